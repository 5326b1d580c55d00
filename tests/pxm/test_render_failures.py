"""Sources that break a render, on a real S3 endpoint (moto_server) with real GeoTIFFs written by rasterio:
truncated files (issues 14.6, 15.8, 15.13), huge declared sizes (15.6), a VRT under a .tif name (15.10),
errors crossing real Dask worker processes, and Ctrl-C on ``pixels-xr pxm render`` (15.3)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mercantile
import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.shutil import copy as gdal_copy
from render_helpers import manifest, mbtiles
from typer.testing import CliRunner

from pixels_xr.errors import SourceError
from pixels_xr.pxm import MAX_PIXELS, UnreadableSources, check_sources, gdal_path, open_source, render
from pixels_xr.pxm.cli import MAX_PIXELS as CLI_MAX_PIXELS
from pixels_xr.pxm.cli import pxm_app

pytestmark = pytest.mark.timeout(600)
BUCKET = "pxm-failures"


def _write(path: Path, data: np.ndarray | None, profile: dict, overviews: bool = False) -> Path:
    with rasterio.open(path, "w", **profile) as ds:
        if data is not None:
            ds.write(data)
    if overviews:  # added afterwards, as gdaladdo does: the overviews are the last thing in the file
        with rasterio.open(path, "r+") as ds:
            ds.build_overviews([2, 4], Resampling.average)
    return path


def _truncate(src: Path, dst: Path, keep: float) -> Path:
    shutil.copy(src, dst)
    with open(dst, "r+b") as f:
        f.truncate(int(src.stat().st_size * keep))
    return dst


@pytest.fixture(scope="module")
def files(s3_server, shared_data: Path, tmp_path_factory) -> dict[str, str]:
    """Real GeoTIFFs made here from the real Landsat RGB image; {name: s3 uri}."""
    tmp = tmp_path_factory.mktemp("failures")
    with rasterio.open(shared_data / "rgb" / "rasterio_RGB.byte.tif") as ds:
        data, profile = ds.read(), ds.profile
    profile.update(tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    good = _write(tmp / "good.tif", data, profile)
    ovr = _write(tmp / "ovr.tif", data, profile, overviews=True)
    made = {
        "good": good,
        "truncated": _truncate(good, tmp / "truncated.tif", 0.6),
        "truncated_overview": _truncate(ovr, tmp / "truncated_overview.tif", 0.97),
        # a 720 KB sparse GeoTIFF declaring 10^6 x 10^6 pixels
        "huge": _write(tmp / "huge.tif", None, dict(
            driver="GTiff", width=10**6, height=10**6, count=3, dtype="uint8", crs="EPSG:32618",
            transform=rasterio.transform.from_origin(500000, 4500000, 0.1, 0.1), tiled=True, blockxsize=4096,
            blockysize=4096, SPARSE_OK=True, BIGTIFF="YES", compress="deflate")),
    }
    # a VRT named .tif, pointing at a local file GDAL would otherwise read on every worker
    secret = _write(tmp / "local_only.tif", data, profile)
    gdal_copy(str(secret), str(tmp / "evil.tif"), driver="VRT")
    made["vrt"] = tmp / "evil.tif"
    assert b"local_only.tif" in made["vrt"].read_bytes()
    return {name: s3_server.upload(path, BUCKET, f"f/{name}.tif") for name, path in made.items()}


@pytest.fixture(scope="module")
def client(files):
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as c:
        yield c


def _manifest_file(tmp_path: Path, *uris: str) -> Path:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"version": "0.5.1", "sources": list(uris), "info": {
        "tilesets": ["acme.fail"], "license": "CC0", "notes": "", "account": "acme", "product": "p",
        "date": "2020"}}))
    return path


def _errors(findings) -> list[str]:
    return [f.message for f in findings if f.level == "error"]


# ------------------------------------------------------------------------------------ --check-sources


def test_check_sources_reads_data_and_catches_truncation(files) -> None:
    """15.8: a truncated file opens fine; its last blocks (full resolution or an overview) do not read."""
    assert _errors(check_sources(manifest(files["good"]))) == []
    errs = _errors(check_sources(manifest(files["truncated"])))
    assert len(errs) == 1 and errs[0].startswith("cannot read data at full resolution (truncated or corrupt")
    assert "TIFFReadEncodedTile" in errs[0] or "TIFFFillTile" in errs[0]
    errs = _errors(check_sources(manifest(files["truncated_overview"])))
    assert len(errs) == 1 and errs[0].startswith("cannot read data at overview 2 of 2")
    with open_source(files["truncated_overview"]) as src:
        src.read()  # the full-resolution data is intact: only reading every level catches this file


def test_cli_check_sources_truncated_is_one_line(files, tmp_path: Path) -> None:
    res = CliRunner().invoke(pxm_app, ["validate", str(_manifest_file(tmp_path, files["good"], files["truncated"])),
                                       "--check-sources"])
    assert res.exit_code == 1, res.output
    assert f"error: sources[1] {files['truncated']}: cannot read data at full resolution" in res.output
    assert "sources[0]" not in res.output and "Traceback" not in res.output


@pytest.mark.timeout(60)  # it ran for minutes at 1.5 GB
def test_huge_declared_size_fails_fast_naming_the_source(files, tmp_path: Path) -> None:
    """15.6: width x height is capped (2^31 by default) at the open, in --check-sources and render alike."""
    assert MAX_PIXELS == CLI_MAX_PIXELS == 2**31
    with pytest.raises(SourceError, match="declares 1000000 x 1000000 px = 1,000,000,000,000 pixels, more than"
                                          " the limit of 2,147,483,648") as err:
        open_source(files["huge"])
    assert err.value.where == files["huge"]
    with open_source(files["huge"], max_pixels=None) as src:  # the limit is an option
        assert src.width == 10**6
    path = _manifest_file(tmp_path, files["huge"])
    res = CliRunner().invoke(pxm_app, ["validate", str(path), "--check-sources"])
    assert res.exit_code == 1 and f"error: sources[0] {files['huge']}: declares 1000000 x 1000000 px" in res.output
    res = CliRunner().invoke(pxm_app, ["render", str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        f"error: {files['huge']}: declares 1000000 x 1000000 px = 1,000,000,000,000 pixels, more than the limit"
        " of 2,147,483,648 (max_pixels / --max-pixels)"]
    small = _manifest_file(tmp_path, files["good"])  # a lower limit from the command line
    for cmd in (["validate", str(small), "--check-sources"], ["render", str(small), "--out", str(tmp_path / "o")]):
        res = CliRunner().invoke(pxm_app, [*cmd, "--max-pixels", "1000"])
        assert res.exit_code == 1 and "declares 791 x 718 px = 567,938 pixels, more than the limit of 1,000" \
            in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_vrt_named_tif_is_refused_by_check_and_render(files, tmp_path: Path) -> None:
    """15.10: both paths open sources with the GTiff/JP2OpenJPEG drivers only, through one helper."""
    message = ("cannot open: not a GeoTIFF or JPEG 2000 file (sources are opened with the GDAL drivers GTiff,"
               " JP2OpenJPEG only)")
    assert _errors(check_sources(manifest(files["vrt"]))) == [message]
    with pytest.raises(SourceError) as err:
        render(manifest(files["vrt"]), tmp_path, tile_format="png", minzoom=9)
    assert (err.value.where, err.value.message) == (files["vrt"], message)
    assert not list(tmp_path.iterdir())
    with rasterio.open(gdal_path(files["vrt"])) as ds:  # GDAL alone would read it
        assert ds.driver == "VRT"


# ------------------------------------------------------------------------------------------- render


def test_render_carries_on_and_names_every_unreadable_source(client, files, tmp_path: Path) -> None:
    """14.6: the truncated source is reported with the report; good blocks are kept; nothing is written."""
    m = manifest(files["truncated"], files["good"], files["truncated_overview"])  # first wins: it is read
    with pytest.raises(UnreadableSources) as err:
        render(m, tmp_path, tile_format="png", minzoom=7, maxzoom=11, client=client)
    exc = err.value
    assert set(exc.failures) == {files["truncated"]}  # overview 2 is never read at zooms >= 7 here
    assert exc.failures[files["truncated"]].startswith("cannot read: ")
    assert exc.where == files["truncated"] and isinstance(exc, SourceError)
    report = exc.report
    assert report is not None and not report.complete and report.failed_sources == exc.failures
    assert 0 < report.failed_tasks < report.tasks
    assert str(report).startswith("no tileset written: 1 source(s) unreadable;")
    assert not (tmp_path / "acme.test.mbtiles").exists()
    stores = list(tmp_path.glob(".pxm-render-*/store.sqlite"))
    assert len(stores) == 1 and report.work == stores[0].parent
    with sqlite3.connect(stores[0]) as db:
        assert db.execute("SELECT count(*) FROM done").fetchone()[0] == report.tasks - report.failed_tasks
    fine = render(manifest(files["good"]), tmp_path / "ok", tile_format="png", minzoom=7, client=client)
    assert fine.complete and mbtiles(tmp_path / "ok" / "acme.test.mbtiles")


def test_unopenable_sources_are_all_named_before_rendering(files, tmp_path: Path) -> None:
    with pytest.raises(UnreadableSources) as err:
        render(manifest(files["good"], files["vrt"], files["huge"]), tmp_path, tile_format="png")
    assert list(err.value.failures) == [files["vrt"], files["huge"]] and err.value.report is None
    assert err.value.message.endswith("(and 1 more unreadable source(s))")
    assert not list(tmp_path.iterdir())


def test_errors_survive_pickling_with_their_where(files) -> None:
    """What a worker sends back: our errors round-trip (tblib included) with ``where`` and no GDAL chain."""
    from distributed.protocol.pickle import dumps, loads

    from pixels_xr.pxm.renderer import leaf_task
    from pixels_xr.pxm.warp import describe_source

    spec = describe_source(files["truncated"], None, ())
    corner = mercantile.tile(*mercantile.lnglat(spec.bounds[2] - 1, spec.bounds[1] + 1), 9)  # the lost rows
    tiles, top, failures = leaf_task((spec,), 9, corner.x // 8, corner.y // 8, 8, 256, Resampling.nearest,
                                     "png", 5)
    assert (tiles, top) == ([], None) and [uri for uri, _ in failures] == [files["truncated"]]
    with open_source(files["truncated"]) as src:
        try:
            src.read()
        except SourceError as e:
            caught = e
    assert caught.__cause__ is None and caught.__context__ is None
    for err in (caught, UnreadableSources({"s3://a/b.tif": "cannot read: x", "s3://a/c.tif": "y"})):
        back = loads(dumps(err))
        assert (type(back), str(back), back.where, back.message) == (type(err), str(err), err.where, err.message)
    assert pickle.loads(pickle.dumps(err)).failures == err.failures


def test_truncated_source_on_real_worker_processes_is_one_line_per_source(dask_scheduler, files,
                                                                          tmp_path: Path) -> None:
    """14.6 / 15.13: it was a bare ``Exception: SourceError(...)`` traceback (the GDAL cause chained to our
    error did not unpickle on the client)."""
    path = _manifest_file(tmp_path, files["good"], files["truncated"])
    res = CliRunner().invoke(pxm_app, ["render", str(path), "--out", str(tmp_path / "out"), "--minzoom", "8",
                                       "--cluster", dask_scheduler.address])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "Exception:" not in res.output
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 2, res.output
    assert errors[0].startswith(f"error: {files['truncated']}: cannot read: ")
    assert errors[1].startswith("error: no tileset written: 1 source(s) unreadable;")
    assert not (tmp_path / "out" / "acme.fail.mbtiles").exists()


# ------------------------------------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("cluster", ["threads", "local"])
def test_ctrl_c_stops_the_render_in_seconds_without_tracebacks(files, tmp_path: Path, cluster: str) -> None:
    """15.3: SIGINT to the process group (what a terminal sends) while threads or a local cluster render."""
    from servers import child_env

    path = _manifest_file(tmp_path, files["good"])
    out = tmp_path / "out"
    exe = Path(sys.executable).with_name("pixels-xr")
    proc = subprocess.Popen([str(exe), "pxm", "render", str(path), "--out", str(out), "--workers", "1",
                             "--cluster", cluster, "--minzoom", "13", "--maxzoom", "13"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=child_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        done = 0
        while time.monotonic() < deadline and proc.poll() is None and not done:
            for store in out.glob(".pxm-render-*/store.sqlite"):
                try:
                    with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=1) as db:
                        done = db.execute("SELECT count(*) FROM done").fetchone()[0]
                except sqlite3.Error:
                    pass
            time.sleep(0.2)
        assert done and proc.poll() is None, "the render never got going"
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        _, stderr = proc.communicate(timeout=20)
        assert time.monotonic() - t0 < 20
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "interrupted: outputs are complete or absent" in stderr
    assert sorted(p.name for p in out.iterdir()) == [next(out.glob(".pxm-render-*")).name]  # no output, no temp
