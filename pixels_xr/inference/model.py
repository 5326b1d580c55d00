"""Keras/TensorFlow models loaded once per process and path (local, or downloaded from remote storage)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pixels_xr.errors import ModelError
from pixels_xr.inference.sidecar import MODEL_SUFFIXES
from pixels_xr.io import storage
from pixels_xr.io.predictions import first_line

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
        raise ModelError(f"cannot read the model: {first_line(exc)}", path) from None
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
                raise ModelError(f"cannot download the model: {first_line(exc)}", path) from None
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
        raise ModelError(f"cannot load the Keras model: {first_line(exc)}", path) from None
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
        raise ModelError(f"cannot load the SavedModel: {first_line(exc)}", path) from None
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
