"""Incremental runs: a re-run computes exactly the units whose items changed, grows the time axis for new
bins, keeps bins outside the range, and plans without writing (real STAC API, real Dask, real stores)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster
from ledger_files import recorded_units
from servers import start_stac_api
from shapely.geometry import box
from typer.testing import CliRunner

from pixels_xr import load_config, open_feature, run_batch
from pixels_xr.catalog import read_local
from pixels_xr.cli import app
from pixels_xr.features import Feature
from pixels_xr.io.layout import MANIFEST_DIR
from pixels_xr.signing import ALLOWED_HREFS_ENV
from pixels_xr.testing.sample import make_sample
from pixels_xr.timeslices import RUN_DATE_ENV
from pixels_xr.units import classify, fingerprint

BASE = {"mode": "latest_pixel", "interval": "months", "platforms": "SENTINEL_2", "bands": ["red", "nir"]}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory):
    # 8 dates every 10 days from 2021-11-03: November 3, December 3, January 2 acquisitions
    return make_sample(tmp_path_factory.mktemp("inc") / "sample", n_dates=8, width=64, height=64, tiles=1)


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as lc, \
            Client(lc) as c:
        yield c


def _items(sample) -> list[dict]:
    return sorted(read_local(sample.catalog), key=lambda i: i["properties"]["datetime"])


def _feature(sample) -> list[Feature]:
    return [Feature("field", box(*sample.bounds), crs=sample.crs)]


def _write_catalog(path: Path, items: list[dict]) -> str:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    return str(path)


def _files(store: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of a feature's group: mtime (ns) and bytes."""
    return {str(p.relative_to(store)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted((store / "field").rglob("*")) if p.is_file()}


def _ledger_files(store: Path) -> dict[str, tuple[int, bytes]]:
    """Every record file of the ledger (job records, templates, unit files): mtime (ns) and bytes."""
    root = store / MANIFEST_DIR
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for folder in ("units", "jobs") for p in sorted((root / folder).rglob("*")) if p.is_file()}


def _recorded(store: Path) -> list[str]:
    """The labels of the feature's recorded units."""
    return [label for fid, label in recorded_units(store) if fid == "field"]


def test_a_new_month_in_the_catalog_recomputes_exactly_its_units(sample, client, tmp_path: Path,
                                                                 monkeypatch) -> None:
    monkeypatch.setenv(ALLOWED_HREFS_ENV, f"{sample.root}/")  # the API serves the sample's local files
    items = _items(sample)
    january = [i for i in items if i["properties"]["datetime"].startswith("2022-01")]
    assert january and len(january) < len(items)
    server = start_stac_api([i for i in items if i not in january])
    port = int(server.url.rsplit(":", 1)[1])
    cfg = load_config({**BASE, "start": "2021-11-01", "end": "2022-01-31", "catalog": server.url,
                       "collection": "sentinel-2-l2a"})
    store = tmp_path / "out.zarr"
    try:
        first = run_batch(cfg, _feature(sample), str(store), client=client, progress=False)
        assert first.ok and first.units_written == 3
    finally:
        server.stop()
    server = start_stac_api(items, port=port)  # the catalog grew: same URL, one more month of scenes
    try:
        before, ledger = _files(store), _ledger_files(store)
        planned = run_batch(cfg, _feature(sample), str(store), plan_only=True)
        assert [(u["unit"], u["state"]) for u in planned.features[0].units] == [
            ("2022-01-01/2022-01-31", "stale")]
        assert all(i["id"] in planned.features[0].units[0]["reason"] for i in january[:3])
        assert ledger and _files(store) == before and _ledger_files(store) == ledger  # the plan wrote nothing
        written: list[str] = []
        second = run_batch(cfg, _feature(sample), str(store), client=client, progress=False,
                           on_unit=lambda f, label: written.append(label))
        assert second.ok and written == ["2022-01-01/2022-01-31"]
        assert [u["unit"] for u in second.features[0].units] == written
        after = _files(store)
        changed = {name for name in after if before.get(name) != after[name]}
        # January's chunks, the flag that says January is no longer empty, and metadata (item ids)
        assert changed and all(_in_step(name, 2) or name.endswith("zarr.json") or name == "field/empty/c/0"
                               for name in changed), changed
        assert not any(_in_step(name, 0) or _in_step(name, 1) for name in changed)
        # the same store as a clean run over the final catalog, byte for byte
        clean = tmp_path / "clean.zarr"
        assert run_batch(cfg, _feature(sample), str(clean), client=client, progress=False).ok
        assert _contents(store) == _contents(clean), _differences(store, clean)
        third = run_batch(cfg, _feature(sample), str(store), client=client, progress=False)
        assert third.units_written == 0 and third.features[0].status == "skipped"
    finally:
        server.stop()


def _in_step(name: str, step: int) -> bool:
    """Whether a chunk file holds time step ``step`` (Zarr v3 ``c/<t>/<y>/<x>``, v2 ``<t>.<y>.<x>``)."""
    parts = name.split("/")
    if "c" in parts:
        return parts[parts.index("c") + 1] == str(step) and len(parts) > parts.index("c") + 2
    return parts[-1].split(".")[0] == str(step) and parts[-1].count(".") == 2


def _contents(store: Path) -> dict[str, bytes]:
    return {name: data for name, (_, data) in _files(store).items()}


def test_a_reprocessed_scene_makes_exactly_its_bin_stale(sample, client, tmp_path: Path) -> None:
    items = _items(sample)
    catalog = tmp_path / "items.json"
    cfg = load_config({**BASE, "start": "2021-11-01", "end": "2022-01-31",
                       "catalog": _write_catalog(catalog, items)})
    store = tmp_path / "out.zarr"
    assert run_batch(cfg, _feature(sample), str(store), client=client, progress=False).units_written == 3
    december = next(i for i in items if i["properties"]["datetime"].startswith("2021-12"))
    december["properties"]["updated"] = "2030-01-01T00:00:00Z"  # same tile and day, a newer processing
    _write_catalog(catalog, items)
    written: list[str] = []
    report = run_batch(cfg, _feature(sample), str(store), client=client, progress=False,
                       on_unit=lambda f, label: written.append(label))
    assert written == ["2021-12-01/2021-12-31"]
    assert report.features[0].units == [{"unit": "2021-12-01/2021-12-31", "state": "stale",
                                         "reason": f"reprocessed {december['id']}"}]


def test_a_rolling_range_appends_bins_keeps_old_ones_and_matches_a_clean_run(sample, client, tmp_path: Path,
                                                                            monkeypatch) -> None:
    catalog = _write_catalog(tmp_path / "items.json", _items(sample))
    cfg = load_config({**BASE, "start": "-1 months", "end": "today", "catalog": catalog})
    assert cfg.output_identity == load_config(cfg.model_dump(exclude_none=True)).output_identity
    store = tmp_path / "out.zarr"
    monkeypatch.setenv(RUN_DATE_ENV, "2021-12-10")
    assert [b.label for b in cfg.bins(_feature(sample)[0])] == ["2021-11-01/2021-11-30", "2021-12-01/2021-12-10"]
    assert run_batch(cfg, _feature(sample), str(store), client=client, progress=False).units_written == 2
    monkeypatch.setenv(RUN_DATE_ENV, "2022-01-20")  # a month and a half later: same config, same output
    report = run_batch(cfg, _feature(sample), str(store), client=client, progress=False)
    states = {u["unit"]: (u["state"], u["reason"]) for u in report.features[0].units}
    assert states == {"2021-12-01/2021-12-31": ("stale", "bin end moved (2021-12-01/2021-12-10 → "
                                                         "2021-12-01/2021-12-31)"),
                      "2022-01-01/2022-01-20": ("new", "new bin"),
                      "2021-11-01/2021-11-30": ("gone", "outside the range now: kept")}
    grown = open_feature(str(store), "field").compute()
    assert [str(t)[:10] for t in grown.time.values] == ["2021-11-01", "2021-12-01", "2022-01-01"]
    assert [str(t)[:10] for t in grown.time_end.values] == ["2021-11-30", "2021-12-31", "2022-01-20"]
    assert _recorded(store) == ["2021-11-01/2021-11-30", "2021-12-01/2021-12-31", "2022-01-01/2022-01-20"]
    fixed = load_config({**BASE, "start": "2021-11-01", "end": "2022-01-20", "catalog": catalog})
    clean_store = tmp_path / "clean.zarr"
    assert run_batch(fixed, _feature(sample), str(clean_store), client=client, progress=False).ok
    clean = open_feature(str(clean_store), "field").compute()
    for name in ("red", "nir", "clear_count", "source_time", "time_end", "partial", "empty"):
        np.testing.assert_array_equal(grown[name].values, clean[name].values, err_msg=name)


def test_an_interrupted_incremental_run_resumes_with_what_is_left(sample, client, tmp_path: Path,
                                                                  monkeypatch) -> None:
    catalog = _write_catalog(tmp_path / "items.json", _items(sample))
    cfg = load_config({**BASE, "start": "-1 months", "end": "today", "catalog": catalog, "output": "raw"})
    store = tmp_path / "out"
    monkeypatch.setenv(RUN_DATE_ENV, "2021-11-10")
    assert run_batch(cfg, _feature(sample), str(store), client=client, progress=False, output_format="cog").ok
    monkeypatch.setenv(RUN_DATE_ENV, "2022-01-20")  # 2021-11 grows to its end, 2021-12 and 2022-01 are new

    def stop_after_first(feature_id: str, label: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(cfg, _feature(sample), str(store), client=client, progress=False, output_format="cog",
                  on_unit=stop_after_first)
    planned = run_batch(cfg, _feature(sample), str(store), output_format="cog", plan_only=True)
    left = [u["unit"] for u in planned.features[0].units if u["state"] != "gone"]
    assert 0 < len(left) < 3
    written: list[str] = []
    report = run_batch(cfg, _feature(sample), str(store), client=client, progress=False, output_format="cog",
                       on_unit=lambda f, label: written.append(label))
    assert report.ok and written == left
    names = {p.name for p in (store / "field").iterdir()}
    # this run's bins, and the first run's (now outside the range) kept
    assert names >= {"2021-10-01_2021-10-31.tif", "2021-11-01_2021-11-10.tif", "2021-12-01_2021-12-31.tif",
                     "2022-01-01_2022-01-20.tif"}


def test_plan_on_the_command_line_prints_why_and_writes_nothing(sample, client, tmp_path: Path) -> None:
    items = _items(sample)
    catalog = tmp_path / "items.json"
    config = {**BASE, "start": "2021-11-01", "end": "2022-01-31", "catalog": _write_catalog(catalog, items[:-1])}
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(config))
    features = tmp_path / "features.geojson"
    features.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "id": "field", "properties": {}, "geometry": _feature(sample)[0].lonlat_geometry()
        .__geo_interface__}]}))
    store = tmp_path / "out.zarr"
    assert run_batch(load_config(config), _feature(sample), str(store), client=client, progress=False).ok
    _write_catalog(catalog, items)
    before = _files(store)
    result = CliRunner().invoke(app, ["collect", str(cfg_path), "--features", str(features), "--out",
                                      str(store), "--plan"])
    assert result.exit_code == 0, result.output
    assert f"field: 1 to compute: 2022-01-01/2022-01-31 stale (added {items[-1]['id']})" in result.output
    assert "plan: 1 features, 1 units to compute (1 stale), 2 done; nothing written" in result.output
    assert _files(store) == before


def test_classify_names_what_changed() -> None:
    identity = "abc"
    old = {"a": "0|1", "b": "0|1"}
    record = {"fingerprint": fingerprint(old, identity), "items": old}
    current = {"2021-01-01/2021-01-31": {"a": "0|2", "c": "0|1"},  # a reprocessed, b removed, c added
               "2021-02-01/2021-02-28": old, "2021-03-01/2021-03-31": {}}
    recorded = {"2021-01-01/2021-01-31": record, "2021-02-01/2021-02-28": record,
                "2020-12-01/2020-12-31": record, "2021-03-01/2021-03-31": {**record, "skipped": ["x"]}}
    plans = {p.label: (p.state, p.reason) for p in classify(current, recorded, list(recorded), identity)}
    assert plans == {"2021-01-01/2021-01-31": ("stale", "added c; removed b; reprocessed a"),
                     "2021-02-01/2021-02-28": ("done", ""),
                     "2021-03-01/2021-03-31": ("retry", "1 items had unreadable assets: x"),
                     "2020-12-01/2020-12-31": ("gone", "outside the range now: kept")}
    assert fingerprint(old, identity) != fingerprint(old, "other config")
    assert classify({"2021-01-01/2021-01-31": old}, {}, ["2021-01-01/2021-01-31"], identity)[0].reason == \
        "not written yet"


def test_rolling_dates_are_kept_as_spelled_and_snap_to_the_interval(monkeypatch) -> None:
    cfg = load_config({**BASE, "start": "today - 12 months", "end": "today", "interval_step": 3})
    assert (cfg.start, cfg.end) == ("today-12months", "today")
    monkeypatch.setenv(RUN_DATE_ENV, "2026-12-17")
    import datetime as dt

    assert cfg.fixed_range() == (dt.date(2025, 10, 1), dt.date(2026, 12, 17))  # quarter grid: Oct 2025
    monkeypatch.setenv(RUN_DATE_ENV, "2027-01-05")
    assert cfg.fixed_range()[0] == dt.date(2026, 1, 1)
    for bad in ("yesterday", "-12 fortnights", "2021-02-30"):
        with pytest.raises(Exception, match="start: must be a date YYYY-MM-DD or a rolling date"):
            load_config({**BASE, "start": bad, "end": "today"})
    monkeypatch.setenv(RUN_DATE_ENV, "not a date")
    with pytest.raises(Exception, match="PIXELS_XR_RUN_DATE"):
        load_config({**BASE, "start": "-1 months", "end": "today"})
    assert os.environ[RUN_DATE_ENV] == "not a date"


def _differences(a: Path, b: Path) -> tuple[list[str], list[str]]:
    ca, cb = _contents(a), _contents(b)
    return sorted(set(ca) ^ set(cb)), sorted(k for k in set(ca) & set(cb) if ca[k] != cb[k])


def test_a_grown_partial_bin_replaces_its_cogs(sample, client, tmp_path: Path, monkeypatch) -> None:
    catalog = _write_catalog(tmp_path / "items.json", _items(sample))
    cfg = load_config({**BASE, "start": "2021-11-01", "end": "today", "catalog": catalog})
    store = tmp_path / "out"
    monkeypatch.setenv(RUN_DATE_ENV, "2021-12-10")
    assert run_batch(cfg, _feature(sample), str(store), client=client, progress=False, output_format="cog").ok
    assert (store / "field" / "2021-12-01_2021-12-10.tif").exists()
    monkeypatch.setenv(RUN_DATE_ENV, "2021-12-31")
    report = run_batch(cfg, _feature(sample), str(store), client=client, progress=False, output_format="cog")
    assert [u["state"] for u in report.features[0].units] == ["stale"]
    names = sorted(p.name for p in (store / "field").iterdir() if p.name.startswith("2021-12"))
    assert names == ["2021-12-01_2021-12-31.tif", "2021-12-01_2021-12-31_clear_count.tif",
                     "2021-12-01_2021-12-31_source_time.tif"]
    assert _recorded(store) == ["2021-11-01/2021-11-30", "2021-12-01/2021-12-31"]
