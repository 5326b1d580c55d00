"""``predict``: a model over a Dataset, blockwise on Dask (``map_blocks``; overlapped blocks for images)."""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from pixels_xr._version import __version__
from pixels_xr.errors import ModelError
from pixels_xr.inference.blocks import NODATA_U8, PROBABILITY_U8_SCALE, Plan, classes_block, image_block, \
    merged_chunks, pixel_block, uint8_block
from pixels_xr.inference.model import LoadedModel, load_model
from pixels_xr.inference.sidecar import ModelSpec, load_spec, sidecar_path
from pixels_xr.io.predictions import first_line

#: Samples (pixels) per model call for per-pixel models, tiles per call for image models.
DEFAULT_BATCH = {"pixel": 65536, "image": 8}


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
        raise ModelError(f"cannot select {time!r}: {first_line(exc)}", "time") from None


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
    plan = Plan(model=path, scale=spec.per_band("scale", n), offset=spec.per_band("offset", n),
                 nodata=_input_nodata(ds, names, spec), when=spec.nodata.when, fill=spec.nodata.fill,
                 batch=batch, margin=margin if loaded.kind == "image" else 0, patch=spec.patch)
    data = arr.data if isinstance(arr.data, da.Array) else da.from_array(arr.values, chunks=-1)
    prob = _blockwise(data, plan, loaded, timed)
    return _assemble(prob, arr, ds, plan, spec, loaded, output, probability_dtype, timed or timeless)


def _pixel_task(block: np.ndarray, plan: Plan, timed: bool) -> np.ndarray:
    """:func:`pixel_block` with the model this process loaded for ``plan.model`` (runs on workers)."""
    return pixel_block(block, load_model(plan.model), plan, timed)


def _image_task(block: np.ndarray, plan: Plan, timed: bool) -> np.ndarray:
    """:func:`image_block` with the model this process loaded for ``plan.model`` (runs on workers)."""
    return image_block(block, load_model(plan.model), plan, timed)


def _blockwise(data: da.Array, plan: Plan, model: LoadedModel, timed: bool) -> da.Array:
    """(band, time, y, x) dask array → (class, time | 1, y, x) float32 probabilities."""
    data = data.rechunk({0: -1, 1: -1 if timed else 1})  # one date per block: a COG per date reads its own
    c = model.channels
    if model.kind == "pixel":
        chunks = ((c,), (1,) if timed else data.chunks[1], data.chunks[2], data.chunks[3])
        return data.map_blocks(_pixel_task, plan=plan, timed=timed, chunks=chunks, dtype=np.float32,
                               meta=np.empty((0, 0, 0, 0), np.float32))
    fixed = model.size
    for k, axis in enumerate("yx"):
        tile = fixed[k] or (plan.patch[k] if plan.patch else None)
        if tile is not None and tile <= 2 * plan.margin:
            raise ModelError(f"tile {axis} size {tile} must exceed twice the margin ({plan.margin})",
                             "overlap")
    minimum = [max(fixed[k] or 1, 2 * plan.margin + 1) for k in range(2)]
    planned = {2: merged_chunks(data.chunks[2], minimum[0]), 3: merged_chunks(data.chunks[3], minimum[1])}
    given = {2: data.chunks[2], 3: data.chunks[3]}
    data = data.rechunk(planned)
    depth = {0: 0, 1: 0, 2: plan.margin, 3: plan.margin}
    extended = da.overlap.overlap(data, depth=depth, boundary="none") if plan.margin else data
    chunks = ((c,), (1,) if timed else extended.chunks[1], extended.chunks[2], extended.chunks[3])
    out = extended.map_blocks(_image_task, plan=plan, timed=timed, chunks=chunks, dtype=np.float32,
                              meta=np.empty((0, 0, 0, 0), np.float32))
    out = da.overlap.trim_internal(out, depth, boundary="none") if plan.margin else out
    return out.rechunk(given) if planned != given else out  # the output keeps the input's chunks


def _assemble(prob: da.Array, arr: xr.DataArray, ds: xr.Dataset, plan: Plan, spec: ModelSpec,
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
        values = prob.map_blocks(classes_block, drop_axis=0, dtype=np.uint8, meta=np.empty((0,) * len(dims),
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
            prob = prob.map_blocks(uint8_block, dtype=np.uint8)
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
