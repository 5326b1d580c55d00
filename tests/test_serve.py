"""``pixels-xr serve``: the server over HTTP (Range, traversal, loopback) and the map in a headless Chromium.

The run outputs come from the synthetic sample (a Zarr store and a COG folder of the same run, on the
session's Dask cluster); the tilesets from ``pxm render`` (the command line) of an 8-bit RGB image made
from the sample with an orange block of known colour, uploaded to the session's S3 (moto). The browser
tests share one Chromium session (``browser``) and never skip: CI installs Chromium (``.ci/run``).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import stackstac  # noqa: F401  (imported before run_batch's threads: its first import races, see the note)
from PIL import Image
from pyproj import Transformer
from typer.testing import CliRunner

import pixels_xr as px
from pixels_xr.cli import app
from pixels_xr.plot import to_rgb
from pixels_xr.serve import MapServer
from pixels_xr.serve.app import STATIC
from pixels_xr.testing.sample import make_sample

REPO = Path(__file__).resolve().parents[1]
ORANGE = (255, 128, 0)
BLOCK = (slice(12, 44), slice(12, 44))  # rows, cols of the orange block in the tileset's source image
TILESET = "acme.sample"
SCREENSHOT = os.environ.get("PIXELS_XR_SCREENSHOT")  # docs/serve.png regenerates the README's picture


# ------------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory):
    return make_sample(tmp_path_factory.mktemp("sample"), n_dates=8, width=96, height=96)


@pytest.fixture(scope="module")
def cluster_client(dask_scheduler):
    from distributed import Client

    with Client(dask_scheduler.address, set_as_default=False) as client:
        yield client


@pytest.fixture(scope="module")
def runs(sample, cluster_client, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same latest-pixel run (3 monthly bins, 3 fields) written as a Zarr store and as COGs."""
    base = json.loads((REPO / "configs" / "sample_monthly_latest_pixel.json").read_text())
    config = px.load_config({**base, "catalog": str(sample.catalog), "end": "2022-01-31"})
    features = px.load_features(sample.features)[:3]  # field-2 and its neighbours: enough to mosaic
    out = tmp_path_factory.mktemp("runs")
    paths = {"zarr": out / "run.zarr", "cog": out / "run-cog"}
    for fmt, path in paths.items():
        report = px.run_batch(config, features, str(path), client=cluster_client, output_format=fmt,
                              progress=False)
        assert report.ok, report.summary()
    return paths


@pytest.fixture(scope="module")
def tilesets(sample, s3_server, dask_scheduler, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pxm render`` of one 8-bit RGB image as PMTiles, MBTiles and an XYZ folder side by side."""
    work = tmp_path_factory.mktemp("tiles")
    item = next((sample.root / "29RMP").iterdir())
    bands = []
    for band in ("red", "green", "blue"):
        with rasterio.open(item / f"{band}.tif") as src:
            profile = src.profile
            bands.append(src.read(1).astype(np.float64))
    stack = np.stack(bands)
    rgb = np.clip(stack / max(1.0, np.percentile(stack, 98)) * 255, 1, 254).astype(np.uint8)
    for k, value in enumerate(ORANGE):
        rgb[(k, *BLOCK)] = value
    image = work / "sample_rgb.tif"
    profile.update(count=3, dtype="uint8", nodata=None, photometric="RGB", compress="deflate")
    with rasterio.open(image, "w", **profile) as dst:
        dst.write(rgb)
    uri = s3_server.upload(image, "serve-tiles", "sample/sample_rgb.tif")
    manifest = work / "manifest.json"
    manifest.write_text(json.dumps({"version": "0.5.1", "sources": [uri], "info": {
        "tilesets": [TILESET], "license": "CC-BY-4.0 synthetic", "notes": "serve tests", "account": "acme",
        "product": "sample", "date": "2022-01-01"}}))
    out = work / "out"
    for fmt in ("pmtiles", "mbtiles", "xyz"):
        result = CliRunner().invoke(app, ["pxm", "render", str(manifest), "--out", str(out), "--format", fmt,
                                          "--tile-format", "png", "--cluster", dask_scheduler.address])
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        TILESET, f"{TILESET}.mbtiles", f"{TILESET}.pmtiles"]
    return out


def block_lonlat(tilesets: Path) -> tuple[float, float]:
    """lon/lat of the centre of the orange block."""
    with rasterio.open(tilesets.parent / "sample_rgb.tif") as src:
        x, y = src.transform @ ((BLOCK[1].start + BLOCK[1].stop) / 2, (BLOCK[0].start + BLOCK[0].stop) / 2)
        return Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True).transform(x, y)


# ------------------------------------------------------------------------------------------------ HTTP
def request(server: MapServer, path: str, headers: dict[str, str] | None = None,
            method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """Send ``path`` exactly as given (no client-side normalisation of ``..``)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_range_requests_are_answered_206_and_416(tilesets: Path) -> None:
    archive = tilesets / f"{TILESET}.pmtiles"
    data = archive.read_bytes()
    path = f"/files/{TILESET}.pmtiles"
    with MapServer(tilesets) as server:
        status, headers, body = request(server, path)
        assert status == 200 and body == data and headers["accept-ranges"] == "bytes"
        status, headers, body = request(server, path, {"Range": "bytes=0-126"})  # the PMTiles header
        assert status == 206 and body == data[:127] and headers["content-range"] == f"bytes 0-126/{len(data)}"
        status, headers, body = request(server, path, {"Range": "bytes=-10"})
        assert status == 206 and body == data[-10:]
        status, headers, body = request(server, path, {"Range": f"bytes={len(data) - 5}-"})
        assert status == 206 and body == data[-5:]
        status, headers, body = request(server, path, {"Range": "bytes=0-1,10-11"})
        assert status == 206 and headers["content-type"].startswith("multipart/byteranges")
        assert data[:2] in body and data[10:12] in body
        status, headers, _ = request(server, path, {"Range": f"bytes={len(data)}-{len(data) + 10}"})
        assert status == 416 and headers["content-range"] == f"bytes */{len(data)}"
        status, headers, body = request(server, path, {"Range": "bytes=0-9"}, method="HEAD")
        assert status in (200, 206) and body == b""


def test_only_files_under_path_are_served(tilesets: Path, tmp_path: Path) -> None:
    secret = tilesets.parent / "secret.txt"
    secret.write_text("not for the map")
    (tilesets / "link.txt").symlink_to(secret)  # a link inside PATH to a file outside it
    with MapServer(tilesets) as server:
        assert request(server, f"/files/{TILESET}.mbtiles")[0] == 200
        for path in ("/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files/..%2fsecret.txt",
                     "/files/%2E%2E%2Fsecret.txt", f"/files/{TILESET}/../../secret.txt", "/files//etc/passwd",
                     "/files/%2Fetc%2Fpasswd", "/files/link.txt", "/files/", "/files/nothing.here",
                     "/static/../app.py", "/static/%2e%2e/app.py"):
            status, _, body = request(server, path)
            assert status == 404 and b"not for the map" not in body and b"root:" not in body, path
    with MapServer(tilesets / f"{TILESET}.pmtiles") as server:  # PATH a file: that file only
        assert request(server, f"/files/{TILESET}.pmtiles", {"Range": "bytes=0-6"})[2] == b"PMTiles"
        assert request(server, f"/files/{TILESET}.mbtiles")[0] == 404
        assert [t["id"] for t in json.loads(request(server, "/api/layers")[2])["tilesets"]] == [
            f"{TILESET}.pmtiles"]


def test_loopback_only_by_default(tilesets: Path) -> None:
    with MapServer(tilesets) as server:
        assert server._server.servers[0].sockets[0].getsockname()[0] == "127.0.0.1"
        assert request(server, "/api/layers", {"Host": f"localhost:{server.port}"})[0] == 200
        for host in ("attacker.example", "attacker.example:80", "127.0.0.1.attacker.example"):  # DNS rebinding
            status, _, body = request(server, "/api/layers", {"Host": host})
            assert status == 400 and b"tilesets" not in body, host


def test_tileset_tiles_are_the_stored_tiles(tilesets: Path) -> None:
    import sqlite3

    with sqlite3.connect(tilesets / f"{TILESET}.mbtiles") as db:
        z, x, row, data = db.execute("SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles "
                                     "ORDER BY zoom_level DESC LIMIT 1").fetchone()
    y = (1 << z) - 1 - row
    with MapServer(tilesets) as server:
        for tileset in (f"{TILESET}.mbtiles", TILESET):
            status, headers, body = request(server, f"/tiles/{tileset}/{z}/{x}/{y}")
            assert status == 200 and headers["content-type"] == "image/png" and body == bytes(data), tileset
        assert request(server, f"/tiles/{TILESET}.mbtiles/{z}/0/0")[0] == 204  # not held: empty
        assert request(server, f"/tiles/{TILESET}.pmtiles/{z}/{x}/{y}")[0] == 404  # read by the page itself
        assert request(server, f"/tiles/nothing/{z}/{x}/{y}")[0] == 404


def test_run_tiles_are_the_stretch_of_the_values_for_zarr_and_cog(runs: dict[str, Path]) -> None:
    """A tile's pixel is the run-wide stretch of its value (the quicklook's ``to_rgb``), Zarr = COG."""
    import mercantile

    ds = px.open_feature(str(runs["zarr"]), "field-2").compute()
    rgba = None
    with MapServer(runs["zarr"]) as zarr_server, MapServer(runs["cog"]) as cog_server:
        info = json.loads(request(zarr_server, "/api/layers")[2])["run"]
        assert info == json.loads(request(cog_server, "/api/layers")[2])["run"] | {"path": "run.zarr",
                                                                                   "kind": "zarr"}
        assert info["bins"] == ["2021-11-01/2021-11-30", "2021-12-01/2021-12-31", "2022-01-01/2022-01-31"]
        assert info["layers"] == ["rgb", "clear_count", "source_time"]
        limits = {b: tuple(v) for b, v in info["stretch"].items()}
        expected = np.round(to_rgb(ds, limits=limits) * 255).astype(np.uint8)  # (time, y, x, 4)
        row, col = ds.sizes["y"] // 2, ds.sizes["x"] // 2
        k = int(np.argmax(expected[:, row, col, 3]))  # a bin where the pixel has data
        lon, lat = Transformer.from_crs(ds.rio.crs, "EPSG:4326", always_xy=True).transform(
            float(ds.x[col]), float(ds.y[row]))
        z = info["maxzoom"]
        t = mercantile.tile(lon, lat, z)
        for layer in ("rgb", "clear_count", "source_time"):
            path = f"/run/{layer}/{k}/{z}/{t.x}/{t.y}.png"
            status, headers, body = request(zarr_server, path)
            assert status == 200 and headers["content-type"] == "image/png", layer
            assert request(cog_server, path)[2] == body, f"{layer}: the COG output draws differently"
            if layer == "rgb":
                rgba = np.asarray(Image.open(io.BytesIO(body)).convert("RGBA"))
        assert request(zarr_server, f"/run/rgb/{k}/{z}/0/0.png")[0] == 204
        assert request(zarr_server, f"/run/nope/{k}/{z}/{t.x}/{t.y}.png")[0] == 404
        assert request(zarr_server, f"/run/rgb/99/{z}/{t.x}/{t.y}.png")[0] == 404
        pixel = json.loads(request(zarr_server, f"/run/pixel?lon={lon}&lat={lat}")[2])
        assert request(zarr_server, "/run/pixel?lon=0&lat=0")[0] == 404
    west, south, east, north = mercantile.xy_bounds(t)
    mx, my = mercantile.xy(lon, lat)
    i, j = int((north - my) / (north - south) * 256), int((mx - west) / (east - west) * 256)
    assert tuple(rgba[i, j]) == tuple(expected[k, row, col])
    assert (pixel["feature"], pixel["row"], pixel["col"]) == ("field-2", row, col)
    assert pixel["series"]["red"] == [None if np.isnan(v) else pytest.approx(float(v)) for v in
                                      ds.red.values[:, row, col]]
    assert pixel["series"]["clear_count"] == [int(v) for v in ds.clear_count.values[:, row, col]]


def test_cli_serve_prints_the_url_and_stops_on_ctrl_c(tilesets: Path, tmp_path: Path) -> None:
    for path in (tilesets / "missing", tmp_path):  # nothing there; a folder with nothing to show
        bad = CliRunner().invoke(app, ["serve", str(path)])
        assert bad.exit_code == 1 and bad.output.startswith(f"error: {path}: ") and bad.output.count("\n") == 1
    with MapServer(tilesets) as busy:  # a port in use: one line too
        taken = CliRunner().invoke(app, ["serve", str(tilesets), "--port", str(busy.port)])
        assert taken.exit_code == 1 and taken.output.startswith("error: --port: cannot listen on 127.0.0.1:")
        assert taken.output.count("\n") == 1
    proc = subprocess.Popen([sys.executable, "-m", "pixels_xr.cli", "serve", str(tilesets), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line + proc.stderr.read()
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=30)
        conn.request("GET", "/api/layers")
        assert len(json.loads(conn.getresponse().read())["tilesets"]) == 3
        conn.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_show_puts_the_map_in_a_notebook_iframe(tilesets: Path) -> None:
    from pixels_xr.serve import show

    frame = show(tilesets, height=400)
    again = show(tilesets)
    assert frame.src == again.src and frame.height == 400  # one server per path
    port = int(re.match(r"http://127\.0\.0\.1:(\d+)/$", frame.src).group(1))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/")
    page = conn.getresponse().read().decode()
    assert 'src="static/map.js"' in page and f'src="{frame.src}"' in frame._repr_html_()


def test_vendored_javascript_matches_its_record_and_nothing_is_remote() -> None:
    vendor = STATIC / "vendor"
    record = json.loads((vendor / "VENDOR.json").read_text())
    assert {"maplibre-gl", "pmtiles", "fflate"} <= set(record)
    for name, entry in record.items():
        assert entry["version"] and entry["license"] and entry["integrity"].startswith("sha512-"), name
        assert (vendor / entry["license_file"]).stat().st_size > 500, name
        for file, digest in entry["files"].items():
            assert hashlib.sha256((vendor / file).read_bytes()).hexdigest() == digest, file
    page = "".join((STATIC / n).read_text() for n in ("index.html", "map.js", "map.css"))
    remote = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"'`)]*", page)) - {"http://www.w3.org/2000/svg"}
    assert not remote, remote


# --------------------------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def browser():
    from browser import Browser

    session = Browser()
    try:
        yield session
    finally:
        session.close()


def open_map(browser, server: MapServer) -> None:
    browser.console(), browser.responses()  # drop what earlier pages logged
    browser.open(server.url)
    browser.wait_idle()


def assert_clean(browser) -> list[tuple[str, int]]:
    """No page or console errors; returns the network responses."""
    assert browser.page_errors() == []
    problems = [m for m in browser.console() if m["level"] in ("SEVERE", "WARNING")]
    assert problems == []
    return browser.responses()


def screen_point(browser, lon: float, lat: float) -> tuple[int, int]:
    x, y = browser.js("const p = window.pixelsXr.map.project([arguments[0], arguments[1]]);"
                      "return [Math.round(p.x), Math.round(p.y)]", lon, lat)
    return int(y), int(x)


def test_tilesets_on_the_map(browser, tilesets: Path) -> None:
    lon, lat = block_lonlat(tilesets)
    with MapServer(tilesets) as server:
        open_map(browser, server)
        responses = assert_clean(browser)
        tiles = [(u, s) for u, s in responses if "/files/" in u or "/tiles/" in u]
        assert all(s in (200, 204, 206) for _, s in tiles), tiles
        assert any("/files/" in u and s == 206 for u, s in tiles)  # PMTiles through Range requests
        assert any(f"/tiles/{TILESET}.mbtiles/" in u and s == 200 for u, s in tiles)
        assert any(f"/tiles/{TILESET}/" in u and s == 200 for u, s in tiles)
        ids = [f"{TILESET}.mbtiles", f"{TILESET}.pmtiles", TILESET]
        for shown in ids:  # each tileset alone draws the image with its orange block
            before = browser.idle_count()
            browser.js("for (const box of document.querySelectorAll('#layers input')) {"
                       " box.checked = box.value === arguments[0]; box.dispatchEvent(new Event('change')); }",
                       shown)
            browser.wait_idle(before)
            image = browser.canvas()
            assert image.std() > 10, shown
            i, j = screen_point(browser, lon, lat)
            around = image[i - 2:i + 3, j - 2:j + 3].astype(int)
            assert np.abs(around - ORANGE).max() <= 3, (shown, image[i, j])
        assert_clean(browser)


def test_run_output_on_the_map_with_time_slider_and_pixel_series(browser, runs: dict[str, Path]) -> None:
    ds = px.open_feature(str(runs["zarr"]), "field-2").compute()
    with MapServer(runs["zarr"]) as server:
        info = json.loads(request(server, "/api/layers")[2])["run"]
        limits = {b: tuple(v) for b, v in info["stretch"].items()}
        expected = np.round(to_rgb(ds, limits=limits) * 255).astype(np.uint8)
        open_map(browser, server)
        responses = assert_clean(browser)
        tiles = [(u, s) for u, s in responses if "/run/" in u]
        assert tiles and all(s in (200, 204) for _, s in tiles) and any(s == 200 for _, s in tiles), tiles
        image = browser.canvas()
        assert image.std() > 10
        # a pixel with data in bins 0 and 1 whose colour differs between them, zoomed in until it is large
        valid = (expected[0, ..., 3] > 0) & (expected[1, ..., 3] > 0)
        differs = valid & (np.abs(expected[0, ..., :3].astype(int) - expected[1, ..., :3]).sum(axis=-1) > 30)
        row, col = np.argwhere(differs)[len(np.argwhere(differs)) // 2]
        lon, lat = Transformer.from_crs(ds.rio.crs, "EPSG:4326", always_xy=True).transform(
            float(ds.x[col]), float(ds.y[row]))
        before = browser.idle_count()
        browser.js("window.pixelsXr.map.jumpTo({center: [arguments[0], arguments[1]], zoom: arguments[2]})",
                   lon, lat, info["maxzoom"])
        browser.wait_idle(before)
        colours = []
        for k in (0, 1):
            if k:
                before = browser.idle_count()
                browser.js("const s = document.getElementById('slider'); s.value = '1';"
                           "s.dispatchEvent(new Event('input'))")
                browser.wait_idle(before)
            image = browser.canvas()
            i, j = screen_point(browser, lon, lat)
            colours.append(image[i, j])
            around = image[i - 2:i + 3, j - 2:j + 3].astype(int)
            want = expected[k, row, col, :3]
            assert np.abs(around - want).max() <= 2, (k, image[i, j], want)
        assert np.abs(colours[0].astype(int) - colours[1]).sum() > 30  # the slider changed the image
        shown = browser.js("return document.getElementById('bin').textContent")
        assert shown == "2021-12-01/2021-12-31 (2/3)"
        # a click shows the pixel's series across bins
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        canvas = browser.driver.find_element(By.CSS_SELECTOR, "#map canvas")
        i, j = screen_point(browser, lon, lat)
        size = canvas.size
        ActionChains(browser.driver).move_to_element_with_offset(
            canvas, j - size["width"] // 2, i - size["height"] // 2).click().perform()
        browser.wait(lambda: browser.js("const p = document.getElementById('pixel');"
                                        "return !p.hidden && p.querySelectorAll('tr[data-bin]').length"),
                     "the pixel panel")
        title = browser.js("return document.getElementById('pixel-title').textContent")
        assert title.startswith(f"field-2: pixel row {row}, col {col}")
        cells = browser.js("return [...document.querySelectorAll('#pixel tr[data-bin]')].map("
                           "r => [...r.children].map(c => c.textContent))")
        bands = info["bands"]
        assert [c[0] for c in cells] == info["bins"]
        assert [c[1 + bands.index("red")] for c in cells] == [
            "–" if np.isnan(v) else f"{v:.4f}" for v in ds.red.values[:, row, col]]
        assert browser.js("return document.querySelector('#pixel tr.current').dataset.bin") == info["bins"][1]
        # the other layers draw too
        for layer in ("clear_count", "source_time"):
            before = browser.idle_count()
            browser.js(f"document.querySelector('#layers input[value={layer}]').click()")
            browser.wait_idle(before)
            assert browser.canvas().std() > 5, layer
        if SCREENSHOT:
            browser.js("document.querySelector('#layers input[value=rgb]').click();"
                       "window.pixelsXr.map.fitBounds(arguments[0], {padding: 30, animate: false})",
                       info["bounds"])
            time.sleep(1)
            browser.wait_idle(browser.idle_count() - 1)
            browser.driver.save_screenshot(SCREENSHOT)
        assert_clean(browser)
