"""Zonal statistics of many parcels: ``pixels_xr.stats`` against the stackstac + exactextract glue of today.

    .venv/bin/python benchmarks/bench_stats.py [--parcels 10000] [--baseline 40] [--no-write]

The synthetic sample (one 1024² tile at 10 m, 12 dates from 2021-11-03 every 10 days), a monthly median
(Nov–Feb: 4 bins) of red and nir plus NDVI (per observation before the median), the SCL mask. Parcels:
irregular quadrilaterals of ≈ 60–80 px, one per 10 × 10 px cell of a square lattice over the tile, with
exact coverage fractions; statistics count, mean, std, min, max, median of each variable.

Ours: ``stats`` on one ``open_client("local")`` cluster, GeoParquet out. The baseline is what a user writes
today, per parcel: ``stackstac.stack`` over the parcel's bounds, mask SCL, reflectance with each item's
scale/offset, NDVI, a monthly ``resample().median()``, compute, then ``exact_extract`` of each month's
rasters over the parcel. It runs on the first ``--baseline`` parcels only (it is slow: see the table) and its
rate is extrapolated per parcel; its figures are checked against ours for those parcels. Peak memory: this
process's RSS sampled every 50 ms during each run, and each worker's peak RSS (``ru_maxrss``) after ours.
Results go to the ``<!-- stats -->`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_state, publish, table

WORK = Path(__file__).with_name("_work") / "stats"
SIDE = 1024
CELL = 10  # pixels per lattice cell (one parcel per cell)
RES = 10.0
MONTHS = ["2021-11-01", "2021-12-01", "2022-01-01", "2022-02-01", "2022-03-01"]


class PeakRSS:
    """This process's peak resident memory while the block runs (sampled every 50 ms)."""

    def __enter__(self) -> PeakRSS:  # noqa: PYI034
        import psutil

        self._proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *a: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def parcels(bounds: tuple[float, ...], n: int, seed: int = 0) -> list:
    """``n`` irregular quadrilaterals, one per lattice cell, row by row from the top-left corner."""
    from shapely.geometry import Polygon

    rng = np.random.default_rng(seed)
    left, _, _, top = bounds
    per_row = SIDE // CELL
    out = []
    for k in range(n):
        r, c = divmod(k, per_row)
        x0, y0 = left + c * CELL * RES, top - r * CELL * RES
        inset = rng.uniform(0.3, 1.6, 8) * RES
        out.append(Polygon([(x0 + inset[0], y0 - inset[1]), (x0 + CELL * RES - inset[2], y0 - inset[3]),
                            (x0 + CELL * RES - inset[4], y0 - CELL * RES + inset[5]),
                            (x0 + inset[6], y0 - CELL * RES + inset[7])]))
    return out


def baseline(items: list[dict], polygons: list, epsg: int) -> list[dict]:
    """The glue of today, parcel by parcel: stackstac + xarray + exactextract."""
    import pandas as pd
    import stackstac
    from exactextract import exact_extract
    from exactextract.raster import NumPyRasterSource
    from shapely.geometry import mapping

    scale = np.array([i["assets"]["red"]["raster:bands"][0]["scale"] for i in items], np.float32)
    offset = np.array([i["assets"]["red"]["raster:bands"][0]["offset"] for i in items], np.float32)
    rows = []
    for k, poly in enumerate(polygons):
        minx, miny, maxx, maxy = poly.bounds
        bounds = (np.floor(minx / RES) * RES, np.floor(miny / RES) * RES, np.ceil(maxx / RES) * RES,
                  np.ceil(maxy / RES) * RES)
        stack = stackstac.stack(items, assets=["red", "nir", "scl"], epsg=epsg, resolution=RES, bounds=bounds,
                                dtype="float32", fill_value=np.float32(np.nan), rescale=False, snap_bounds=False)
        scl = stack.sel(band="scl")
        clear = ~scl.isin([0, 1, 3, 8, 9, 10]) & scl.notnull()
        sc = stack.time.copy(data=scale)
        of = stack.time.copy(data=offset)
        red = (stack.sel(band="red") * sc + of).where(clear & (stack.sel(band="red") > 0))
        nir = (stack.sel(band="nir") * sc + of).where(clear & (stack.sel(band="nir") > 0))
        ndvi = (nir - red) / (nir + red)
        monthly = {v: a.resample(time="1MS").median().compute() for v, a in
                   (("red", red), ("nir", nir), ("NDVI", ndvi))}
        feat = [{"type": "Feature", "properties": {}, "geometry": mapping(poly)}]
        for t, month in enumerate(monthly["red"].time.values):
            row = {"parcel": k, "time": pd.Timestamp(month)}
            for v, arr in monthly.items():
                raster = NumPyRasterSource(arr.isel(time=t).values.astype(np.float32), *bounds)
                props = exact_extract(raster, feat, ["count", "mean", "stdev", "min", "max", "median"],
                                      output="geojson")[0]["properties"]
                row.update({f"{v}_{s}": props[s] for s in props})
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parcels", type=int, default=10_000)
    ap.add_argument("--baseline", type=int, default=40, help="parcels the baseline runs (rate extrapolated)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import pixels_xr as px
    from pixels_xr.cluster import open_client
    from pixels_xr.features import Feature
    from pixels_xr.testing.sample import make_sample

    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sample = make_sample(WORK / "sample", width=SIDE, height=SIDE, tiles=1, n_dates=12)
    print(f"sample: {time.perf_counter() - t0:.1f} s", flush=True)
    config = px.load_config({"start": MONTHS[0], "end": "2022-02-28", "mode": "composite",
                             "composite_method": "median", "interval": "months", "platforms": "SENTINEL_2",
                             "bands": ["red", "nir"], "indices": ["NDVI"], "catalog": str(sample.catalog)})
    polygons = parcels(sample.bounds, args.parcels)
    features = [Feature(f"p{k:05d}", p, crs=sample.crs) for k, p in enumerate(polygons)]
    items = []
    for path in sorted(glob.glob(str(WORK / "sample" / "*" / "*" / "*.json"))):
        item = json.loads(Path(path).read_text())
        if item.get("type") != "Feature":
            continue
        for asset in item["assets"].values():
            asset["href"] = str((Path(path).parent / asset["href"]).resolve())
        items.append(item)
    items.sort(key=lambda i: i["properties"]["datetime"])
    before = machine_state()

    import warnings

    warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)  # the baseline's median of cloudy pixels
    with PeakRSS() as base_mem:
        tb0 = time.perf_counter()
        ref = baseline(items, polygons[: args.baseline], 32629)
        tb = time.perf_counter() - tb0
    base_rate = args.baseline / tb
    print(f"baseline: {args.baseline} parcels in {tb:.1f} s ({base_rate:.2f} parcels/s)", flush=True)

    out = WORK / "fields.parquet"
    shutil.rmtree(f"{out}.parts", ignore_errors=True)
    with open_client("local", quiet=True) as client:
        px.stats(config, features[:50], None, client=client)  # warm: imports, numba, GDAL on the workers
        with PeakRSS() as ours_mem:
            to0, co0 = time.perf_counter(), time.process_time()
            ours = px.stats(config, features, str(out), client=client)
            to, co = time.perf_counter() - to0, time.process_time() - co0
        workers = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    ours_rate = args.parcels / to
    print(f"ours: {args.parcels} parcels in {to:.1f} s ({ours_rate:.1f} parcels/s)", flush=True)

    # the baseline's figures against ours for the parcels it ran (same pixels, same exact fractions)
    worst = 0.0
    for row in ref:
        mine = ours[(ours.id == f"p{row['parcel']:05d}") & (ours.time == row["time"])].iloc[0]
        for v in ("red", "nir", "NDVI"):
            for theirs, key in (("mean", "mean"), ("median", "median"), ("count", "count"), ("max", "max")):
                a, b = mine[f"{v}_{key}"], row[f"{v}_{theirs}"]
                if np.isfinite(a) or np.isfinite(b):
                    worst = max(worst, abs(a - b) / max(abs(b), 1e-6))
    peak_worker = max(workers.values()) / 2**20
    rows = [[f"{args.parcels:,}", f"{len(ours):,}", f"{to:.1f}", f"{ours_rate:.1f}",
             f"{base_rate:.2f} ({args.baseline} parcels in {tb:.1f} s)", f"{ours_rate / base_rate:.0f}×",
             f"{co:.1f}", f"{ours_mem.peak / 2**20:.0f}", f"{peak_worker:.0f} ({len(workers)} workers)",
             f"{base_mem.peak / 2**20:.0f}", f"{worst:.1e}"]]
    lines = [
        "## Statistics per field: N parcels, `pixels_xr.stats` vs stackstac + exactextract per parcel",
        "",
        (f"`.venv/bin/python benchmarks/bench_stats.py --parcels {args.parcels} --baseline {args.baseline}` — "
         f"the synthetic sample as one {SIDE}² tile at 10 m, 12 dates; monthly median Nov–Feb (4 bins) of red, "
         "nir and NDVI (per observation before the median), SCL mask; one irregular quadrilateral of ≈ 60–80 px "
         "per 10 × 10 px cell; count/mean/std/min/max/median with exact coverage fractions. Ours: `stats` on "
         "one `open_client(\"local\")` cluster into GeoParquet (after a warm-up call on 50 parcels). Baseline: "
         "per parcel `stackstac.stack` over its bounds → SCL mask → reflectance → NDVI → "
         "`resample(time=\"1MS\").median()` → `exact_extract` per month, on the first parcels only; its rate "
         "is extrapolated per parcel (its figures are checked against ours: last column). Client CPU: this "
         "process's CPU time during our run (search, graph building, parts); client memory: this process's peak "
         "RSS during the run (sampled); worker memory: each worker process's peak RSS."),
        f"Machine before: {before}.",
        "",
        *table(["parcels", "rows", "ours: wall s", "ours: parcels/s", "baseline: parcels/s",
                "ratio (goal ≥ 10×)", "ours: client CPU s", "ours: client peak MiB", "ours: worker peak MiB",
                "baseline: peak MiB", "max rel. diff vs baseline"], rows),
    ]
    publish("stats", lines, write=not args.no_write)


if __name__ == "__main__":
    main()
