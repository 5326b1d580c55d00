"""Clear-sky rules (SCL, QA_PIXEL bits, user values) and blockwise cleanup that shows no chunk edges."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import rasterio
import xarray as xr

from pixels_xr.masks import _cleanup, cleanup_not_clear, rule_clear
from pixels_xr.platforms import PLATFORMS, MaskSpec, default_mask


def test_scl_rule_on_real_scene(shared_data: Path) -> None:
    with rasterio.open(shared_data / "s2-l2a-S2A_29RKH_20200219/SCL.tif") as ds:
        scl = ds.read(1)
    spec = default_mask(PLATFORMS["sentinel-2"], "L2A")
    assert spec is not None
    clear = rule_clear(scl, spec)
    np.testing.assert_array_equal(clear, ~np.isin(scl, [0, 1, 3, 8, 9, 10]))
    assert clear[scl == 7].all() and not clear[scl == 9].any()


def test_qa_pixel_bits_on_real_landsat(shared_data: Path) -> None:
    path = next((shared_data / "landsat-c2l2-LC08_001062_20201031").glob("*QA_PIXEL.TIF"))
    with rasterio.open(path) as ds:
        qa = ds.read(1)
    spec = default_mask(PLATFORMS["landsat-8"], "L2")
    assert spec is not None
    clear = rule_clear(qa, spec)
    reference = (qa.astype(np.int64) & 0b11111) == 0
    np.testing.assert_array_equal(clear, reference)
    assert clear.mean() < 0.05  # the scene is 99.9 % cloudy


def test_whitelist_and_nodata() -> None:
    spec = MaskSpec("fmask", nodata=255, clear_values=(0, 1))
    values = np.array([0, 1, 2, 3, 4, 255], np.uint8)
    np.testing.assert_array_equal(rule_clear(values, spec), [True, True, False, False, False, False])


def test_cleanup_chunked_equals_whole_image() -> None:
    rng = np.random.default_rng(3)
    not_clear = rng.random((2, 157, 203)) < 0.3
    whole = cleanup_not_clear(not_clear, 2, 3)
    arr = xr.DataArray(da.from_array(not_clear, chunks=(1, 40, 50)), dims=("time", "y", "x"))
    chunked = _cleanup(arr, 2, 3).values
    np.testing.assert_array_equal(chunked, whole)
    assert whole.mean() != not_clear.mean()  # the cleanup did something


def test_a_class_band_alone_without_a_mask_collects(tmp_path) -> None:
    """Mode all, mask none, only the SCL band (no reflectance band): every pixel with data counts clear."""
    from shapely.geometry import box

    from pixels_xr import collect, load_config
    from pixels_xr.features import Feature
    from pixels_xr.testing.sample import make_sample

    sample = make_sample(tmp_path / "s", n_dates=3, width=32, height=32, tiles=1)
    cfg = load_config({"start": "2021-11-01", "end": "2021-12-31", "mode": "all", "mask": "none",
                       "platforms": "SENTINEL_2", "bands": ["scl"], "catalog": str(sample.catalog)})
    ds = collect(cfg, Feature("a", box(*sample.bounds), crs=sample.crs)).compute()
    assert list(ds.data_vars) == ["scl", "clear_count"] and ds.sizes["time"] == 3
    assert ((ds.scl != 0) == (ds.clear_count == 1)).all()
