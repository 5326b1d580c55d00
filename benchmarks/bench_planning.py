"""Planning + graph construction for one Sentinel-2 tile: pixels_xr.cube.build_cube vs stackstac vs odc-stac.

Run:  .venv/bin/python benchmarks/bench_planning.py [--sizes 100 1000] [--repeat 3] [--no-write]

Items: the 10 real Earth Search v1 items of tile 13TDE in ../shared/data/stac, cloned every 5 days from
2017-01-01 with new ids (their 23 assets and projection metadata unchanged), normalised by
``catalog.parse_item`` (not timed). Cube: 3 bands + SCL (4 assets) over the whole tile (10980 × 10980
at 10 m, EPSG:32613), monthly composite configuration, 1024-pixel spatial chunks.

What is timed, for each approach: from the item dicts to the low-level task graph a scheduler runs
(``materialise``: dask's own ``compute`` path, expression optimised and every layer expanded into tasks),
nothing read. Ours = ``build_cube`` (grid, asset table, coordinates, graph) + materialise. Baselines get the
same normalised dicts and grid: ``stackstac.stack`` with the arguments pixels_xr used before (chunks of one
item × one band, and again with our chunks: one time bin × all bands), and ``odc.stac.load`` (pystac Items
prepared outside the timing). Prints a table and rewrites only the ``<!-- planning -->`` section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import sys
from pathlib import Path

import numpy as np
from shapely.geometry import box

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_state, materialise, publish, table, timed  # noqa: E402

from pixels_xr.catalog import parse_item  # noqa: E402
from pixels_xr.config import load_config  # noqa: E402
from pixels_xr.cube import build_cube  # noqa: E402
from pixels_xr.features import Feature  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stac"
SOURCE = SHARED / "earthsearch_v1_sentinel-2-c1-l2a_T13TDE_2024-03-31_04-22_10items.json"
TILE = Feature("13TDE", box(399960, 4390200, 509760, 4500000), crs="EPSG:32613")
CONFIG = {"start": "2017-01-01", "end": "2031-12-31", "mode": "composite", "composite_method": "median",
          "interval": "months", "platforms": "SENTINEL_2", "bands": ["red", "green", "nir"], "scale": 10,
          "collection": "sentinel-2-c1-l2a", "force": True}


def synthesize(n: int) -> list[dict]:
    """``n`` items cloned from the 10 real ones, one every 5 days from 2017-01-01, unique ids."""
    base = json.loads(SOURCE.read_text())["features"]
    t0 = dt.datetime(2017, 1, 1, 17, 53, 2, tzinfo=dt.timezone.utc)
    out = []
    for k in range(n):
        item = copy.deepcopy(base[k % len(base)])
        t = t0 + dt.timedelta(days=5 * k)
        item["properties"]["datetime"] = t.isoformat().replace("+00:00", "Z")
        item["id"] = f"S2X_T13TDE_{t:%Y%m%d}_{k:04d}_L2A"
        out.append(item)
    return out


def run(n: int, repeat: int) -> dict[str, tuple[float, int]]:
    """Seconds and task counts per approach for ``n`` items."""
    import odc.stac
    import pystac
    import stackstac
    from odc.geo.geobox import GeoBox

    cfg = load_config(CONFIG)
    parsed = [parse_item(i, cfg) for i in synthesize(n)]  # ours: the typed items catalog.search returns
    items = [i.to_stac() for i in parsed]  # the baselines: the same items as normalised STAC dicts
    names = ["red", "green", "nir", "scl"]
    cube = build_cube(parsed, TILE, cfg)
    bounds, shape, transform = cube.rio.bounds(), cube.rio.shape, cube.rio.transform()
    bin_chunks = cube.data.chunks[0]
    py_items = [pystac.Item.from_dict({**i, "links": []}, migrate=False) for i in items]
    geobox = GeoBox(shape, transform, "EPSG:32613")

    def ours(time_chunks: int | None = None) -> int:
        return len(materialise(build_cube(parsed, TILE, cfg, time_chunks=time_chunks)))

    def ours_no_gc() -> int:  # the caller's garbage collector off during dask's materialisation too
        gc.disable()
        try:
            return ours()
        finally:
            gc.enable()

    def stackstac_stack(chunks: tuple) -> int:
        arr = stackstac.stack(items, assets=names, epsg=32613, resolution=10, bounds=bounds,
                              snap_bounds=False, chunksize=chunks, dtype=np.dtype("uint16"),
                              fill_value=np.uint16(0), rescale=False, sortby_date=False, xy_coords="center",
                              properties=False, band_coords=False)
        assert arr.shape == cube.shape, (arr.shape, cube.shape)
        return len(materialise(arr))

    def odc_load() -> int:
        ds = odc.stac.load(py_items, bands=names, geobox=geobox, chunks={"x": 1024, "y": 1024},
                           dtype="uint16", nodata=0, groupby="id", resampling="nearest")
        assert ds.red.shape == (cube.shape[0],) + cube.shape[2:]
        return len(materialise(*[ds[b] for b in names]))

    out = {}
    for label, fn, reps in [
        ("ours: build_cube (one chunk per monthly bin × 4 bands)", lambda: ours(), repeat),
        ("ours, with the garbage collector off while dask materialises", ours_no_gc, repeat),
        ("ours: build_cube, time_chunks=1 (one chunk per item × 4 bands)", lambda: ours(1), 1),
        ("stackstac.stack, chunks 1 item × 1 band (as pixels_xr used it)",
         lambda: stackstac_stack((1, 1, 1024, 1024)), 1),
        ("stackstac.stack, our chunks (bin × 4 bands)", lambda: stackstac_stack((bin_chunks, 4, 1024, 1024)),
         max(1, repeat - 1)),
        ("odc.stac.load, chunks 1 item × 1024²", odc_load, 1),
    ]:
        seconds, tasks = timed(fn, reps)
        out[label] = (seconds, tasks)
        print(f"{n:5d} items  {seconds:8.3f} s  {tasks:8d} tasks  {label}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--repeat", type=int, default=3, help="best of N for ours (baselines of seconds: 1 run)")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args()
    if not SOURCE.exists():
        raise SystemExit(f"{SOURCE}: real Earth Search items not found (../shared/data is needed)")
    import dask
    import odc.stac
    import stackstac

    before = machine_state()
    run(10, 1)  # warm imports and caches of every approach
    results = {n: run(n, args.repeat) for n in args.sizes}
    after = machine_state()
    labels = list(results[args.sizes[0]])
    ours = labels[0]
    big, small = max(args.sizes), min(args.sizes)
    lines = [
        "## Planning + graph construction (one Sentinel-2 tile)",
        "",
        "Items: the 10 real Earth Search v1 items of tile 13TDE cloned every 5 days from 2017-01-01 "
        "(23 assets each, real projection metadata), normalised beforehand. Cube: red, green, nir + scl "
        "(4 assets) over the whole tile, 10980 × 10980 px at 10 m, 1024-px chunks, monthly composite "
        "config. "
        "Timed: item dicts → the low-level task graph a scheduler runs (dask's `compute` path: expression "
        "optimised, every layer expanded into tasks); nothing is read. Baselines get the same dicts and grid "
        "(odc: pystac Items made outside the timing). "
        f"Ours best of {args.repeat}, baselines of seconds 1 run. "
        f"dask {dask.__version__}, stackstac {stackstac.__version__}, odc-stac {odc.stac.__version__}.",
        f"Machine (shared with other engineers, timings noisy): before {before}; after {after}.",
        "Command: `.venv/bin/python benchmarks/bench_planning.py`",
        "",
    ]
    lines += table(["approach", *[f"{n} items: s (tasks)" for n in args.sizes], f"µs/task at {big}"],
                   [[label, *[f"{results[n][label][0]:.3f} ({results[n][label][1]:,})" for n in args.sizes],
                     f"{1e6 * results[big][label][0] / results[big][label][1]:.0f}"] for label in labels])
    lines += ["", *table(["ratio (other s / ours s; higher = ours faster)",
                          *[f"{n} items" for n in args.sizes]],
                         [[label, *[f"{results[n][label][0] / results[n][ours][0]:.1f}×" for n in args.sizes]]
                          for label in labels[1:]])]
    growth = results[big][ours][0] / results[small][ours][0]
    growth_no_gc = results[big][labels[1]][0] / results[small][labels[1]][0]
    goal_time = results[big][ours][0] < 2.0
    lines += ["", f"Growth of ours from {small} to {big} items ({big / small:.0f}× the items and tasks): "
              f"{growth:.1f}×, {growth_no_gc:.1f}× with the garbage collector off (its passes over the "
              f"caller's live objects during dask's materialisation are the rest). "
              f"Goal < 2 s for {big} items: {'met' if goal_time else 'NOT met'} "
              f"({results[big][ours][0]:.3f} s)."]
    lines += ["", "Why ours is fast: `build_cube` writes the graph itself as plain tasks (one reader-table "
              "task per time chunk, one read task per chunk × spatial block; the garbage collector paused "
              "while it builds), while stackstac and odc-stac hand dask blockwise layers that are expanded "
              "task by task at submit time, at several times our cost per task (last column); and a chunk "
              "holds a whole time bin × all bands, the unit the reduction needs anyway (no rechunk later)."]
    publish("planning", lines, not args.no_write)


if __name__ == "__main__":
    main()
