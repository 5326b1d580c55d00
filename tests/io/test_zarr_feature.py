"""Whole small features written at once (``write_feature``): the same store xarray's ``to_zarr`` gives,
readable and writable by zarr afterwards, locally and on a real S3 endpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from affine import Affine

from pixels_xr.io.zarr_store import (
    _LAYOUTS,
    aligned,
    open_feature,
    update_feature,
    write_feature,
    write_steps,
    write_time_axis,
)

TIMES = np.array([np.datetime64(f"2022-{m:02d}-01", "ns") for m in range(1, 7)])


def feature(height: int, width: int, seed: int) -> xr.Dataset:
    """A member-like Dataset: float bands with NaN, counts, pick times with NaT, time flags, CRS."""
    rng = np.random.default_rng(seed)
    red = rng.random((6, height, width)).astype("float32")
    red[0, :2] = np.nan
    picked = rng.integers(0, 10**6, (6, height, width)).astype("datetime64[s]").astype("datetime64[ns]")
    picked[1, 0] = np.datetime64("NaT")
    ds = xr.Dataset({"red": (("time", "y", "x"), red),
                     "clear_count": (("time", "y", "x"), rng.integers(0, 5, (6, height, width)).astype("uint16"),
                                     {"nodata": 0}),
                     "source_time": (("time", "y", "x"), picked)},
                    coords={"time": TIMES, "time_end": ("time", TIMES + np.timedelta64(27, "D")),
                            "empty": ("time", rng.random(6) > 0.5), "y": 3369995.0 - 10 * np.arange(height),
                            "x": 500005.0 + 10 * np.arange(width)},
                    attrs={"feature": f"f{seed}", "item_ids": json.dumps({"2022-01-01": [f"i{seed}"]})})
    return ds.rio.write_crs("EPSG:32629").rio.write_transform(Affine(10, 0, 500000 + seed, 0, -10, 3370000))


@pytest.mark.parametrize("zarr_format", [3, 2])
@pytest.mark.parametrize("whole", [True, False])
def test_written_at_once_equals_xarray_to_zarr(tmp_path, monkeypatch, zarr_format, whole) -> None:
    """Values, coordinates, attributes and georeferencing as xarray writes them; a small feature in one
    chunk per variable, a larger one in ``aligned``'s chunks (one step × chunksize)."""
    from pixels_xr.io import zarr_store

    if not whole:
        monkeypatch.setattr(zarr_store, "WHOLE_CHUNK_BYTES", 1000)
    _LAYOUTS.clear()
    for k, (height, width) in enumerate([(20, 20), (13, 27), (70, 45), (20, 20), (9, 9)]):  # first: xarray's
        ds = feature(height, width, k)
        write_feature(ds, str(tmp_path / "fast.zarr"), f"f{k}", chunksize=32, zarr_format=zarr_format)
        aligned(ds, 32).to_zarr(tmp_path / "ref.zarr", group=f"f{k}", mode="w", zarr_format=zarr_format,
                                consolidated=False)
        got, ref = open_feature(str(tmp_path / "fast.zarr"), f"f{k}"), open_feature(str(tmp_path / "ref.zarr"), f"f{k}")
        xr.testing.assert_identical(got.load(), ref.load())
        assert got.rio.transform() == ref.rio.transform() and got.rio.crs == ref.rio.crs
        for name in got.data_vars:  # whole in v3: one shard of a chunk per step; in v2: one chunk
            want = (6, height, width) if whole else (1, min(32, height), min(32, width))
            sharded = whole and zarr_format == 3
            assert got[name].encoding["chunks"] == ((1, height, width) if sharded else want)
            assert got[name].encoding.get("shards") == (want if sharded else None)
            assert zarr_store.time_chunk(str(tmp_path / "fast.zarr"), f"f{k}") == want[0]
    assert len(_LAYOUTS) == 1 and (next(iter(_LAYOUTS.values())) is not None) == (zarr_format == 3)


def test_written_at_once_then_grown_and_rewritten_by_steps(tmp_path) -> None:
    store = str(tmp_path / "out.zarr")
    for k in range(2):  # the second is written from the kept metadata
        write_feature(feature(11, 14, 100 + k), store, f"f{k}", chunksize=8)
    longer = xr.Dataset(coords={"time": np.append(TIMES, np.datetime64("2022-07-01", "ns")),
                                "time_end": ("time", np.append(TIMES, np.datetime64("2022-07-01", "ns"))),
                                "empty": ("time", np.zeros(7, bool))})
    write_time_axis(store, "f1", longer)
    new = np.full((1, 11, 14), 0.5, "float32")
    write_steps(store, "f1", {"red": new}, [6])
    ds = open_feature(store, "f1").load()
    assert ds.sizes["time"] == 7 and zarr.open_group(store, path="f1")["red"].shape == (7, 11, 14)
    np.testing.assert_array_equal(ds.red.values[6], new[0])
    np.testing.assert_array_equal(ds.red.values[:6], feature(11, 14, 101).red.values)


@pytest.mark.parametrize("grow", [False, True])
def test_updated_in_one_write_equals_the_zarr_path_and_a_fresh_write(tmp_path, grow) -> None:
    """``update_feature`` (an incremental re-run of a member: a stale step rewritten, the axis grown by a
    new bin, item ids merged) gives what ``write_time_axis`` + ``write_steps`` give through zarr, and the
    very files ``write_feature`` writes for the updated Dataset."""
    from pixels_xr.io import storage

    base = feature(11, 14, 7)
    stores = {k: str(tmp_path / f"{k}.zarr") for k in ("zarr", "direct", "fresh")}
    for store in stores.values():
        write_feature(base, store, "f0", chunksize=8)
    n = 7 if grow else 6
    times = np.append(TIMES, np.datetime64("2022-07-01", "ns"))[:n]
    empty = np.append(base.empty.values, False)[:n]
    empty[2] = not empty[2]
    axis = xr.Dataset(coords={"time": times, "time_end": ("time", times + np.timedelta64(27, "D")),
                              "empty": ("time", empty)})
    at = [2, 6] if grow else [2]
    rng = np.random.default_rng(0)
    values = {"red": rng.random((len(at), 11, 14)).astype("float32") * np.array([np.nan, 1][:len(at)])[:, None, None],
              "clear_count": rng.integers(0, 5, (len(at), 11, 14)).astype("uint16"),
              "source_time": rng.integers(0, 10**6, (len(at), 11, 14)).astype("datetime64[s]").astype("datetime64[ns]")}
    now = {**base.attrs, "item_ids": json.dumps({"2022-03-01": ["new"]})}
    merged = {**now, "item_ids": json.dumps({"2022-01-01": ["i7"], "2022-03-01": ["new"]})}

    write_time_axis(stores["zarr"], "f0", axis, merged)
    write_steps(stores["zarr"], "f0", values, at)
    assert update_feature(stores["direct"], "f0", values, at, axis,
                          lambda old: {**now, "item_ids": json.dumps({**json.loads(old["item_ids"]),
                                                                       **json.loads(now["item_ids"])})})
    got = open_feature(stores["direct"], "f0").load()
    xr.testing.assert_identical(got, open_feature(stores["zarr"], "f0").load())

    expected = base.isel(time=[*range(6), 5][:n]).assign_coords(time=times, time_end=axis.time_end,
                                                                 empty=axis.empty)  # dtypes kept
    expected.attrs = merged
    for name, v in values.items():
        data = expected[name].values.copy()
        data[at] = v
        expected[name] = (("time", "y", "x"), data, base[name].attrs)
    write_feature(expected, stores["fresh"], "f0", chunksize=8)
    assert storage.read_tree(stores["direct"] + "/f0") == storage.read_tree(stores["fresh"] + "/f0")


def test_shards_are_the_bytes_zarr_writes(tmp_path) -> None:
    """A whole feature's shards (one chunk per step, all-fill steps left out, then the index) made from the
    kept metadata are byte for byte what zarr writes for the same Dataset."""
    from pixels_xr.io import storage, zarr_store

    _LAYOUTS.clear()
    store = str(tmp_path / "out.zarr")
    write_feature(feature(8, 9, 0), store, "f0", chunksize=16)  # through xarray: its metadata kept
    ds = feature(11, 14, 1)
    ds["red"][3] = np.nan
    write_feature(ds, store, "f1", chunksize=16)  # made directly
    ours = storage.read_tree(store + "/f1")
    encoded = zarr_store._json_attrs(ds)
    zarr_store._set_encodings(encoded, 11, 14, 1, shards=6)
    theirs = zarr_store._xarray_files(encoded, 3)[1]
    for name in ("red", "clear_count", "source_time"):
        assert ours[f"{name}/c.0.0.0"] == theirs[f"{name}/c/0/0/0"], name
    assert zarr.open_group(store, path="f1")["red"].shards == (6, 11, 14)
    lazy = open_feature(store, "f1")  # a task per shard, not per step
    assert lazy.red.chunks == ((6,), (11,), (14,)) and lazy.time_end.chunks == ((6,),)
    np.testing.assert_array_equal(lazy.red.values, ds.red.values)


def test_update_refuses_a_store_of_another_layout(tmp_path) -> None:
    """A feature written in aligned chunks (template + regions) is left to the zarr path, untouched."""
    from pixels_xr.io import storage

    store = str(tmp_path / "out.zarr")
    aligned(feature(11, 14, 3), 8).to_zarr(store, group="f0", mode="w", consolidated=False)
    before = storage.read_tree(store + "/f0")
    assert not update_feature(store, "f0", {"red": np.zeros((1, 11, 14), "float32")}, [0])
    assert storage.read_tree(store + "/f0") == before


def test_written_at_once_on_s3(s3_server) -> None:
    bucket = s3_server.make_bucket("pixels-feature")
    store = f"s3://{bucket}/run.zarr"
    for k in range(2):
        write_feature(feature(10, 12, k), store, f"f{k}", chunksize=16)
    got, want = open_feature(store, "f1").load(), feature(10, 12, 1)
    for name in ("red", "clear_count", "source_time", "empty", "time_end", "x", "y"):
        np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)
    assert json.loads(got.attrs["item_ids"]) == {"2022-01-01": ["i1"]} and got.rio.crs == want.rio.crs
    write_feature(feature(10, 12, 5), store, "f1", chunksize=16)  # replaced whole
    np.testing.assert_array_equal(open_feature(store, "f1").clear_count.values, feature(10, 12, 5).clear_count.values)
    new = np.full((1, 10, 12), 3, "uint16")
    assert update_feature(store, "f1", {"clear_count": new}, [4])  # updated in one read and one write
    np.testing.assert_array_equal(open_feature(store, "f1").clear_count.values[4], new[0])
