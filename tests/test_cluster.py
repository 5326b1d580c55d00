"""open_client on a real scheduler, a LocalCluster and bad input; GDAL/AWS settings reach the workers."""

from __future__ import annotations

import os

import pytest

from pixels_xr.cluster import (WORKER_DEFAULTS, EnvironmentPlugin, local_cluster_size, open_client,
                               worker_environment)
from pixels_xr.config import ClusterOptions
from pixels_xr.errors import ConfigError


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
