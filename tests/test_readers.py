"""``pool_size`` bounds the GDAL reads a process runs at once, whatever the scheduler's thread count."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from shapely.geometry import box

from pixels_xr import readers
from pixels_xr.catalog import search
from pixels_xr.config import load_config
from pixels_xr.cube import build_cube
from pixels_xr.features import Feature
from pixels_xr.local_raster import LocalRaster


class Gauge:
    """Counts calls running at the same time (each held for ``hold`` seconds so overlaps show)."""

    def __init__(self, hold: float = 0.02) -> None:
        self.hold, self.now, self.most, self.calls = hold, 0, 0, 0
        self._lock = threading.Lock()

    def wrap(self, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.now += 1
                self.calls += 1
                self.most = max(self.most, self.now)
            try:
                time.sleep(self.hold)
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.now -= 1
        return counted


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Feature]:
    from pixels_xr.testing.sample import make_sample

    info = make_sample(tmp_path_factory.mktemp("sample"), n_dates=6, width=128, height=128, tiles=2,
                       every_days=4)
    return info.catalog, Feature("area", box(*info.bounds), crs=info.crs)


def _cube(sample: tuple[Path, Feature], pool_size: int, bands: list[str], loader: str,
          resampling: str = "nearest") -> Any:
    catalog, feature = sample
    cfg = load_config({"start": "2021-11-01", "end": "2021-12-31", "mode": "all", "platforms": "SENTINEL_2",
                       "bands": bands, "mask": "none", "catalog": str(catalog), "chunksize": 64,
                       "pool_size": pool_size, "resampling": resampling})
    items = search(cfg, feature)
    assert len(items) >= 4
    return build_cube(items, feature, cfg, loader=loader, time_chunks=1)


@pytest.mark.parametrize("loader,bands,resampling", [
    ("stackstac", ["red"], "nearest"),  # one asset per block, read in the dask thread, direct reads
    ("stackstac", ["red", "nir", "green"], "bilinear"),  # blocks read through the pool, WarpedVRT reads
    ("odc", ["red", "nir"], "nearest"),
])
def test_pool_size_bounds_concurrent_reads_under_many_threads(sample: tuple[Path, Feature], loader: str,
                                                              bands: list[str], resampling: str,
                                                              monkeypatch: Any) -> None:
    from stackstac.rio_reader import ThreadLocalRioDataset

    results = {}
    for pool_size in (2, 16):
        gauge = Gauge()
        if loader == "stackstac":  # every GDAL read: direct (one locked dataset) or warped (per thread)
            monkeypatch.setattr(ThreadLocalRioDataset, "read", gauge.wrap(ThreadLocalRioDataset.read))
            monkeypatch.setattr(readers._LockedDataset, "read", gauge.wrap(readers._LockedDataset.read))
        else:  # odc-stac opens and reads the file in rio_read
            monkeypatch.setattr(readers, "rio_read", gauge.wrap(readers.rio_read))
        cube = _cube(sample, pool_size, bands, loader, resampling)
        assert cube.data.npartitions >= 16  # many independent read tasks for 16 threads
        with dask.config.set(scheduler="threads", num_workers=16):
            results[pool_size] = cube.values
        monkeypatch.undo()
        assert gauge.calls >= cube.sizes["time"] * len(bands)
        if pool_size == 2:
            assert gauge.most == 2  # never more than pool_size reads at once, and the bound is reached
        else:
            assert gauge.most > 2  # the gauge does see concurrency when the bound allows it
    np.testing.assert_array_equal(results[2], results[16])
    assert (results[2] != 0).mean() > 0.5  # real pixels were read


def test_reader_pickles_with_its_pool_size(sample: tuple[Path, Feature]) -> None:
    import pickle

    cube = _cube(sample, 3, ["red"], "stackstac")
    layer = next(v for k, v in cube.data.dask.layers.items() if k.startswith("pixels-readers-"))
    table = next(iter(layer.values()))()  # run one reader-table task
    reader, _ = next(e for e in table.ravel() if e is not None)
    clone = pickle.loads(pickle.dumps(reader))
    assert isinstance(clone, readers.PixelsReader) and clone.pool_size == 3 and clone.url == reader.url
    window = readers.windows.Window(0, 0, 16, 16)
    np.testing.assert_array_equal(clone.read(window), reader.read(window))


@pytest.mark.parametrize("scale,resampling", [(10, "nearest"), (10, "bilinear"), (20, "nearest"),
                                              (30, "average")])
def test_cube_equals_plain_stackstac(sample: tuple[Path, Feature], scale: int, resampling: str) -> None:
    """Direct reads (native grid, nearest) and warped reads give stackstac.stack's values on the same grid,
    including the area outside each tile (two tiles, each covering part of the grid); scl stays nearest."""
    import stackstac
    from rasterio.enums import Resampling

    catalog, feature = sample
    cfg = load_config({"start": "2021-11-01", "end": "2021-12-31", "mode": "all", "platforms": "SENTINEL_2",
                       "bands": ["red", "nir"], "catalog": str(catalog), "chunksize": 96, "scale": scale,
                       "resampling": resampling})
    items = search(cfg, feature)
    cube = build_cube(items, feature, cfg)
    assert list(cube.band.values) == ["red", "nir", "scl"] and len(items) >= 8

    def plain(assets: list[str], how: str) -> np.ndarray:
        return stackstac.stack([i.to_stac() for i in items], assets=assets, epsg=32629, resolution=scale, bounds=cube.rio.bounds(),
                               snap_bounds=False, dtype=np.dtype("uint16"), fill_value=np.uint16(0),
                               rescale=False, sortby_date=False, resampling=Resampling[how]).values

    values = cube.values
    np.testing.assert_array_equal(values[:, :2], plain(["red", "nir"], resampling))
    np.testing.assert_array_equal(values[:, 2:], plain(["scl"], "nearest"))
    assert (values == 0).any() and (values != 0).mean() > 0.5  # both data and fill around the tiles


@pytest.mark.parametrize("dtype,nodata,fill,mask", [
    ("uint16", 7, 0, False),  # nodata differs from the fill value: replaced after an unmasked read
    ("uint16", 0, 0, False),
    ("uint16", None, 0, False),  # no nodata: every pixel valid
    ("uint16", None, 0, True),  # internal mask: masked read
    ("float32", float("nan"), float("nan"), False),
    ("int16", -5, -5, False),
])
def test_direct_reads_match_stackstac_vrt_reads(tmp_path: Path, dtype: str, nodata: Any, fill: Any,
                                                mask: bool) -> None:
    """Direct windowed reads give what stackstac's WarpedVRT reader gives, window by window: inside the
    file, across its edge and outside it, nodata and masks included."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin
    from rasterio.windows import Window
    from stackstac.raster_spec import RasterSpec
    from stackstac.rio_reader import AutoParallelRioReader

    rng = np.random.default_rng(1)
    values = rng.integers(0, 12, (40, 50)).astype(dtype)
    path = tmp_path / "a.tif"
    profile = {"driver": "GTiff", "width": 50, "height": 40, "count": 1, "dtype": dtype, "nodata": nodata,
               "crs": "EPSG:32629", "transform": from_origin(500100, 3400000, 10, 10)}
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(values, 1)
        if mask:
            dst.write_mask(values != 3)
    spec = RasterSpec(epsg=32629, bounds=(500000, 3399400, 500800, 3400100), resolutions_xy=(10, 10))
    kw = {"url": str(path), "spec": spec, "resampling": Resampling.nearest, "dtype": np.dtype(dtype),
          "fill_value": np.dtype(dtype).type(fill), "scale_offset": (1.0, 0.0)}
    ours, theirs = readers.PixelsReader(**kw), AutoParallelRioReader(**kw)
    for window in (Window(10, 10, 50, 40), Window(12, 15, 8, 9), Window(0, 0, 30, 30), Window(55, 45, 25, 25),
                   Window(70, 0, 10, 10), Window(0, 0, 80, 70)):
        got, want = ours.read(window), theirs.read(window)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert isinstance(ours._inner, readers._AlignedReader)  # the direct path was taken
    # through GDAL's C API, except where the mask band is more than nodata (rasterio's masked read)
    assert isinstance(ours._inner._dataset._ds, LocalRaster) is not mask


def _geotiff(path: Path, values: np.ndarray) -> None:
    import rasterio
    from rasterio.transform import from_origin

    tmp = path.with_suffix(".part.tif")
    with rasterio.open(tmp, "w", driver="GTiff", width=values.shape[1], height=values.shape[0], count=1,
                       dtype=values.dtype, nodata=0, crs="EPSG:32629",
                       transform=from_origin(500000, 3400000, 10, 10)) as dst:
        dst.write(values, 1)
    tmp.replace(path)  # a new inode, as a re-download would leave


@pytest.fixture
def local_opens(monkeypatch) -> list[str]:
    """The paths ``LocalRaster.open`` is called with from now on, in order."""
    opens: list[str] = []
    real_open = LocalRaster.open.__func__
    monkeypatch.setattr(LocalRaster, "open", classmethod(lambda cls, p, o=None: (opens.append(p),
                                                                                   real_open(cls, p, o))[1]))
    return opens


def _checked_key(path: str) -> tuple[str, frozenset]:
    return path, readers._options_key(readers._reader_open_options())


def _held(hrefs: set[str]) -> set[str]:
    """Which of ``hrefs`` the asset check left open in this process."""
    return {path for path, _ in readers.checked_rasters._open} & hrefs


def _release(hrefs: set[str]) -> None:
    for path in hrefs:
        readers.checked_rasters.take(path, readers._reader_open_options())


def test_the_asset_checks_open_is_its_first_readers_until_the_file_changes(tmp_path: Path,
                                                                          local_opens: list[str]) -> None:
    from rasterio.enums import Resampling
    from rasterio.windows import Window
    from stackstac.raster_spec import RasterSpec

    path = tmp_path / "a.tif"
    first, second = (np.arange(1, 401, dtype="uint16").reshape(20, 20) + k for k in (0, 1000))
    _geotiff(path, first)
    spec = RasterSpec(epsg=32629, bounds=(500000, 3399800, 500200, 3400000), resolutions_xy=(10, 10))
    kw = {"url": str(path), "spec": spec, "resampling": Resampling.nearest, "dtype": np.dtype("uint16"),
          "fill_value": np.uint16(0), "scale_offset": (1.0, 0.0),
          "gdal_env": readers.gdal_env(readers.GDAL_CLOUD_ENV)}
    assert readers._checked_local(str(path)) and local_opens == [str(path)]
    checked = readers.checked_rasters._open[_checked_key(str(path))][2]
    reader = readers.PixelsReader(**kw)
    np.testing.assert_array_equal(reader.read(Window(0, 0, 20, 20)), first)
    assert local_opens == [str(path)] and reader._inner._dataset._ds is checked  # no second open
    assert _checked_key(str(path)) not in readers.checked_rasters._open

    assert readers._checked_local(str(path))
    stale = readers.checked_rasters._open[_checked_key(str(path))][2]
    _geotiff(path, second)  # replaced between the check and the read
    np.testing.assert_array_equal(readers.PixelsReader(**kw).read(Window(0, 0, 20, 20)), second)
    assert len(local_opens) == 3 and stale._handle is None  # opened as it is now; the stale one closed


def test_checked_rasters_keep_at_most_their_limit(tmp_path: Path) -> None:
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"{k}.tif")
        _geotiff(paths[-1], np.full((4, 4), k + 1, "uint16"))
    held = readers.CheckedRasters(limit=2)
    rasters = [LocalRaster.open(str(p)) for p in paths]
    for p, r in zip(paths, rasters):
        held.put(str(p), {}, r, readers.file_stamp(str(p)))
    assert len(held) == 2 and rasters[0]._handle is None  # the oldest closed
    assert held.take(str(paths[0]), {}) is None and held.take(str(paths[2]), {"VSI_CACHE": True}) is None
    assert held.take(str(paths[2]), {}) is rasters[2] and len(held) == 1
    spare = LocalRaster.open(str(paths[2]))
    held.put("GTIFF_DIR:1:" + str(paths[2]), {}, spare, readers.file_stamp("GTIFF_DIR:1:" + str(paths[2])))
    assert spare._handle is None and len(held) == 1  # nothing to compare later: closed, not kept


def _taken_here(path: str) -> bool:
    return readers.checked_rasters.take(path, readers._reader_open_options()) is not None


def test_a_forked_child_never_takes_its_parents_open_files(tmp_path: Path) -> None:
    """A fork copies the parent's open dataset and shares its file offset: a child reading it would race
    the parent."""
    import multiprocessing

    path = tmp_path / "a.tif"
    _geotiff(path, np.full((4, 4), 3, "uint16"))
    assert readers._checked_local(str(path))
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_taken_here, (str(path),)) is False
    assert _taken_here(str(path))  # still the parent's


def test_a_cube_read_after_its_asset_check_opens_no_file_again(sample: tuple[Path, Feature],
                                                              local_opens: list[str]) -> None:
    catalog, feature = sample
    cfg = load_config({"start": "2021-11-01", "end": "2021-12-31", "mode": "all", "platforms": "SENTINEL_2",
                       "bands": ["red", "nir"], "mask": "none", "catalog": str(catalog), "chunksize": 64})
    items, problems = readers.check_assets(search(cfg, feature), cfg)
    hrefs = {s.href for i in items for s in i.sources.values()}

    assert not problems and len(hrefs) == 2 * len(items) and _held(hrefs) == hrefs
    local_opens.clear()  # the check's own opens: counted from here
    with dask.config.set(scheduler="threads"):
        got = build_cube(items, feature, cfg, time_chunks=1).values
    assert local_opens == [] and _held(hrefs) == set()
    with dask.config.set(scheduler="threads"):  # nothing held now: every asset opened, same pixels
        np.testing.assert_array_equal(build_cube(items, feature, cfg, time_chunks=1).values, got)
    assert len(set(local_opens)) == 2 * len(items)


def test_the_check_leaves_files_open_only_where_this_process_reads_them(sample: tuple[Path, Feature],
                                                                        dask_scheduler) -> None:
    from distributed import Client

    from pixels_xr.compose import observations

    catalog, feature = sample
    cfg = load_config({"start": "2021-11-01", "end": "2021-12-31", "mode": "all", "platforms": "SENTINEL_2",
                       "bands": ["green"], "mask": "none", "catalog": str(catalog)})
    found = search(cfg, feature)
    hrefs = {s.href for i in found for s in i.sources.values()}

    _release(hrefs)  # whatever an earlier test left
    readers.check_assets(found, cfg, keep_open=False)
    assert _held(hrefs) == set()
    with Client(dask_scheduler.address):  # the default scheduler now: its workers are other processes
        assert not readers.reads_in_this_process()
        readers.check_assets(found, cfg)
        assert _held(hrefs) == set()
    with dask.config.set(scheduler="processes"):
        assert not readers.reads_in_this_process()
    with dask.config.set(scheduler="threads"):
        assert readers.reads_in_this_process()
        readers.check_assets(found, cfg)
    assert _held(hrefs) == hrefs
    _release(hrefs)  # with the odc loader no reader would take them:
    observations(cfg, feature, items=found, loader="odc")
    assert _held(hrefs) == set()
