"""``local_raster``: local files through GDAL's C API give what rasterio gives, or say they cannot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.errors import RasterioIOError
from rasterio.transform import from_origin
from rasterio.windows import Window

from pixels_xr.local_raster import LocalRaster

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL = [DATA / "s2-l2a-S2A_29RKH_20200219" / "B04.tif",  # tiled COG, deflate
        DATA / "s2-l2a-S2A_29RKH_20200219" / "SCL.tif",
        next((DATA / "landsat-c2l2-LC08_001062_20201031").glob("*_SR_B4.TIF"), None)]  # striped


@pytest.mark.parametrize("path", [p for p in REAL if p is not None and p.exists()], ids=lambda p: p.name)
def test_description_and_reads_equal_rasterio_on_real_files(path: Path) -> None:
    with rasterio.open(path) as ds, LocalRaster.open(str(path)) as raster:
        assert (raster.width, raster.height, raster.count) == (ds.width, ds.height, ds.count)
        assert raster.transform == ds.transform and raster.epsg == ds.crs.to_epsg()
        assert raster.dtype == np.dtype(ds.dtypes[0]) and raster.nodata == ds.nodata
        assert raster.mask_flags == sum(f.value for f in ds.mask_flag_enums[0]) and raster.exact
        h, w = ds.height, ds.width
        for window in (Window(0, 0, w, h), Window(w // 3, h // 5, w // 2, h // 3), Window(w - 7, h - 1, 7, 1)):
            want = ds.read(1, window=window)
            np.testing.assert_array_equal(raster.read(window), want)
            for dtype in ("float32", "int32", "float64"):  # GDAL's conversion, as rasterio's out_dtype
                np.testing.assert_array_equal(raster.read(window, out_dtype=dtype),
                                              ds.read(1, window=window, out_dtype=dtype))
            block = np.full((3, int(window.height) + 4, int(window.width) + 6), 7, want.dtype)
            view = block[1, 2:-2, 3:-3]  # a strided slot of a larger block, as the cube reads into
            raster.read(window, out=view)
            np.testing.assert_array_equal(view, want)
            assert (block[0] == 7).all() and (block[2] == 7).all() and (block[1, :2] == 7).all()


def test_what_it_cannot_open_or_read_raises_rasterios_error(tmp_path: Path) -> None:
    with pytest.raises(RasterioIOError, match="missing.tif"):
        LocalRaster.open(str(tmp_path / "missing.tif"))
    text = tmp_path / "notes.tif"
    text.write_text("not a raster")
    with pytest.raises(RasterioIOError, match="not recognized"):
        LocalRaster.open(str(text))
    source = REAL[0]
    with LocalRaster.open(str(source)) as whole:
        first = int(whole.tag("BLOCK_OFFSET_0_0", "TIFF")) + int(whole.tag("BLOCK_SIZE_0_0", "TIFF"))
        last = max(int(whole.tag(f"BLOCK_OFFSET_{i}_{j}", "TIFF")) for i in range(2) for j in range(2))
    assert first < last
    cut = tmp_path / "cut.tif"
    cut.write_bytes(source.read_bytes()[:first])  # header and first tile intact, later tiles gone
    with LocalRaster.open(str(cut)) as raster:
        raster.read(Window(0, 0, 1, 1))
        with pytest.raises(RasterioIOError, match="Read or write failed"):
            raster.read(Window(0, 0, raster.width, raster.height))
        with pytest.raises(ValueError, match="buffer"):
            raster.read(Window(0, 0, 4, 4), out=np.zeros((4, 5), np.uint16))


def test_files_it_does_not_describe_exactly_are_left_to_rasterio(tmp_path: Path) -> None:
    """An internal mask (the mask band is more than nodata) or a CRS without an EPSG code at its root:
    ``exact`` is False, so the readers open those with rasterio (whose CRS matching and masked reads
    decide)."""
    values = np.arange(20 * 30, dtype="uint16").reshape(20, 30)
    profile = {"driver": "GTiff", "width": 30, "height": 20, "count": 1, "dtype": "uint16", "nodata": None,
               "transform": from_origin(500000, 3400000, 10, 10)}
    masked = tmp_path / "masked.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), \
            rasterio.open(masked, "w", crs="EPSG:32629", **profile) as dst:
        dst.write(values, 1)
        dst.write_mask(values % 3 != 0)
    custom = tmp_path / "custom.tif"
    with rasterio.open(custom, "w", crs="+proj=utm +zone=29 +ellps=intl +units=m", **profile) as dst:
        dst.write(values, 1)
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", crs="EPSG:32629", **profile) as dst:
        dst.write(values, 1)
    with LocalRaster.open(str(masked)) as a, LocalRaster.open(str(custom)) as b, \
            LocalRaster.open(str(plain)) as c:
        assert not a.exact and a.epsg == 32629
        assert not b.exact and b.epsg is None
        assert c.exact and c.nodata is None
        np.testing.assert_array_equal(c.read(Window(0, 0, 30, 20)), values)


def test_a_closed_raster_raises_instead_of_handing_gdal_freed_pointers() -> None:
    raster = LocalRaster.open(str(REAL[0]))
    raster.close()
    for call in (lambda: raster.read(Window(0, 0, 4, 4)), lambda: raster.tag("BLOCK_SIZE_0_0", "TIFF"),
                 lambda: raster.epsg):
        with pytest.raises(RasterioIOError, match="Dataset is closed"):
            call()
    raster.close()  # twice is harmless


def test_threads_opening_and_reading_together_from_a_fresh_process_get_rasterios_pixels() -> None:
    """A worker's read threads open and read assets all at once from the first read of the process on (the
    binding is made once, under a lock): in a new process, 8 threads at once, each on its own dataset."""
    import subprocess
    import sys

    paths = [str(p) for p in REAL if p is not None and p.exists()]
    script = f"""
import sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np, rasterio
from rasterio.windows import Window
from pixels_xr.local_raster import LocalRaster
paths = {paths!r}
def read(path):
    with LocalRaster.open(path) as raster:
        return raster.read(Window(0, 0, 64, 64))
with ThreadPoolExecutor(8) as pool:
    jobs = [(p, pool.submit(read, p)) for p in paths * 16]
    got = [(p, job.result()) for p, job in jobs]
for path, pixels in got:
    with rasterio.open(path) as ds:
        assert (pixels == ds.read(1, window=Window(0, 0, 64, 64))).all(), path
print(len(got))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and result.stdout.strip() == str(16 * len(paths)), result.stderr
