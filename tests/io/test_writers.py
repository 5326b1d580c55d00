"""COG writer and storage: streamed, valid, georeferenced, atomic — locally and on a real S3 endpoint."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import rasterio
import xarray as xr
from rio_cogeo.cogeo import cog_validate

from pixels_xr.errors import OutputError
from pixels_xr.io import storage
from pixels_xr.io.cog import CogLayer, write_cog, write_cogs


def make_array(dtype: str = "uint16", shape: tuple[int, int, int] = (3, 700, 530)) -> xr.DataArray:
    rng = np.random.default_rng(7)
    values = rng.integers(1, 10000, size=shape).astype(dtype)
    x = 500000.0 + 10 * np.arange(shape[2]) + 5
    y = 3400000.0 - 10 * np.arange(shape[1]) - 5
    arr = xr.DataArray(da.from_array(values, chunks=(shape[0], 256, 256)), dims=("band", "y", "x"),
                       coords={"band": ["blue", "red", "nir"][: shape[0]], "x": x, "y": y})
    return arr.rio.write_crs("EPSG:32629")


def test_cog_streamed_from_dask_equals_rasterio_read(tmp_path: Path) -> None:
    arr = make_array()
    path = tmp_path / "a" / "b.tif"
    write_cog(arr, str(path), nodata=0, tags={"datetime": "2022-03-01"})
    assert cog_validate(str(path), quiet=True)[0]
    with rasterio.open(path) as src:
        np.testing.assert_array_equal(src.read(), arr.values)
        assert src.descriptions == ("blue", "red", "nir") and src.nodata == 0
        assert src.transform == arr.rio.transform() and src.crs == arr.rio.crs
        assert src.tags()["datetime"] == "2022-03-01T00:00:00Z" and src.overviews(1)
        assert src.profile["compress"].lower() == "deflate" and src.profile["tiled"]
    assert [p.name for p in path.parent.iterdir()] == ["b.tif"]  # no temporary files left behind


def test_layers_written_together_compute_shared_tasks_once(tmp_path: Path) -> None:
    arr = make_array()
    calls = []

    def expensive(block: np.ndarray) -> np.ndarray:
        calls.append(block.shape)
        return block

    shared = arr.copy(data=arr.data.map_blocks(expensive, meta=np.array((), dtype=arr.dtype)))
    total = shared.sum("band").astype("uint32")
    write_cogs([CogLayer(shared, str(tmp_path / "bands.tif"), 0),
                CogLayer(total, str(tmp_path / "sum.tif"), 0, ["sum"])], scheduler="threads")
    assert len(calls) == arr.data.npartitions  # each chunk of the shared task computed once for both COGs
    with rasterio.open(tmp_path / "bands.tif") as a, rasterio.open(tmp_path / "sum.tif") as b:
        np.testing.assert_array_equal(a.read(), arr.values)
        np.testing.assert_array_equal(b.read(1), arr.values.sum(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bands.tif", "sum.tif"]


def test_float_cog_keeps_nan_nodata(tmp_path: Path) -> None:
    arr = make_array("float32", (1, 300, 200)).squeeze("band", drop=True)
    arr = arr.where(arr > 5000)
    write_cog(arr, str(tmp_path / "f.tif"), band_names=["ndvi"])
    with rasterio.open(tmp_path / "f.tif") as src:
        assert np.isnan(src.nodata) and src.descriptions == ("ndvi",)
        np.testing.assert_array_equal(src.read(1), arr.values)


def test_failed_write_leaves_previous_file_and_no_debris(tmp_path: Path) -> None:
    good = make_array()
    path = tmp_path / "out.tif"
    write_cog(good, str(path), nodata=0)
    before = path.read_bytes()

    def explode(block: np.ndarray) -> np.ndarray:
        raise OSError("read failed")

    bad = good.copy(data=good.data.map_blocks(explode, dtype=good.dtype))
    with pytest.raises(OSError, match="read failed"):
        write_cog(bad, str(path), nodata=0)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]


def test_cog_on_s3_and_storage_ops(s3_server) -> None:
    bucket = s3_server.make_bucket("pixels-io")
    url = f"s3://{bucket}/cogs/x.tif"
    arr = make_array()
    write_cog(arr, url, nodata=0)
    with rasterio.open(f"/vsis3/{bucket}/cogs/x.tif") as src:
        np.testing.assert_array_equal(src.read(), arr.values)
    storage.write_bytes(f"s3://{bucket}/cogs/m/a.json", b"{}")
    assert storage.exists(url) and storage.list_names(f"s3://{bucket}/cogs") == ["m", "x.tif"]
    assert storage.read_bytes(f"s3://{bucket}/cogs/m/a.json") == b"{}"
    assert storage.read_bytes(f"s3://{bucket}/cogs/none.json") is None
    storage.remove_tree(f"s3://{bucket}/cogs")
    assert storage.list_names(f"s3://{bucket}/cogs") == []


def test_array_without_crs_is_refused(tmp_path: Path) -> None:
    arr = xr.DataArray(np.zeros((1, 4, 4), np.uint8), dims=("band", "y", "x"))
    with pytest.raises(OutputError, match="no CRS"):
        write_cog(arr, str(tmp_path / "n.tif"))
    assert not list(tmp_path.iterdir())
