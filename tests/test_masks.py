"""Clear-sky rules (SCL, QA_PIXEL bits, user values) and blockwise cleanup that shows no chunk edges."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
import rasterio
import xarray as xr

from pixels_xr.masks import _cleanup, cleanup_not_clear, clear_mask, rule_clear
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


def _reference_parts(block: np.ndarray, spec: MaskSpec, nodata: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(data in bands 0-2, the rule on mask band 3) in plain numpy."""
    refl = block[:, :3]
    plain = nodata is None or np.isnan(nodata)
    valid = (~np.isnan(refl) if refl.dtype.kind == "f" else np.ones(refl.shape, bool)) if plain else refl != nodata
    rule = rule_clear(block[:, 3], spec) & (True if plain else block[:, 3] != nodata)
    return valid.all(axis=1), rule


@pytest.mark.parametrize("dtype,nodata", [(np.uint16, 0), (np.uint16, None), (np.uint8, 0), (np.int16, -9999),
                                          (np.float32, np.nan), (np.uint16, -1)])
@pytest.mark.parametrize("spec", [MaskSpec("scl", not_clear_values=(0, 1, 3, 8, 9, 10)),
                                  MaskSpec("scl", clear_values=(4, 5, 6)),
                                  MaskSpec("scl", not_clear_bits=(1, 3), nodata=1), None])
@pytest.mark.parametrize("band_chunk", [4, 3])  # all bands in a block (build_cube's), or bands split
def test_clear_mask_equals_numpy_reference(dtype: Any, nodata: float | None, spec: MaskSpec | None,
                                           band_chunk: int) -> None:
    """The one-pass block mask (lookup table or numpy rule, nodata per band) against plain numpy, chunked."""
    rng = np.random.default_rng(5)
    block = rng.integers(0, 12, (7, 4, 50, 60)).astype(dtype)
    if block.dtype.kind == "f":
        block[block == 2] = np.nan
    cube = xr.DataArray(da.from_array(block, chunks=(3, band_chunk, 25, 30)), dims=("time", "band", "y", "x"),
                        coords={"band": ["a", "b", "c", "scl"], "reflectance": ("band", [True, True, True, False])},
                        attrs={"nodata": nodata})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN mask values cast for the bits rule
        valid, rule = _reference_parts(block, spec or MaskSpec("scl"), nodata)
        want = valid if spec is None else valid & rule
        np.testing.assert_array_equal(clear_mask(cube, spec).values, want)
        if spec is not None:  # with cleanup: the rule part is cleaned, validity is not
            cleaned = ~cleanup_not_clear(~rule, 1, 2) & valid
            np.testing.assert_array_equal(clear_mask(cube, spec, 1, 2).values, cleaned)
    assert spec is None or 0 < want.mean() < 1


def test_clear_mask_on_real_scl(shared_data: Path) -> None:
    with rasterio.open(shared_data / "s2-l2a-S2A_29RKH_20200219/SCL.tif") as ds:
        scl = ds.read(1).astype(np.uint16)[None, None]
    spec = default_mask(PLATFORMS["sentinel-2"], "L2A")
    block = np.concatenate([np.full_like(scl, 7)] * 3 + [scl], axis=1)
    cube = xr.DataArray(block, dims=("time", "band", "y", "x"),
                        coords={"band": ["a", "b", "c", spec.asset], "reflectance": ("band", [True] * 3 + [False])},
                        attrs={"nodata": 0})
    np.testing.assert_array_equal(clear_mask(cube, spec).values[0], ~np.isin(scl[0, 0], [0, 1, 3, 8, 9, 10]))


def test_a_cube_block_reaches_the_mask_kernel_without_a_copy(monkeypatch) -> None:
    """The mask task is handed the cube's block itself: dask's joining of the band blocks (map_blocks with
    drop_axis) copied every block, a second pass over all decoded pixels, even when it is one block."""
    from pixels_xr import masks

    blocks = {("cube", t, 0, y, x): np.random.default_rng(t * 4 + y * 2 + x).integers(0, 12, (3, 4, 20, 20))
              .astype(np.uint16) for t in range(2) for y in range(2) for x in range(2)}
    data = da.Array(blocks, "cube", ((3, 3), (4,), (20, 20), (20, 20)), meta=np.empty((0,) * 4, np.uint16))
    cube = xr.DataArray(data, dims=("time", "band", "y", "x"),
                        coords={"band": ["a", "b", "c", "scl"], "reflectance": ("band", [True] * 3 + [False])},
                        attrs={"nodata": 0})
    seen: list[bool] = []
    real = masks.clear_block

    def watched(b: np.ndarray, **kwargs: Any) -> np.ndarray:
        seen.append(any(b is a for a in blocks.values()))
        return real(b, **kwargs)

    monkeypatch.setattr(masks, "clear_block", watched)
    clear_mask(cube, MaskSpec("scl", not_clear_values=(0, 1))).compute(scheduler="sync")
    assert len(seen) == 8 and all(seen)
