"""Modes ``all``, ``latest_pixel``, ``cloud_sorted_pixel`` and ``composite``: xarray glue over the kernels.

Output ``xr.Dataset`` (dims ``time, y, x``; CRS set): one variable per requested band — float32 surface
reflectance (``output: reflectance``, NaN nodata) or harmonised uint16 DN (``output: raw``: reflectance /
scale with every item's offset removed, clipped to ≥ 1, nodata 0) — plus ``clear_count`` (uint16: clear
observations behind each pixel) and, for modes that pick one observation per pixel, ``source_time`` (the
acquisition each pixel came from). ``time`` is the bin start, with ``time_end``, ``partial`` and ``empty``
coordinates; an empty bin is present, all nodata and flagged. Pick modes run the kernels on raw integer DN
(exact, half the memory) and convert the picked values with the picked item's own scale/offset; the median
runs on float32 reflectance so items of different processing baselines mix correctly. Kernels run per
spatial block of one bin in the cube's own ``(time, band, y, x)`` layout (``build_cube`` chunks time by
bin), so no rechunk and no transposed copy comes before them.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from pixels_xr import reducers
from pixels_xr._version import __version__
from pixels_xr.catalog import as_items, search
from pixels_xr.config import PixelsConfig
from pixels_xr.cube import Loader, build_cube, check_assets
from pixels_xr.errors import ConfigError
from pixels_xr.features import Feature
from pixels_xr.items import AssetProblem, ParsedItem
from pixels_xr.masks import clear_mask
from pixels_xr.methods import METHODS, Method
from pixels_xr.signing import redact_json
from pixels_xr.timeslices import TimeBin, assign_bins


@dataclass(frozen=True)
class Observations:
    """What a feature's reductions start from: the lazy cube, its clear-sky mask, the items it was built
    from, the unreadable assets left out (``check_assets`` problems) and the items a search filter removed
    (by reason)."""

    cube: xr.DataArray
    clear: xr.DataArray
    items: list[ParsedItem]
    problems: list[AssetProblem]
    filtered: dict[str, int]


def observations(config: PixelsConfig, feature: Feature, *,
                 items: Sequence[ParsedItem | dict] | None = None, loader: Loader = "stackstac",
                 check: bool = True, reads_here: bool | None = None) -> Observations:
    """Search (unless ``items``) → asset check (``check``) → cube → clear mask with the configured cleanup:
    the one path from a configuration to observations, shared by ``collect``, ``run_batch`` and ``plot``.
    ``reads_here``: whether the cube's reads run in this process (``check_assets``' ``keep_open``)."""
    found = search(config, feature) if items is None else items
    filtered = dict(getattr(found, "filtered", {}))
    parsed = as_items(found, config)
    problems: list[AssetProblem] = []
    if check and parsed:
        # only the stackstac loader's direct reads (nearest, pixels on the output grid) take what it opened
        direct = loader == "stackstac" and config.resampling == "nearest"
        parsed, problems = check_assets(parsed, config, keep_open=reads_here if direct else False)
    cube = build_cube(parsed, feature, config, loader=loader)
    clear = clear_mask(cube, config.mask_spec, config.mask_cleanup.opening, config.mask_cleanup.dilation)
    return Observations(cube, clear, parsed, problems, filtered)


def collect(config: PixelsConfig, feature: Feature, *, items: Sequence[ParsedItem | dict] | None = None,
            loader: Loader = "stackstac", check: bool = True) -> xr.Dataset:
    """Lazy Dataset of a feature for the configured mode (search → cube → mask → reduce).

    ``items`` skips the search (``catalog.search``'s parsed items, or STAC dicts parsed here); ``check``
    opens every asset header first so unreadable assets are recorded (``attrs["asset_problems"]``) or fail
    per ``on_asset_error``.
    """
    return composite(observations(config, feature, items=items, loader=loader, check=check), config, feature)


def composite(obs: Observations, config: PixelsConfig, feature: Feature) -> xr.Dataset:
    """The configured mode's lazy Dataset over observations, with the run's provenance in ``attrs``
    (JSON strings, so that Zarr and COG tags keep them as written)."""
    cube, clear = obs.cube, obs.clear
    if config.mode == "all":
        ds = _all(cube, clear, config)
    else:
        ds = _binned(cube, clear, config, config.bins(feature), config.method)
    ds.attrs["item_ids"] = json.dumps(unit_item_ids(cube, config, feature))
    ds.attrs.update({
        "feature": feature.id, "mode": config.mode,
        "config": redact_json(config.model_dump_json(exclude_none=True)),  # no tokens in a catalog URL
        "output": config.output, "asset_problems": json.dumps(obs.problems),
        "items_filtered": json.dumps(obs.filtered),
        "software": f"pixels_xr {__version__}",
    })
    if cube.attrs.get("empty_reason"):
        ds.attrs["empty_reason"] = cube.attrs["empty_reason"]
    ds = ds.rio.write_crs(cube.rio.crs).rio.write_transform(cube.rio.transform())
    return ds


# ----------------------------------------------------------------------------------------------- helpers
def _score(method: Method, cube: xr.DataArray, spec_asset: str) -> xr.DataArray | None:
    """The per-observation ranking of a ``best_by_score`` method (None for the other reductions)."""
    if method.score == "s2_quality":
        tyx = ("time", "y", "x")
        return xr.apply_ufunc(reducers.s2_quality_score, cube.sel(band=spec_asset).transpose(*tyx),
                              cube.sel(band="red").transpose(*tyx).astype("float32"),
                              cube.sel(band="nir").transpose(*tyx).astype("float32"),
                              dask="parallelized", output_dtypes=[np.float32])
    if method.score == "qa_pixel_class":  # clear land (bit 6) > water (bit 7) > snow (bit 5); ties → newest
        qa = cube.sel(band=spec_asset).astype("int64")
        return xr.where((qa & 64) > 0, 3.0, xr.where((qa & 128) > 0, 2.0, xr.where((qa & 32) > 0, 1.0, 0.0))
                        ).astype("float32")
    return None


def _per_chunk(fn: Any, cube: xr.DataArray, clear: xr.DataArray, score: xr.DataArray | None,
               steps: np.ndarray, n_steps: int, outputs: list[tuple[Any, Any]],
               per_item: dict[str, np.ndarray],
               **kwargs: Any) -> list[Any]:
    """Run ``fn(data (t, band, y, x), clear (t, y, x)[, score (t, y, x)], **per_item, **kwargs) -> tuple of
    (y, x)`` on every spatial block of every time chunk of the cube, in its own layout (no transposed copy);
    ``steps[i]`` is the output time step of item ``i``, and a time chunk holds the items of one step
    (``_chunked_by_step``). Returns one ``(step, y, x)`` dask array per ``(dtype, fill)`` of ``outputs``; a
    step without items is ``fill``. ``per_item`` arrays (first axis time) reach ``fn`` cut to the chunk.

    The graph is written directly, one reduce task per chunk × block and one unpack task per output block:
    building it per step with xarray and dask calls was most of the client's time per feature."""
    import dask.array as da
    from dask.base import tokenize

    from pixels_xr.graph import HighLevelGraph, List, Task, TaskRef

    data = _data(cube.transpose("time", "band", "y", "x"))
    masks = [_data(clear.transpose("time", "y", "x"))]
    if score is not None:
        masks.append(_data(score.transpose("time", "y", "x")))
    masks = [m.rechunk((data.chunks[0],) + data.chunks[2:]) for m in masks]
    ys, xs = data.chunks[2], data.chunks[3]
    token = tokenize(fn, data.name, [m.name for m in masks], steps, n_steps, outputs, per_item, kwargs)
    reduce_name = f"pixels-reduce-{token}"
    edges = np.cumsum((0,) + data.chunks[0])
    chunk_of_step: dict[int, int] = {}
    layer = {}
    for j, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        if b == a:
            continue
        chunk_of_step[steps[a]] = j
        cut = {k: v[a:b] for k, v in per_item.items()}
        for iy in range(len(ys)):
            for ix in range(len(xs)):
                refs = [List(*(TaskRef((data.name, j, kb, iy, ix)) for kb in range(len(data.chunks[1]))))]
                refs += [TaskRef((m.name, j, iy, ix)) for m in masks]
                key = (reduce_name, j, iy, ix)
                layer[key] = Task(key, _reduce_block, fn, *refs, **cut, **kwargs)
    graph = HighLevelGraph.from_collections(reduce_name, layer, dependencies=[data, *masks])
    reduced = da.Array(graph, reduce_name, ((1,) * len(data.chunks[0]), ys, xs),
                       meta=np.empty((0, 0, 0), object))
    arrays = []
    for k, (dtype, fill) in enumerate(outputs):
        name = f"pixels-out{k}-{token}"
        layer = {}
        for step in range(max(n_steps, 1)):  # no step at all: one empty block
            for iy, h in enumerate(ys):
                for ix, w in enumerate(xs):
                    key = (name, step, iy, ix)
                    j = chunk_of_step.get(step)
                    layer[key] = (Task(key, _unpack, TaskRef((reduce_name, j, iy, ix)), k) if j is not None
                                  else Task(key, np.full, (min(n_steps, 1), h, w), fill, np.dtype(dtype)))
        graph = HighLevelGraph.from_collections(name, layer, dependencies=[reduced])
        arrays.append(da.Array(graph, name, ((1,) * n_steps or (0,), ys, xs),
                               meta=np.empty((0, 0, 0), dtype)))
    return arrays


def _reduce_block(fn: Any, data: Any, *masks: Any, **kwargs: Any) -> Any:
    """``fn`` on one chunk × block; the band blocks of the chunk are joined (without a copy when there is
    one, as for a cube of ``build_cube``)."""
    return fn(data[0] if len(data) == 1 else np.concatenate(data, axis=1), *masks, **kwargs)


def _unpack(results: tuple[np.ndarray, ...], k: int) -> np.ndarray:
    return results[k][None]


def _data(arr: xr.DataArray) -> Any:
    import dask.array as da

    return arr.data if isinstance(arr.data, da.Array) else da.from_array(arr.values, chunks=-1)


def _chunked_by_step(arr: xr.DataArray, steps: np.ndarray) -> xr.DataArray:
    """``arr`` with one time chunk per run of equal ``steps`` (as ``build_cube`` chunks already: then a
    no-op)."""
    bounds = np.flatnonzero(np.diff(steps)) + 1
    sizes = tuple(int(n) for n in np.diff(np.concatenate(([0], bounds, [steps.size])))) or (0,)
    if arr.chunks is not None and arr.chunks[arr.get_axis_num("time")] == sizes:
        return arr
    return arr.chunk({"time": sizes})


def _pick_block(data: np.ndarray, clear: np.ndarray, score: np.ndarray | None = None, *, scale: np.ndarray,
                offset: np.ndarray, times: np.ndarray, cloud_cover: np.ndarray, method: Method, nodata: Any,
                refl_bands: np.ndarray, out_bands: np.ndarray, output: str) -> tuple[np.ndarray, ...]:
    """One spatial block of one step: data (time, band, y, x), clear and score (time, y, x); the per-item
    arrays are the step's."""
    d = np.ascontiguousarray(data)
    c = np.ascontiguousarray(clear)
    if method.reduction == "latest":
        out, index, count = reducers.latest_valid(d, c, nodata)
    elif method.reduction == "first_by_order":
        # least cloudy first (unknown cover last), then oldest; or plain time order
        order = (np.arange(len(times)) if method.order == "time" else
                 np.argsort(np.nan_to_num(cloud_cover.astype(float), nan=101.0), kind="stable"))
        out, index, count = reducers.first_valid_by_order(d, c, order, nodata)
    elif method.reduction == "best_by_score" and score is not None:
        out, index, count = reducers.quality_mosaic(d, c, np.ascontiguousarray(score), nodata)
    else:
        raise ValueError(f"no pick kernel for method {method.name!r} ({method.reduction})")
    out = out[out_bands]
    picked = index >= 0
    safe = np.where(picked, index, 0)
    results = []
    for k, b in enumerate(out_bands):
        values = out[k]
        if refl_bands[b]:
            sc = np.take(scale[:, b], safe)
            of = np.take(offset[:, b], safe)
            refl = values.astype(np.float32) * sc + of
            results.append(_convert(refl, picked & (values != nodata), sc, output))
        else:
            results.append(np.where(picked, values, nodata).astype(values.dtype))
    source = np.where(picked, np.take(times, safe), np.datetime64("NaT", "ns")).astype("datetime64[ns]")
    return (*results, count, source)


def _convert(refl: np.ndarray, ok: np.ndarray, scale: Any, output: str) -> np.ndarray:
    if output == "reflectance":
        return np.where(ok, refl, np.float32(np.nan)).astype(np.float32)
    dn = np.clip(np.rint(refl / scale), 1, 65535)
    return np.where(ok, dn, 0).astype(np.uint16)


def _median_block(data: np.ndarray, clear: np.ndarray, *, bands: np.ndarray, scale: np.ndarray,
                  offset: np.ndarray, output: str, out_scale: float) -> tuple[np.ndarray, ...]:
    """Median of one spatial block of one bin over clear observations, on float32 reflectance
    (``DN × scale + offset`` per item, as ``cube.to_reflectance``), converted by the kernel as it reads
    each tile (no float32 copy of the block). A clear pixel holds data in every reflectance band
    (``masks.clear_mask``), so nodata never enters the median."""
    out, count = reducers.clear_median(data, clear, bands=bands, scale=scale[:, bands], offset=offset[:, bands])
    values = [out[k] if output == "reflectance" else _convert(out[k], ~np.isnan(out[k]), out_scale, output)
              for k in range(out.shape[0])]
    return (*values, count)


def _fill(dtype: Any, nodata: Any) -> Any:
    """The value of a step without observations: NaN, NaT, 0 for unsigned integers, else the nodata."""
    kind = np.dtype(dtype).kind
    if kind == "f":
        return np.nan
    if kind == "M":
        return np.datetime64("NaT", "ns")
    return 0 if kind == "u" else nodata


def _apply_pick(cube: xr.DataArray, clear: xr.DataArray, score: xr.DataArray | None, method: Method,
                config: PixelsConfig, steps: np.ndarray, n_steps: int) -> xr.Dataset:
    names = list(cube.band.values)
    bands = list(config.band_names)
    refl_bands = np.array(cube.reflectance.values, dtype=bool)
    nodata = cube.attrs["nodata"]
    out_types = [np.float32 if (refl_bands[names.index(b)] and config.output == "reflectance") else
                 (np.uint16 if refl_bands[names.index(b)] else cube.dtype) for b in bands]
    types = out_types + [np.uint16, np.dtype("datetime64[ns]")]
    per_item = {**_scaling(cube), "times": cube.time.values.astype("datetime64[ns]"),
                "cloud_cover": np.asarray(cube.cloud_cover.values, dtype=float)}
    results = _per_chunk(_pick_block, cube, clear, score, steps, n_steps,
                         [(t, _fill(t, nodata)) for t in types], per_item, method=method,
                         nodata=cube.dtype.type(nodata), refl_bands=refl_bands,
                         out_bands=np.array([names.index(b) for b in bands]), output=config.output)
    return _dataset([*bands, "clear_count", "source_time"], results, cube)


def _apply_median(cube: xr.DataArray, clear: xr.DataArray, config: PixelsConfig, steps: np.ndarray,
                  n_steps: int) -> xr.Dataset:
    bands = list(config.band_names)
    classes = [b for b in bands if not bool(cube.reflectance.sel(band=b))]
    if classes:
        raise ConfigError(f"a median composite cannot reduce class bands {classes}; drop them or use "
                          "composite_method first_clear/quality", "bands")
    names = list(cube.band.values)
    out_scale = float(np.nanmin(cube.scale.values)) if cube.sizes["time"] else 1e-4
    out_type = np.float32 if config.output == "reflectance" else np.uint16
    types = [out_type] * len(bands) + [np.uint16]
    results = _per_chunk(_median_block, cube, clear, None, steps, n_steps,
                         [(t, _fill(t, None)) for t in types], _scaling(cube),
                         bands=np.array([names.index(b) for b in bands]), output=config.output,
                         out_scale=out_scale)
    return _dataset([*bands, "clear_count"], results, cube)


def _scaling(cube: xr.DataArray) -> dict[str, np.ndarray]:
    """Per item and band: DN × scale + offset is reflectance."""
    return {"scale": cube.scale.values.astype(np.float32), "offset": cube.offset.values.astype(np.float32)}


def _dataset(names: list[str], arrays: list[Any], cube: xr.DataArray) -> xr.Dataset:
    return xr.Dataset({n: (("time", "y", "x"), a) for n, a in zip(names, arrays)},
                      coords={"y": cube.y, "x": cube.x})


def _reduce(cube: xr.DataArray, clear: xr.DataArray, config: PixelsConfig, method: Method, steps: np.ndarray,
            n_steps: int) -> xr.Dataset:
    """The per-step reduction; items must be in step order."""
    cube, clear = _chunked_by_step(cube, steps), _chunked_by_step(clear, steps)
    if method.reduction == "median":
        return _apply_median(cube, clear, config, steps, n_steps)
    spec = config.mask_spec
    score = _score(method, cube, spec.asset) if spec is not None else None
    return _apply_pick(cube, clear, score, method, config, steps, n_steps)


def _in_step_order(cube: xr.DataArray, clear: xr.DataArray,
                   steps: np.ndarray) -> tuple[xr.DataArray, xr.DataArray, np.ndarray]:
    """Items outside every step dropped and the rest in step order (stable: time order within a step),
    as a cube of ``build_cube`` already is."""
    keep = np.flatnonzero(steps >= 0)
    keep = keep[np.argsort(steps[keep], kind="stable")]
    if keep.size == steps.size and np.array_equal(keep, np.arange(steps.size)):
        return cube, clear, steps
    return cube.isel(time=keep), clear.isel(time=keep), steps[keep]


def _bin_steps(cube: xr.DataArray, bins: list[TimeBin]) -> np.ndarray:
    """The bin index of each observation (-1: outside every bin)."""
    return _bin_steps_of(cube.time.values, bins)


def _bin_steps_of(times: np.ndarray, bins: list[TimeBin]) -> np.ndarray:
    days = [dt.date.fromisoformat(str(t)[:10]) for t in times]
    return np.array(assign_bins(days, bins), dtype=np.int64)


def _day_steps(cube: xr.DataArray) -> tuple[np.ndarray, np.ndarray]:
    """The acquisition days of the observations (mode ``all``'s steps) and each observation's day index."""
    return _day_steps_of(cube.time.values)


def _day_steps_of(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    days = np.array([np.datetime64(str(t)[:10], "ns") for t in times], dtype="datetime64[ns]")
    unique, steps = np.unique(days, return_inverse=True)
    return unique, steps.astype(np.int64)


def unit_item_ids(cube: xr.DataArray | Sequence[ParsedItem], config: PixelsConfig,
                  feature: Feature) -> dict[str, list[str]]:
    """Ids of the items behind each output time step, by unit label: the bin's ``start/end`` label, or the
    acquisition day in mode ``all``; from a cube (its items) or from parsed items (a group's member)."""
    if isinstance(cube, xr.DataArray):
        ids, times = cube.id.values, cube.time.values
    else:
        ids = np.array([i.id for i in cube], dtype=object)
        times = np.array([i.datetime for i in cube], dtype=object)
    if config.mode == "all":
        days, steps = _day_steps_of(times)
        labels = [str(d)[:10] for d in days]
    else:
        bins = config.bins(feature)
        steps, labels = _bin_steps_of(times, bins), [b.label for b in bins]
    return {label: [str(i) for i in ids[steps == k]] for k, label in enumerate(labels)}


def _binned(cube: xr.DataArray, clear: xr.DataArray, config: PixelsConfig, bins: list[TimeBin],
            method: Method) -> xr.Dataset:
    cube, clear, steps = _in_step_order(cube, clear, _bin_steps(cube, bins))
    out = _reduce(cube, clear, config, method, steps, len(bins))
    counts = np.bincount(steps, minlength=len(bins))
    out = out.assign_coords(
        time=np.array([np.datetime64(b.start, "ns") for b in bins]),
        time_end=("time", np.array([np.datetime64(b.end, "ns") for b in bins])),
        partial=("time", np.array([b.partial for b in bins])),
        empty=("time", counts == 0),
    )
    return _finish(out, cube)


def _all(cube: xr.DataArray, clear: xr.DataArray, config: PixelsConfig) -> xr.Dataset:
    """One slice per acquisition day: same-day tiles fused first-valid (in time order), cloudy → nodata."""
    unique, steps = _day_steps(cube)
    cube, clear, steps = _in_step_order(cube, clear, steps)
    out = _reduce(cube, clear, config, METHODS["all_first"], steps, len(unique))
    out = out.drop_vars("source_time").assign_coords(time=unique)
    return _finish(out, cube)


def _finish(ds: xr.Dataset, cube: xr.DataArray) -> xr.Dataset:
    ds = ds.assign_coords(x=cube.x, y=cube.y)
    ds = ds.transpose("time", "y", "x")
    for name, var in ds.data_vars.items():  # float bands use NaN as nodata
        if var.dtype.kind != "f" and name not in {"clear_count", "source_time"}:
            var.attrs["nodata"] = 0 if var.dtype.kind == "u" else cube.attrs["nodata"]
    return ds
