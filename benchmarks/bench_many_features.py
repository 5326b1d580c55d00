"""Many small features: N fields of 20 × 20 px against one field of the same pixels, per-feature client cost.

    .venv/bin/python benchmarks/bench_many_features.py [--counts 100,1000] [--no-write] [--profile OUT.txt]

The synthetic sample (``make_sample``: 36 dates, one tile of 256² px or as large as the largest square
needs) with a monthly median over a year
(12 bins), Zarr, ``run_batch`` on one ``open_client("local")`` cluster shared by every run of this script.
The baseline is one feature covering a square of ``side`` × ``side`` pixels (side = 20 · √N); the same
square cut into N features of 20 × 20 px is run after it, into a fresh store, and the outputs are compared
where they overlap (each small feature equals its window of the big one). Client CPU is this process's
CPU time over the run (planning, search, graph building, submission, bookkeeping) divided by N. Results go
to the ``<!-- many-features -->`` section of RESULTS.md; ``--profile`` records a py-spy profile of the
client during the largest N run (``py-spy`` must be on PATH or in the venv).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_state, publish, table  # noqa: E402

WORK = Path(__file__).with_name("_work") / "many"
PX = 20  # pixels per side of a small feature
RES = 10.0


def squares(origin: tuple[float, float], n_side: int, size_px: int) -> list[tuple[float, ...]]:
    """``n_side`` × ``n_side`` squares of ``size_px`` pixels from ``origin`` (left, top), row by row."""
    left, top = origin
    step = size_px * RES
    return [(left + c * step, top - (r + 1) * step, left + (c + 1) * step, top - r * step)
            for r in range(n_side) for c in range(n_side)]


def run(config, features, out: Path, client) -> tuple[float, float, object]:
    from pixels_xr.batch import run_batch

    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), time.process_time()
    report = run_batch(config, features, str(out), client=client, progress=False)
    return time.perf_counter() - t0, time.process_time() - c0, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", default="100", help="feature counts N (perfect squares), comma-separated")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--profile", type=Path, default=None)
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]

    from shapely.geometry import box

    import pixels_xr as px
    from pixels_xr.cluster import open_client
    from pixels_xr.features import Feature
    from pixels_xr.testing.sample import make_sample

    WORK.mkdir(parents=True, exist_ok=True)
    # the sample must hold the largest square (and its 8 px margin): one tile of side ≥ 256 px
    need = max(256, PX * int(round(max(counts) ** 0.5)) + 16)
    sample = make_sample(WORK / f"sample-{need}", width=need, height=need, tiles=1)
    config = px.load_config({"start": "2021-11-01", "end": "2022-10-31", "mode": "composite",
                             "composite_method": "median", "interval": "months", "platforms": "SENTINEL_2",
                             "bands": ["red", "green", "blue", "nir"], "catalog": str(sample.catalog)})
    left, _, _, top = sample.bounds
    origin = (left + 8 * RES, top - 8 * RES)
    rows = []
    before = machine_state()
    with open_client("local", quiet=True) as client:
        px.run_batch(config, [Feature("warm", box(*squares(origin, 1, PX)[0]), crs=sample.crs)],
                     str(WORK / "warm.zarr"), client=client, progress=False, overwrite=True)  # imports, numba, GDAL
        for n in counts:
            side = int(round(n ** 0.5))
            assert side * side == n, f"{n} is not a perfect square"
            big = Feature("big", box(*squares(origin, 1, PX * side)[0]), crs=sample.crs)
            t1, c1, r1 = run(config, [big], WORK / f"one-{n}.zarr", client)
            small = [Feature(f"f{k:05d}", box(*b), crs=sample.crs)
                     for k, b in enumerate(squares(origin, side, PX))]
            profiler = None
            if args.profile is not None and n == max(counts):
                spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
                profiler = subprocess.Popen([spy, "record", "-o", str(args.profile), "-f", "raw", "-r", "50",
                                             "--pid", str(os.getpid())], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
                time.sleep(1)
            tn, cn, rn = run(config, small, WORK / f"many-{n}.zarr", client)
            if profiler is not None:
                profiler.send_signal(2)
                profiler.wait(timeout=60)
            assert r1.ok and rn.ok, (r1.summary(), rn.summary())
            whole = px.open_feature(str(WORK / f"one-{n}.zarr"), "big").compute()
            equal = True
            for k, f in enumerate(small[: min(n, 25)]):
                part = px.open_feature(str(WORK / f"many-{n}.zarr"), f.id).compute()
                r, c = divmod(k, side)
                window = whole.isel(y=slice(r * PX, (r + 1) * PX), x=slice(c * PX, (c + 1) * PX))
                equal &= all(np.array_equal(part[v].values, window[v].values, equal_nan=True)
                             for v in ("red", "nir", "clear_count"))
            rows.append([str(n), f"{t1:.1f}", f"{tn:.1f}", f"{tn / t1:.1f}×", f"{c1 * 1000:.0f}",
                         f"{cn / n * 1000:.0f}", "yes" if equal else "NO"])
            print(rows[-1], flush=True)
    after = machine_state()
    lines = [
        "## Many small features: N × 20 × 20 px vs one feature of the same pixels",
        "",
        f"`.venv/bin/python benchmarks/bench_many_features.py --counts {args.counts}` — the sample "
        f"(36 dates, one {need}² px tile), monthly median over a year (12 bins), 4 bands, Zarr, `run_batch` on one "
        "`open_client(\"local\")` cluster for every run. Client CPU: this process's CPU time during the run.",
        f"Machine before: {before}; after: {after}.",
        "",
        *table(["N", "one feature: wall s", "N features: wall s", "ratio (goal ≤ 3×)",
                "one feature: client ms", "N features: client ms/feature (goal ≤ 10)",
                "outputs equal where they overlap"], rows),
    ]
    publish("many-features", lines, write=not args.no_write)
    (WORK / "last.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
