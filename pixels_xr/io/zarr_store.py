"""Zarr outputs: one store per run, one group per feature, written as a template then per-bin regions.

Layout (scales to many features: groups are independent prefixes, nothing is consolidated at the root, so
concurrent writers never touch a shared object)::

    OUT.zarr/zarr.json                 root group
    OUT.zarr/<feature id>/…            one Dataset per feature (time, y, x): bands, clear_count, source_time
    OUT.zarr/.pixels_xr/…              run manifest (see batch), never a Zarr node

``write_template`` writes every array's metadata and the coordinates (``compute=False`` for the data);
``region_write`` gives the delayed write of one time bin (or a run of bins; optionally after the template,
in the same graph), one fused task per block, so bins and features can be written independently and in
parallel. Dask chunks are aligned to Zarr chunks (one time step × ``chunksize``
pixels) before writing; a misaligned chunking raises instead of silently corrupting neighbouring regions.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.delayed import Delayed

from pixels_xr.errors import OutputError
from pixels_xr.graph import block_graph

ZARR_FORMATS = (2, 3)


def aligned(ds: xr.Dataset, chunksize: int) -> xr.Dataset:
    """``ds`` rechunked to one time step × ``chunksize`` pixels, with matching Zarr chunk encodings."""
    cy, cx = min(chunksize, ds.sizes["y"]) or 1, min(chunksize, ds.sizes["x"]) or 1
    in_memory = {k: c.variable for k, c in ds.coords.items() if c.chunks is None and k not in ds.indexes}
    ds = _json_attrs(ds.chunk({"time": 1, "y": cy, "x": cx}).assign_coords(in_memory))
    # coordinates stay numpy so the template writes them (region writes carry data variables only); those
    # that were lazy are computed here, in this thread: through a cluster's client each costs a round trip
    ds = ds.assign_coords({k: c.compute(scheduler="synchronous") for k, c in ds.coords.items()
                           if c.chunks is not None})
    for var in ds.data_vars.values():
        var.encoding = {"chunks": (1, cy, cx)}
        if var.dtype.kind == "f":
            var.encoding["_FillValue"] = np.float32(np.nan) if var.dtype == np.float32 else np.nan
        elif var.dtype.kind in "ui":  # integers keep their dtype on read: nodata stays an attribute
            var.encoding["_FillValue"] = None
        elif var.dtype.kind == "M":
            var.encoding.update(units="microseconds since 1970-01-01", dtype="int64")
    check_alignment(ds)
    return ds


def _json_attrs(ds: xr.Dataset) -> xr.Dataset:
    """A copy whose attributes (dataset, variables, coordinates) are all JSON-serialisable."""
    def keep(value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return all(keep(v) for v in value)
        return isinstance(value, (str, int, float, bool, np.integer, np.floating, np.bool_))

    ds = ds.copy()
    ds.attrs = {k: v for k, v in ds.attrs.items() if keep(v)}
    for name in list(ds.variables):
        ds[name].attrs = {k: v for k, v in ds[name].attrs.items() if keep(v)}
    return ds


def check_alignment(ds: xr.Dataset) -> None:
    """Raise when a variable's dask chunks do not line up with its Zarr chunks (all but the last equal)."""
    for name, var in ds.data_vars.items():
        target = var.encoding.get("chunks")
        if var.chunks is None or target is None:
            continue
        for dim, sizes, size in zip(var.dims, var.chunks, target):
            if any(s != size for s in sizes[:-1]) or sizes[-1] > size:
                raise OutputError(f"dask chunks {sizes} along {dim!r} do not match the Zarr chunk {size}", name)


def write_template(ds: xr.Dataset, store: str, group: str, *, zarr_format: int = 3) -> None:
    """Create ``group`` in ``store`` with all metadata and coordinates; data arrays stay unwritten (fill)."""
    _check_format(zarr_format)
    ds.to_zarr(store, group=group, mode="w", compute=False, zarr_format=zarr_format, consolidated=False)


def _check_format(zarr_format: int) -> None:
    if zarr_format not in ZARR_FORMATS:
        raise OutputError(f"zarr_format must be 2 or 3, got {zarr_format}", "zarr_format")


def region_write(ds: xr.Dataset, store: str, group: str, index: int | slice, *, at: int | None = None,
                 template_format: int | None = None) -> Delayed:
    """The delayed write of time step(s) ``index`` of ``ds`` into its template (``write_template``), at
    the same steps of the store's time axis or from step ``at`` (a store whose axis holds more bins than
    ``ds``: bins outside today's range, kept); ``template_format`` (2 or 3) writes the template first, as a
    task of the same graph (on a worker: the client plans the next features meanwhile).

    One task per block writes that block of every variable and runs, inside itself, the work only that
    block needs (``fused.block_graph``): one task instead of about 25 per block, which on a cluster was most
    of the scheduler's and the client's time (xarray's own region write makes a store task per variable
    and block, and its checks cost ~40 ms of client time per call). Values are CF-encoded as xarray encodes
    them (``encode_cf_variable`` with each variable's encoding), so readers see no difference.
    """
    from pixels_xr.graph import List, Task, TaskRef

    region = index if isinstance(index, slice) else slice(index, index + 1)
    names = [name for name, var in ds.data_vars.items() if "time" in var.dims]
    part = ds[names].isel(time=region)
    first = part[names[0]]
    if any(part[n].dims != first.dims or part[n].chunks != first.chunks for n in names):
        raise OutputError("variables of a region write must share dims and chunks", group)
    target = _BlockTarget(store, group, first.dims, first.chunks,
                          tuple(((region.start or 0) if at is None else at) if d == "time" else 0
                                for d in first.dims),
                          tuple((n, dict(part[n].encoding)) for n in names))
    args: tuple = (target,)
    template = {}
    if template_format is not None:
        _check_format(template_format)  # refused here, before any task runs
        key = f"pixels-zarr-template-{tokenize(store, group, target)}"
        template[key] = Task(key, write_template, _skeleton(ds), store, group, zarr_format=template_format)
        args += (TaskRef(key),)  # every block write waits for the template
    blocks = list(np.ndindex(*[len(c) for c in first.chunks]))
    graph, keys = block_graph([part[n].data for n in names], blocks, _write_block, args,
                              name="pixels-zarr-write")
    graph.update(template)
    done = f"pixels-zarr-done-{tokenize(keys)}"
    graph[done] = Task(done, len, List(*(TaskRef(k) for k in keys)))
    return Delayed(done, graph)


@dataclass(frozen=True)
class _BlockTarget:
    """Where the blocks of a region write go: the group, the grid of the region and each variable's
    encoding (``(name, encoding)`` in the order of the blocks handed to ``_write_block``)."""

    store: str
    group: str
    dims: tuple[str, ...]
    chunks: tuple[tuple[int, ...], ...]
    offset: tuple[int, ...]
    variables: tuple[tuple[str, dict], ...]


def _skeleton(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with every dask variable on an empty graph: what a template write needs, small to ship."""
    import dask.array as da

    # one assign (a setitem per variable aligns the Dataset each time); random names: hashing the
    # arguments of da.empty cost more than the rest of this function
    return ds.assign({name: var.copy(data=da.empty(var.shape, chunks=var.chunks, dtype=var.dtype,
                                                   name=f"pixels-skeleton-{uuid.uuid4().hex}"))
                      for name, var in ds.data_vars.items() if var.chunks is not None})


def _write_block(block: tuple[int, ...], values: list[np.ndarray], target: _BlockTarget,
                 *after: Any) -> None:
    """Write one block of every variable into its Zarr array (runs on a worker; ``after``: the template
    task's result when it is written in the same graph)."""
    import zarr

    where = tuple(slice(o + sum(c[:i]), o + sum(c[: i + 1]))
                  for o, c, i in zip(target.offset, target.chunks, block))
    group = zarr.open_group(target.store, path=target.group, mode="r+")
    for (name, encoding), data in zip(target.variables, values):
        encoded = xr.conventions.encode_cf_variable(xr.Variable(target.dims, data, encoding=dict(encoding)),
                                                    name=name)
        group[name][where] = np.asarray(encoded.data)


def write_time_axis(store: str, group: str, axis: xr.Dataset, attrs: dict[str, Any] | None = None) -> None:
    """Give a feature's group the time axis of ``axis`` (its coordinates along ``time``, every step) and,
    with ``attrs``, these group attributes: arrays along time grow to its length (never shrink: bins outside
    the range stay) and the time coordinates are rewritten (``empty`` of a bin that now has items…),
    encoded as the template encoded them. New steps read as fill until their region writes land.

    Arrays are resized one by one (Zarr has no multi-array transaction): a reader opening the group in the
    milliseconds between the first and the last resize finds arrays of two lengths and cannot open it (it
    never reads wrong values: a reopen after the resize sees the new axis, new steps as fill until
    written); the run's lock keeps other writers out."""
    import zarr

    n = axis.sizes["time"]
    root = zarr.open_group(store, path=group, mode="r+")
    arrays = dict(root.arrays())
    for name, arr in arrays.items():
        if name not in axis.coords and _dims(arr)[:1] == ("time",) and arr.shape[0] < n:
            arr.resize((n, *arr.shape[1:]))
    for name, coord in axis.coords.items():
        arr = arrays.get(str(name))
        if arr is None or coord.dims != ("time",):
            continue
        encoding = {k: arr.attrs[k] for k in ("units", "calendar") if k in arr.attrs}
        encoded = xr.conventions.encode_cf_variable(
            xr.Variable(("time",), coord.values, encoding={**encoding, "dtype": arr.dtype}), name=str(name))
        values = np.asarray(encoded.data).astype(arr.dtype)
        if arr.shape[0] == n and np.array_equal(arr[:], values):
            continue  # unchanged: not rewritten (chunks keep their bytes and times)
        if arr.shape[0] < n:
            arr.resize((n,))
        arr[:] = values
    if attrs is not None:
        root.attrs.put(_json_attrs(xr.Dataset(attrs=attrs)).attrs)


def _dims(arr: Any) -> tuple[str, ...]:
    names = getattr(getattr(arr, "metadata", None), "dimension_names", None)
    return tuple(names or arr.attrs.get("_ARRAY_DIMENSIONS") or ())


def open_feature(store: str, feature_id: str, **kwargs: Any) -> xr.Dataset:
    """The Dataset of one feature from a run's store, georeferenced (``.rio.crs`` / ``.rio.transform()``)."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)

    try:
        return xr.open_zarr(store, group=feature_id, consolidated=False,
                            **{"decode_coords": "all", **kwargs})
    except (FileNotFoundError, KeyError) as exc:
        raise OutputError(f"no feature {feature_id!r} in the store ({exc.__class__.__name__})", store) from None
