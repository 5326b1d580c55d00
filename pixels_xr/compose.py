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
import functools
import json
import operator
from typing import Any

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr

from pixels_xr import reducers
from pixels_xr.catalog import search
from pixels_xr.config import PixelsConfig
from pixels_xr.cube import Loader, build_cube, check_assets
from pixels_xr.errors import ConfigError
from pixels_xr.features import Feature
from pixels_xr.masks import clear_mask
from pixels_xr.timeslices import TimeBin, assign_bins

PICK_METHODS = {"latest_pixel", "cloud_sorted_pixel", "first_clear", "quality", "qa_pixel"}


def collect(config: PixelsConfig, feature: Feature, *, items: list[dict] | None = None,
            loader: Loader = "stackstac", check: bool = True) -> xr.Dataset:
    """Lazy Dataset of a feature for the configured mode (search → cube → mask → reduce).

    ``items`` skips the search (normalised items from ``catalog.search``); ``check`` opens every asset
    header first so unreadable assets are recorded (``attrs["asset_problems"]``) or fail per
    ``on_asset_error``.
    """
    if items is None:
        items = search(config, feature)
    problems: list[dict] = []
    if check and items:
        items, problems = check_assets(items, config)
    cube = build_cube(items, feature, config, loader=loader)
    spec = config.mask_spec
    clear = clear_mask(cube, spec, config.mask_cleanup.opening, config.mask_cleanup.dilation)
    if config.mode == "all":
        ds = _all(cube, clear, config)
    else:
        method = config.mode if config.mode != "composite" else config.resolved_composite_method
        ds = _binned(cube, clear, config, config.bins(feature), method)
    ds.attrs.update({
        "feature": feature.id, "mode": config.mode, "config": config.model_dump_json(exclude_none=True),
        "output": config.output, "asset_problems": json.dumps(problems),
        "software": f"pixels_xr {__import__('pixels_xr').__version__}",
    })
    if cube.attrs.get("empty_reason"):
        ds.attrs["empty_reason"] = cube.attrs["empty_reason"]
    ds = ds.rio.write_crs(cube.rio.crs).rio.write_transform(cube.rio.transform())
    return ds


# ----------------------------------------------------------------------------------------------- helpers
def _score(method: str, cube: xr.DataArray, spec_asset: str) -> xr.DataArray | None:
    if method == "quality":
        tyx = ("time", "y", "x")
        return xr.apply_ufunc(reducers.s2_quality_score, cube.sel(band=spec_asset).transpose(*tyx),
                              cube.sel(band="red").transpose(*tyx).astype("float32"),
                              cube.sel(band="nir").transpose(*tyx).astype("float32"),
                              dask="parallelized", output_dtypes=[np.float32])
    if method == "qa_pixel":  # clear land (bit 6) > water (bit 7) > snow (bit 5); ties → newest
        qa = cube.sel(band=spec_asset).astype("int64")
        return xr.where((qa & 64) > 0, 3.0, xr.where((qa & 128) > 0, 2.0, xr.where((qa & 32) > 0, 1.0, 0.0))
                        ).astype("float32")
    return None


def _per_block(fn: Any, cube: xr.DataArray, clear: xr.DataArray, score: xr.DataArray | None,
               dtypes: list[Any], **kwargs: Any) -> list[xr.DataArray]:
    """Run ``fn(data (t, band, y, x), clear (t, y, x)[, score (t, y, x)], **kwargs) -> tuple of (y, x)``
    on every spatial block of one time slice, in the cube's own layout (no transposed copies); one
    ``(y, x)`` DataArray per output. Time and band blocks of a spatial block go to one task."""
    import dask.array as da

    args: list[Any] = [_data(cube.transpose("time", "band", "y", "x")), "tbyx",
                       _data(clear.transpose("time", "y", "x")), "tyx"]
    if score is not None:
        args += [_data(score.transpose("time", "y", "x")), "tyx"]
    packed = da.blockwise(functools.partial(_joined, fn, **kwargs), "yx", *args, dtype=object,
                          meta=np.empty((0, 0), object))
    coords = {"y": cube.y, "x": cube.x}
    return [xr.DataArray(packed.map_blocks(operator.getitem, k, dtype=dt, meta=np.empty((0, 0), dt)),
                         dims=("y", "x"), coords=coords) for k, dt in enumerate(dtypes)]


def _joined(fn: Any, data: Any, *masks: Any, **kwargs: Any) -> Any:
    """``fn`` on whole blocks: the lists blockwise hands for the time (and band) blocks of one spatial block
    are joined, without a copy when there is one block (a bin-aligned cube) — dask's own ``concatenate``
    copies even then."""
    return fn(_join(data, (0, 1)), *(_join(m, (0,)) for m in masks), **kwargs)


def _join(blocks: Any, axes: tuple[int, ...]) -> np.ndarray:
    if not isinstance(blocks, list):
        return blocks
    parts = [_join(b, axes[1:]) for b in blocks]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axes[0])


def _data(arr: xr.DataArray) -> Any:
    import dask.array as da

    return arr.data if isinstance(arr.data, da.Array) else da.from_array(arr.values, chunks=-1)


def _pick_block(data: np.ndarray, clear: np.ndarray, score: np.ndarray | None = None, *, scale: np.ndarray,
                offset: np.ndarray, times: np.ndarray, method: str, nodata: Any, order: np.ndarray | None,
                refl_bands: np.ndarray, out_bands: np.ndarray, output: str) -> tuple[np.ndarray, ...]:
    """One spatial block of one bin: data (time, band, y, x), clear and score (time, y, x)."""
    d = np.ascontiguousarray(data)
    c = np.ascontiguousarray(clear)
    if method == "latest_pixel":
        out, index, count = reducers.latest_valid(d, c, nodata)
    elif order is not None:
        out, index, count = reducers.first_valid_by_order(d, c, order, nodata)
    else:
        out, index, count = reducers.quality_mosaic(d, c, np.ascontiguousarray(score), nodata)
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
    (``DN × scale + offset`` per item, as ``cube.to_reflectance``). A clear pixel holds data in every
    reflectance band (``masks.clear_mask``), so nodata never enters the median."""
    refl = np.empty((data.shape[0], len(bands)) + data.shape[2:], np.float32)  # C order, as the kernel wants
    for k, b in enumerate(bands):
        np.multiply(data[:, b], scale[:, b, None, None], out=refl[:, k], dtype=np.float32)
        if offset[:, b].any():  # x + 0 is x: bins before baseline 04.00 skip a pass
            refl[:, k] += offset[:, b, None, None]
    out, count = reducers.clear_median(refl, np.ascontiguousarray(clear), np.float32(np.nan))
    values = [out[k] if output == "reflectance" else _convert(out[k], ~np.isnan(out[k]), out_scale, output)
              for k in range(out.shape[0])]
    return (*values, count)


def _apply_pick(cube: xr.DataArray, clear: xr.DataArray, score: xr.DataArray | None, method: str,
                config: PixelsConfig) -> xr.Dataset:
    names = list(cube.band.values)
    bands = list(config.band_names)
    out_bands = np.array([names.index(b) for b in bands])
    refl_bands = np.array(cube.reflectance.values, dtype=bool)
    nodata = cube.attrs["nodata"]
    times = cube.time.values.astype("datetime64[ns]")
    order = None
    if score is None and method in {"cloud_sorted_pixel", "first_clear"}:  # least cloudy first, then oldest
        order = np.argsort(np.nan_to_num(cube.cloud_cover.values.astype(float), nan=101.0), kind="stable")
    elif score is None and method == "all_first":
        order = np.arange(len(times))
    out_types = [np.float32 if (refl_bands[names.index(b)] and config.output == "reflectance") else
                 (np.uint16 if refl_bands[names.index(b)] else cube.dtype) for b in bands]
    results = _per_block(_pick_block, cube, clear, score, out_types + [np.uint16, "datetime64[ns]"],
                         scale=cube.scale.values.astype(np.float32),
                         offset=cube.offset.values.astype(np.float32), times=times, method=method,
                         nodata=cube.dtype.type(nodata), order=order, refl_bands=refl_bands,
                         out_bands=out_bands, output=config.output)
    data_vars = {b: r for b, r in zip(bands, results[: len(bands)])}
    data_vars["clear_count"] = results[len(bands)]
    data_vars["source_time"] = results[len(bands) + 1]
    return xr.Dataset(data_vars)


def _apply_median(cube: xr.DataArray, clear: xr.DataArray, config: PixelsConfig) -> xr.Dataset:
    bands = list(config.band_names)
    classes = [b for b in bands if not bool(cube.reflectance.sel(band=b))]
    if classes:
        raise ConfigError(f"a median composite cannot reduce class bands {classes}; drop them or use "
                          "composite_method first_clear/quality", "bands")
    names = list(cube.band.values)
    out_scale = float(np.nanmin(cube.scale.values)) if cube.sizes["time"] else 1e-4
    out_type = np.float32 if config.output == "reflectance" else np.uint16
    results = _per_block(_median_block, cube, clear, None, [out_type] * len(bands) + [np.uint16],
                         bands=np.array([names.index(b) for b in bands]),
                         scale=cube.scale.values.astype(np.float32),
                         offset=cube.offset.values.astype(np.float32), output=config.output,
                         out_scale=out_scale)
    data_vars = {b: r for b, r in zip(bands, results[: len(bands)])}
    data_vars["clear_count"] = results[len(bands)]
    return xr.Dataset(data_vars)


def _empty_slice(template: xr.Dataset) -> xr.Dataset:
    import dask.array as da
    from dask.base import tokenize

    out = {}
    for name, var in template.data_vars.items():
        fill: Any = np.nan if var.dtype.kind == "f" else \
            (np.datetime64("NaT", "ns") if var.dtype.kind == "M" else 0)
        chunks = var.data.chunksize if hasattr(var.data, "chunksize") else var.shape
        # keys follow the template (this feature's), never only shape and value: distributed mixes up a
        # key that several concurrent computations share
        key = f"pixels-empty-{tokenize(getattr(var.data, 'name', None), name, var.shape, str(var.dtype))}"
        out[name] = (var.dims, da.full(var.shape, fill, dtype=var.dtype, chunks=chunks, name=key))
    return xr.Dataset(out, coords={k: v for k, v in template.coords.items() if k in {"x", "y"}})


def _reduce(cube: xr.DataArray, clear: xr.DataArray, config: PixelsConfig, method: str) -> xr.Dataset:
    spec = config.mask_spec
    score = _score(method, cube, spec.asset) if spec is not None else None
    if method == "median":
        return _apply_median(cube, clear, config)
    return _apply_pick(cube, clear, score, method, config)


def _binned(cube: xr.DataArray, clear: xr.DataArray, config: PixelsConfig, bins: list[TimeBin],
            method: str) -> xr.Dataset:
    days = [dt.date.fromisoformat(str(t)[:10]) for t in cube.time.values]
    labels = np.array(assign_bins(days, bins), dtype=np.int64)
    cube = cube.assign_coords(bin=("time", labels))
    clear = clear.assign_coords(bin=("time", labels))
    template: xr.Dataset | None = None  # the first non-empty bin shapes the empty ones
    slices: list[xr.Dataset | None] = []
    item_ids: list[list[str]] = []
    for k in range(len(bins)):
        sel = np.nonzero(labels == k)[0]
        item_ids.append([str(i) for i in cube.id.values[sel]] if sel.size else [])
        if sel.size == 0:
            slices.append(None)
            continue
        # one bin's observations in one chunk along time, so the kernel sees the whole bin at once
        ds = _reduce(_at(cube, sel), _at(clear, sel), config, method)
        slices.append(ds)
        template = template or ds
    if template is None:  # no observation at all: run the reduction on one all-nodata observation
        feature = str(cube.attrs.get("feature", ""))
        template = _reduce(_nodata_like(cube, feature), _nodata_like(clear, feature), config, method)
    filled = [s if s is not None else _empty_slice(template) for s in slices]
    out = xr.concat(filled, dim="time", coords="minimal", compat="override", join="override")
    out = out.assign_coords(
        time=np.array([np.datetime64(b.start, "ns") for b in bins]),
        time_end=("time", np.array([np.datetime64(b.end, "ns") for b in bins])),
        partial=("time", np.array([b.partial for b in bins])),
        empty=("time", np.array([s is None for s in slices])),
    )
    out.attrs["item_ids"] = json.dumps({b.label: ids for b, ids in zip(bins, item_ids)})
    return _finish(out, cube)


def _at(arr: xr.DataArray, index: np.ndarray) -> xr.DataArray:
    """``arr`` at these time positions; a run of consecutive positions (a bin or a day of time-sorted items)
    is a slice, which keeps whole chunks of the cube (no gather tasks)."""
    if index.size and np.array_equal(index, np.arange(index[0], index[0] + index.size)):
        return arr.isel(time=slice(int(index[0]), int(index[0]) + index.size))
    return arr.isel(time=index)


def _nodata_like(arr: xr.DataArray, feature: str) -> xr.DataArray:
    """One all-nodata, never-clear observation with the layout of ``arr`` (for empty results); its dask key
    names the feature (see ``_empty_slice``)."""
    import dask.array as da
    from dask.base import tokenize

    shape = (1,) + arr.shape[1:]
    name = f"pixels-nodata-{tokenize(feature, getattr(arr.data, 'name', None), shape, str(arr.dtype))}"
    if arr.dtype == bool:
        data = da.zeros(shape, dtype=bool, name=name)
    else:
        data = da.full(shape, arr.attrs.get("nodata", 0), dtype=arr.dtype, name=name)
    coords = {k: v for k, v in arr.coords.items() if "time" not in v.dims}
    time_coords = {k: ("time", np.zeros(1, dtype=v.dtype) if v.dtype.kind != "M" else
                       np.array(["1970-01-01"], "datetime64[ns]")) for k, v in arr.coords.items()
                   if v.dims == ("time",)}
    for k, v in arr.coords.items():
        if v.dims == ("time", "band"):
            time_coords[k] = (("time", "band"), np.ones((1, v.shape[1]), dtype=v.dtype))
    return xr.DataArray(data, dims=arr.dims, coords={**coords, **time_coords}, attrs=arr.attrs)


def _all(cube: xr.DataArray, clear: xr.DataArray, config: PixelsConfig) -> xr.Dataset:
    """One slice per acquisition day: same-day tiles fused first-valid (in time order), cloudy → nodata."""
    days = np.array([np.datetime64(str(t)[:10], "ns") for t in cube.time.values], dtype="datetime64[ns]")
    unique = np.unique(days)
    slices = [_apply_pick(_at(cube, np.nonzero(days == d)[0]), _at(clear, np.nonzero(days == d)[0]),
                          None, "all_first", config) for d in unique]
    if not slices:
        feature = str(cube.attrs.get("feature", ""))
        template = _apply_pick(_nodata_like(cube, feature), _nodata_like(clear, feature), None, "all_first",
                               config)
        out = template.isel(time=slice(0, 0)) if "time" in template.dims else template.expand_dims(
            time=np.array([], "datetime64[ns]"))
    else:
        out = xr.concat(slices, dim="time", coords="minimal", compat="override", join="override")
        out = out.assign_coords(time=unique)
    out = out.drop_vars("source_time")
    out.attrs["item_ids"] = json.dumps({str(d)[:10]: [str(i) for i in cube.id.values[days == d]]
                                        for d in unique})
    return _finish(out, cube)


def _finish(ds: xr.Dataset, cube: xr.DataArray) -> xr.Dataset:
    ds = ds.assign_coords(x=cube.x, y=cube.y)
    ds = ds.transpose("time", "y", "x")
    for name, var in ds.data_vars.items():  # float bands use NaN as nodata
        if var.dtype.kind != "f" and name not in {"clear_count", "source_time"}:
            var.attrs["nodata"] = 0 if var.dtype.kind == "u" else cube.attrs["nodata"]
    return ds
