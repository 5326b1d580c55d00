"""Warp PXM sources into Web Mercator blocks and mosaic them: GDAL's warper, the source mask as validity.

Each source is read (window of the block, plus a margin for the resampling kernel), coloured (after its
mask was decided), and warped as RGBA whose alpha is the validity mask, so GDAL weights only valid pixels
and no black or white collar bleeds in. A destination pixel is valid when the source pixel under its centre
is valid (centres projected exactly, see ``_centre_grid``): masks are crisp and identical whichever way a
mosaic is cut into files; where GDAL finds too little valid weight for such a pixel, it takes the colour of
the pixel under its centre. Sources are composed in manifest order, **first wins**: a pixel, with all its
bands, comes from the first source valid there, and the loop stops as soon as the block is full (a source
whose footprint only covers filled pixels is not even read). Default resampling: bilinear.

Source handles are cached per worker thread (rasterio datasets are not thread-safe), keyed by the source
and its options, at most ``HANDLE_CACHE`` at a time. Sources are opened under ``source_env()``: GDAL reads
the AWS settings from the environment itself (no boto3 session per call), and sidecar files are probed one
by one (``GDAL_DISABLE_READDIR_ON_OPEN=TRUE``) and may be fetched (``CPL_VSIL_CURL_ALLOWED_EXTENSIONS``): the
cluster's cloud defaults (``EMPTY_DIR``, only .tif/.jp2 allowed) hide external ``.msk`` masks and ``.ovr``.

A source that fails to read while a block is rendered does not stop the block: its failure is returned
with the block (``render_block(..., failures=[])``) and the other sources are still mosaicked, so one run
reports every unreadable source; the renderer never stores such a block (see ``renderer``).
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import rasterio
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from rasterio.session import DummySession
from rasterio.transform import from_bounds
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, transform_bounds
from rasterio.windows import Window
from rasterio.windows import from_bounds as window_from_bounds

from pixels_xr.errors import SourceError
from pixels_xr.pxm.color import FormulaError, Op
from pixels_xr.pxm.color import apply as apply_color
from pixels_xr.pxm.sources import GDAL_ERRORS, MAX_PIXELS, MaskKind, SourceHandle, gdal_message, open_source
from pixels_xr.pxm.tiles import Bounds, tile_bounds

__all__ = ["HANDLE_CACHE", "SourceSpec", "describe_source", "render_block", "source_env"]

WEB_MERCATOR = CRS.from_epsg(3857)
HANDLE_CACHE = 16
_NODE = 16  # destination pixels between exactly projected centres (validity)
_MARGIN = 4  # source pixels read beyond the block on every side (covers cubic/lanczos kernels)
_LOCAL = threading.local()
#: Files GDAL may fetch over /vsis3/: sources and their sidecars (masks, overviews, aux metadata).
_SIDECARS = ",".join(e for ext in (".tif", ".tiff", ".jp2", ".msk", ".ovr", ".aux.xml", ".tfw", ".wld")
                     for e in (ext, ext.upper()))


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
    return rasterio.Env(session=DummySession(), GDAL_DISABLE_READDIR_ON_OPEN="TRUE",
                        CPL_VSIL_CURL_ALLOWED_EXTENSIONS=_SIDECARS)


def describe_source(uri: str, info: Any, ops: tuple[Op, ...], max_pixels: int | None = MAX_PIXELS) -> SourceSpec:
    """Open a source on the client and describe it (raises SourceError naming the URI when unusable)."""
    with source_env(), open_source(uri, info, max_pixels=max_pixels) as src:
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
            raise SourceError(f"cannot project to EPSG:3857: {gdal_message(err)}", where=uri) from None
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
            handle = open_source(spec.uri, bidx=spec.bidx, crs=spec.crs, ndv=spec.ndv, max_pixels=None)
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


def _read(spec: SourceSpec, src: SourceHandle, bounds: Bounds,
          dst_res: float) -> tuple[np.ndarray, Any] | None:
    """(coloured RGBA (4, h, w) with alpha = validity, transform) around ``bounds``; None outside."""
    ds = src.dataset
    try:
        sb = transform_bounds(WEB_MERCATOR, src.crs, *bounds, densify_pts=21)
    except Exception as err:  # GDAL projection errors
        raise SourceError(f"cannot project a tile to the source CRS: {gdal_message(err)}",
                          where=spec.uri) from None
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


def _to_source(wkt: str) -> Transformer:
    """EPSG:3857 -> source CRS transformer, one per thread (pyproj transformers are not thread-safe)."""
    cache: dict[str, Transformer] | None = getattr(_LOCAL, "transformers", None)
    if cache is None:
        cache = _LOCAL.transformers = {}
    if wkt not in cache:
        if len(cache) >= HANDLE_CACHE:
            cache.clear()
        cache[wkt] = Transformer.from_crs(WEB_MERCATOR.to_wkt(), wkt, always_xy=True)
    return cache[wkt]


def _centre_grid(transform: Any, crs: CRS, block: tuple[Any, int]) -> tuple[np.ndarray, np.ndarray]:
    """(column, row) in the source of exactly projected destination centres every ``_NODE`` pixels.

    The grid is anchored at the block's corner and interpolated bilinearly in between (``_compose``): the
    same positions whichever file of a mosaic holds the pixel, so masks do not depend on how a mosaic is
    cut into files (GDAL's approximate transformer would).
    """
    block_transform, size = block
    nodes = np.arange(size // _NODE + 1) * _NODE + 0.5
    gx, gy = np.meshgrid(block_transform.c + nodes * block_transform.a,
                         block_transform.f + nodes * block_transform.e)
    sx, sy = _to_source(crs.to_wkt()).transform(gx, gy)
    inverse = ~transform
    return (inverse.a * sx + inverse.b * sy + inverse.c, inverse.d * sx + inverse.e * sy + inverse.f)


def _weights(lo: int, hi: int, nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid cell and fraction of destination pixels ``lo``…``hi − 1`` along one axis."""
    t = np.arange(lo, hi) / _NODE
    i = np.minimum(np.floor(t).astype(np.int64), nodes - 2)
    return i, (t - i)


@numba.njit(cache=True, nogil=True)
def _compose(grid_col: np.ndarray, grid_row: np.ndarray, i: np.ndarray, fr: np.ndarray, j: np.ndarray,
             fc: np.ndarray, rgba: np.ndarray, warped: np.ndarray, out: np.ndarray,
             filled: np.ndarray) -> None:  # pragma: no cover - compiled
    """Fill the holes of ``out``/``filled`` (a window of the block) with the valid pixels of ``warped``.

    One pass, no full-size temporaries (this was 2× GDAL's warp time in numpy). For each destination pixel:
    the source pixel under its centre (grid interpolated, then floored: the same float operations in the
    same order as the numpy version it replaces, so the same pixels) decides validity; where GDAL found
    too little valid weight (warped alpha 0) that source pixel's colour is taken.
    """
    height, width = rgba.shape[1], rgba.shape[2]
    for r in range(out.shape[0]):
        ir, wr = i[r], fr[r]
        for c in range(out.shape[1]):
            if filled[r, c]:
                continue
            jc, wc = j[c], fc[c]
            top = grid_col[ir, jc] * (1 - wc) + grid_col[ir, jc + 1] * wc
            bottom = grid_col[ir + 1, jc] * (1 - wc) + grid_col[ir + 1, jc + 1] * wc
            col = np.floor(top * (1 - wr) + bottom * wr)
            top = grid_row[ir, jc] * (1 - wc) + grid_row[ir, jc + 1] * wc
            bottom = grid_row[ir + 1, jc] * (1 - wc) + grid_row[ir + 1, jc + 1] * wc
            row = np.floor(top * (1 - wr) + bottom * wr)
            if not (col >= 0 and row >= 0 and col < width and row < height):
                continue
            sr, sc = int(row), int(col)
            if rgba[3, sr, sc] == 0:
                continue
            if warped[3, r, c] == 0:
                for b in range(3):
                    out[r, c, b] = rgba[b, sr, sc]
            else:
                for b in range(3):
                    out[r, c, b] = warped[b, r, c]
            out[r, c, 3] = 255
            filled[r, c] = True


def _warp(rgba: np.ndarray, transform: Any, crs: CRS, dst_transform: Any, shape: tuple[int, int],
          resampling: Resampling) -> np.ndarray:
    """GDAL-warp (4, h, w) RGBA whose alpha is the validity onto an EPSG:3857 grid.

    Goes through an in-memory GeoTIFF and a WarpedVRT rather than ``reproject`` on arrays, which builds a
    boto3 session per call whenever AWS keys are in the environment (~0.2 s each).
    """
    profile = dict(driver="GTiff", width=rgba.shape[2], height=rgba.shape[1], count=4, dtype="uint8", crs=crs,
                   transform=transform, interleave="pixel")
    with MemoryFile() as memfile:
        with memfile.open(**profile) as dst:
            dst.write(rgba)
        with memfile.open() as mem, WarpedVRT(mem, crs=WEB_MERCATOR, transform=dst_transform, width=shape[1],
                                              height=shape[0], src_alpha=4, dst_alpha=4,
                                              resampling=resampling) as vrt:
            return vrt.read()


def render_block(
    specs: tuple[SourceSpec, ...], z: int, x0: int, y0: int, n: int, tile_size: int, resampling: Resampling,
    failures: list[tuple[str, str]] | None = None,
) -> np.ndarray | None:
    """Mosaic of the ``n`` × ``n`` tiles from (z, x0, y0) as (n·T, n·T, 4) uint8 RGBA, None when empty.

    Alpha is 255 where some source is valid and 0 elsewhere. A source that cannot be read raises
    :class:`SourceError`, or, when a ``failures`` list is given, is appended to it as ``(uri, message)``
    and skipped (the block is then incomplete).
    """
    size = n * tile_size
    bounds = tile_bounds(z, x0, y0, n)
    res = (bounds[2] - bounds[0]) / size
    out = np.zeros((size, size, 4), dtype=np.uint8)
    filled = np.zeros((size, size), dtype=bool)
    with source_env():
        for spec in specs:
            failure = None
            try:
                if _mosaic_one(spec, bounds, res, size, resampling, out, filled):
                    break
            except SourceError as err:
                failure = err.message
            except (*GDAL_ERRORS, FormulaError) as err:
                failure = f"cannot warp: {gdal_message(err)}"
            if failure is not None:  # raised here, outside the handler: no GDAL exception chained
                if failures is None:
                    raise SourceError(failure, where=spec.uri)
                failures.append((spec.uri, failure))
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
    if filled[r0:r1, c0:c1].all():
        return False
    sub = (bounds[0] + c0 * res, bounds[3] - r1 * res, bounds[0] + c1 * res, bounds[3] - r0 * res)
    src = _handle(spec)
    got = _read(spec, src, sub, res)
    if got is None:
        return False
    rgba, transform = got
    warped = _warp(rgba, transform, src.crs, from_bounds(*sub, c1 - c0, r1 - r0), (r1 - r0, c1 - c0),
                   resampling)
    grid_col, grid_row = _centre_grid(transform, src.crs, (from_bounds(*bounds, size, size), size))
    i, fr = _weights(r0, r1, len(grid_col))
    j, fc = _weights(c0, c1, len(grid_col))
    _compose(grid_col, grid_row, i, fr, j, fc, rgba, warped, out[r0:r1, c0:c1], filled[r0:r1, c0:c1])
    return bool(filled.all())
