"""Zarr outputs: one store per run, one group per feature, written as a template then per-bin regions.

Layout (scales to many features: groups are independent prefixes, nothing is consolidated at the root, so
concurrent writers never touch a shared object)::

    OUT.zarr/zarr.json                 root group
    OUT.zarr/<feature id>/…            one Dataset per feature (time, y, x): bands, clear_count, source_time
    OUT.zarr/.pixels_xr/…              run manifest (see batch), never a Zarr node

``write_template`` writes every array's metadata and the coordinates (``compute=False`` for the data);
``region_write`` gives the delayed write of one time bin (or a run of bins), so bins and features can be
written independently and in parallel. Dask chunks are aligned to Zarr chunks (one time step × ``chunksize``
pixels) before writing; a misaligned chunking raises instead of silently corrupting neighbouring regions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from dask.delayed import Delayed

from pixels_xr.errors import OutputError

ZARR_FORMATS = (2, 3)


def aligned(ds: xr.Dataset, chunksize: int) -> xr.Dataset:
    """``ds`` rechunked to one time step × ``chunksize`` pixels, with matching Zarr chunk encodings."""
    cy, cx = min(chunksize, ds.sizes["y"]) or 1, min(chunksize, ds.sizes["x"]) or 1
    ds = _json_attrs(ds.chunk({"time": 1, "y": cy, "x": cx}))
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
    if zarr_format not in ZARR_FORMATS:
        raise OutputError(f"zarr_format must be 2 or 3, got {zarr_format}", "zarr_format")
    ds.to_zarr(store, group=group, mode="w", compute=False, zarr_format=zarr_format, consolidated=False)


def region_write(ds: xr.Dataset, store: str, group: str, index: int | slice) -> Delayed:
    """The delayed write of time step(s) ``index`` of ``ds`` into its template (``write_template``).

    A slice of several bins is one write: xarray's region checks and encoding then run once for all of
    them (they dominate the client's time per call).
    """
    region = index if isinstance(index, slice) else slice(index, index + 1)
    per_time = [name for name, var in ds.data_vars.items() if "time" in var.dims]
    part = ds[per_time].isel(time=region)
    part = part.drop_vars([c for c in part.coords if "time" not in part[c].dims])
    return part.to_zarr(store, group=group, mode="r+", region={"time": region}, compute=False,
                        consolidated=False)


def open_feature(store: str, feature_id: str, **kwargs: Any) -> xr.Dataset:
    """The Dataset of one feature from a run's store, georeferenced (``.rio.crs`` / ``.rio.transform()``)."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)

    try:
        return xr.open_zarr(store, group=feature_id, consolidated=False,
                            **{"decode_coords": "all", **kwargs})
    except (FileNotFoundError, KeyError) as exc:
        raise OutputError(f"no feature {feature_id!r} in the store ({exc.__class__.__name__})", store) from None
