"""Batch throughput: 1 vs 2 workers on ≥20 features, peak memory of client and workers, bounded memory.

    .venv/bin/python benchmarks/bench_batch.py [--features 20] [--size 512] [--no-write]
    .venv/bin/python benchmarks/bench_batch.py --big [--big-size 3072] [--big-dates 24,96]

A synthetic sample (real COGs, ``make_sample``) is tiled into ``--features`` square fields; the same
monthly median composite is run with ``run_batch`` into fresh Zarr stores on ``open_client("local")`` with
1 and with 2 single-threaded worker processes (the cluster users get: worker defaults included). Peak
resident memory of the client process and of each worker is sampled every 50 ms (psutil), CPU time of each
over the run too. Outputs of the two runs are compared array by array. ``--big`` runs one field over the
whole of a larger sample, once per ``--big-dates`` count, and records the input cube (items × 5 assets ×
y × x as uint16) against the memory the machine had free and the peak memory of every process: peaks that
stay flat while the cube grows past free memory are what bounded memory means. Results go to the
``<!-- batch -->`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_state, publish  # noqa: E402

WORK = Path(__file__).with_name("_work") / "batch"


class PeakMemory:
    """Peak RSS (bytes) of a set of processes, sampled in a background thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = dict.fromkeys(pids, 0)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, proc in self.procs.items():
                try:
                    self.peak[name] = max(self.peak[name], proc.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(self.interval)

    def _cpu(self) -> dict[str, float]:
        return {name: sum(proc.cpu_times()[:2]) for name, proc in self.procs.items()}

    def __enter__(self) -> PeakMemory:
        self._cpu0 = self._cpu()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu = {name: t - self._cpu0[name] for name, t in self._cpu().items()}


def tiled_features(bounds: tuple[float, float, float, float], crs: str, n: int, path: Path) -> Path:
    """``n`` square fields tiling the sample area (as close to square as the count allows)."""
    minx, miny, maxx, maxy = bounds
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    w, h = (maxx - minx) / cols, (maxy - miny) / rows
    feats = []
    for k in range(n):
        r, c = divmod(k, cols)
        x0, y0 = minx + c * w + 5, miny + r * h + 5
        ring = [[x0, y0], [x0 + w - 10, y0], [x0 + w - 10, y0 + h - 10], [x0, y0 + h - 10], [x0, y0]]
        feats.append({"type": "Feature", "id": f"cell-{k:03d}", "properties": {"crs": crs},
                      "geometry": {"type": "Polygon", "coordinates": [ring]}})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def run(config, features, out: Path, workers: int) -> dict:
    from pixels_xr.batch import run_batch
    from pixels_xr.cluster import open_client

    shutil.rmtree(out, ignore_errors=True)
    with open_client("local", {"workers": workers, "threads_per_worker": 1}, quiet=True) as client:
        pids = {"client": os.getpid(), **{f"worker {i}": pid for i, pid in
                                          enumerate(client.run(os.getpid).values())}}
        client.run(lambda: __import__("pixels_xr.compose"))  # imports are not what we measure
        with PeakMemory(pids) as mem:
            t0 = time.perf_counter()
            report = run_batch(config, features, str(out), client=client, progress=False)
            seconds = time.perf_counter() - t0
    assert report.ok, report.to_dict()
    return {"seconds": seconds, "units": report.units_written, "peak": mem.peak, "cpu": mem.cpu}


def same_outputs(a: Path, b: Path, ids: list[str]) -> bool:
    from pixels_xr.io.zarr_store import open_feature

    for fid in ids:
        da, db = open_feature(str(a), fid).load(), open_feature(str(b), fid).load()
        for name in da.data_vars:
            if not np.array_equal(da[name].values, db[name].values, equal_nan=True):
                return False
    return True


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, default=20)
    ap.add_argument("--size", type=int, default=512, help="sample tile size in pixels")
    ap.add_argument("--dates", type=int, default=24)
    ap.add_argument("--big", action="store_true", help="also run one field whose cube outgrows memory")
    ap.add_argument("--big-size", type=int, default=3072, help="sample tile size for --big")
    ap.add_argument("--big-dates", default="24,96", help="date counts of the --big samples (comma-separated)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    from pixels_xr.config import load_config
    from pixels_xr.features import load_features
    from pixels_xr.testing.sample import make_sample

    WORK.mkdir(parents=True, exist_ok=True)
    sample_dir = WORK / f"sample-{args.size}-{args.dates}"
    if not (sample_dir / "catalog.json").exists():
        shutil.rmtree(sample_dir, ignore_errors=True)
    info = make_sample(sample_dir, n_dates=args.dates, width=args.size, height=args.size)
    features = load_features(tiled_features(info.bounds, info.crs, args.features, WORK / "features.geojson"))
    config = load_config({"start": "2021-11-01", "end": "2022-06-30", "mode": "composite",
                          "composite_method": "median", "interval": "months", "platforms": "SENTINEL_2",
                          "bands": ["blue", "green", "red", "nir"], "catalog": str(info.catalog),
                          "chunksize": 512})
    state = machine_state()
    results = {w: run(config, features, WORK / f"out-{w}.zarr", w) for w in (1, 2)}
    identical = same_outputs(WORK / "out-1.zarr", WORK / "out-2.zarr", [f.id for f in features])
    ratio = results[1]["seconds"] / results[2]["seconds"]
    pixels = sum(load_features_pixels(config, f) for f in features)
    lines = [
        "## Batch runs: 1 vs 2 workers, peak memory",
        "",
        f"`.venv/bin/python benchmarks/bench_batch.py{''.join(' ' + a for a in sys.argv[1:])}` — "
        f"{len(features)} fields "
        f"tiling a {args.size}² × 2-tile synthetic sample ({args.dates} dates, real COGs), monthly median "
        f"composite Nov–Jun (8 bins), 4 bands, {pixels:,} output pixels per bin in all; `run_batch` into a "
        "fresh Zarr store on a LocalCluster of single-threaded worker processes. "
        f"Machine: {state}. Outputs of the two runs identical: {identical}.",
        "",
        "| workers | seconds | units | units/s | client CPU s | workers CPU s | client peak MiB "
        "| worker peak MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for w, r in results.items():
        workers_peak = ", ".join(mib(v) for k, v in r["peak"].items() if k != "client")
        workers_cpu = sum(v for k, v in r["cpu"].items() if k != "client")
        lines.append(f"| {w} | {r['seconds']:.1f} | {r['units']} | {r['units'] / r['seconds']:.2f} | "
                     f"{r['cpu']['client']:.1f} | {workers_cpu:.1f} | {mib(r['peak']['client'])} | "
                     f"{workers_peak} |")
    two = results[2]
    floor = (two["cpu"]["client"] + sum(v for k, v in two["cpu"].items() if k != "client")) / os.cpu_count()
    lines += ["", f"Speed-up 2 vs 1 workers: **{ratio:.2f}×** (goal ≥1.7×). Each worker has one thread "
              "and its kernels one core (the nanny's OMP_NUM_THREADS=1 caps numba), so 1 worker uses 1 "
              "core. The client (planning, graph submission and, in a LocalCluster, the scheduler) shares "
              "the cores with the workers: the CPU of the 2-worker run spread perfectly over "
              f"{os.cpu_count()} cores would take {floor:.1f} s, a ceiling of "
              f"{results[1]['seconds'] / floor:.2f}× on this machine."]
    if args.big:
        lines += ["", *big_runs(args.big_size, [int(d) for d in args.big_dates.split(",")], config)]
    publish("batch", lines, write=not args.no_write)


def load_features_pixels(config, feature) -> int:
    from pixels_xr.grid import feature_grid

    grid = feature_grid(config, feature)
    return grid.width * grid.height


def big_runs(size: int, date_counts: list[int], config) -> list[str]:
    """One field over the whole of a larger sample, per date count: peak memory against the cube's size."""
    from datetime import date, timedelta

    from pixels_xr.features import load_features
    from pixels_xr.grid import feature_grid
    from pixels_xr.testing.sample import make_sample

    rows = []
    for dates in date_counts:
        sample_dir = WORK / f"sample-{size}-{dates}"
        info = make_sample(sample_dir, n_dates=dates, width=size, height=size)
        minx, miny, maxx, maxy = info.bounds
        path = WORK / "big.geojson"
        ring = [[minx, miny], [maxx, miny], [maxx, maxy], [minx, maxy], [minx, miny]]
        path.write_text(json.dumps({"type": "FeatureCollection", "features": [{
            "type": "Feature", "id": "whole-area", "properties": {"crs": info.crs},
            "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
        features = load_features(path)
        last = max(date.fromisoformat(d) for d in info.dates) + timedelta(days=1)
        big = config.model_copy(update={"catalog": str(info.catalog), "chunksize": 512, "max_pixels": 10**9,
                                        "end": last})
        grid = feature_grid(big, features[0])
        cube_bytes = info.items * 5 * grid.width * grid.height * 2  # every item × 5 assets, uint16
        free = psutil.virtual_memory().available
        r = run(big, features, WORK / "out-big.zarr", 2)
        shutil.rmtree(WORK / "out-big.zarr", ignore_errors=True)
        peak = max(v for k, v in r["peak"].items() if k != "client")
        rows.append(f"| {grid.width}×{grid.height} | {info.items} | {cube_bytes / 2**30:.1f} | "
                    f"{free / 2**30:.1f} | {cube_bytes / free:.1f}× | {r['units']} | {r['seconds']:.0f} | "
                    f"{mib(peak)} | {mib(r['peak']['client'])} |")
        if len(date_counts) > 1 and dates != date_counts[-1]:
            shutil.rmtree(sample_dir, ignore_errors=True)  # keep the disk for the next, larger sample
    return ["Bounded memory: one field over the whole of a "
            f"{size}² × 2-tile sample, all items, monthly median, 2 workers of one thread (GDAL block "
            "cache 128 MB by default on workers):", "",
            "| field px | items | cube GiB (uint16) | free GiB at start | cube ÷ free | units | seconds "
            "| peak worker MiB | peak client MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|", *rows]


if __name__ == "__main__":
    main()
