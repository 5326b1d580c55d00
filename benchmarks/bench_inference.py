"""Benchmark of ``pixels_xr.inference.predict`` against ``model.predict`` on the whole array in one process.

Run:  .venv/bin/python benchmarks/bench_inference.py [--tiles 4] [--chunk 512] [--repeat 2] [--no-write]

Input: the real Sentinel-2 reflectance of ``../shared/data/ml`` (512² × 6 bands) tiled ``tiles``×``tiles``
into one date (2048² px by default), as an xr.Dataset chunked ``chunk``². Models (same weights for both
sides): a per-pixel dense net 6→16→3 and a fully convolutional CNN (two 3×3 convolutions, margin 2).
Baseline: the array normalised beforehand (not timed), then one ``model.predict`` call on all of it in
this process (TensorFlow's default threads: every core). Ours: ``predict(ds, path).compute()`` from the
raw Dataset (normalisation, nodata masks and blending included) on a LocalCluster of 1 and 2 single-thread
workers (TensorFlow 1 thread each), and on dask threads in this process (the CLI's default). Warm runs:
the workers import TensorFlow and load the model once in an untimed first run (reported as "first run").
Rewrites only the ``<!-- inference -->`` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_state, publish, timed  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared/data/ml/ukis_csmask_sentinel2_512x512x6.npz"
BANDS = ["blue", "green", "red", "nir", "swir16", "swir22"]
SCALE, OFFSET = 2.0, -0.5
NOTE = ("Reading: the baseline already runs one `model.predict` on every core of this 2-core machine; the "
        "cluster rows add the Zarr reads, the dask tasks and moving the float32 probabilities (3 classes × "
        "{mpx:.1f} Mpx = {mb:.0f} MB) from the workers back to this process, with one core per worker and no "
        "spare core for a second worker while other engineers load the machine. In a run, workers write "
        "their blocks to Zarr/COG instead of returning them. Our per-block model call is a traced "
        "`tf.function` (no `model.predict` per block).")


def dataset(tiles: int, chunk: int) -> xr.Dataset:
    """One date of the real image tiled ``tiles``×``tiles`` (mirrored so tiles join smoothly)."""
    img = np.load(DATA)["img"].astype(np.float32)
    row = np.concatenate([img if k % 2 == 0 else img[:, ::-1] for k in range(tiles)], axis=1)
    big = np.concatenate([row if k % 2 == 0 else row[::-1] for k in range(tiles)], axis=0)
    h, w = big.shape[:2]
    ds = xr.Dataset({b: (("time", "y", "x"), big[None, :, :, k]) for k, b in enumerate(BANDS)},
                    coords={"time": np.array(["2020-06-01"], "datetime64[ns]"),
                            "y": 4e6 - 10.0 * np.arange(h) - 5, "x": 5e5 + 10.0 * np.arange(w) + 5})
    return ds.rio.write_crs(32629).chunk({"y": chunk, "x": chunk})


def build_models(folder: Path) -> dict[str, tuple[object, str]]:
    """The two models, saved as .keras files with their sidecars."""
    import keras

    keras.utils.set_random_seed(0)
    dense = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    cnn = keras.Sequential([keras.Input((None, None, 6)),
                            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                            keras.layers.Conv2D(3, 3, padding="same", activation="softmax")])
    out = {}
    for name, model, margin in (("per-pixel dense 6→16→3", dense, 0), ("CNN 2×conv 3×3, margin 2", cnn, 2)):
        stem = folder / ("dense" if margin == 0 else "cnn")
        model.save(f"{stem}.keras")
        Path(f"{stem}.json").write_text(json.dumps({"bands": BANDS, "scale": SCALE, "offset": OFFSET,
                                                    "margin": margin}))
        out[name] = (model, f"{stem}.keras")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    before = machine_state()
    from pixels_xr.cluster import open_client
    from pixels_xr.inference import predict

    rows: list[tuple[str, str, float, float]] = []
    checks: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        dataset(args.tiles, args.chunk).to_zarr(f"{tmp}/cube.zarr", consolidated=False)
        ds = xr.open_zarr(f"{tmp}/cube.zarr", consolidated=False, decode_coords="all")  # workers read it
        pixels = ds.sizes["y"] * ds.sizes["x"]
        x = np.stack([ds[b].values[0] for b in BANDS], -1) * np.float32(SCALE) + np.float32(OFFSET)
        models = build_models(Path(tmp))
        baseline: dict[str, float] = {}
        reference: dict[str, np.ndarray] = {}
        for name, (model, _) in models.items():
            if "dense" in name:
                def run(model=model):
                    return model.predict(x.reshape(-1, 6), batch_size=65536, verbose=0)
            else:
                def run(model=model):
                    return model.predict(x[None], verbose=0)[0]
            run()  # trace once
            baseline[name], ref = timed(run, args.repeat)
            reference[name] = np.asarray(ref, np.float32).reshape(x.shape[0], x.shape[1], 3)
            rows.append((name, "model.predict, whole array, 1 process", baseline[name], 1.0))
        os.environ["PIXELS_XR_TF_THREADS"] = "1"  # forwarded to the workers by open_client
        for label, cluster in (("ours, 1 worker × 1 thread", 1), ("ours, 2 workers × 1 thread", 2),
                               ("ours, dask threads in this process", None)):
            context = open_client("local", {"workers": cluster, "threads_per_worker": 1}, quiet=True) \
                if cluster else contextlib.nullcontext()
            with context:
                for name, (_, path) in models.items():
                    def ours(path=path):
                        return predict(ds, path).probability.values[0]
                    first, _ = timed(ours, 1)
                    seconds, got = timed(ours, args.repeat)
                    diff = float(np.nanmax(np.abs(np.moveaxis(got, 0, -1) - reference[name])))
                    checks.append(f"{name} / {label}: max |ours − model.predict| = {diff:.2e}, "
                                  f"first run {first:.2f} s")
                    rows.append((name, label, seconds, baseline[name] / seconds))
    after = machine_state()
    import tensorflow as tf

    lines = [
        "## Inference: `predict` on a chunked cube vs `model.predict` on the whole array",
        "",
        f"Input: the real S2 reflectance of `ml/ukis_csmask_sentinel2_512x512x6.npz` tiled to "
        f"{ds.sizes['y']}×{ds.sizes['x']} px × 6 bands, one date, in a local Zarr store with chunks "
        f"{args.chunk}² (ours reads it inside the timing; the baseline's array is in memory). Same model "
        "and weights on both sides. Baseline: the normalised array prepared beforehand (untimed), one "
        "`model.predict` call on all of it in this process with TensorFlow's default threads (all cores). "
        "Ours: `predict(ds, model).compute()` from the raw Dataset (normalisation, nodata masks, overlap "
        "and blending included) on a LocalCluster of single-thread workers (TensorFlow 1 thread each) or "
        f"on dask threads in this process. Warm runs, best of {args.repeat}; the first run, where each "
        f"worker imports TensorFlow and loads the model, is listed below. TensorFlow {tf.__version__}.",
        f"Machine (shared with other engineers, timings noisy): before {before}; after {after}.",
        "Command: `.venv/bin/python benchmarks/bench_inference.py`",
        "",
        "| model | run | seconds | Mpx/s | speed vs baseline |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {m} | {r} | {s:.3f} | {pixels / s / 1e6:.2f} | {ratio:.2f}× |" for m, r, s, ratio in rows]
    lines += ["", *[f"- {c}" for c in checks], "", NOTE.format(mpx=pixels / 1e6, mb=pixels * 12 / 1e6)]
    publish("inference", lines, write=not args.no_write)


if __name__ == "__main__":
    main()
