"""Incremental nightly runs: one new acquisition date added to the catalog, re-run vs a full run.

    .venv/bin/python benchmarks/bench_incremental.py [--features 100] [--size 512] [--no-write]

A synthetic sample (real COGs, ``make_sample``: 36 dates every 10 days from 2021-11-03, two tiles) is
cut into ``--features`` square fields; the configuration is a monthly latest-pixel composite over a year
(12 bins per field), Zarr, ``run_batch`` on one local cluster (``open_client("local")``) shared by all
runs. The catalog (a local FeatureCollection) first lacks the last acquisition date. Timed, in one run of
this script: the **full run** over the final catalog into a fresh store (the baseline: what a nightly job
without incremental runs does, or ``--overwrite``), and the **incremental run**: a first run over the
catalog without the last date, then the date added, then the re-run that is timed. The incremental run must
recompute exactly the units whose bin holds the new date (units touched, counted from the catalog) and
give the full run's arrays. Results go to the ``<!-- incremental -->`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_state, publish, table  # noqa: E402

WORK = Path(__file__).with_name("_work") / "incremental"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--size", type=int, default=512, help="sample width and height in pixels")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    import shapely
    from shapely.geometry import box

    import pixels_xr as px
    from pixels_xr.catalog import read_local
    from pixels_xr.cluster import open_client
    from pixels_xr.features import Feature
    from pixels_xr.testing.sample import make_sample

    shutil.rmtree(WORK, ignore_errors=True)
    sample = make_sample(WORK / "sample", n_dates=36, width=args.size, height=args.size, tiles=2)
    items = sorted(read_local(sample.catalog), key=lambda i: i["properties"]["datetime"])
    last_day = items[-1]["properties"]["datetime"][:10]
    older = [i for i in items if i["properties"]["datetime"][:10] != last_day]
    catalog = WORK / "items.json"

    def write_catalog(its: list[dict]) -> None:
        catalog.write_text(json.dumps({"type": "FeatureCollection", "features": its}))

    cfg = px.load_config({"start": "2021-11-01", "end": "2022-10-31", "mode": "latest_pixel",
                          "interval": "months", "platforms": "SENTINEL_2", "bands": ["red", "green", "nir"],
                          "catalog": str(catalog), "chunksize": 256})
    n = int(round(args.features ** 0.5))
    left, bottom, right, top = sample.bounds
    w, h = (right - left) / n, (top - bottom) / n
    features = [Feature(f"f{r:02d}{c:02d}", box(left + c * w, bottom + r * h, left + (c + 1) * w,
                                                bottom + (r + 1) * h), crs=sample.crs)
                for r in range(n) for c in range(n)]
    new_bin = next(b for b in cfg.bins(features[0]) if b.contains(dt.date.fromisoformat(last_day)))
    new_scenes = [i for i in items if i["properties"]["datetime"][:10] == last_day]
    footprints = shapely.union_all([shapely.geometry.shape(i["geometry"]) for i in new_scenes])
    touched = sum(footprints.intersects(f.lonlat_geometry()) for f in features)

    before = machine_state()
    with open_client("local", quiet=True) as client:
        write_catalog(items)
        t0 = time.perf_counter()
        full = px.run_batch(cfg, features, str(WORK / "full.zarr"), client=client, progress=False)
        t_full = time.perf_counter() - t0
        write_catalog(older)
        first = px.run_batch(cfg, features, str(WORK / "nightly.zarr"), client=client, progress=False)
        write_catalog(items)
        t0 = time.perf_counter()
        plan = px.run_batch(cfg, features, str(WORK / "nightly.zarr"), plan_only=True)
        t_plan = time.perf_counter() - t0
        t0 = time.perf_counter()
        incremental = px.run_batch(cfg, features, str(WORK / "nightly.zarr"), client=client, progress=False)
        t_inc = time.perf_counter() - t0
        t0 = time.perf_counter()
        noop = px.run_batch(cfg, features, str(WORK / "nightly.zarr"), client=client, progress=False)
        t_noop = time.perf_counter() - t0
    after = machine_state()
    assert full.ok and first.ok and incremental.ok and noop.ok
    states = incremental.unit_states()
    recomputed = [(f.id, u["unit"]) for f in incremental.features for u in f.units if u["state"] != "gone"]
    same_units = all(u == new_bin.label for _, u in recomputed) and len(recomputed) == touched
    equal = all(
        np.array_equal(px.open_feature(str(WORK / "full.zarr"), f.id)[v].values,
                       px.open_feature(str(WORK / "nightly.zarr"), f.id)[v].values, equal_nan=True)
        for f in features for v in ("red", "green", "nir", "clear_count", "source_time"))
    fraction = t_inc / t_full
    lines = [
        "## Incremental nightly runs: one new acquisition date",
        "",
        f"`.venv/bin/python benchmarks/bench_incremental.py --features {len(features)} --size {args.size}` — "
        f"{len(features)} fields × {len(cfg.bins(features[0]))} monthly bins (latest pixel, 3 bands, Zarr) on "
        f"a {args.size}² two-tile sample of {len(items)} items; the last acquisition date ({last_day}, "
        f"{len(new_scenes)} scenes) is added between the first run and the re-run. One local cluster "
        "(`open_client(\"local\")`) for every run.",
        f"Machine before: {before}; after: {after}.",
        "",
        *table(["run", "wall s", "units written", "units done (skipped)"], [
            ["full run over the final catalog (baseline)", f"{t_full:.1f}", str(full.units_written),
             str(full.units_skipped)],
            ["incremental re-run after the new date", f"{t_inc:.1f}", str(incremental.units_written),
             str(incremental.units_skipped)],
            ["`--plan` of that re-run (searches + ledger only)", f"{t_plan:.1f}", "0",
             str(plan.units_skipped)],
            ["no-op re-run (nothing changed)", f"{t_noop:.1f}", str(noop.units_written), str(noop.units_skipped)],
        ]),
        "",
        f"Incremental / full: **{fraction:.1%}** (goal ≤ 10 %: {'met' if fraction <= 0.10 else 'NOT met'}). "
        f"Units recomputed {len(recomputed)} = units touched by the new scenes {touched} (fields the new "
        f"footprints intersect, bin {new_bin.label}): {'yes' if same_units else 'NO'}; states {states}. "
        f"Arrays equal to the full run's: {'yes' if equal else 'NO'}.",
    ]
    publish("incremental", lines, write=not args.no_write)


if __name__ == "__main__":
    main()
