"""Cloud-optimised GeoTIFFs streamed from (dask-backed) DataArrays.

The arrays are computed one row of dask chunks at a time into tiled, compressed temporary GeoTIFFs (never a
whole array in memory; several COGs of one grid share each row's compute), then ``rio_cogeo.cog_translate``
lays each out as a COG with internal overviews, and the finished file is published atomically
(``storage.staged_file``): a reader sees the complete COG or nothing. Band descriptions, nodata, a
``datetime`` tag (and TIFFTAG_DATETIME) and an optional colour table are written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from distributed import Client
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_translate
from rio_cogeo.profiles import cog_profiles

from pixels_xr.errors import OutputError
from pixels_xr.io import storage

#: Compression of the published COGs (lossless; predictor 2 for integers, 3 for floats).
COG_PROFILE = "deflate"
BLOCKSIZE = 512


@dataclass(frozen=True)
class CogLayer:
    """One COG to write: ``data`` (dims ``band, y, x`` or ``y, x``; rio CRS/transform set) and its metadata.

    ``tags`` may hold a ``datetime`` (date, datetime or ISO string), which also becomes TIFFTAG_DATETIME.
    """

    data: xr.DataArray
    path: str
    nodata: Any = None
    band_names: Sequence[str] | None = None
    tags: Mapping[str, Any] | None = None
    colormap: Mapping[int, tuple[int, int, int, int]] | None = None
    overview_resampling: str = "nearest"


def write_cog(data: xr.DataArray, path: str, *, nodata: Any = None, band_names: Sequence[str] | None = None,
              tags: Mapping[str, Any] | None = None,
              colormap: Mapping[int, tuple[int, int, int, int]] | None = None,
              overview_resampling: str = "nearest", scheduler: Any = None) -> None:
    """Write ``data`` to ``path`` (a local path or an fsspec URL such as ``s3://…``) as a COG.

    See :class:`CogLayer` for the arguments and :func:`write_cogs` for ``scheduler``.
    """
    write_cogs([CogLayer(data, path, nodata, band_names, tags, colormap, overview_resampling)],
               scheduler=scheduler)


def write_cogs(layers: Sequence[CogLayer], *, scheduler: Any = None) -> None:
    """Write several COGs over one grid, computing one row of dask chunks of *all* of them at a time.

    One compute per row means tasks the layers share (e.g. a reducer whose outputs are bands, counts and
    dates) run once, and a caller never has two computations with common keys in flight (distributed
    2026.8 can lose track of such keys and hang). ``scheduler``: a distributed ``Client``, any dask
    scheduler, or None (dask's current one). Each COG is published atomically once all are computed.
    """
    prepared = [_prepare(layer) for layer in layers]
    if not prepared:
        return
    height = prepared[0][0].shape[1]
    if any(data.shape[1:] != prepared[0][0].shape[1:] for data, _ in prepared):
        raise OutputError("layers written together must share one grid", layers[0].path)
    with tempfile.TemporaryDirectory(prefix="pixels-xr-cog-") as tmpdir:
        with contextlib.ExitStack() as stack:
            raws = []
            for k, (data, profile) in enumerate(prepared):
                raw = os.path.join(tmpdir, f"raw{k}.tif")
                dst = stack.enter_context(rasterio.open(raw, "w", **profile))
                layer = layers[k]
                for b, name in enumerate(_band_names(layer, data), start=1):
                    dst.set_band_description(b, name)
                dst.update_tags(**_tags(layer.tags))
                if layer.colormap is not None:
                    dst.write_colormap(1, dict(layer.colormap))
                raws.append((raw, dst))
            for y0, blocks in _row_blocks([data for data, _ in prepared], height, scheduler):
                for (_, dst), block in zip(raws, blocks):
                    dst.write(block, window=Window(0, y0, block.shape[2], block.shape[1]))
        for (raw, _), (data, profile), layer in zip(raws, prepared, layers):
            out_profile = cog_profiles.get(COG_PROFILE).copy()
            out_profile.update(blockxsize=BLOCKSIZE, blockysize=BLOCKSIZE,
                               predictor=3 if np.dtype(profile["dtype"]).kind == "f" else 2)
            with storage.staged_file(layer.path, suffix=".tif") as staged:
                cog_translate(raw, staged, out_profile, nodata=profile["nodata"],
                              overview_resampling=layer.overview_resampling, quiet=True, in_memory=False,
                              forward_band_tags=True, colormap=layer.colormap,
                              additional_cog_metadata=_tags(layer.tags))
            os.remove(raw)


def _prepare(layer: CogLayer) -> tuple[xr.DataArray, dict[str, Any]]:
    """The layer's data as ``(band, y, x)`` and the GeoTIFF profile of its temporary file."""
    data = layer.data
    if data.ndim == 2:
        data = data.expand_dims(band=[layer.band_names[0] if layer.band_names else "1"])
    if data.dims != ("band", "y", "x"):
        data = data.transpose("band", "y", "x")
    if data.rio.crs is None:
        raise OutputError("array has no CRS; set it with .rio.write_crs()", layer.path)
    nbands, height, width = data.shape
    if len(_band_names(layer, data)) != nbands:
        raise OutputError(f"{len(_band_names(layer, data))} band names for {nbands} bands", layer.path)
    dtype = np.dtype(data.dtype)
    nodata = np.nan if layer.nodata is None and dtype.kind == "f" else layer.nodata
    return data, {
        "driver": "GTiff", "dtype": dtype.name, "count": nbands, "height": height, "width": width,
        "crs": data.rio.crs, "transform": data.rio.transform(), "nodata": nodata, "tiled": True,
        "blockxsize": BLOCKSIZE, "blockysize": BLOCKSIZE, "compress": "deflate", "BIGTIFF": "IF_SAFER",
    }


def _band_names(layer: CogLayer, data: xr.DataArray) -> list[str]:
    if layer.band_names is not None:
        return list(layer.band_names)
    if "band" in data.coords:
        return [str(b) for b in data["band"].values]
    return [str(i + 1) for i in range(data.shape[0])]


def _row_blocks(arrays: Sequence[xr.DataArray], height: int, scheduler: Any = None):
    """(y offset, numpy blocks of every array) per row of the first chunked array's dask chunks."""
    chunked = next((a for a in arrays if a.chunks is not None), None)
    rows_per_block = chunked.chunks[1] if chunked is not None else (height,)
    y0 = 0
    for rows in rows_per_block:
        blocks = [a.isel(y=slice(y0, y0 + rows)) for a in arrays]
        if isinstance(scheduler, Client):  # through futures: the run's client, never the global default
            blocks = scheduler.gather(scheduler.compute(blocks))
        else:
            blocks = dask.compute(*blocks, scheduler=scheduler)
        yield y0, [np.asarray(b.values) for b in blocks]
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
