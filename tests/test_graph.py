"""One fused task per output block (``pixels_xr.fused``) and the Zarr region writes built on it.

The fused region write must leave exactly the bytes xarray's own ``to_zarr(region=...)`` leaves, for every
mode (pick modes carry ``source_time`` as CF-encoded int64, median composites float32), and tasks needed by
several blocks (an opening's overlap, reader tables) must still run once.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from shapely.geometry import box

from pixels_xr.compose import collect
from pixels_xr.config import load_config
from pixels_xr.errors import OutputError
from pixels_xr.features import Feature, load_features
from pixels_xr.graph import Task, TaskRef, block_graph, submittable
from pixels_xr.io.zarr_store import aligned, region_write, write_template


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory):
    from pixels_xr.testing.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("fused") / "sample", n_dates=12, width=96, height=96,
                       every_days=5)


def _whole_area(sample) -> Feature:
    """A field over the whole sample (both tiles): several blocks of 64 px each way."""
    minx, miny, maxx, maxy = sample.bounds
    return Feature("whole", box(minx + 5, miny + 5, maxx - 5, maxy - 5), crs=sample.crs)


def _raw(store: Path, group: str) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(store), path=group, mode="r")
    return {name: root[name][...] for name in root.array_keys()}


@pytest.mark.parametrize("overrides", [
    {"mode": "latest_pixel", "bands": ["blue", "red", "scl"]},
    {"mode": "composite", "composite_method": "median", "mask_cleanup": {"opening": 1, "dilation": 2}},
    {"mode": "composite", "composite_method": "first_clear", "output": "raw"},
    {"mode": "all", "interval": None, "end": "2021-11-30"},
], ids=["latest_pixel", "median-cleanup", "first_clear-raw", "all"])
def test_fused_region_write_leaves_the_bytes_xarray_leaves(tmp_path, sample, overrides) -> None:
    # Nov–Feb: the sample's dates end in December, so January and February are empty bins
    config = load_config({k: v for k, v in {
        "start": "2021-11-01", "end": "2022-02-28", "interval": "months", "platforms": "SENTINEL_2",
        "bands": ["blue", "red", "nir"], "catalog": str(sample.catalog), "chunksize": 64, **overrides}.items()
        if v is not None})
    ds = aligned(collect(config, _whole_area(sample)), config.chunksize)
    assert ds.sizes["time"] >= 2 and len(ds.chunks["x"]) >= 2 and len(ds.chunks["y"]) >= 2
    if overrides["mode"] != "all":
        assert ds["empty"].values.tolist() == [False, False, True, True]
    region = slice(1, ds.sizes["time"])
    ours, theirs = tmp_path / "ours.zarr", tmp_path / "theirs.zarr"
    write_template(ds, str(theirs), "f")
    names = [n for n, v in ds.data_vars.items() if "time" in v.dims]
    ds[names].isel(time=region).drop_vars(list(ds.coords)).to_zarr(
        str(theirs), group="f", mode="r+", region={"time": region}, consolidated=False)
    region_write(ds, str(ours), "f", region, template_format=3).compute()  # the template in the same graph
    expected, got = _raw(theirs, "f"), _raw(ours, "f")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert np.array_equal(got[name], expected[name], equal_nan=got[name].dtype.kind == "f"), name
    root_ours, root_theirs = zarr.open_group(str(ours), path="f"), zarr.open_group(str(theirs), path="f")
    for name in expected:
        assert dict(root_ours[name].attrs) == dict(root_theirs[name].attrs), name


def test_region_write_is_one_task_per_block(sample) -> None:
    config = load_config({"start": "2021-11-01", "end": "2021-12-31", "interval": "months",
                          "mode": "latest_pixel",
                          "platforms": "SENTINEL_2", "bands": ["blue", "red"], "catalog": str(sample.catalog),
                          "chunksize": 64})
    feature = max(load_features(sample.features), key=lambda f: f.geometry.area)
    ds = aligned(collect(config, feature), config.chunksize)
    graph = dict(region_write(ds, "/nonexistent.zarr", "f", slice(0, ds.sizes["time"])).__dask_graph__())
    blocks = ds.sizes["time"] * len(ds.chunks["y"]) * len(ds.chunks["x"])
    writes = [k for k in graph if isinstance(k, tuple) and str(k[0]).startswith("pixels-zarr-write")]
    assert len(writes) == blocks
    assert len(graph) <= blocks + ds.sizes["time"] + 1  # + per-bin reader tables + the final task


def test_tasks_shared_by_blocks_run_once() -> None:
    calls: list[tuple[int, int]] = []
    lock = threading.Lock()

    def source(block: np.ndarray, block_info=None) -> np.ndarray:
        with lock:
            calls.append(tuple(loc[0] for loc in block_info[None]["array-location"]))
        return block + 1.0

    base = da.map_blocks(source, da.arange(64.0, chunks=16).reshape(8, 8).rechunk(4), dtype=float)
    smooth = base.map_overlap(lambda b: b * 2, depth=1, boundary="none")  # neighbours' sources are shared
    other = base * 3
    seen: dict[tuple[int, ...], list[np.ndarray]] = {}

    def consume(block: tuple[int, ...], values: list[np.ndarray], tag: str) -> tuple[int, ...]:
        assert tag == "t"
        seen[block] = values
        return block

    blocks = list(itertools.product(range(2), range(2)))
    graph, keys = block_graph([smooth, other], blocks, consume, ("t",))
    assert list(dask.get(graph, keys)) == blocks
    assert len(calls) == 4 and len(set(calls)) == 4  # each source block once, shared across blocks
    expected_smooth, expected_other = smooth.compute(), other.compute()
    for (i, j), (s, o) in seen.items():
        np.testing.assert_array_equal(s, expected_smooth[4 * i:4 * i + 4, 4 * j:4 * j + 4])
        np.testing.assert_array_equal(o, expected_other[4 * i:4 * i + 4, 4 * j:4 * j + 4])


def test_unshared_work_is_fused_into_the_block_task() -> None:
    arr = (da.ones((8, 8), chunks=4) + 1) * 2
    graph, keys = block_graph([arr, arr.T], [(0, 0), (1, 1)], lambda b, v: float(v[0].sum() + v[1].sum()))
    assert set(graph) == set(keys)  # nothing shared: every task lives inside a block task
    assert list(dask.get(graph, keys)) == [128.0, 128.0]


class Untokenizable:
    """A task argument that dask must not tokenize (a stand-in for readers and write jobs, whose tokens were
    a quarter of a small run's client CPU): tokenizing it fails the test."""

    def __len__(self) -> int:
        return 3

    def __dask_tokenize__(self) -> str:
        raise AssertionError("the submitted graph was tokenized")


def test_submittable_graph_is_computed_without_tokenizing_its_tasks(dask_scheduler) -> None:
    from distributed import Client

    dsk = {"pixels-size": Task("pixels-size", len, Untokenizable()),
           "pixels-twice": Task("pixels-twice", lambda n: 2 * n, TaskRef("pixels-size"))}
    with Client(dask_scheduler.address, set_as_default=False) as client:
        first = submittable(dsk)
        assert submittable(dsk)._name != first._name  # a fresh name per submission, never a hash of the tasks
        assert client.get(first, ["pixels-twice", "pixels-size"]) == [6, 3]


def test_bad_template_format_is_refused_before_anything_is_written(tmp_path, sample) -> None:
    config = load_config({"start": "2021-11-01", "end": "2021-12-31", "interval": "months",
                          "mode": "latest_pixel",
                          "platforms": "SENTINEL_2", "bands": ["blue"], "catalog": str(sample.catalog),
                          "chunksize": 64})
    feature = load_features(sample.features)[0]
    ds = aligned(collect(config, feature), config.chunksize)
    with pytest.raises(OutputError, match="zarr_format must be 2 or 3"):
        region_write(ds, str(tmp_path / "out.zarr"), "f", 0, template_format=4)
    assert not (tmp_path / "out.zarr").exists()
