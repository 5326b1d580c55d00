"""PXM rendering on real images served by a real S3 endpoint (moto_server): mosaics, masks, colour, crs,
an independent rasterio reference, the three output formats, resume/no-op, errors and a real cluster."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform, transform_bounds
from render_helpers import AERIAL, BUCKET, FILES, decode, manifest, mbtiles, metadata, s3_key
from typer.testing import CliRunner

from pixels_xr.errors import OutputError, SourceError
from pixels_xr.pxm import apply_color, render
from pixels_xr.pxm.tiles import tile_bounds

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def rgb_dir(shared_data: Path) -> Path:
    return shared_data / "rgb"


@pytest.fixture(scope="module")
def s3(s3_server, rgb_dir: Path) -> dict[str, str]:
    """Every image uploaded before any is opened (GDAL caches S3 listings); {local name: s3 uri}."""
    return {name: s3_server.upload(rgb_dir / name, BUCKET, s3_key(name)) for name in FILES}


@pytest.fixture(scope="module")
def client(s3):
    """An in-process Dask client (threads) for speed; one test below uses real worker processes."""
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as c:
        yield c


@pytest.fixture(scope="module")
def single(client, s3, tmp_path_factory) -> dict[tuple[int, int, int], bytes]:
    """The Landsat RGB.byte image rendered alone (PNG tiles, zooms 5-9)."""
    out = tmp_path_factory.mktemp("single")
    render(manifest(s3["rasterio_RGB.byte.tif"]), out, tile_format="png", minzoom=5, client=client)
    return mbtiles(out / "acme.test.mbtiles")


def test_threads_of_this_process_render_the_same_tiles(s3, single, tmp_path: Path) -> None:
    """The default (no client, cluster "threads"): same bytes as on a Dask client."""
    report = render(manifest(s3["rasterio_RGB.byte.tif"]), tmp_path, tile_format="png", minzoom=5,
                    cluster_options={"workers": 2})
    assert report.tiles == len(single)
    assert mbtiles(tmp_path / "acme.test.mbtiles") == single


def test_four_quadrants_reproduce_the_single_image(client, s3, single, tmp_path: Path) -> None:
    quads = [s3[f"rasterio_rgb{i}.tif"] for i in (1, 2, 3, 4)]
    report = render(manifest(*quads), tmp_path, tile_format="png", minzoom=5, client=client)
    mosaic = mbtiles(tmp_path / "acme.test.mbtiles")
    assert report.maxzoom == 9 and report.minzoom == 5
    assert mosaic.keys() == single.keys()
    worst = 0.0
    for key, data in single.items():
        a, b = decode(data), decode(mosaic[key])
        np.testing.assert_array_equal(a[..., 3], b[..., 3], err_msg=f"mask differs in tile {key}")
        both = (a[..., 3] == 255)
        diff = np.abs(a[..., :3].astype(int) - b[..., :3].astype(int))[both]
        if diff.size:
            worst = max(worst, float(diff.mean()))
            assert np.percentile(diff, 99.9) <= 16, key  # seam pixels: a kernel cut at the quadrant edge
    assert worst < 0.5


def test_mosaic_first_source_wins_with_all_bands(client, s3, tmp_path: Path) -> None:
    """Quadrant 1 listed first wins in the 1-px overlap; a pixel's bands never mix two sources."""
    first, second = s3["rasterio_rgb1.tif"], s3["rasterio_rgb2.tif"]
    m = manifest(first, second, color={"rgb2": "gamma RGB 0.5"})  # brightens only quadrant 2
    render(m, tmp_path / "a", tile_format="png", minzoom=9, resampling="nearest", client=client)
    alone = manifest(first)
    render(alone, tmp_path / "b", tile_format="png", minzoom=9, resampling="nearest", client=client)
    both, one = mbtiles(tmp_path / "a" / "acme.test.mbtiles"), mbtiles(tmp_path / "b" / "acme.test.mbtiles")
    for key, data in one.items():
        a, b = decode(both[key]), decode(data)
        covered = b[..., 3] == 255
        np.testing.assert_array_equal(a[covered], b[covered])  # where quadrant 1 is valid, it wins


def _coverage(path: Path, kind: str, z: int, x: int, y: int, size: int) -> np.ndarray:
    """Reference coverage of a tile: the file's own validity (via open_source) warped nearest by rasterio."""
    from pixels_xr.pxm import open_source

    # the in-process cluster's environment plugin sets GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR here too
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="FALSE"), open_source(str(path)) as src:
        assert src.mask_kind == kind
        _, valid = src.read()
        src_t, src_crs = src.transform, src.crs
    dst = np.zeros((size, size), dtype=np.uint8)
    reproject(valid.astype(np.uint8), dst, src_transform=src_t, src_crs=src_crs,
              dst_transform=rasterio.transform.from_bounds(*tile_bounds(z, x, y), size, size),
              dst_crs="EPSG:3857", resampling=Resampling.nearest)
    return dst > 0


def test_every_mask_style_renders_its_coverage(client, s3, rgb_dir: Path, tmp_path: Path) -> None:
    """The four mask styles of the 0.15 m aerial: alpha band, internal mask, external .msk, nodata.

    The real files do not carry the same mask (alpha 88.7 % valid, internal/external mask 96.9 %, nodata
    97.3 %), so each render must show its own file's coverage; internal and external mask render the same.
    """
    alphas = {}
    for style in ("alpha", "mask", "extmask", "nodata"):
        out = tmp_path / style
        report = render(manifest(s3[f"{AERIAL}_{style}.tif"]), out, tile_format="png", client=client)
        tiles = mbtiles(out / "acme.test.mbtiles")
        assert report.maxzoom == 20 and tiles
        alphas[style] = {k: decode(v)[..., 3] for k, v in tiles.items()}
        for key in (k for k in tiles if k[0] == 20):
            kind = {"extmask": "mask"}.get(style, style)
            ref = _coverage(rgb_dir / f"{AERIAL}_{style}.tif", kind, *key, 256)
            agree = ((alphas[style][key] > 0) == ref).mean()
            assert agree > 0.99, (style, key, agree)  # the reference uses GDAL's approximate transformer
    assert alphas["mask"].keys() == alphas["extmask"].keys()
    for key, alpha in alphas["mask"].items():
        np.testing.assert_array_equal(alpha, alphas["extmask"][key], err_msg=str(key))
    native = {s: np.mean([(a[k] > 0).mean() for k in a if k[0] == 20]) for s, a in alphas.items()}
    assert native["alpha"] < native["mask"] < native["nodata"]  # the files' own coverages, in order


def test_colour_formula_appears_in_the_tiles(client, s3, tmp_path: Path) -> None:
    uri = s3["rasterio_RGB.byte.tif"]
    formula = "sigmoidal RGB 20 0.2 gamma B 1.2"
    opts = dict(tile_format="png", minzoom=9, resampling="nearest", client=client)
    render(manifest(uri, color={"RGB_byte": formula}), tmp_path / "c", **opts)
    render(manifest(uri), tmp_path / "p", **opts)
    coloured = mbtiles(tmp_path / "c" / "acme.test.mbtiles")
    plain = mbtiles(tmp_path / "p" / "acme.test.mbtiles")
    assert coloured.keys() == plain.keys()
    for key in plain:
        a, b = decode(coloured[key]), decode(plain[key])
        np.testing.assert_array_equal(a[..., 3], b[..., 3])  # colour never changes the mask
        valid = b[..., 3] == 255
        expect = np.moveaxis(apply_color(np.moveaxis(b[..., :3], -1, 0), formula), 0, -1)
        np.testing.assert_array_equal(a[..., :3][valid], expect[valid])
        assert (a[..., :3][valid] != b[..., :3][valid]).any()


def test_crs_override_places_the_hamburg_image(client, s3, rgb_dir: Path, tmp_path: Path) -> None:
    uri = s3["dop20c_32587_5922.tif"]
    with pytest.raises(SourceError, match="no CRS"):
        render(manifest(uri), tmp_path / "x", client=client)
    report = render(manifest(uri, crs="EPSG:25832"), tmp_path, minzoom=12, client=client)
    meta = metadata(tmp_path / "acme.test.mbtiles")
    with rasterio.open(rgb_dir / "dop20c_32587_5922.tif") as ds:
        b = ds.bounds
    lons, lats = transform("EPSG:25832", "EPSG:4326", [b.left, b.right], [b.bottom, b.top])
    got = [float(v) for v in meta["bounds"].split(",")]
    assert got == pytest.approx([min(lons), min(lats), max(lons), max(lats)], abs=2e-3)
    assert 9.7 < got[0] < got[2] < 10.4 and 53.3 < got[1] < got[3] < 53.8  # Hamburg
    xs, ys = [], []  # EPSG:3857 extent of the opaque pixels at the max zoom
    for (z, x, y), data in mbtiles(tmp_path / "acme.test.mbtiles").items():
        if z == report.maxzoom:
            rows, cols = np.nonzero(decode(data)[..., 3] == 255)
            w, _, e, n = tile_bounds(z, x, y)
            res = (e - w) / 256
            xs += [w + cols.min() * res, w + (cols.max() + 1) * res]
            ys += [n - (rows.max() + 1) * res, n - rows.min() * res]
    expect = transform_bounds("EPSG:25832", "EPSG:3857", *b, densify_pts=21)
    assert [min(xs), min(ys), max(xs), max(ys)] == pytest.approx(expect, abs=2 * res)


def _reference(path: Path, z: int, x: int, y: int, size: int, resampling: Resampling) -> np.ndarray:
    """An independent RGBA tile: rasterio ``reproject`` of the whole local file with its nodata as alpha."""
    with rasterio.open(path) as ds:
        rgb = ds.read()
        valid = (ds.read_masks(1) > 0).astype(np.uint8) * 255
        src_t, src_crs = ds.transform, ds.crs
    w, s, e, n = tile_bounds(z, x, y)
    dst = np.zeros((4, size, size), dtype=np.uint8)
    reproject(np.concatenate([rgb, valid[None]]), dst, src_transform=src_t, src_crs=src_crs,
              dst_transform=rasterio.transform.from_bounds(w, s, e, n, size, size), dst_crs="EPSG:3857",
              src_alpha=4, dst_alpha=4, resampling=resampling)
    return np.moveaxis(dst, 0, -1)


def test_tiles_match_an_independent_rasterio_reference_at_every_zoom(single, rgb_dir: Path) -> None:
    path = rgb_dir / "rasterio_RGB.byte.tif"
    zooms = sorted({k[0] for k in single})
    assert zooms == [5, 6, 7, 8, 9]
    rng = np.random.default_rng(8)
    for z in zooms:
        keys = sorted(k for k in single if k[0] == z)
        for key in [keys[i] for i in rng.choice(len(keys), size=min(3, len(keys)), replace=False)]:
            ours = decode(single[key])
            ref = _reference(path, *key, 256, Resampling.bilinear if z == 9 else Resampling.average)
            both = (ours[..., 3] > 127) & (ref[..., 3] > 127)
            agree = ((ours[..., 3] > 127) == (ref[..., 3] > 127)).mean()
            assert agree > 0.995, (key, agree)
            diff = np.abs(ours[..., :3].astype(int) - ref[..., :3].astype(int))[both]
            assert diff.mean() < (1.0 if z == 9 else 4.0), (key, diff.mean())


def test_outputs_open_with_standard_readers_and_share_tiles(client, s3, tmp_path: Path) -> None:
    from pmtiles.reader import MmapSource, Reader, all_tiles
    from pmtiles.tile import TileType

    m = manifest(s3["rasterio_RGB.byte.tif"], tilesets=("acme.one", "acme.two"))
    reports = {fmt: render(m, tmp_path / fmt, format=fmt, minzoom=7, client=client)
               for fmt in ("mbtiles", "pmtiles", "xyz")}
    first = mbtiles(tmp_path / "mbtiles" / "acme.one.mbtiles")
    assert first == mbtiles(tmp_path / "mbtiles" / "acme.two.mbtiles")  # both tilesets, same tiles
    assert reports["mbtiles"].tiles == len(first)
    assert reports["mbtiles"].tiles_by_format == {"jpeg": 1, "png": 21}
    meta = metadata(tmp_path / "mbtiles" / "acme.one.mbtiles")
    for key in ("name", "format", "bounds", "center", "minzoom", "maxzoom", "attribution", "description",
                "product", "date"):
        assert meta.get(key), key
    assert meta["name"] == "acme.one" and meta["attribution"] == "CC-BY-4.0 Example Org"
    assert meta["description"] == "Test mosaic notes" and (meta["product"], meta["date"]) == ("aerial_2020",
                                                                                            "2020-06-01")
    assert (meta["minzoom"], meta["maxzoom"], meta["format"]) == ("7", "9", "png")
    with sqlite3.connect(tmp_path / "mbtiles" / "acme.one.mbtiles") as db:  # TMS rows: north is the last row
        rows = db.execute("SELECT tile_row FROM tiles WHERE zoom_level = 7").fetchall()
    assert {r for (r,) in rows} == {(1 << 7) - 1 - y for (z, _, y) in first if z == 7}

    with open(tmp_path / "pmtiles" / "acme.two.pmtiles", "rb") as f:
        reader = Reader(MmapSource(f))
        header, pmeta = reader.header(), reader.metadata()
        pm = {zxy: bytes(d) for zxy, d in all_tiles(reader.get_bytes)}
    assert pm == first
    assert header["clustered"] and header["tile_type"] == TileType.PNG
    assert (header["min_zoom"], header["max_zoom"]) == (7, 9)
    assert pmeta["attribution"] == "CC-BY-4.0 Example Org" and pmeta["description"] == "Test mosaic notes"

    xyz = tmp_path / "xyz" / "acme.one"
    files = {(int(p.parts[-3]), int(p.parts[-2]), int(p.stem)): p.read_bytes() for p in xyz.glob("*/*/*.png")}
    assert files == first
    doc = json.loads((xyz / "metadata.json").read_text())
    assert doc["tiles"] == ["{z}/{x}/{y}.png"] and doc["scheme"] == "xyz" and doc["minzoom"] == 7
    assert not list(tmp_path.rglob(".*"))  # no temporary files or scratch stores left


def test_rerun_is_a_noop_and_an_interrupted_render_resumes(client, s3, tmp_path: Path, monkeypatch) -> None:
    import pixels_xr.pxm.archives as archives

    m = manifest(s3["rasterio_RGB.byte.tif"])
    real_add = archives.TileStore.add
    calls = {"n": 0}

    def crash_after_one(self, *args, **kwargs):
        if calls["n"] == 1:
            raise KeyboardInterrupt("simulated interruption")
        calls["n"] += 1
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(archives.TileStore, "add", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        render(m, tmp_path, tile_format="png", minzoom=6, client=client)
    assert not (tmp_path / "acme.test.mbtiles").exists()  # nothing half-written
    assert len(list(tmp_path.glob(".pxm-render-*/store.sqlite"))) == 1
    monkeypatch.setattr(archives.TileStore, "add", real_add)
    resumed = render(m, tmp_path, tile_format="png", minzoom=6, client=client)
    out = tmp_path / "acme.test.mbtiles"
    fresh = tmp_path / "fresh"
    clean = render(m, fresh, tile_format="png", minzoom=6, client=client)
    assert (resumed.resumed_tasks, resumed.tasks, clean.tasks, clean.resumed_tasks) == (1, 1, 2, 0)
    assert mbtiles(out) == mbtiles(fresh / "acme.test.mbtiles")
    stamp = out.stat().st_mtime_ns
    again = render(m, tmp_path, tile_format="png", minzoom=6, client=client)
    assert again.skipped and out.stat().st_mtime_ns == stamp
    with pytest.raises(OutputError, match="another manifest or other options"):
        render(m, tmp_path, tile_format="png", minzoom=7, client=client)
    assert render(m, tmp_path, tile_format="png", minzoom=7, client=client, overwrite=True).minzoom == 7


def test_a_real_distributed_cluster_and_the_cli(dask_scheduler, s3, tmp_path: Path) -> None:
    from pixels_xr.pxm.cli import pxm_app

    path = tmp_path / "manifest.json"
    quads = [s3[f"rasterio_rgb{i}.tif"] for i in (1, 2, 3, 4)]
    path.write_text(json.dumps({"version": "0.5.1", "sources": quads, "info": {
        "tilesets": ["acme.quads"], "license": "CC0", "notes": "quadrants", "account": "acme",
        "product": "landsat", "date": "2020"}}))
    result = CliRunner().invoke(pxm_app, ["render", str(path), "--out", str(tmp_path / "out"), "--format",
                                          "pmtiles", "--minzoom", "8", "--cluster", dask_scheduler.address])
    assert result.exit_code == 0, result.output
    assert "tiles, zooms 8-9" in result.output
    assert (tmp_path / "out" / "acme.quads.pmtiles").stat().st_size > 10_000


@pytest.mark.parametrize(("args", "message"), [
    (["--tile-size", "300"], "tile_size: tile size must be 256 or 512"),
    (["--format", "tar"], "format: unknown output format 'tar'"),
    (["--tile-format", "gif"], "tile_format: unknown tile format 'gif'"),
    (["--minzoom", "9", "--maxzoom", "3"], "minzoom: minzoom 9 is above maxzoom 3"),
    (["--maxzoom", "40"], "maxzoom: must be an integer 0-24"),
    (["--resampling", "fancy"], "resampling: unknown resampling 'fancy'"),
    (["--workers", "-1"], "cluster.workers: must be a whole number from 1 to"),
])
def test_bad_options_are_one_line_errors(s3, tmp_path: Path, args: list[str], message: str) -> None:
    from pixels_xr.pxm.cli import pxm_app

    path = tmp_path / "m.json"
    path.write_text(json.dumps({"sources": [s3["rasterio_RGB.byte.tif"]], "info": {
        "tilesets": ["acme.x"], "license": "CC0", "notes": "n", "account": "acme", "product": "p",
        "date": "2020"}}))
    result = CliRunner().invoke(pxm_app, ["render", str(path), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith(f"error: {message}")
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_bad_sources_and_manifests_are_one_line_errors(s3, tmp_path: Path) -> None:
    from pixels_xr.pxm.cli import pxm_app

    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"sources": ["s3://pxm-render/render/nothing_here.tif"], "info": {
        "tilesets": ["acme.x"], "license": "CC0", "notes": "n", "account": "acme", "product": "p",
        "date": "2020"}}))
    result = CliRunner().invoke(pxm_app, ["render", str(missing), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("error: s3://pxm-render/render/nothing_here.tif: cannot open")
    remote = CliRunner().invoke(pxm_app, ["render", str(missing), "--out", "s3://pxm-render/a/../tiles"])
    assert remote.exit_code == 1
    assert remote.output.strip() == ("error: s3://pxm-render/a/../tiles: an object-store URL must not contain"
                                     " '.' or '..' segments")
    bad = tmp_path / "bad.json"
    bad.write_text('{"sources": [], "info": {}}')
    result = CliRunner().invoke(pxm_app, ["render", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and result.output.strip() == "error: sources: must list at least one source"
