"""What a run guarantees under concurrency, foreign folders, hostile ids and failing reads (real processes)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from ledger_files import drop_units, recorded_units
from shapely.geometry import box

from pixels_xr.batch import run_batch
from pixels_xr.config import load_config
from pixels_xr.errors import ConfigError, OutputError
from pixels_xr.features import Feature, load_features
from pixels_xr.io.layout import MANIFEST_DIR
from pixels_xr.io.lock import OutputLock

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory):
    from pixels_xr.testing.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("rel") / "sample", n_dates=6, width=256, height=256,
                       every_days=10)


def _config(sample, **kw):
    return load_config({"start": "2021-11-01", "end": "2021-12-31", "mode": "latest_pixel", "interval": "months",
                        "platforms": "SENTINEL_2", "bands": ["red", "nir"], "catalog": str(sample.catalog),
                        "chunksize": 64, **kw})


@pytest.fixture(scope="module")
def client(dask_scheduler):
    from distributed import Client

    with Client(dask_scheduler.address, set_as_default=False) as c:
        yield c


def _arrays(out: str, fid: str) -> dict[str, np.ndarray]:
    ds = xr.open_zarr(out, group=fid, consolidated=False)
    return {k: ds[k].values for k in ds.data_vars}


# ------------------------------------------------------------------------------ one writer per output
def test_second_collect_process_is_refused_and_output_stays_trusted(tmp_path, sample, dask_scheduler) -> None:
    config = tmp_path / "c.json"
    config.write_text(_config(sample).model_dump_json(exclude_none=True))
    out = tmp_path / "run.zarr"
    cmd = [sys.executable, "-m", "pixels_xr.cli", "collect", str(config), "--features", str(sample.features),
           "--out", str(out), "--cluster", dask_scheduler.address, "--window", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / MANIFEST_DIR / "lock.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    # the first run is paused while it holds the lock: it would otherwise finish (a second or so) before the
    # second process has started, and the second would find a finished output instead of a running one
    first.send_signal(signal.SIGSTOP)
    try:
        assert (out / MANIFEST_DIR / "lock.json").exists(), "the first run ended before it could be paused"
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1, second.stdout + second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "another run is writing this output" in lines[0], second.stderr
    assert first.wait(timeout=300) == 0, first.communicate()
    assert not (out / MANIFEST_DIR / "lock.json").exists()  # released
    ref = run_batch(_config(sample), load_features(sample.features), str(tmp_path / "ref.zarr"),
                    cluster=dask_scheduler.address, progress=False)
    assert ref.ok
    for f in load_features(sample.features):
        a, b = _arrays(str(out), f.id), _arrays(str(tmp_path / "ref.zarr"), f.id)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def test_stale_lock_rule(tmp_path) -> None:
    out = str(tmp_path / "o")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_file = tmp_path / "o" / MANIFEST_DIR / "lock.json"
    lock_file.parent.mkdir(parents=True)
    import socket

    lock_file.write_text(json.dumps({"run_id": "x", "host": socket.gethostname(), "pid": int(dead.stdout),
                                     "heartbeat": time.time()}))
    with OutputLock(out, MANIFEST_DIR):  # its holder is gone on this host: broken at once
        holder = json.loads(lock_file.read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(OutputError, match="another run"):
            OutputLock(out, MANIFEST_DIR).acquire()
    assert not lock_file.exists()
    lock_file.write_text(json.dumps({"run_id": "y", "host": "elsewhere", "pid": 1, "heartbeat": time.time()}))
    with pytest.raises(OutputError, match="another run"):
        OutputLock(out, MANIFEST_DIR).acquire()
    lock_file.write_text(json.dumps({"run_id": "y", "host": "elsewhere", "pid": 1,
                                     "heartbeat": time.time() - 3600}))
    with OutputLock(out, MANIFEST_DIR):  # an hour without heartbeat: stale
        pass


def test_lock_on_s3_is_exclusive(s3_server) -> None:
    bucket = s3_server.make_bucket("locks")
    out = f"s3://{bucket}/run.zarr"
    with OutputLock(out, MANIFEST_DIR):
        with pytest.raises(OutputError, match="another run"):
            OutputLock(out, MANIFEST_DIR).acquire()
    with OutputLock(out, MANIFEST_DIR):  # released: free again
        pass


# ------------------------------------------------------------------------------ only our own files
def test_existing_folder_with_user_files_is_refused_untouched(tmp_path, sample) -> None:
    out = tmp_path / "d"
    (out / "field-1").mkdir(parents=True)
    (out / "field-1" / "important.txt").write_text("keep me")
    features = load_features(sample.features)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not a pixels_xr output"):
            run_batch(_config(sample), features, str(out), cluster=None, progress=False, overwrite=overwrite)
    assert (out / "field-1" / "important.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["field-1"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        run_batch(_config(sample), features, str(tmp_path / "file"), cluster=None, progress=False)


def test_symlinked_ledger_and_dot_segments_are_refused(tmp_path, sample) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (out / MANIFEST_DIR).symlink_to(tmp_path / "elsewhere")
    features = load_features(sample.features)[:1]
    with pytest.raises(OutputError, match="symbolic link"):
        run_batch(_config(sample), features, str(out), cluster=None, progress=False)
    assert list((tmp_path / "elsewhere").iterdir()) == []
    with pytest.raises(OutputError, match="segments"):
        run_batch(_config(sample), features, "s3://bucket/a/../b", cluster=None, progress=False)


@pytest.mark.parametrize("bad", ["../../x", "/abs", "a/b", "..", ".hidden"])
def test_api_feature_ids_are_checked_where_they_become_paths(tmp_path, sample, bad) -> None:
    feature = Feature(bad, box(-8.99, 30.44, -8.98, 30.45))
    for fmt in ("zarr", "cog"):
        with pytest.raises(ConfigError, match="not safe"):
            run_batch(_config(sample), [feature], str(tmp_path / "o"), cluster=None, progress=False,
                      output_format=fmt)
    assert not (tmp_path / "o").exists() and not (tmp_path.parent / "x").exists()


def test_overwrite_removes_old_config_groups(tmp_path, sample, client) -> None:
    features = load_features(sample.features)
    out = str(tmp_path / "o.zarr")
    assert run_batch(_config(sample), features[:2], out, client=client, progress=False).ok
    other = _config(sample, bands=["red"])
    report = run_batch(other, features[:1], out, client=client, progress=False, overwrite=True)
    assert report.ok
    with pytest.raises(Exception):  # the old config's group is gone, not left readable beside new ones
        xr.open_zarr(out, group=features[1].id, consolidated=False)
    kept = xr.open_zarr(out, group=features[0].id, consolidated=False)
    assert set(kept.data_vars) == {"red", "clear_count", "source_time"}


# ------------------------------------------------------------------------------ reads that fail mid-run
def test_read_error_after_the_check_is_degraded_then_redone(tmp_path, sample, client) -> None:
    """A COG whose header and first tile are intact but whose other tiles are gone passes the asset check
    and fails the reads: the unit is reported degraded, not recorded, exit status not ok; once the file is
    restored the re-run redoes exactly those units and equals a clean run."""
    root = tmp_path / "sample"
    shutil.copytree(Path(sample.catalog).parent, root)
    catalog = root / Path(sample.catalog).name
    config = load_config({**json.loads(_config(sample).model_dump_json(exclude_none=True)), "catalog": str(catalog)})
    tile = sorted(root.rglob("red.tif"))[0]
    with rasterio.open(tile) as src:
        bounds, crs = src.bounds, src.crs
    feature = Feature("tile", box(*bounds), crs=str(crs))
    clean = run_batch(config, [feature], str(tmp_path / "clean.zarr"), client=client, progress=False)
    assert clean.ok
    backup = tmp_path / "red.tif.bak"
    shutil.copy(tile, backup)
    data = tile.read_bytes()
    tile.write_bytes(data[: int(len(data) * 0.55)])
    from pixels_xr.catalog import search
    from pixels_xr.cube import check_assets

    assert check_assets(search(config, feature), config)[1] == []  # the check cannot see it
    out = str(tmp_path / "run.zarr")
    report = run_batch(config, [feature], out, client=client, progress=False)
    result = report.features[0]
    assert not report.ok and result.status == "degraded", report.to_dict()
    assert result.read_problems and all(p["href"] == str(tile) for p in result.read_problems)
    assert "degraded by read errors" in report.summary()
    units = Path(out, MANIFEST_DIR, "units", "tile")
    assert [p.name for p in units.iterdir()] == ["_template.json"]  # nothing recorded done
    shutil.copy(backup, tile)
    again = run_batch(config, [feature], out, client=client, progress=False)
    assert again.ok and again.units_written == 2, again.to_dict()
    a, b = _arrays(out, "tile"), _arrays(str(tmp_path / "clean.zarr"), "tile")
    assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def test_errors_pickle_by_their_arguments_and_never_echo_megabytes() -> None:
    import pickle

    from pixels_xr import errors

    for cls in (errors.PixelsError, errors.ConfigError, errors.CatalogError, errors.AssetReadError,
                errors.OutputError, errors.ManifestError, errors.SourceError, errors.ModelError):
        err = cls("bad value", "field.x")
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is cls and (back.message, back.where, str(back)) == ("bad value", "field.x",
                                                                               "field.x: bad value")
    huge = errors.CatalogError("local catalog not found", "x" * 10_000_000)
    assert len(str(huge)) < 400


def test_full_disk_leaves_no_temporary_files(tmp_path) -> None:
    """A real full file system (a 64 KiB tmpfs in a private mount namespace): the write fails in one line
    and neither a partial file nor a zero-byte temporary is left."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not available")
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = ("from pixels_xr.io import storage\n"
              "from pixels_xr.errors import OutputError\n"
              f"storage.write_bytes({str(mnt / 'ok.json')!r}, b'x' * 1000)\n"
              "try:\n"
              f"    storage.write_bytes({str(mnt / 'big.json')!r}, b'x' * 200_000)\n"
              "except OutputError as exc:\n"
              "    print('refused:', exc)\n"
              "import os\n"
              f"print(sorted(os.listdir({str(mnt)!r})))\n")
    run = subprocess.run(["unshare", "-m", "sh", "-c",
                          f"mount -t tmpfs -o size=64k tmpfs {mnt} && {sys.executable} -c \"$0\"", script],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    if "mount:" in run.stderr or "unshare:" in run.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    assert "refused:" in run.stdout and "No space left" in run.stdout
    assert run.stdout.strip().splitlines()[-1] == "['ok.json']", run.stdout


def test_finished_output_on_read_only_storage_reruns_as_a_no_op(tmp_path, sample) -> None:
    """A real read-only bind mount (private mount namespace): the finished output re-runs as a no-op (exit
    0, nothing written); an unfinished one is refused in one line per feature, exit 1."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not available")
    config = tmp_path / "c.json"
    config.write_text(_config(sample).model_dump_json(exclude_none=True))
    out = tmp_path / "run.zarr"
    cmd = [sys.executable, "-m", "pixels_xr.cli", "collect", str(config), "--features", str(sample.features),
           "--out", str(out), "--quiet", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300).returncode == 0
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    readonly = f"mount --bind {out} {out} && mount -o remount,ro,bind {out} && exec \"$@\""
    run = subprocess.run(["unshare", "-m", "sh", "-c", readonly, "sh", *cmd], env=env, capture_output=True,
                         text=True, timeout=300)
    if "mount:" in run.stderr or "unshare:" in run.stderr:
        pytest.skip(f"cannot make a read-only mount here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 units written" in run.stdout and "already complete" in run.stdout
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    drop_units(out, [u for u in recorded_units(out) if u[1].startswith("2021-12-")][:1])  # one unit missing now
    run = subprocess.run(["unshare", "-m", "sh", "-c", readonly, "sh", *cmd], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1 and "storage is read-only" in run.stderr, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
