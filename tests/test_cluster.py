"""open_client on a real scheduler, a LocalCluster and bad input; GDAL/AWS settings reach the workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pixels_xr.cluster import (
    WORKER_DEFAULTS,
    EnvironmentPlugin,
    local_cluster_size,
    max_local_workers,
    open_client,
    parse_memory_limit,
    worker_environment,
)
from pixels_xr.config import ClusterOptions
from pixels_xr.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_address_client_forwards_environment_and_leaves_scheduler_running(dask_scheduler, monkeypatch,
                                                                           capsys) -> None:
    monkeypatch.setenv("GDAL_CACHEMAX", "321")
    monkeypatch.setenv("AWS_REQUEST_PAYER", "requester")
    with open_client(dask_scheduler.address) as client:
        seen = client.run(lambda: (os.environ.get("GDAL_CACHEMAX"), os.environ.get("AWS_REQUEST_PAYER")))
        assert len(seen) == 2 and set(seen.values()) == {("321", "requester")}
    assert "Dask dashboard:" in capsys.readouterr().err
    with open_client(dask_scheduler.address, quiet=True) as client:  # the scheduler was not closed
        assert client.submit(lambda x: x * 2, 21).result() == 42


def test_local_cluster_is_sized_and_closed(monkeypatch) -> None:
    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    with open_client("local", {"workers": 1, "threads_per_worker": 1}, quiet=True) as client:
        assert list(client.nthreads().values()) == [1]
        # GDAL's block cache is bounded by default; a task's kernels use one thread per dask thread
        assert list(client.run(lambda: os.environ.get("GDAL_CACHEMAX")).values()) == \
            [WORKER_DEFAULTS["GDAL_CACHEMAX"]]
        assert client.submit(_kernel_threads_in_task).result() == (1, 1)
        cluster = client.cluster
    assert cluster.status.name == "closed"
    workers, threads, memory = local_cluster_size(ClusterOptions())
    assert workers * threads >= (os.cpu_count() or 1) // 2 and memory > 2**28


def _kernel_threads_in_task() -> tuple[int, int]:
    import numba

    from pixels_xr.reducers import _kernel_threads

    return _kernel_threads(), numba.get_num_threads()


def test_worker_defaults_never_override_a_workers_own_setting(dask_scheduler) -> None:
    with open_client(dask_scheduler.address, quiet=True) as client:
        client.run(lambda: os.environ.__setitem__("PIXELS_XR_TEST_OWN", "worker"))
        client.register_plugin(EnvironmentPlugin({"PIXELS_XR_TEST_SET": "client"},
                                                 {"PIXELS_XR_TEST_OWN": "default", "PIXELS_XR_TEST_SET": "x",
                                                  "PIXELS_XR_TEST_NEW": "default"}), name="test-defaults")
        seen = client.run(lambda: tuple(os.environ.get(f"PIXELS_XR_TEST_{k}") for k in ("OWN", "SET", "NEW")))
        assert set(seen.values()) == {("worker", "client", "default")}
        client.run(lambda: [os.environ.pop(f"PIXELS_XR_TEST_{k}", None) for k in ("OWN", "SET", "NEW")])


@pytest.mark.parametrize("spec, options, where", [
    ("nowhere", None, "cluster"),
    ("local", {"wokers": 2}, "cluster.wokers"),
    ("tcp://127.0.0.1:9", None, "cluster"),
])
def test_bad_cluster_input_names_the_field(spec, options, where) -> None:
    with pytest.raises(ConfigError) as err:
        with open_client(spec, options, quiet=True):
            pass
    assert err.value.where == where and "\n" not in str(err.value)


def test_environment_fallbacks(monkeypatch) -> None:
    monkeypatch.setenv("PIXELS_XR_WORKERS", "two")
    with pytest.raises(ConfigError, match="PIXELS_XR_WORKERS"):
        with open_client("local", quiet=True):
            pass
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "9")
    assert worker_environment()["GDAL_HTTP_MAX_RETRY"] == "9"  # the client's own settings win


# ------------------------------------------------------------------- sizes checked before anything starts


@pytest.mark.parametrize("options, where, needle", [
    (ClusterOptions().model_copy(update={"workers": -1}), "cluster.workers", "at least 1"),  # hung
    (ClusterOptions().model_copy(update={"workers": 0}), "cluster.workers", "at least 1"),
    (ClusterOptions().model_copy(update={"workers": 100000}), "cluster.workers", "at most"),  # hung
    (ClusterOptions().model_copy(update={"threads_per_worker": 0}), "cluster.threads_per_worker", "≥ 1"),
    ({"memory_limit": "lots"}, "cluster.memory_limit", "not a memory size"),  # dask's ValueError
    ({"memory_limit": "-1GB"}, "cluster.memory_limit", "at least"),
    ({"memory_limit": "1e400"}, "cluster.memory_limit", "not a memory size"),
    ({"memory_limit": "10 kB"}, "cluster.memory_limit", "at least"),
    ({"adapt_min": 5, "adapt_max": 2}, "cluster.adapt_min", "above adapt_max"),
])
def test_bad_sizes_are_refused_before_a_cluster_starts(options, where, needle) -> None:
    with pytest.raises(ConfigError) as err:
        with open_client("local", options, quiet=True):
            pytest.fail("a cluster started")
    assert err.value.where == where and needle in str(err.value), str(err.value)


def test_memory_limit_forms() -> None:
    assert parse_memory_limit(None) is None
    assert parse_memory_limit("auto") == "auto"
    assert parse_memory_limit("0.5") == 0.5 and parse_memory_limit(0.25) == 0.25
    assert parse_memory_limit("2GiB") == 2 * 2**30 and parse_memory_limit("4 GB") == 4 * 10**9
    assert parse_memory_limit(4e9) == 4 * 10**9
    assert max_local_workers() == min(256, 4 * (os.cpu_count() or 1))


def test_workers_from_the_environment_must_be_positive(monkeypatch) -> None:
    monkeypatch.setenv("PIXELS_XR_WORKERS", "0")
    with pytest.raises(ConfigError, match="PIXELS_XR_WORKERS"):
        with open_client("local", quiet=True):
            pass


def test_local_workers_never_see_sigint_restarts_included() -> None:
    """Ctrl-C reaches the whole process group; the workers must leave it to the client (which closes them)."""
    with open_client("local", {"workers": 1, "threads_per_worker": 1}, quiet=True) as client:
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the client's own mask is back
        blocked = client.run(lambda: signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
        assert list(blocked.values()) == [True]
        client.restart()  # the nanny starts a new worker process
        blocked = client.run(lambda: signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
        assert list(blocked.values()) == [True]


# ------------------------------------------------------- a script without `if __name__ == "__main__":`

UNGUARDED = """
import pixels_xr as px
from shapely.geometry import box

config = px.load_config({CONFIG!r})
features = [px.Feature("a", box(-9.0, 38.7, -8.99, 38.71))]
report = px.run_batch(config, features, {OUT!r}, cluster="local", progress=False)
print("finished", report.ok)
"""

CALLED_FROM_TOP = """
from pixels_xr.cluster import open_client


def main():
    with open_client("local", {{"workers": 1, "threads_per_worker": 1}}, quiet=True) as client:
        print("answer", client.submit(sum, [40, 2]).result())


main()
"""

GUARDED = CALLED_FROM_TOP.replace("\nmain()\n", '\nif __name__ == "__main__":\n    main()\n')


def _run_script(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    script = tmp_path / "user_script.py"
    script.write_text(text.format(CONFIG=str(REPO / "configs" / "sample_monthly_composite.json"),
                                  OUT=str(tmp_path / "out.zarr")))
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("text", [UNGUARDED, CALLED_FROM_TOP], ids=["run_batch-at-top-level", "main()-unguarded"])
def test_a_script_without_main_guard_gets_one_clear_error(tmp_path, text) -> None:
    proc = _run_script(tmp_path, text)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Nanny failed" not in proc.stderr and "bootstrapping phase" not in proc.stderr, proc.stderr
    assert proc.stderr.count("Traceback") == 1, proc.stderr  # the script's own uncaught error, nothing from workers
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pixels_xr.errors.PixelsError: {tmp_path / 'user_script.py'}: line "), last
    assert 'put the code that runs the batch under `if __name__ == "__main__":`' in last, last
    assert "finished" not in proc.stdout and "answer" not in proc.stdout


def test_the_same_script_with_the_guard_runs(tmp_path) -> None:
    proc = _run_script(tmp_path, GUARDED)
    assert proc.returncode == 0, proc.stderr
    assert "answer 42" in proc.stdout
