"""Grouped runs: nearby small features share one search, cube and reduction and stay themselves.

Each member of a group must give what the feature gives alone (``collect`` in this process, the
per-feature engine), fail alone, resume alone, and be empty alone when no item covers it. The sample has
swath edges, so members of one group have different items (different empty bins and item ids).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely
from distributed import Client
from ledger_files import drop_feature, drop_units, recorded_units, recorded_whole
from shapely.geometry import box

from pixels_xr.batch import run_batch
from pixels_xr.compose import collect
from pixels_xr.config import load_config
from pixels_xr.features import Feature
from pixels_xr.grid import make_grid
from pixels_xr.groups import GROUP_CELL, group_features, window
from pixels_xr.io.zarr_store import open_feature

RES = 10.0


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory):
    from pixels_xr.testing.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("groups") / "sample", n_dates=10, width=96, height=96,
                       every_days=6)


@pytest.fixture
def client(dask_scheduler):
    with Client(dask_scheduler.address, set_as_default=False) as c:
        yield c


def make_config(sample, **overrides):
    base = {"start": "2021-11-01", "end": "2021-12-31", "mode": "composite", "composite_method": "median",
            "interval": "months", "platforms": "SENTINEL_2", "bands": ["red", "nir"],
            "catalog": str(sample.catalog), "chunksize": 64}
    return load_config({key: value for key, value in {**base, **overrides}.items() if value is not None})


def fields(sample) -> list[Feature]:
    """Small parcels across the area (both tiles, both swath edges): squares, a triangle, an L-shape."""
    left, _, _, top = sample.bounds
    out = []
    for k, (col, row, size) in enumerate([(3, 3, 12), (40, 10, 9), (80, 30, 14), (150, 60, 10),
                                          (120, 5, 8), (60, 70, 11)]):
        x0, y1 = left + col * RES + 3.0, top - row * RES - 4.0  # off the pixel lattice: edges are snapped
        square = box(x0, y1 - size * RES, x0 + size * RES, y1)
        if k == 1:
            square = shapely.Polygon([(x0, y1), (x0 + size * RES, y1), (x0, y1 - size * RES)])
        if k == 2:
            square = square.difference(box(x0 + 7 * RES, y1 - 7 * RES, x0 + 20 * RES, y1 + RES))
        out.append(Feature(f"p{k}", square, crs=sample.crs))
    return out


def test_grouping_rule(sample) -> None:
    config = make_config(sample)
    small = fields(sample)
    left, _, _, top = sample.bounds
    big = Feature("big", box(left, top - 400 * RES, left + 400 * RES, top), crs=sample.crs)  # > half a cell
    dated = [Feature(f"d{k}", f.geometry, f.crs, date=__import__("datetime").date(2022, 1, k + 1))
             for k, f in enumerate(small[:2])]
    groups = group_features(config, [*small, big])
    assert [[f.id for f in g.features] for g in groups] == [[f.id for f in small], ["big"]]
    assert groups[1].single and not groups[0].single
    assert groups[0].bounds == (min(f.geometry.bounds[0] for f in small), min(f.geometry.bounds[1] for f in small),
                                max(f.geometry.bounds[2] for f in small), max(f.geometry.bounds[3] for f in small))
    assert len(group_features(config, small, max_members=4)) == 2
    dynamic = make_config(sample, start=None, end=None, dynamic_dates_interval="months", dynamic_dates_step=2)
    assert [len(g.features) for g in group_features(dynamic, dated)] == [1, 1]  # other dates, other groups
    far = Feature("far", box(left + GROUP_CELL * RES * 3, top - 100, left + GROUP_CELL * RES * 3 + 100, top),
                  crs=sample.crs)
    assert len(group_features(config, [small[0], far])) == 2
    outer = make_grid((left, top - 100 * RES, left + 100 * RES, top), sample.crs, RES, (left, top))
    inner = make_grid((left + 20 * RES, top - 40 * RES, left + 30 * RES, top - 25 * RES), sample.crs, RES,
                      (left, top))
    assert window(outer, inner) == (slice(25, 40), slice(20, 30))
    shifted = make_grid((left + 25.0, top - 400.0, left + 305.0, top - 250.0), sample.crs, RES, (5.0, 0.0))
    assert window(outer, shifted) is None  # another lattice phase: not a window


@pytest.mark.parametrize("mode", ["composite", "latest_pixel", "all"])
def test_grouped_run_equals_each_feature_alone(tmp_path, sample, client, mode) -> None:
    config = make_config(sample, mode=mode, interval=None if mode == "all" else "months",
                         composite_method="median" if mode == "composite" else None)
    small = fields(sample)
    out = str(tmp_path / "run.zarr")
    report = run_batch(config, small, out, client=client, progress=False)
    assert report.ok, report.to_dict()
    assert len(group_features(config, small)) == 1  # one group: every member came from its reduction
    empties = set()
    for f in small:
        alone = collect(config, f).compute(scheduler="synchronous")
        got = open_feature(out, f.id).load()
        assert set(got.data_vars) == set(alone.data_vars), f.id  # (listing order is the store's)
        for name in alone.data_vars:
            assert got[name].dtype == alone[name].dtype, (f.id, name)
            np.testing.assert_array_equal(got[name].values, alone[name].values, err_msg=f"{f.id} {name}")
        for name in ("time", "x", "y", *(c for c in ("time_end", "empty", "partial") if c in alone.coords)):
            np.testing.assert_array_equal(got[name].values, alone[name].values, err_msg=f"{f.id} {name}")
        assert got.rio.transform() == alone.rio.transform() and got.rio.crs == alone.rio.crs
        assert json.loads(got.attrs["item_ids"]) == json.loads(alone.attrs["item_ids"])
        assert got.attrs["feature"] == f.id and got.attrs["config"] == alone.attrs["config"]
        if "empty" in alone.coords:
            empties.add(tuple(alone.empty.values))
    items = json.loads((Path(out) / "stac" / small[3].id / f"{small[3].id}.json").read_text())
    assert items["properties"]["proj:shape"] == list(open_feature(out, small[3].id).red.shape[1:])


def test_member_fails_alone_and_resumes_alone(tmp_path, sample, client) -> None:
    small = fields(sample)
    tight = make_config(sample, max_pixels=200)  # p2 (15 × 15 px grid) exceeds it; the rest do not
    out = tmp_path / "run.zarr"
    report = run_batch(tight, small, str(out), client=client, progress=False)
    failed = [f for f in report.features if f.status == "failed"]
    assert [f.id for f in failed] == ["p2"] and failed[0].stage == "build" and "max_pixels" in failed[0].error
    assert all(f.status == "done" and f.units_written == 2 for f in report.features if f.id != "p2")

    config = make_config(sample)
    out = tmp_path / "resume.zarr"
    first = run_batch(config, small, str(out), client=client, progress=False)
    assert first.ok and first.units_written == 12
    reference = {f.id: open_feature(str(out), f.id).load() for f in small}
    drop_units(out, [u for u in recorded_units(out) if u[0] == "p1" and u[1].startswith("2021-12")][:1])
    shutil.rmtree(out / "p4")  # a whole member lost (its data and its records)
    drop_feature(out, "p4")
    again = run_batch(config, small, str(out), client=client, progress=False)
    assert again.ok
    written = {f.id: f.units_written for f in again.features}
    assert written == {"p0": 0, "p1": 1, "p2": 0, "p3": 0, "p4": 2, "p5": 0}
    for f in small:
        got = open_feature(str(out), f.id).load()
        for name in reference[f.id].data_vars:
            np.testing.assert_array_equal(got[name].values, reference[f.id][name].values, err_msg=f.id)
    assert run_batch(config, small, str(out), client=client, progress=False).units_written == 0
    # a member's store holds every step in one chunk: run alone later, the feature is rewritten whole
    drop_units(out, [u for u in recorded_units(out) if u[0] == "p0" and u[1].startswith("2021-11")][:1])
    alone = run_batch(config, small[:1], str(out), client=client, progress=False)
    assert alone.ok and alone.units_written == 2
    assert {u["reason"] for u in alone.features[0].units} == {"rewritten whole (stored as one chunk)"}
    got = open_feature(str(out), "p0").load()
    for name in reference["p0"].data_vars:
        np.testing.assert_array_equal(got[name].values, reference["p0"][name].values, err_msg=name)


def test_member_without_items_is_empty(tmp_path, sample, client) -> None:
    """A parcel just west of the tiles, in the same cell as covered ones: its bins empty, the others not."""
    left, bottom, _, _ = sample.bounds
    outside = Feature("outside", box(left - 60 * RES, bottom + 10 * RES, left - 50 * RES, bottom + 20 * RES),
                      crs=sample.crs)
    small = fields(sample)[3:5]
    config = make_config(sample)
    assert len(group_features(config, [*small, outside])) == 1
    report = run_batch(config, [*small, outside], str(tmp_path / "run.zarr"), client=client, progress=False)
    assert report.ok, report.to_dict()
    empty = next(f for f in report.features if f.id == "outside")
    assert empty.items == 0 and empty.empty_reason == "no items matched the search" and empty.units_written == 2
    ds = open_feature(str(tmp_path / "run.zarr"), "outside").load()
    assert ds.empty.values.all() and int(ds.clear_count.max()) == 0 and np.isnan(ds.red.values).all()
    covered = open_feature(str(tmp_path / "run.zarr"), small[0].id).load()
    assert not covered.empty.values.all() and int(covered.clear_count.max()) > 0


def test_incremental_group_rerun_checks_and_reads_only_the_new_bins_items(tmp_path, sample, client) -> None:
    """Run 1 over a catalog without December; run 2 with it computes December's units only, opens none of
    November's assets (one is missing now and goes unnoticed: its units are done), and leaves member
    stores equal, file for file, to a clean run over the final catalog."""
    from pixels_xr.catalog import read_local

    items = sorted(read_local(sample.catalog), key=lambda i: i["properties"]["datetime"])
    catalog = tmp_path / "items.json"

    def write(its: list[dict]) -> None:
        catalog.write_text(json.dumps({"type": "FeatureCollection", "features": its}))

    config = make_config(sample, catalog=str(catalog))
    small = fields(sample)
    write([i for i in items if not i["properties"]["datetime"].startswith("2021-12")])
    out = tmp_path / "nightly.zarr"
    assert run_batch(config, small, str(out), client=client, progress=False).ok
    write(items)
    november = next(i for i in items if i["properties"]["datetime"].startswith("2021-11"))
    asset = Path(november["assets"]["red"]["href"])
    asset = asset if asset.is_absolute() else Path(sample.catalog).parent / asset
    hidden = asset.with_name(asset.name + ".away")
    asset.rename(hidden)
    try:
        second = run_batch(config, small, str(out), client=client, progress=False)
    finally:
        hidden.rename(asset)
    assert second.ok and second.skipped_assets == 0, second.to_dict()
    assert {u["unit"] for f in second.features for u in f.units} == {"2021-12-01/2021-12-31"}
    clean = tmp_path / "clean.zarr"
    assert run_batch(config, small, str(clean), client=client, progress=False).ok
    for f in small:
        got = {p.relative_to(out): p.read_bytes() for p in sorted((out / f.id).rglob("*")) if p.is_file()}
        want = {p.relative_to(clean): p.read_bytes() for p in sorted((clean / f.id).rglob("*")) if p.is_file()}
        assert got == want, f.id
        # its STAC item, made from the member's grid and the store's grown time axis, is the clean run's
        assert json.loads((out / "stac" / f.id / f"{f.id}.json").read_text()) == \
            json.loads((clean / "stac" / f.id / f"{f.id}.json").read_text()), f.id
    assert recorded_units(out) == recorded_units(clean) and all(recorded_whole(out).values())


def test_a_members_window_is_cut_from_its_blocks_as_from_the_joined_blocks() -> None:
    from pixels_xr.batch import _window

    rng = np.random.default_rng(0)
    heights, widths, steps = [5, 7, 4], [6, 3], [2, 3]  # blocks of unequal sizes, two step groups
    blocks = [[[rng.random((t, h, w)).astype(np.float32) for w in widths] for h in heights] for t in steps]
    joined = np.concatenate([np.concatenate([np.concatenate(row, axis=2) for row in step], axis=1)
                             for step in blocks], axis=0)
    for dy in range(sum(heights)):
        for dx in range(sum(widths)):
            for h, w in ((1, 1), (sum(heights) - dy, sum(widths) - dx), (min(6, sum(heights) - dy), 2)):
                got = _window(blocks, dy, dx, h, w)
                assert got.dtype == joined.dtype
                np.testing.assert_array_equal(got, joined[:, dy:dy + h, dx:dx + w], err_msg=f"{dy} {dx} {h} {w}")
