"""Cubes against independent references: direct rasterio reads of the real Sentinel-2 scene, rioxarray, odc-stac."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rioxarray
from rasterio.windows import from_bounds
from shapely.geometry import box

from pixels_xr.catalog import search
from pixels_xr.config import load_config
from pixels_xr.cube import build_cube, check_assets, to_reflectance
from pixels_xr.errors import AssetReadError
from pixels_xr.features import Feature

SCENE = "s2-l2a-S2A_29RKH_20200219"
BANDS = {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08", "scl": "SCL", "swir16": "B11"}


@pytest.fixture
def s2_catalog(shared_data: Path, tmp_path: Path) -> Path:
    """The real Earth Search item of the scene, its assets pointing at the local decimated COGs."""
    folder = shared_data / SCENE
    item = json.loads((folder / "S2A_29RKH_20200219_0_L2A.json").read_text())
    item["links"] = []
    for key, fname in BANDS.items():
        asset = item["assets"][key]
        asset["href"] = str(folder / f"{fname}.tif")
        with rasterio.open(asset["href"]) as ds:  # item metadata describes full resolution: take the TIFF's
            asset["proj:shape"] = list(ds.shape)
            asset["proj:transform"] = list(ds.transform)[:6]
    for key in [k for k in item["assets"] if k not in BANDS]:
        del item["assets"][key]
    path = tmp_path / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [item]}))
    return path


def _config(catalog: Path, **kw: Any):
    base = {"start": "2020-02-19", "end": "2020-02-19", "mode": "all", "platforms": "SENTINEL_2",
            "bands": ["B02", "B04", "B08"], "scale": 100, "catalog": str(catalog)}
    return load_config({**base, **kw})


FEATURE = Feature("scene-part", box(230000, 2730000, 262345, 2771234), crs="EPSG:32629")


def _direct(path: Path, bounds: tuple[float, float, float, float]) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1, window=from_bounds(*bounds, transform=ds.transform))


def test_native_grid_is_bit_identical_to_rasterio(shared_data: Path, s2_catalog: Path) -> None:
    cfg = _config(s2_catalog)
    items = search(cfg, FEATURE)
    assert len(items) == 1
    cube = build_cube(items, FEATURE, cfg)
    assert cube.dims == ("time", "band", "y", "x") and list(cube.band.values) == ["blue", "red", "nir", "scl"]
    bounds = cube.rio.bounds()
    # phase: source origin 199980 is 80 m off the 100 m multiples; the grid follows it
    assert bounds[0] % 100 == pytest.approx(80) and bounds[3] % 100 == pytest.approx(20)
    assert bounds[0] <= 230000 and bounds[2] >= 262345 and bounds[2] - 262345 < 100
    values = cube.compute()
    for name in ("blue", "red", "nir"):
        ref = _direct(shared_data / SCENE / f"{BANDS[name]}.tif", bounds)
        np.testing.assert_array_equal(values.sel(band=name).isel(time=0).values, ref)
    assert values.dtype == np.uint16
    # SCL (200 m) read at its own native scale is bit-identical too, and stays integer
    cfg200 = _config(s2_catalog, bands=["scl"], scale=200)
    scl = build_cube(search(cfg200, FEATURE), FEATURE, cfg200).compute()
    ref = _direct(shared_data / SCENE / "SCL.tif", scl.rio.bounds())
    np.testing.assert_array_equal(scl.sel(band="scl").isel(time=0).values, ref)
    assert set(np.unique(ref)) <= {2, 5, 7, 8, 9, 10, 0}


def test_no_half_pixel_shift_against_rioxarray(shared_data: Path, s2_catalog: Path) -> None:
    cfg = _config(s2_catalog, bands=["red"])
    cube = build_cube(search(cfg, FEATURE), FEATURE, cfg)
    da = rioxarray.open_rasterio(shared_data / SCENE / "B04.tif").squeeze("band", drop=True)
    ref = da.sel(x=cube.x, y=cube.y)  # exact coordinate match: any half-pixel shift raises KeyError
    np.testing.assert_array_equal(cube.sel(band="red").isel(time=0).values, ref.values)
    assert cube.rio.crs.to_epsg() == 32629
    assert cube.rio.transform() == rasterio.Affine(100, 0, float(cube.x[0]) - 50, 0, -100, float(cube.y[0]) + 50)


def test_other_scale_follows_grid_rule(s2_catalog: Path) -> None:
    cfg = _config(s2_catalog, scale=300)
    cube = build_cube(search(cfg, FEATURE), FEATURE, cfg)
    left, bottom, right, top = cube.rio.bounds()
    assert (left - 199980) % 300 == pytest.approx(0) and (top - 2800020) % 300 == pytest.approx(0)
    assert left <= 230000 < left + 300 and right - 300 < 262345 <= right
    assert cube.sizes["x"] == round((right - left) / 300)


def test_reflectance_scale_offset_and_clip(shared_data: Path, s2_catalog: Path) -> None:
    cfg = _config(s2_catalog, clip=True)
    from shapely.geometry import Polygon

    tri = Feature("tri", Polygon([(230000, 2730000), (262345, 2730000), (246000, 2771234)]), crs="EPSG:32629")
    cube = build_cube(search(cfg, tri), tri, cfg)
    refl = to_reflectance(cube).compute()
    assert refl.dtype == np.float32 and list(refl.band.values) == ["blue", "red", "nir"]
    raw = cube.compute()
    red = raw.sel(band="red").isel(time=0).values.astype("float64")
    ok = red != 0
    # baseline 02.xx scene (2020): reflectance = DN / 10000, no offset
    np.testing.assert_allclose(refl.sel(band="red").isel(time=0).values[ok], (red[ok] / 1e4).astype("float32"),
                               rtol=1e-6)
    assert np.isnan(refl.sel(band="red").isel(time=0).values[~ok]).all()
    # clip: pixel centres outside the triangle are nodata, inside is data (the scene has no gaps here)
    from rasterio.features import geometry_mask

    inside = geometry_mask([tri.geometry], out_shape=red.shape, transform=cube.rio.transform(), invert=True)
    np.testing.assert_array_equal(ok, inside)
    assert (raw.isel(time=0, x=0, y=0).values == 0).all() and 0.3 < ok.mean() < 0.7


def test_odc_loader_cross_check(s2_catalog: Path) -> None:
    cfg = _config(s2_catalog)
    items = search(cfg, FEATURE)
    a = build_cube(items, FEATURE, cfg).compute()
    b = build_cube(items, FEATURE, cfg, loader="odc").compute()
    assert a.shape == b.shape and list(a.band.values) == list(b.band.values)
    np.testing.assert_array_equal(a.x.values, b.x.values)
    np.testing.assert_array_equal(a.values, b.values)


def test_empty_search_gives_empty_cube_with_grid(s2_catalog: Path) -> None:
    cfg = _config(s2_catalog, start="2021-01-01", end="2021-01-31")
    items = search(cfg, FEATURE)
    cube = build_cube(items, FEATURE, cfg)
    assert items == [] and cube.sizes["time"] == 0 and cube.sizes["x"] > 300
    assert "no items" in cube.attrs["empty_reason"] and cube.rio.crs.to_epsg() == 32629


def test_unreadable_asset_is_recorded_or_fails(s2_catalog: Path, tmp_path: Path) -> None:
    data = json.loads(s2_catalog.read_text())
    good = data["features"][0]
    broken = json.loads(json.dumps(good))
    broken["id"] = "S2A_29RKH_20200219_1_broken"
    broken["properties"]["datetime"] = "2020-02-19T12:00:00Z"
    broken["properties"]["s2:mgrs_tile"] = "29RKJ"  # not a same-tile duplicate
    truncated = tmp_path / "trunc.tif"
    truncated.write_bytes(Path(good["assets"]["red"]["href"]).read_bytes()[:5000])
    broken["assets"]["red"]["href"] = str(truncated)
    broken["assets"]["blue"]["href"] = str(tmp_path / "missing.tif")
    data["features"].append(broken)
    s2_catalog.write_text(json.dumps(data))
    cfg = _config(s2_catalog)
    items = search(cfg, FEATURE)
    assert len(items) == 2
    kept, problems = check_assets(items, cfg)
    assert [i.id for i in kept] == [good["id"]]
    assert {(p["item"], p["asset"]) for p in problems} >= {(broken["id"], "blue"), (broken["id"], "red")}
    with pytest.raises(AssetReadError, match=f"item '{broken['id']}'"):
        check_assets(items, _config(s2_catalog, on_asset_error="fail"))
