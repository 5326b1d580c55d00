"""Warp PXM sources into Web Mercator blocks and mosaic them: GDAL's warper, the source mask as validity.

Each source is read (window of the block, plus a margin for the resampling kernel), coloured (after its
mask was decided), and warped as RGBA whose alpha is the validity mask, so GDAL weights only valid pixels
and no black or white collar bleeds in. A destination pixel is valid when the source pixel under its centre
is valid (a nearest-neighbour warp of the mask): masks are crisp and identical whichever way the mosaic is
cut into files. Sources are composed in manifest order, **first wins**: a pixel, with all its bands, comes
from the first source valid there, and the loop stops as soon as the block is full (a source whose
footprint only covers filled pixels is not even read). Default resampling: bilinear.

Source handles are cached per worker thread (rasterio datasets are not thread-safe), keyed by the source
and its options, at most ``HANDLE_CACHE`` at a time. Sources are opened under ``source_env()``: GDAL reads
the AWS settings from the environment itself (no boto3 session per call), and sidecar files are probed one
by one (``GDAL_DISABLE_READDIR_ON_OPEN=TRUE``): the cloud default ``EMPTY_DIR`` hides external ``.msk`` masks.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.session import DummySession
from rasterio.transform import from_bounds
from rasterio.io import MemoryFile
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, transform_bounds
from rasterio.windows import Window, from_bounds as window_from_bounds

from pixels_xr.errors import SourceError
from pixels_xr.pxm.color import Op, apply as apply_color
from pixels_xr.pxm.sources import MaskKind, SourceHandle, open_source
from pixels_xr.pxm.tiles import Bounds, tile_bounds

__all__ = ["HANDLE_CACHE", "SourceSpec", "describe_source", "render_block", "source_env"]

WEB_MERCATOR = CRS.from_epsg(3857)
HANDLE_CACHE = 16
_MARGIN = 4  # source pixels read beyond the block on every side (covers cubic/lanczos kernels)
_LOCAL = threading.local()


@dataclass(frozen=True)
class SourceSpec:
    """What a worker needs to read one source: options, colour, EPSG:3857 footprint and pixel size."""

    uri: str
    bidx: tuple[int, ...] | None
    crs: str | None
    ndv: tuple[int, int, int] | None
    ops: tuple[Op, ...]
    mask: MaskKind
    bounds: Bounds
    res: float

    def key(self) -> tuple[Any, ...]:
        return (self.uri, self.bidx, self.crs, self.ndv)


def source_env() -> contextlib.AbstractContextManager[Any]:
    """The GDAL settings sources are read under (on the client and on every worker)."""
    return rasterio.Env(session=DummySession(), GDAL_DISABLE_READDIR_ON_OPEN="TRUE")


def describe_source(uri: str, info: Any, ops: tuple[Op, ...]) -> SourceSpec:
    """Open a source on the client and describe it (raises SourceError naming the URI when unusable)."""
    with source_env(), open_source(uri, info) as src:
        if not src.georeferenced:
            raise SourceError("not georeferenced (no geotransform)", where=uri)
        if src.crs is None:
            raise SourceError("has no CRS; give info.crs (EPSG:NNNN)", where=uri)
        ds = src.dataset
        if any(ds.dtypes[b - 1] != "uint8" for b in src.bidx):
            raise SourceError(f"bands {list(src.bidx)} must be 8-bit (uint8)", where=uri)
        try:
            west, south, east, north = transform_bounds(src.crs, WEB_MERCATOR, *ds.bounds, densify_pts=21)
            transform, _, _ = calculate_default_transform(src.crs, WEB_MERCATOR, ds.width, ds.height,
                                                          *ds.bounds)
        except Exception as err:  # rasterio CRSError / GDAL projection errors
            raise SourceError(f"cannot project to EPSG:3857: {err}", where=uri) from err
        if not all(math.isfinite(v) for v in (west, south, east, north, transform.a)):
            raise SourceError("footprint does not project to EPSG:3857 (beyond ±85°?)", where=uri)
        crs = _info_crs(info)
        return SourceSpec(uri=uri, bidx=src.bidx + ((src.alpha_band,) if src.alpha_band else ()),
                          crs=crs, ndv=src.ndv if src.mask_kind == "ndv" else None, ops=tuple(ops),
                          mask=src.mask_kind,
                          bounds=(west, south, east, north), res=abs(transform.a))


def _info_crs(info: Any) -> str | None:
    return info.get("crs") if isinstance(info, dict) else getattr(info, "crs", None)


def _handle(spec: SourceSpec) -> SourceHandle:
    cache: OrderedDict[tuple[Any, ...], SourceHandle] | None = getattr(_LOCAL, "handles", None)
    if cache is None:
        cache = _LOCAL.handles = OrderedDict()
    key = spec.key()
    handle = cache.get(key)
    if handle is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            handle = open_source(spec.uri, bidx=spec.bidx, crs=spec.crs, ndv=spec.ndv)
        if handle.mask_kind != spec.mask:
            handle.close()
            raise SourceError(f"mask {handle.mask_kind!r} on a worker but {spec.mask!r} on the client (GDAL"
                              " settings differ)", where=spec.uri)
        cache[key] = handle
        while len(cache) > HANDLE_CACHE:
            cache.popitem(last=False)[1].close()
    cache.move_to_end(key)
    return handle


def _overlap(a: Bounds, b: Bounds) -> Bounds | None:
    west, south = max(a[0], b[0]), max(a[1], b[1])
    east, north = min(a[2], b[2]), min(a[3], b[3])
    return (west, south, east, north) if west < east and south < north else None


def _read(spec: SourceSpec, src: SourceHandle, bounds: Bounds, dst_res: float) -> tuple[np.ndarray, Any] | None:
    """(coloured RGBA (4, h, w) with alpha = validity, transform) around ``bounds``; None outside."""
    ds = src.dataset
    try:
        sb = transform_bounds(WEB_MERCATOR, src.crs, *bounds, densify_pts=21)
    except Exception as err:  # GDAL projection errors
        raise SourceError(f"cannot project a tile to the source CRS: {err}", where=spec.uri) from err
    win = window_from_bounds(*sb, transform=ds.transform)
    col0 = max(0, math.floor(win.col_off) - _MARGIN)
    row0 = max(0, math.floor(win.row_off) - _MARGIN)
    col1 = min(ds.width, math.ceil(win.col_off + win.width) + _MARGIN)
    row1 = min(ds.height, math.ceil(win.row_off + win.height) + _MARGIN)
    if col1 <= col0 or row1 <= row0:
        return None
    window = Window(col0, row0, col1 - col0, row1 - row0)
    step = max(1, math.floor(dst_res / spec.res))  # decimate on read: the block is coarser than the source
    shape = None if step == 1 else (math.ceil(window.height / step), math.ceil(window.width / step))
    rgb, valid = src.read(window=window, out_shape=shape)
    if spec.ops:
        rgb = apply_color(rgb, spec.ops)
    transform = ds.window_transform(window)
    if shape is not None:
        transform = transform @ transform.scale(window.width / shape[1], window.height / shape[0])
    return np.concatenate([rgb, valid[None].astype(np.uint8) * 255]), transform


def _warp(rgba: np.ndarray, transform: Any, crs: CRS, dst_transform: Any, shape: tuple[int, int],
          resampling: Resampling) -> tuple[np.ndarray, np.ndarray]:
    """GDAL-warp (4, h, w) RGBA (alpha = validity) onto an EPSG:3857 grid: (warped RGBA, valid mask).

    Through an in-memory GeoTIFF and WarpedVRTs rather than ``reproject`` on arrays, which builds a boto3
    session per call whenever AWS keys are in the environment (~0.2 s each).
    """
    profile = dict(driver="GTiff", width=rgba.shape[2], height=rgba.shape[1], count=4, dtype="uint8", crs=crs,
                   transform=transform, interleave="pixel")
    grid = dict(crs=WEB_MERCATOR, transform=dst_transform, width=shape[1], height=shape[0])
    with MemoryFile() as memfile:
        with memfile.open(**profile) as dst:
            dst.write(rgba)
        with memfile.open() as mem:
            with WarpedVRT(mem, src_alpha=4, dst_alpha=4, resampling=resampling, **grid) as vrt:
                warped = vrt.read()
            if resampling == Resampling.nearest:
                return warped, warped[3] > 0
            with WarpedVRT(mem, src_nodata=0, resampling=Resampling.nearest, **grid) as vrt:
                centre = vrt.read(4)  # the source pixel under each destination pixel's centre
    return warped, (centre > 0) & (warped[3] > 0)


def render_block(
    specs: tuple[SourceSpec, ...], z: int, x0: int, y0: int, n: int, tile_size: int, resampling: Resampling
) -> np.ndarray | None:
    """Mosaic of the ``n`` × ``n`` tiles from (z, x0, y0) as (n·T, n·T, 4) uint8 RGBA, None when empty.

    Alpha is 255 where some source is valid and 0 elsewhere.
    """
    size = n * tile_size
    bounds = tile_bounds(z, x0, y0, n)
    res = (bounds[2] - bounds[0]) / size
    out = np.zeros((size, size, 4), dtype=np.uint8)
    filled = np.zeros((size, size), dtype=bool)
    with source_env():
        for spec in specs:
            try:
                if _mosaic_one(spec, bounds, res, size, resampling, out, filled):
                    break
            except (RasterioError, MemoryError) as err:
                raise SourceError(f"cannot warp: {' '.join(str(err).split())}", where=spec.uri) from err
    return out if filled.any() else None


def _mosaic_one(spec: SourceSpec, bounds: Bounds, res: float, size: int, resampling: Resampling,
                out: np.ndarray, filled: np.ndarray) -> bool:
    """Warp one source into the holes of ``out``/``filled``; True once the block is full."""
    part = _overlap(spec.bounds, bounds)
    if part is None:
        return False
    c0 = max(0, math.floor((part[0] - bounds[0]) / res) - 1)
    c1 = min(size, math.ceil((part[2] - bounds[0]) / res) + 1)
    r0 = max(0, math.floor((bounds[3] - part[3]) / res) - 1)
    r1 = min(size, math.ceil((bounds[3] - part[1]) / res) + 1)
    hole = ~filled[r0:r1, c0:c1]
    if not hole.any():
        return False
    sub = (bounds[0] + c0 * res, bounds[3] - r1 * res, bounds[0] + c1 * res, bounds[3] - r0 * res)
    src = _handle(spec)
    got = _read(spec, src, sub, res)
    if got is None:
        return False
    rgba, transform = got
    warped, valid = _warp(rgba, transform, src.crs, from_bounds(*sub, c1 - c0, r1 - r0), (r1 - r0, c1 - c0),
                          resampling)
    take = valid & hole
    if take.any():
        view = out[r0:r1, c0:c1]
        view[take, :3] = np.moveaxis(warped[:3], 0, -1)[take]
        view[take, 3] = 255
        filled[r0:r1, c0:c1] |= take
    return bool(filled.all())
