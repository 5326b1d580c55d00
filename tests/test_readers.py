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
    from pixels_xr.sample import make_sample

    info = make_sample(tmp_path_factory.mktemp("sample"), n_dates=6, width=128, height=128, tiles=1,
                       every_days=4)
    return info.catalog, Feature("area", box(*info.bounds), crs=info.crs)


def _cube(sample: tuple[Path, Feature], pool_size: int, bands: list[str], loader: str) -> Any:
    catalog, feature = sample
    cfg = load_config({"start": "2021-11-01", "end": "2021-12-31", "mode": "all", "platforms": "SENTINEL_2",
                       "bands": bands, "mask": "none", "catalog": str(catalog), "chunksize": 64,
                       "pool_size": pool_size})
    items = search(cfg, feature)
    assert len(items) >= 4
    return build_cube(items, feature, cfg, loader=loader, time_chunks=1)


@pytest.mark.parametrize("loader,bands", [("stackstac", ["red"]), ("stackstac", ["red", "nir", "green"]),
                                          ("odc", ["red", "nir"])])
def test_pool_size_bounds_concurrent_reads_under_many_threads(sample: tuple[Path, Feature], loader: str,
                                                              bands: list[str], monkeypatch: Any) -> None:
    from stackstac.rio_reader import AutoParallelRioReader

    results = {}
    for pool_size in (2, 16):
        gauge = Gauge()
        if loader == "stackstac":  # the GDAL read under stackstac's reader
            monkeypatch.setattr(AutoParallelRioReader, "read", gauge.wrap(AutoParallelRioReader.read))
        else:  # odc-stac opens and reads the file in rio_read
            monkeypatch.setattr(readers, "rio_read", gauge.wrap(readers.rio_read))
        cube = _cube(sample, pool_size, bands, loader)
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
