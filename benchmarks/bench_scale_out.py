"""Scale-out behind latency: a batch run reading from S3 at 20 ms per request on 1, 2 and 4 single-thread
workers, with the CPU of every process, so the ceiling two cores allow is measured, not assumed.

Run:  .venv/bin/python benchmarks/bench_scale_out.py [--workers 1,2,4] [--latency 20] [--fields 8x4]
                                                     [--size 1024] [--dates 24] [--no-write]

The object-storage benchmark's sample (``bench_object_storage.sample``: 2 tiles of 1024², 24 dates, 5 assets
per item) on a ``moto_server``, reached by GDAL through ``pixels_xr.testing.latency_proxy`` (its own
process) holding every request ``--latency`` ms. The area is cut into ``--fields`` (columns × rows) fields,
run by ``run_batch`` (monthly median Nov 2021 – Feb 2022, 4 bands, Zarr on local disk) on
``open_client("local", {"workers": w, "threads_per_worker": 1})``, one fresh cluster per worker count
(a warm-up run first: imports, numba, GDAL), GDAL caches emptied before each measured run.

Measured per run: wall time; CPU seconds of this process (client and, in a local cluster, the scheduler),
of the workers (and their nannies), of moto_server and of the proxy. Two cores can do at most 2 CPU
seconds per second, so ``ceiling = total CPU / 2`` is the least wall time the run could take here: where
the speed-up from doubling the workers falls short of 1.8×, the run is checked against that ceiling
(within 10 % of it: the cores, not the workers, are what ran out). Outputs of every worker count are
compared. Results go to the ``<!-- scale-out -->`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import machine_state, publish, table  # noqa: E402
from bench_object_storage import BANDS, served_sample, timed_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--latency", type=float, default=20.0, help="milliseconds per request")
    ap.add_argument("--fields", default="8x4", help="columns x rows of fields over the area")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--dates", type=int, default=24)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from shapely.geometry import box

    from pixels_xr.batch import run_batch
    from pixels_xr.cluster import open_client
    from pixels_xr.config import load_config
    from pixels_xr.features import Feature
    from pixels_xr.io.zarr_store import open_feature

    counts = [int(v) for v in args.workers.split(",")]
    results: list[dict[str, Any]] = []
    with served_sample(args.size, args.dates, "pxr-bench-scale-", args.latency / 1000) as served:
        meta, work, files = served.meta, served.work, served.files
        cfg = load_config({"start": "2021-11-01", "end": "2022-02-28", "mode": "composite",
                           "composite_method": "median", "interval": "months", "platforms": "SENTINEL_2",
                           "bands": BANDS, "catalog": str(served.catalog)})
        cols, rows = (int(v) for v in args.fields.split("x"))
        left, bottom, right, top = meta["bounds"]
        w, h = (right - left) / cols, (top - bottom) / rows
        fields = [Feature(f"f{r}{c}", box(left + c * w, top - (r + 1) * h, left + (c + 1) * w, top - r * h),
                          crs=meta["crs"]) for r in range(rows) for c in range(cols)]
        servers = {"moto_server": [served.moto.server.pid], "proxy": [served.proxy.proc.pid]}
        before = machine_state()
        for n in counts:
            with open_client("local", {"workers": n, "threads_per_worker": 1}, quiet=True) as client:
                run_batch(cfg, fields[:1], str(work / f"warm-{n}.zarr"), client=client, progress=False)
                run = timed_run(client, served.proxy, lambda: run_batch(
                    cfg, fields, str(work / f"run-{n}.zarr"), client=client, progress=False), servers)
            assert run["result"].ok, run["result"].summary()
            cpu = {"client + scheduler": run["cpu"].pop("client"), **run["cpu"]}
            results.append({"workers": n, "wall": run["seconds"], "cpu": cpu, "gets": run["gets"]})
            print(results[-1], flush=True)
        equal = all(
            all(np.array_equal(open_feature(str(work / f"run-{counts[0]}.zarr"), f.id)[b].values,
                               open_feature(str(work / f"run-{n}.zarr"), f.id)[b].values, equal_nan=True)
                for b in BANDS)
            for n in counts[1:] for f in fields)
    after = machine_state()
    cores = os.cpu_count() or 1
    table_rows, goals = [], []
    for k, r in enumerate(results):
        total = sum(r["cpu"].values())
        ceiling = total / cores
        speedup = results[k - 1]["wall"] / r["wall"] if k else None
        r.update(total=total, ceiling=ceiling, speedup=speedup)
        table_rows.append([str(r["workers"]), f"{r['wall']:.1f}", *[f"{r['cpu'][p]:.1f}" for p in r["cpu"]],
                           f"{total:.1f}", f"{ceiling:.1f}", f"{r['wall'] / ceiling:.2f}",
                           "" if speedup is None else f"{speedup:.2f}×", f"{r['gets']:,}"])
        if speedup is not None:
            near = r["wall"] <= 1.1 * ceiling
            goals.append(f"{results[k - 1]['workers']} → {r['workers']} workers: {speedup:.2f}× "
                         f"({'met' if speedup >= 1.8 else 'below 1.8×'}); wall {r['wall']:.1f} s against a "
                         f"ceiling of {ceiling:.1f} s on {cores} cores ({r['wall'] / ceiling:.2f}×: "
                         f"{'within 10 % of it, the cores ran out' if near else 'NOT within 10 % of it'})")
    lines = [
        f"## Scale-out behind latency: {len(fields)} fields from S3 at {args.latency:g} ms per request",
        "",
        f"`.venv/bin/python benchmarks/bench_scale_out.py{''.join(' ' + a for a in sys.argv[1:])}` — the "
        f"object-storage sample ({len(files)} COGs on moto_server behind the latency proxy), {len(fields)} fields "
        f"({args.fields} over the {meta['bounds'][2] - meta['bounds'][0]:.0f} × "
        f"{meta['bounds'][3] - meta['bounds'][1]:.0f} m area), monthly median Nov 2021 – Feb 2022, 4 bands, "
        "Zarr; `run_batch` on `open_client(\"local\", {\"workers\": w, \"threads_per_worker\": 1})`, one "
        "cluster per row (warmed up, GDAL caches emptied). CPU seconds per process group; ceiling = all CPU "
        f"/ {cores} cores, the least wall time this machine allows.",
        f"Machine before: {before}; after: {after}.",
        "",
        *table(["workers", "wall s", *[f"CPU s: {p}" for p in results[0]["cpu"]], "CPU s: all",
                "ceiling s", "wall / ceiling", "speed-up vs previous", "GET"], table_rows),
        "",
        *[f"- {g}" for g in goals],
        f"- outputs of every worker count equal: {'yes' if equal else 'NO'}",
    ]
    publish("scale-out", lines, write=not args.no_write)


if __name__ == "__main__":
    main()
