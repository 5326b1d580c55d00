"""Cloud-optimised GeoTIFFs streamed from (dask-backed) DataArrays.

The array is computed one row of dask chunks at a time into a tiled, compressed temporary GeoTIFF (never
the whole array in memory), then ``rio_cogeo.cog_translate`` lays it out as a COG with internal overviews,
and the finished file is published atomically (``storage.staged_file``): a reader sees the complete COG or
nothing. Band descriptions, nodata, a ``datetime`` tag (and TIFFTAG_DATETIME) and an optional colour table
are written.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_translate
from rio_cogeo.profiles import cog_profiles

from pixels_xr.errors import OutputError
from pixels_xr.io import storage

#: Compression of the published COGs (lossless; predictor 2 for integers, 3 for floats).
COG_PROFILE = "deflate"
BLOCKSIZE = 512


def write_cog(data: xr.DataArray, path: str, *, nodata: Any = None, band_names: Sequence[str] | None = None,
              tags: Mapping[str, Any] | None = None,
              colormap: Mapping[int, tuple[int, int, int, int]] | None = None,
              overview_resampling: str = "nearest", scheduler: Any = None) -> None:
    """Write ``data`` (dims ``band, y, x`` or ``y, x``; rio CRS/transform set) to ``path`` as a COG.

    ``path`` is a local path or an fsspec URL (``s3://…``). ``tags`` may hold a ``datetime`` (date,
    datetime or ISO string), which also becomes TIFFTAG_DATETIME. ``scheduler`` computes dask blocks: a distributed
    ``Client`` (through futures, safe when several writers share tasks), any dask scheduler, or None (dask's
    current one).
    """
    if data.ndim == 2:
        data = data.expand_dims(band=[band_names[0] if band_names else "1"])
    if data.dims != ("band", "y", "x"):
        data = data.transpose("band", "y", "x")
    if data.rio.crs is None:
        raise OutputError("array has no CRS; set it with .rio.write_crs()", path)
    nbands, height, width = data.shape
    names = list(band_names) if band_names is not None else [str(b) for b in data["band"].values] \
        if "band" in data.coords else [str(i + 1) for i in range(nbands)]
    if len(names) != nbands:
        raise OutputError(f"{len(names)} band names for {nbands} bands", path)
    dtype = np.dtype(data.dtype)
    if nodata is None and dtype.kind == "f":
        nodata = np.nan
    profile = {
        "driver": "GTiff", "dtype": dtype.name, "count": nbands, "height": height, "width": width,
        "crs": data.rio.crs, "transform": data.rio.transform(), "nodata": nodata, "tiled": True,
        "blockxsize": BLOCKSIZE, "blockysize": BLOCKSIZE, "compress": "deflate", "BIGTIFF": "IF_SAFER",
    }
    with tempfile.TemporaryDirectory(prefix="pixels-xr-cog-") as tmpdir:
        raw = os.path.join(tmpdir, "raw.tif")
        with rasterio.open(raw, "w", **profile) as dst:
            for k, name in enumerate(names, start=1):
                dst.set_band_description(k, name)
            dst.update_tags(**_tags(tags))
            if colormap is not None:
                dst.write_colormap(1, dict(colormap))
            for y0, block in _row_blocks(data, scheduler):
                dst.write(block, window=Window(0, y0, width, block.shape[1]))
        out_profile = cog_profiles.get(COG_PROFILE).copy()
        out_profile.update(blockxsize=BLOCKSIZE, blockysize=BLOCKSIZE,
                           predictor=3 if dtype.kind == "f" else 2)
        with storage.staged_file(path, suffix=".tif") as staged:
            cog_translate(raw, staged, out_profile, nodata=nodata, overview_resampling=overview_resampling,
                          quiet=True, in_memory=False, forward_band_tags=True, colormap=colormap,
                          additional_cog_metadata=_tags(tags))


def _row_blocks(data: xr.DataArray, scheduler: Any = None):
    """(y offset, numpy block of all bands and columns) per row of dask chunks (one block when eager)."""
    if data.chunks is None:
        yield 0, np.asarray(data.values)
        return
    y0 = 0
    for rows in data.chunks[1]:
        block = data.isel(y=slice(y0, y0 + rows))
        if hasattr(scheduler, "compute") and hasattr(scheduler, "submit"):  # a distributed Client
            block = scheduler.compute(block).result()
        else:
            block = block.compute(scheduler=scheduler)
        yield y0, np.asarray(block.values)
        y0 += rows


def _tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (tags or {}).items():
        if key == "datetime" and value is not None:
            when = value if isinstance(value, (dt.date, dt.datetime)) else dt.datetime.fromisoformat(
                str(value).replace("Z", "+00:00"))
            if not isinstance(when, dt.datetime):
                when = dt.datetime(when.year, when.month, when.day)
            out["datetime"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
            out["TIFFTAG_DATETIME"] = when.strftime("%Y:%m:%d %H:%M:%S")
        elif value is not None:
            out[str(key)] = str(value)
    return out
