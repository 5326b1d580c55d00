"""Keras/TensorFlow models over ``xr.Dataset`` cubes, blockwise on Dask (``map_blocks`` / overlapped blocks).

Two kinds of model, told apart by the rank of their input (batch axis first):

- per-pixel: ``(N, bands)`` or ``(N, time, bands)``; run on the valid pixels of each block only;
- image: ``(N, h, w, bands)`` or ``(N, time, h, w, bands)``; blocks are extended by the receptive-field
  ``margin`` (``overlap``), tiled with patches of the model's input size (or the sidecar's ``patch`` for
  fully convolutional models) and the overlapping tile interiors blended, so a chunked cube gives the same
  predictions as one block. Tiles never trust pixels within ``margin`` of an inner tile edge.

Models without a time axis run on every date (the output keeps ``time``); models with one read
``time`` dates and the output has no time. The task graph carries only the model's path: every process
loads a model once (``load_model`` caches by path and modification time) and reuses it for every block.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from pixels_xr._version import __version__
from pixels_xr.errors import ModelError, OutputError, PixelsError
from pixels_xr.io import storage
from pixels_xr.model_spec import MODEL_SUFFIXES, ModelSpec, load_spec, sidecar_path

#: Class value of nodata pixels in ``classes`` and of uint8 ``probability``; uint8 probabilities are p × 254.
NODATA_U8 = 255
PROBABILITY_U8_SCALE = 254
#: Samples (pixels) per model call for per-pixel models, tiles per call for image models.
DEFAULT_BATCH = {"pixel": 65536, "image": 8}

_LOCK = threading.Lock()
_CACHE: dict[tuple[str, int], LoadedModel] = {}
#: How many times this process loaded a model from storage (for tests and logs).
LOAD_COUNT: dict[str, int] = {}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to call on float32 batches, with what the planner needs to know about it."""

    path: str
    run: Callable[[np.ndarray], np.ndarray]
    input_shape: tuple[int | None, ...]  # without the batch axis
    channels: int

    @property
    def kind(self) -> Literal["pixel", "image"]:
        """``pixel`` for (bands) / (time, bands) inputs, ``image`` for (h, w, bands) / (time, h, w, bands)."""
        return "pixel" if len(self.input_shape) <= 2 else "image"

    @property
    def time_steps(self) -> int | None:
        """Dates the model reads (None: no time axis, the model runs on each date)."""
        return self.input_shape[0] if len(self.input_shape) in (2, 4) else None  # type: ignore[return-value]

    @property
    def bands(self) -> int | None:
        """Input channels."""
        return self.input_shape[-1]

    @property
    def size(self) -> tuple[int | None, int | None]:
        """(h, w) of an image model's input; None where the model takes any size."""
        return (self.input_shape[-3], self.input_shape[-2]) if self.kind == "image" else (None, None)


def _tensorflow() -> Any:
    """Import TensorFlow once per process: quiet logs, Keras on TF, threads from ``PIXELS_XR_TF_THREADS``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise ModelError(f"TensorFlow is not installed ({exc}): pip install 'pixels-xr[tf]'",
                         "model") from None
    threads = int(os.environ.get("PIXELS_XR_TF_THREADS", "0") or 0)
    if threads > 0 and tf.config.threading.get_intra_op_parallelism_threads() != threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # the runtime already started in this process: keep its pools
            pass
    return tf


def _local_model(path: str) -> Path:
    """A local path of the model: itself, or a per-process download of a remote (``s3://``) file/folder."""
    if not storage.is_remote(path):
        return Path(storage.local_path(path))
    fs, remote = storage.filesystem(path)
    remote = remote.rstrip("/")
    try:
        folder = fs.isdir(remote)
        files = fs.find(remote, detail=True) if folder else {remote: fs.info(remote)}
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the model: {_first_line(exc)}", path) from None
    if not files:
        raise ModelError("model not found", path)
    version = json.dumps(sorted((k, str(v.get("ETag") or v.get("LastModified") or v.get("size")))
                                for k, v in files.items()))
    digest = hashlib.sha1(f"{path}\n{version}".encode()).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / "pixels-xr-models" / digest / remote.rsplit("/", 1)[-1]
    if not target.exists():  # download beside it, then rename: other processes never see half a model
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            fs.get(remote, str(partial), recursive=folder)
            os.replace(partial, target)
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            if not target.exists():
                raise ModelError(f"cannot download the model: {_first_line(exc)}", path) from None
    return target


def _stamp(path: str) -> int:
    """Modification time (ns) of a local model, 0 for remote ones (downloaded once per process)."""
    if storage.is_remote(path):
        return 0
    try:
        return os.stat(storage.local_path(path)).st_mtime_ns
    except OSError:
        raise ModelError("model not found", path) from None


def load_model(path: str | Path) -> LoadedModel:
    """Load a Keras 3 ``.keras``/``.h5`` file or a TensorFlow SavedModel folder, once per process and path."""
    key = (str(path), _stamp(str(path)))
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is None:
            cached = _load(str(path))
            _CACHE[key] = cached
            LOAD_COUNT[str(path)] = LOAD_COUNT.get(str(path), 0) + 1
        return cached


def _load(path: str) -> LoadedModel:
    local = _local_model(path)
    tf = _tensorflow()
    if local.is_dir():
        if not (local / "saved_model.pb").exists():
            raise ModelError("folder holds no saved_model.pb (not a TensorFlow SavedModel)", path)
        return _load_saved_model(tf, local, path)
    if local.suffix.lower().lstrip(".") not in MODEL_SUFFIXES:
        raise ModelError("not a model: expected a .keras (or .h5) file or a SavedModel folder", path)
    import keras

    try:
        model = keras.saving.load_model(local, compile=False)
    except Exception as exc:  # noqa: BLE001 - corrupt archives fail in many ways; report one line
        raise ModelError(f"cannot load the Keras model: {_first_line(exc)}", path) from None
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelError(f"models with {len(model.inputs)} inputs and {len(model.outputs)} outputs are not "
                         "supported (one of each)", path)
    shape = tuple(model.inputs[0].shape[1:])
    spec = tf.TensorSpec((None, *shape), tf.float32)
    call = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    return _checked(path, lambda x: call(x).numpy(), shape, model.outputs[0].shape)


def _load_saved_model(tf: Any, local: Path, path: str) -> LoadedModel:
    try:
        obj = tf.saved_model.load(str(local))
        signature = obj.signatures["serving_default"]
    except KeyError:
        raise ModelError("SavedModel has no 'serving_default' signature", path) from None
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot load the SavedModel: {_first_line(exc)}", path) from None
    inputs = signature.structured_input_signature[1]
    outputs = signature.structured_outputs
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(f"signature with {len(inputs)} inputs and {len(outputs)} outputs is not supported "
                         "(one of each)", path)
    (in_name, in_spec), = inputs.items()
    (out_name, out_spec), = outputs.items()

    def run(x: np.ndarray) -> np.ndarray:
        return signature(**{in_name: tf.constant(x)})[out_name].numpy()

    run.keepalive = obj  # type: ignore[attr-defined]  # the signature needs its object alive
    return _checked(path, run, tuple(in_spec.shape[1:]), out_spec.shape)


def _checked(path: str, run: Callable[[np.ndarray], np.ndarray], shape: tuple, out_shape: Any) -> LoadedModel:
    shape = tuple(None if s is None else int(s) for s in shape)
    out = tuple(out_shape)
    if len(shape) not in (1, 2, 3, 4) or shape[-1] is None:
        raise ModelError(f"unsupported input shape {('batch', *shape)}: expected (batch, [time,] bands) or "
                         "(batch, [time,] h, w, bands) with a fixed band count", path)
    if len(out) != len(shape) - (1 if len(shape) in (2, 4) else 0) + 1 or out[-1] is None:
        raise ModelError(f"output shape {tuple(out)} does not match input {('batch', *shape)}: expected one "
                         "value per class per pixel", path)
    return LoadedModel(path=path, run=run, input_shape=shape, channels=int(out[-1]))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# ----------------------------------------------------------------------------------------------------
# Block functions (run on workers; receive only small, picklable plans)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    model: str
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    nodata: float | None
    when: str
    fill: float
    batch: int
    margin: int = 0
    patch: tuple[int, int] | None = None


def _prepare(block: np.ndarray, plan: _Plan) -> tuple[np.ndarray, np.ndarray]:
    """(normalised float32 values in (time, y, x, band) order with nodata filled, bad-value mask)."""
    values = np.moveaxis(block, 0, -1)
    bad = np.isnan(values) if values.dtype.kind == "f" else np.zeros(values.shape, bool)
    if plan.nodata is not None:
        bad |= values == plan.nodata
    x = values.astype(np.float32) * np.asarray(plan.scale, np.float32) + np.asarray(plan.offset, np.float32)
    x[bad] = plan.fill
    return x, bad


def _nodata_pixels(bad: np.ndarray, when: str, axes: tuple[int, ...]) -> np.ndarray:
    return bad.any(axis=axes) if when == "any" else bad.all(axis=axes)


def _run_batches(model: LoadedModel, x: np.ndarray, batch: int) -> np.ndarray:
    if len(x) == 0:
        return np.empty((0, model.channels), np.float32)
    parts = [np.asarray(model.run(np.ascontiguousarray(x[i:i + batch])), np.float32)
             for i in range(0, len(x), batch)]
    return np.concatenate(parts)


def _pixel_block(block: np.ndarray, plan: _Plan, timed: bool) -> np.ndarray:
    """Per-pixel model on a (band, time, y, x) block → probabilities (class, time | 1, y, x), NaN nodata."""
    model = load_model(plan.model)
    x, bad = _prepare(block, plan)  # (time, y, x, band)
    if timed:  # samples (y·x, time, band)
        samples = np.moveaxis(x, 0, 2).reshape(-1, x.shape[0], x.shape[3])
        invalid = _nodata_pixels(bad, plan.when, (0, 3)).reshape(-1)
        out_shape = (1, *x.shape[1:3])
    else:  # samples (time·y·x, band)
        samples = x.reshape(-1, x.shape[3])
        invalid = _nodata_pixels(bad, plan.when, (3,)).reshape(-1)
        out_shape = x.shape[:3]
    if not invalid.any():  # no gather/scatter copies when every pixel is valid
        result = _run_batches(model, samples, plan.batch)
    else:
        result = np.full((len(invalid), model.channels), np.nan, np.float32)
        keep = np.flatnonzero(~invalid)
        result[keep] = _run_batches(model, samples[keep], plan.batch)
    return np.moveaxis(result.reshape(*out_shape, model.channels), -1, 0)


def _tile_starts(length: int, tile: int, margin: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - 2 * margin))
    return starts + [length - tile]


def _trusted(start: int, tile: int, length: int, margin: int) -> tuple[int, int]:
    """Pixels of a tile whose receptive field lies inside it (all of it at block edges)."""
    return (start + margin if start > 0 else 0), (start + tile - margin if start + tile < length else length)


def _ramp(lo: int, hi: int) -> np.ndarray:
    i = np.arange(hi - lo, dtype=np.float32)
    return np.minimum(i + 1, hi - lo - i)


def _image_block(block: np.ndarray, plan: _Plan, timed: bool, block_info: dict | None = None) -> np.ndarray:
    """Image model on an overlapped (band, time, y, x) block → (class, time | 1, y, x) probabilities."""
    model = load_model(plan.model)
    x, bad = _prepare(block, plan)  # (time, y, x, band)
    n_t, height, width = x.shape[:3]
    fixed = model.size
    tile = tuple(fixed[k] or min(plan.patch[k] if plan.patch else block.shape[2 + k], block.shape[2 + k])
                 for k in range(2))
    pad = (max(0, tile[0] - height), max(0, tile[1] - width))
    if any(pad):  # only a whole array smaller than a fixed-size input; planned as one block
        x = np.pad(x, ((0, 0), (0, pad[0]), (0, pad[1]), (0, 0)), constant_values=plan.fill)
    frames = [x] if timed else [x[t:t + 1] for t in range(n_t)]
    out = np.empty((model.channels, len(frames), height, width), np.float32)
    ys = _tile_starts(x.shape[1], tile[0], plan.margin)
    xs = _tile_starts(x.shape[2], tile[1], plan.margin)
    windows = [(y0, x0) for y0 in ys for x0 in xs]
    for f, frame in enumerate(frames):
        if len(windows) == 1 and not any(pad):  # one tile as large as the block: nothing to blend
            pred = np.asarray(model.run(frame[None] if timed else frame), np.float32)[0]
            out[:, f] = np.moveaxis(pred, -1, 0)
            continue
        acc = np.zeros((x.shape[1], x.shape[2], model.channels), np.float32)
        weight = np.zeros((x.shape[1], x.shape[2], 1), np.float32)
        for i in range(0, len(windows), plan.batch):
            chunk = windows[i:i + plan.batch]
            tiles = np.stack([frame[:, y0:y0 + tile[0], x0:x0 + tile[1]] for y0, x0 in chunk])
            pred = np.asarray(model.run(tiles if timed else tiles[:, 0]), np.float32)
            for (y0, x0), p in zip(chunk, pred):
                ylo, yhi = _trusted(y0, tile[0], x.shape[1], plan.margin)
                xlo, xhi = _trusted(x0, tile[1], x.shape[2], plan.margin)
                w = np.multiply.outer(_ramp(ylo, yhi), _ramp(xlo, xhi))[..., None]
                acc[ylo:yhi, xlo:xhi] += w * p[ylo - y0:yhi - y0, xlo - x0:xhi - x0]
                weight[ylo:yhi, xlo:xhi] += w
        out[:, f] = np.moveaxis(acc[:height, :width] / weight[:height, :width], -1, 0)
    if timed:
        out[:, :, _nodata_pixels(bad, plan.when, (0, 3))] = np.nan
    else:
        out[:, _nodata_pixels(bad, plan.when, (3,))] = np.nan
    return out


def _classes_block(prob: np.ndarray) -> np.ndarray:
    """Probabilities (class, ...) → uint8 class indexes (one sigmoid channel: p ≥ 0.5), 255 nodata."""
    classes = (prob[0] >= 0.5).astype(np.uint8) if prob.shape[0] == 1 else \
        np.argmax(np.nan_to_num(prob, nan=-1.0), axis=0).astype(np.uint8)
    classes[np.isnan(prob[0])] = NODATA_U8
    return classes


def _uint8_block(prob: np.ndarray) -> np.ndarray:
    out = np.round(np.nan_to_num(prob, nan=0.0) * PROBABILITY_U8_SCALE).astype(np.uint8)
    out[np.isnan(prob)] = NODATA_U8
    return out


# ----------------------------------------------------------------------------------------------------
# Planning (client side)
# ----------------------------------------------------------------------------------------------------


def _merged_chunks(chunks: tuple[int, ...], minimum: int) -> tuple[int, ...]:
    """Chunks merged with their neighbours until each is at least ``minimum`` long (or the whole axis)."""
    out: list[int] = []
    run = 0
    for c in chunks:
        run += c
        if run >= minimum:
            out.append(run)
            run = 0
    if run:
        if out:
            out[-1] += run
        else:
            out.append(run)
    return tuple(out)


def _select_time(ds: xr.Dataset, time: Any) -> xr.Dataset:
    if time is None or "time" not in ds.dims:
        return ds
    try:
        if isinstance(time, (int, np.integer)) or (isinstance(time, slice) and all(
                v is None or isinstance(v, (int, np.integer)) for v in (time.start, time.stop))) or (
                isinstance(time, Sequence) and not isinstance(time, str) and time
                and all(isinstance(v, (int, np.integer)) for v in time)):
            return ds.isel(time=time)
        return ds.sel(time=time)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ModelError(f"cannot select {time!r}: {_first_line(exc)}", "time") from None


def _input_nodata(ds: xr.Dataset, bands: Sequence[str], spec: ModelSpec) -> float | None:
    if spec.nodata.value is not None:
        return spec.nodata.value
    var = ds[bands[0]]
    if "nodata" in var.attrs and var.attrs["nodata"] is not None:
        return float(var.attrs["nodata"])
    return 0.0 if var.dtype.kind == "u" else None


def _check_inputs(ds: xr.Dataset, bands: list[str], spec: ModelSpec, model: LoadedModel) -> None:
    missing = [b for b in bands if b not in ds.data_vars]
    if missing:
        raise ModelError(f"band {missing[0]!r} is not in the dataset (variables: "
                         f"{', '.join(map(str, ds.data_vars))})", "bands")
    if model.bands != len(bands):
        raise ModelError(f"{len(bands)} bands {bands} for a model with {model.bands} input channels", "bands")
    for b in bands:
        if not {"y", "x"} <= set(ds[b].dims) or not set(ds[b].dims) <= {"time", "y", "x"}:
            raise ModelError(f"variable {b!r} has dims {ds[b].dims}; expected (time,) y, x", "bands")
    kind = ds.attrs.get("output")
    if spec.input != "any" and kind in ("reflectance", "raw") and kind != spec.input:
        raise ModelError(f"the model expects {spec.input} values but the dataset holds {kind}", "input")


def predict(
    dataset: xr.Dataset,
    model: str | Path,
    *,
    bands: Sequence[str] | None = None,
    time: Any = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    output: Literal["probabilities", "classes"] = "probabilities",
    probability_dtype: Literal["float32", "uint8"] = "float32",
    sidecar: str | Path | dict | None = None,
) -> xr.Dataset:
    """Lazy predictions of ``model`` (``.keras`` file or SavedModel folder; sidecar beside it) on ``dataset``.

    ``bands`` overrides the sidecar's band order; ``time`` selects dates (index, label, slice or list);
    ``overlap`` overrides the sidecar's receptive-field ``margin`` for image models; ``batch_size`` is
    pixels (per-pixel models) or tiles (image models) per model call. The result holds ``probability``
    ([time,] class, y, x; float32 with NaN nodata, or uint8 = p × 254 with 255 nodata) or ``classes``
    ([time,] y, x; uint8, 255 nodata, with ``class_names`` and a ``colormap`` attribute).
    """
    if output not in ("probabilities", "classes"):
        raise ModelError(f"unknown output {output!r}; use 'probabilities' or 'classes'", "output")
    if probability_dtype not in ("float32", "uint8"):
        raise ModelError(f"unknown probability dtype {probability_dtype!r}; use float32 or uint8", "dtype")
    path = str(model)
    source = sidecar if sidecar is not None else sidecar_path(path)
    spec = load_spec(source)
    loaded = load_model(path)
    try:
        spec.class_names(loaded.channels)
    except ModelError as exc:
        where = "sidecar" if isinstance(source, dict) else str(source)
        raise ModelError(exc.message, f"{where}: {exc.where}") from None
    names = list(bands) if bands is not None else list(spec.bands)
    ds = _select_time(dataset, time)
    if "spatial_ref" in ds.data_vars:  # a store read without decode_coords="all"
        ds = ds.set_coords("spatial_ref")
    _check_inputs(ds, names, spec, loaded)
    if len(names) != len(spec.bands) and (isinstance(spec.scale, list) or isinstance(spec.offset, list)):
        raise ModelError(f"{len(names)} bands but the sidecar normalises {len(spec.bands)}", "bands")
    timeless = "time" not in ds[names[0]].dims
    arr = xr.concat([ds[b] if not timeless else ds[b].expand_dims("time") for b in names], dim="band",
                    coords="minimal", compat="override", join="override")
    arr = arr.transpose("band", "time", "y", "x")
    timed = loaded.time_steps is not None
    if timed and arr.sizes["time"] != loaded.time_steps:
        raise ModelError(f"the model reads {loaded.time_steps} dates, the dataset has {arr.sizes['time']} "
                         "(select them with time=...)", "time")
    margin = spec.margin if overlap is None else int(overlap)
    if margin < 0:
        raise ModelError(f"must be ≥ 0, got {margin}", "overlap")
    batch = int(batch_size or DEFAULT_BATCH[loaded.kind])
    if batch < 1:
        raise ModelError(f"must be ≥ 1, got {batch}", "batch_size")
    n = len(names)
    plan = _Plan(model=path, scale=spec.per_band("scale", n), offset=spec.per_band("offset", n),
                 nodata=_input_nodata(ds, names, spec), when=spec.nodata.when, fill=spec.nodata.fill,
                 batch=batch, margin=margin if loaded.kind == "image" else 0, patch=spec.patch)
    data = arr.data if isinstance(arr.data, da.Array) else da.from_array(arr.values, chunks=-1)
    prob = _blockwise(data, plan, loaded, timed)
    return _assemble(prob, arr, ds, plan, spec, loaded, output, probability_dtype, timed or timeless)


def _blockwise(data: da.Array, plan: _Plan, model: LoadedModel, timed: bool) -> da.Array:
    """(band, time, y, x) dask array → (class, time | 1, y, x) float32 probabilities."""
    data = data.rechunk({0: -1, 1: -1 if timed else 1})  # one date per block: a COG per date reads its own
    c = model.channels
    if model.kind == "pixel":
        chunks = ((c,), (1,) if timed else data.chunks[1], data.chunks[2], data.chunks[3])
        return data.map_blocks(_pixel_block, plan=plan, timed=timed, chunks=chunks, dtype=np.float32,
                               meta=np.empty((0, 0, 0, 0), np.float32))
    fixed = model.size
    for k, axis in enumerate("yx"):
        tile = fixed[k] or (plan.patch[k] if plan.patch else None)
        if tile is not None and tile <= 2 * plan.margin:
            raise ModelError(f"tile {axis} size {tile} must exceed twice the margin ({plan.margin})",
                             "overlap")
    minimum = [max(fixed[k] or 1, 2 * plan.margin + 1) for k in range(2)]
    planned = {2: _merged_chunks(data.chunks[2], minimum[0]), 3: _merged_chunks(data.chunks[3], minimum[1])}
    given = {2: data.chunks[2], 3: data.chunks[3]}
    data = data.rechunk(planned)
    depth = {0: 0, 1: 0, 2: plan.margin, 3: plan.margin}
    extended = da.overlap.overlap(data, depth=depth, boundary="none") if plan.margin else data
    chunks = ((c,), (1,) if timed else extended.chunks[1], extended.chunks[2], extended.chunks[3])
    out = extended.map_blocks(_image_block, plan=plan, timed=timed, chunks=chunks, dtype=np.float32,
                              meta=np.empty((0, 0, 0, 0), np.float32))
    out = da.overlap.trim_internal(out, depth, boundary="none") if plan.margin else out
    return out.rechunk(given) if planned != given else out  # the output keeps the input's chunks


def _assemble(prob: da.Array, arr: xr.DataArray, ds: xr.Dataset, plan: _Plan, spec: ModelSpec,
              model: LoadedModel, output: str, probability_dtype: str, drop_time: bool) -> xr.Dataset:
    names = spec.class_names(model.channels)
    coords: dict[Hashable, Any] = {k: v for k, v in arr.coords.items() if k != "band" and (
        not drop_time or "time" not in v.dims)}
    attrs = {"model": Path(plan.model.rstrip("/")).name, "classes": json.dumps(names),
             "software": f"pixels_xr {__version__}"}
    attrs.update({k: ds.attrs[k] for k in ("feature", "mode") if k in ds.attrs})
    if drop_time:
        prob = prob[:, 0]
    dims = ("time", "y", "x")[1 if drop_time else 0:]
    if output == "classes":
        values = prob.map_blocks(_classes_block, drop_axis=0, dtype=np.uint8, meta=np.empty((0,) * len(dims),
                                                                                             np.uint8))
        var = xr.DataArray(values, dims=dims, coords=coords, attrs={
            "class_names": names, "nodata": NODATA_U8, "flag_values": list(range(len(names))),
            "flag_meanings": " ".join(n.replace(" ", "_") for n in names),
            "colormap": json.dumps({str(k): list(v) for k, v in spec.colormap(names).items()})})
        out = xr.Dataset({"classes": var}, attrs=attrs)
    else:
        if model.channels == 1:  # one sigmoid output: probability of the second class; add the first
            prob = da.concatenate([1 - prob, prob], axis=0)
        var_attrs: dict[str, Any] = {}
        if probability_dtype == "uint8":
            prob = prob.map_blocks(_uint8_block, dtype=np.uint8)
            var_attrs = {"nodata": NODATA_U8, "scale": 1 / PROBABILITY_U8_SCALE}
        labels = np.array(names, dtype=object)  # variable-length strings: specified in Zarr v3
        var = xr.DataArray(prob, dims=("class", *dims), coords={**coords, "class": labels}, attrs=var_attrs)
        var = var.transpose(*dims[:-2], "class", "y", "x")
        out = xr.Dataset({"probability": var}, attrs=attrs)
    if drop_time and "time" in arr.coords and arr["time"].size and np.issubdtype(arr["time"].dtype,
                                                                                   np.datetime64):
        out.attrs["dates"] = json.dumps([str(t)[:19] for t in arr["time"].values])
    crs = ds.rio.crs
    return out.rio.write_crs(crs) if crs is not None else out


def colormap_of(dataset: xr.Dataset) -> dict[int, tuple[int, int, int, int]] | None:
    """The colour table stored with ``classes`` by :func:`predict` (None when absent)."""
    raw = dataset["classes"].attrs.get("colormap") if "classes" in dataset else None
    if not raw:
        return None
    table = {int(k): tuple(int(c) for c in v) for k, v in json.loads(raw).items()}
    return {**table, NODATA_U8: (0, 0, 0, 0)}  # type: ignore[dict-item]


# ----------------------------------------------------------------------------------------------------
# Stores: engine Zarr in, Zarr or COGs out (the ``pixels-xr predict`` command)
# ----------------------------------------------------------------------------------------------------


def open_input(url: str, group: str | None = None) -> xr.Dataset:
    """An engine Dataset from a Zarr store: its root, its ``group``, or a group path ``run.zarr/f1``."""
    try:
        with warnings.catch_warnings():  # stores without consolidated metadata are fine (and warn)
            warnings.simplefilter("ignore", RuntimeWarning)
            ds = xr.open_zarr(url, group=group, consolidated=None, chunks={}, decode_coords="all")
    except (FileNotFoundError, KeyError, ValueError, OSError) as exc:
        where = f"{url} (group {group})" if group else url
        raise PixelsError(f"not a readable Zarr dataset: {_first_line(exc)}", where) from None
    if not ds.data_vars:
        import zarr

        try:
            children = sorted(zarr.open_group(url, mode="r", path=group or "").group_keys())
        except Exception:  # noqa: BLE001 - only used to improve the message
            children = []
        hint = f"; it holds the groups {', '.join(children)}: pick one with --group" if children else ""
        raise PixelsError(f"no data variables{hint}", url if not group else f"{url} (group {group})")
    return ds


def output_name(var: str, time: Any, taken: set[str]) -> str:
    """File name of one COG: ``classes.tif`` or ``classes_2021-11-01.tif`` (a counter when dates repeat)."""
    stem = var if time is None else f"{var}_{str(np.datetime_as_string(time, unit='D'))}"
    name, k = f"{stem}.tif", 1
    while name in taken:
        name, k = f"{stem}_{k}.tif", k + 1
    taken.add(name)
    return name


def write_predictions(result: xr.Dataset, out: str, fmt: Literal["zarr", "cog"] = "zarr") -> list[str]:
    """Write ``predict``'s result to a Zarr store or one COG per date in folder ``out``; returns the paths."""
    from zarr.errors import ContainsArrayError, ContainsGroupError

    from pixels_xr.io.cog import write_cog

    if fmt == "zarr":
        regular = result.chunk({d: max(c) for d, c in result.chunks.items()})  # Zarr needs regular chunks
        try:
            regular.to_zarr(out, mode="w-", consolidated=False)
        except (FileExistsError, ContainsGroupError, ContainsArrayError) as exc:
            raise OutputError(f"already exists ({type(exc).__name__}); remove it first", out) from None
        return [out]
    var = "classes" if "classes" in result else "probability"
    data = result[var]
    taken: set[str] = set()
    written: list[str] = []
    times = data["time"].values if "time" in data.dims else [None]
    for k, when in enumerate(times):
        layer = data.isel(time=k) if when is not None else data
        if var == "probability":
            layer = layer.rename({"class": "band"})
        path = storage.join(out, output_name(var, when, taken))
        nodata = data.attrs.get("nodata")
        write_cog(layer, path, nodata=nodata, band_names=[str(c) for c in result["class"].values]
                  if var == "probability" else ["classes"],
                  tags={"model": result.attrs.get("model"), "classes": result.attrs.get("classes"),
                        "datetime": str(when)[:19] if when is not None else None},
                  colormap=colormap_of(result) if var == "classes" else None)
        written.append(path)
    return written
