"""Benchmark of the numba kernels in pixels_xr.reducers against named numpy/bottleneck/xarray baselines.

Run:  .venv/bin/python benchmarks/bench_reducers.py [--size 1024] [--repeat 3]

Cube: (24, 4, size, size) uint16 with ~40 % cloud in spatially coherent blobs. Prints a table and rewrites
only the ``<!-- reducers -->`` section of benchmarks/RESULTS.md. Times are wall clock, best of N, JIT
warmed up first; the baselines get their float32-with-NaN input prepared outside the timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import bottleneck as bn
import numba
import numpy as np
import xarray as xr

from pixels_xr import reducers as R

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import publish  # noqa: E402



def blob_clouds(rng, t, ny, nx, fraction=0.4, cells=24):
    """Boolean cloud masks: bilinear upsampling of a coarse random field, thresholded to ``fraction``."""
    coarse = rng.random((t, cells + 1, cells + 1))
    yi = np.linspace(0, cells, ny)
    xi = np.linspace(0, cells, nx)
    y0 = np.minimum(yi.astype(int), cells - 1)
    x0 = np.minimum(xi.astype(int), cells - 1)
    fy = (yi - y0)[None, :, None]
    fx = (xi - x0)[None, None, :]
    c00 = coarse[:, y0][:, :, x0]
    c01 = coarse[:, y0][:, :, x0 + 1]
    c10 = coarse[:, y0 + 1][:, :, x0]
    c11 = coarse[:, y0 + 1][:, :, x0 + 1]
    field = (c00 * (1 - fx) + c01 * fx) * (1 - fy) + (c10 * (1 - fx) + c11 * fx) * fy
    return field < np.quantile(field, fraction, axis=(1, 2), keepdims=True)


def best_of(fn, n):
    times = []
    result = None
    for _ in range(n):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def numpy_latest(data, clear, nodata):
    """Latest clear observation with plain numpy: argmax over the reversed mask, then a gather."""
    t = data.shape[0]
    idx = t - 1 - np.argmax(clear[::-1], axis=0)
    has = clear.any(axis=0)
    out = np.take_along_axis(data, idx[None, None], axis=0)[0]
    out = np.where(has[None], out, nodata)
    return out, np.where(has, idx, -1).astype(np.int16), clear.sum(axis=0, dtype=np.uint16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3, help="best of N for the fast runs")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    shape = (24, 4, args.size, args.size)
    data = rng.integers(0, 10000, size=shape, dtype=np.uint16)
    cloud = blob_clouds(rng, shape[0], shape[2], shape[3])
    clear = np.ascontiguousarray(~cloud)  # masks.py hands out C-ordered masks
    nodata = np.uint16(0)
    f32 = np.where(clear[:, None], data.astype(np.float32), np.float32(np.nan))
    da = xr.DataArray(f32, dims=("time", "band", "y", "x"))
    n = args.repeat
    threads = numba.get_num_threads()

    # warm up the JIT (and its on-disk cache) on a small piece of the same dtypes and layouts
    small = (data[:, :, :8].copy(), clear[:, :8].copy())
    R.clear_median(*small)
    R.clear_percentile(*small, [10, 50, 90])
    R.latest_valid(*small, nodata)
    R.first_valid_by_order(*small, np.arange(24)[::-1], nodata)
    R.quality_mosaic(*small, np.zeros(small[1].shape, np.float32), nodata)

    rows = []  # (kernel, implementation, seconds)

    t_ours, (med, cnt) = best_of(lambda: R.clear_median(data, clear), n)
    numba.set_num_threads(1)
    t_ours1, _ = best_of(lambda: R.clear_median(data, clear), n)
    numba.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t_np, ref = best_of(lambda: np.nanmedian(f32, axis=0), 1)
        t_bn, ref_bn = best_of(lambda: bn.nanmedian(f32, axis=0), 1)
        t_xr, ref_xr = best_of(lambda: da.median("time", skipna=True).values, 1)
    same = (
        np.array_equal(med, ref, equal_nan=True)
        and np.array_equal(med, ref_bn, equal_nan=True)
        and np.array_equal(med, ref_xr, equal_nan=True)
    )
    rows += [
        ("median", f"ours, {threads} threads", t_ours),
        ("median", "ours, 1 thread", t_ours1),
        ("median", "np.nanmedian (float32+NaN)", t_np),
        ("median", "bottleneck.nanmedian (float32+NaN)", t_bn),
        ("median", "xarray .median(skipna=True)", t_xr),
    ]

    t_pct, _ = best_of(lambda: R.clear_percentile(data, clear, [10, 50, 90]), n)
    rows.append(("percentiles 10/50/90", f"ours, {threads} threads", t_pct))

    t_lat, lat = best_of(lambda: R.latest_valid(data, clear, nodata), n)
    numba.set_num_threads(1)
    t_lat1, _ = best_of(lambda: R.latest_valid(data, clear, nodata), n)
    numba.set_num_threads(threads)
    t_nplat, nplat = best_of(lambda: numpy_latest(data, clear, nodata), n)
    t_copy, _ = best_of(lambda: np.copy(data), n)
    same_lat = all(np.array_equal(a, b) for a, b in zip(lat, nplat))
    rows += [
        ("latest_valid", f"ours, {threads} threads", t_lat),
        ("latest_valid", "ours, 1 thread", t_lat1),
        ("latest_valid", "numpy argmax + take_along_axis", t_nplat),
        ("latest_valid", "np.copy of the cube (bandwidth limit)", t_copy),
    ]
    order = np.argsort(cloud.mean(axis=(1, 2)), kind="stable")
    t_ord, _ = best_of(lambda: R.first_valid_by_order(data, clear, order, nodata), n)
    score = rng.random(clear.shape, dtype=np.float32)
    t_q, _ = best_of(lambda: R.quality_mosaic(data, clear, score, nodata), n)
    rows += [
        ("first_valid_by_order", f"ours, {threads} threads", t_ord),
        ("quality_mosaic", f"ours, {threads} threads", t_q),
    ]

    ratios = {
        "median: numpy / ours": t_np / t_ours,
        "median: bottleneck / ours": t_bn / t_ours,
        "median: xarray / ours": t_xr / t_ours,
        "median: numpy / ours (1 thread)": t_np / t_ours1,
        "median: bottleneck / ours (1 thread)": t_bn / t_ours1,
        "latest_valid: numpy / ours": t_nplat / t_lat,
        "latest_valid: copy / ours (goal >= 0.5)": t_copy / t_lat,
        "latest_valid: copy / ours (1 thread)": t_copy / t_lat1,
    }
    goals = {
        "median >= 10x numpy": t_np / t_ours >= 10,
        "median >= 1.5x bottleneck": t_bn / t_ours >= 1.5,
        "latest_valid >= 0.5x copy speed": t_copy / t_lat >= 0.5,
    }

    lines = [
        "## Reducers (numba kernels)",
        "",
        f"Cube {shape} uint16, {cloud.mean():.0%} cloud in blobs; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numba {numba.__version__} "
        f"({threads} threads), numpy {np.__version__}, bottleneck {bn.__version__}, xarray {xr.__version__}. "
        f"Wall clock, best of {n} (baselines of several seconds: 1 run). Baselines read a prepared "
        "float32+NaN cube (its preparation is not timed); ours read the uint16 cube and the bool mask. "
        f"Results identical to the baselines: median {same}, latest_valid {same_lat}.",
        "Command: `.venv/bin/python benchmarks/bench_reducers.py`",
        "",
        "| kernel | implementation | seconds |",
        "|---|---|---:|",
    ]
    lines += [f"| {k} | {impl} | {sec:.4f} |" for k, impl, sec in rows]
    lines += ["", "| ratio (higher = ours faster) | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    lines += ["", "Goals: " + ", ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in goals.items())]
    publish("reducers", lines, write=not args.no_write)


if __name__ == "__main__":
    main()
