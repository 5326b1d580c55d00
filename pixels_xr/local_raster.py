"""Local GeoTIFFs opened and read through GDAL's C API directly (ctypes, on the libgdal rasterio loaded).

Why not rasterio here: ``rasterio.open`` of a local COG builds its whole dataset object on every open,
holding the GIL, and most of that is the CRS, built from the GeoTIFF keys through PROJ's database. The
cube opens every asset once per process and the asset check once more, and the check needs no CRS at all.
Here only what a direct read needs is asked of GDAL, when it is needed (the CRS on first use), and every
call releases the GIL (ctypes does). Measured on ``bench_end_to_end.py``'s sample: RESULTS.md
(``end-to-end``).

``LocalRaster.exact`` is False where this description is not the whole story (a mask band that is more
than nodata, a CRS without an EPSG code at its root, a type outside the table): callers then open the file
with rasterio as before, so nothing changes in what is read. Pixels come from ``GDALRasterIOEx`` with the
buffer's own type and strides, the call rasterio makes for ``read(out=…)``: the same bits.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
from affine import Affine
from rasterio import windows
from rasterio.errors import RasterioIOError

#: GDAL data type codes (``GDALDataType``) of the numpy types a direct read handles.
_GDAL_TYPES = {1: np.uint8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
               7: np.float64, 14: np.int8}
_NUMPY_TYPES = {np.dtype(v): k for k, v in _GDAL_TYPES.items()}
GMF_ALL_VALID, GMF_NODATA = 0x01, 0x08
_OF_RASTER_READONLY_VERBOSE = 0x02 | 0x40  # GDAL_OF_RASTER | GDAL_OF_READONLY (0) | GDAL_OF_VERBOSE_ERROR


def libgdal_path() -> str | None:
    """Path of the libgdal this process loaded with rasterio (Linux: from the process's memory map)."""
    import ctypes.util
    import re

    import rasterio  # noqa: F401  (loads libgdal)

    try:
        with open("/proc/self/maps") as f:
            found = sorted(set(re.findall(r"(/\S*libgdal[^/\s]*\.so[^/\s]*)", f.read())))
    except OSError:
        found = []
    return found[0] if found else ctypes.util.find_library("gdal")


@functools.cache
def libgdal() -> ctypes.CDLL | None:
    """rasterio's libgdal opened with ctypes (once per process), or None where it cannot be found."""
    path = libgdal_path()
    return ctypes.CDLL(path) if path else None


class _Gdal:
    """The raster calls of GDAL's C API used here, bound once per process (``get``)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        c = ctypes
        self.lib = lib
        vp, ip, cp = c.c_void_p, c.c_int, c.c_char_p
        signatures = {
            "GDALAllRegister": (None, []),
            "GDALOpenEx": (vp, [cp, c.c_uint, vp, vp, vp]),
            "GDALClose": (None, [vp]),
            "GDALGetRasterXSize": (ip, [vp]), "GDALGetRasterYSize": (ip, [vp]),
            "GDALGetRasterCount": (ip, [vp]),
            "GDALGetGeoTransform": (ip, [vp, c.POINTER(c.c_double)]),
            "GDALGetSpatialRef": (vp, [vp]),
            "OSRGetAuthorityName": (cp, [vp, cp]), "OSRGetAuthorityCode": (cp, [vp, cp]),
            "GDALGetRasterBand": (vp, [vp, ip]),
            "GDALGetRasterDataType": (ip, [vp]),
            "GDALGetRasterNoDataValue": (c.c_double, [vp, c.POINTER(ip)]),
            "GDALGetMaskFlags": (ip, [vp]),
            "GDALGetMetadataItem": (cp, [vp, cp, cp]),
            "GDALRasterIOEx": (ip, [vp, ip, ip, ip, ip, ip, vp, ip, ip, ip, c.c_int64, c.c_int64, vp]),
            "CPLGetLastErrorMsg": (cp, []), "CPLErrorReset": (None, []),
            "CPLPushErrorHandler": (None, [vp]), "CPLPopErrorHandler": (None, []),
            "CPLGetThreadLocalConfigOption": (cp, [cp, cp]),
            "CPLSetThreadLocalConfigOption": (None, [cp, cp]),
        }
        for name, (restype, argtypes) in signatures.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        self.quiet = c.cast(lib.CPLQuietErrorHandler, c.c_void_p)
        lib.GDALAllRegister()  # idempotent; rasterio registers drivers only when its first Env starts

    @staticmethod
    def get() -> _Gdal | None:
        """The binding, or None where no libgdal can be found (then rasterio does every open). Made once
        under a lock: a worker's read threads ask for it together, and GDALAllRegister must run once."""
        with _BINDING_LOCK:
            return _binding()

    def last_error(self) -> str:
        return (self.lib.CPLGetLastErrorMsg() or b"").decode("utf-8", "replace").strip()


_BINDING_LOCK = threading.Lock()


@functools.cache
def _binding() -> _Gdal | None:
    lib = libgdal()
    return _Gdal(lib) if lib is not None else None


class _ThreadConfig:
    """GDAL config options set for the calling thread inside the block and restored after it (what a
    rasterio ``Env`` does, without its start-up: entering an outermost Env checks data paths on disk)."""

    def __init__(self, gdal: _Gdal, options: Mapping[str, Any]) -> None:
        self._gdal = gdal
        self._options = {k.encode(): _option_text(v) for k, v in options.items()}
        self._saved: dict[bytes, bytes | None] = {}

    def __enter__(self) -> None:
        lib = self._gdal.lib
        for key, value in self._options.items():
            self._saved[key] = lib.CPLGetThreadLocalConfigOption(key, None)
            lib.CPLSetThreadLocalConfigOption(key, value)

    def __exit__(self, *exc: Any) -> None:
        for key, value in self._saved.items():
            self._gdal.lib.CPLSetThreadLocalConfigOption(key, value)


def _option_text(value: Any) -> bytes:
    if isinstance(value, bool):
        return b"YES" if value else b"NO"
    return str(value).encode()


class LocalRaster:
    """Band 1 of a local raster open in GDAL: its size, grid, type, nodata and mask flags, and windowed reads
    into numpy buffers. One read at a time per dataset (GDAL datasets are not thread-safe): callers lock."""

    def __init__(self, gdal: _Gdal, handle: int, name: str) -> None:
        self._gdal, self._handle, self.name = gdal, handle, name
        lib = gdal.lib
        self.width, self.height = lib.GDALGetRasterXSize(handle), lib.GDALGetRasterYSize(handle)
        self.count = lib.GDALGetRasterCount(handle)
        gt = (ctypes.c_double * 6)()
        has_transform = lib.GDALGetGeoTransform(handle, gt) == 0
        self.transform = Affine.from_gdal(*gt) if has_transform else None
        self._band = lib.GDALGetRasterBand(handle, 1) if self.count else None
        code = lib.GDALGetRasterDataType(self._band) if self._band else 0
        self.dtype = np.dtype(_GDAL_TYPES[code]) if code in _GDAL_TYPES else None
        has = ctypes.c_int(0)
        value = lib.GDALGetRasterNoDataValue(self._band, ctypes.byref(has)) if self._band else 0.0
        self.nodata = float(value) if has.value else None  # a float, as rasterio gives it
        self.mask_flags = lib.GDALGetMaskFlags(self._band) if self._band else 0

    @classmethod
    def open(cls, path: str, options: Mapping[str, Any] | None = None) -> LocalRaster:
        """Open ``path`` (config ``options`` set for the open, e.g. ``GDAL_DISABLE_READDIR_ON_OPEN``);
        ``RasterioIOError`` (an ``OSError``) with GDAL's message when it cannot be opened, as rasterio
        raises, and ``LookupError`` when no libgdal is found."""
        gdal = _Gdal.get()
        if gdal is None:
            raise LookupError("libgdal not found")
        lib = gdal.lib
        lib.CPLPushErrorHandler(gdal.quiet)
        try:
            lib.CPLErrorReset()
            with _ThreadConfig(gdal, options or {}):
                handle = lib.GDALOpenEx(os.fsencode(path), _OF_RASTER_READONLY_VERBOSE, None, None, None)
            if not handle:
                raise RasterioIOError(gdal.last_error() or f"{path}: cannot open")
        finally:
            lib.CPLPopErrorHandler()
        return cls(gdal, handle, path)

    @functools.cached_property
    def epsg(self) -> int | None:
        """The EPSG code at the root of the raster's CRS, None without one. Asked on first use: GDAL builds
        the CRS from the GeoTIFF keys through PROJ's database then, most of an open's cost."""
        return _epsg(self._gdal.lib, self._gdal.lib.GDALGetSpatialRef(self._open_handle()))

    @property
    def exact(self) -> bool:
        """Whether this description is complete for a direct read: one band of a known type, a grid with
        an EPSG code (else rasterio's reading of the CRS decides), and a mask that is just the nodata
        value or none (else GDAL's mask band is read, through rasterio)."""
        return self.count == 1 and self.dtype is not None and self.transform is not None and \
            self.epsg is not None and self.mask_flags in (GMF_NODATA, GMF_ALL_VALID)

    def tag(self, name: str, domain: str) -> str | None:
        """Metadata item ``name`` of band 1 in ``domain`` (e.g. ``BLOCK_OFFSET_0_0`` in ``TIFF``)."""
        self._open_handle()
        value = self._gdal.lib.GDALGetMetadataItem(self._band, name.encode(), domain.encode())
        return value.decode() if value is not None else None

    def read(self, window: windows.Window, indexes: int = 1, out: np.ndarray | None = None,
             out_dtype: Any = None) -> np.ndarray:
        """Band 1's pixels in ``window`` (inside the raster) into ``out`` (any positive strides) or a new
        array of ``out_dtype`` (default the band's), converted by GDAL as rasterio's ``read`` does."""
        if indexes != 1:
            raise ValueError("LocalRaster reads band 1 only")
        col, row, width, height = (int(window.col_off), int(window.row_off), int(window.width),
                                   int(window.height))
        if out is None:
            out = np.empty((height, width), np.dtype(out_dtype) if out_dtype is not None else self.dtype)
        if out.shape != (height, width) or min(out.strides) <= 0 or not out.flags.writeable:
            raise ValueError(f"buffer of shape {out.shape} for a window of {height} × {width}")
        code = _NUMPY_TYPES.get(out.dtype)
        if code is None:
            raise TypeError(f"no GDAL type for {out.dtype}")
        self._open_handle()
        lib = self._gdal.lib
        lib.CPLPushErrorHandler(self._gdal.quiet)
        try:
            lib.CPLErrorReset()
            failed = lib.GDALRasterIOEx(self._band, 0, col, row, width, height, out.ctypes.data, width, height,
                                        code, out.strides[1], out.strides[0], None)
            if failed:  # rasterio's error and message, so rules on rasterio's errors (errors_as_nodata) apply
                raise RasterioIOError(f"Read or write failed. {self._gdal.last_error()}".strip())
        finally:
            lib.CPLPopErrorHandler()
        return out

    def _open_handle(self) -> int:
        """The dataset's handle; after ``close`` an error, as rasterio gives (GDAL would be handed freed
        pointers, and a crash takes the whole worker with it)."""
        if not self._handle:
            raise RasterioIOError(f"Dataset is closed: {self.name}")
        return self._handle

    def close(self) -> None:
        handle, self._handle, self._band = self._handle, None, None
        if handle:
            self._gdal.lib.GDALClose(handle)

    def __enter__(self) -> LocalRaster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _epsg(lib: Any, srs: int | None) -> int | None:
    if not srs:
        return None
    name, code = lib.OSRGetAuthorityName(srs, None), lib.OSRGetAuthorityCode(srs, None)
    if name != b"EPSG" or not code or not code.isdigit():
        return None
    return int(code)

