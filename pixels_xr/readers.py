"""Reading cube blocks: per-process read concurrency (``pool_size``) and the task that fills one block.

A cube block holds one time chunk (a time bin, or one acquisition day in mode ``all``) × all bands × one
spatial window. Its task reads every asset of the chunk that overlaps the window through a per-process
thread pool of ``pool_size`` threads, so a bin of many scenes is read in parallel even when the block is a
single task. Independently of who calls, every GDAL open and read holds one of the process's
``pool_size`` read slots (``PixelsReader`` for stackstac, ``BoundedRioDriver`` for odc-stac), so a
process never runs more than ``pool_size`` reads at once whatever the scheduler and its thread count.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from odc.loader._rio import RioDriver, RioReader, rio_read
from rasterio import windows

from pixels_xr import read_problems
from pixels_xr.catalog import as_items, signer_for
from pixels_xr.config import PixelsConfig
from pixels_xr.errors import AssetReadError
from pixels_xr.items import AssetProblem, ParsedItem, RasterSource
from pixels_xr.run_cache import memo
from pixels_xr.signing import HrefRefused, Signer, redact, redact_logs, sign

redact_logs()  # rasterio's and stackstac's debug logs name every href they open, signed or pre-signed

_LOCK = threading.Lock()
_POOLS: dict[int, ThreadPoolExecutor] = {}
_SLOTS: dict[int, threading.BoundedSemaphore] = {}


#: GDAL settings for cloud reads (added to stackstac's defaults; documented in the README).
GDAL_CLOUD_ENV: dict[str, Any] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no directory listings per open
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.TIF,.tiff,.TIFF,.jp2,.JP2",
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MAX_RETRY": "4",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_INGESTED_BYTES_AT_OPEN": "32768",  # one request fetches header + most COG IFDs
    "VSI_CACHE": "TRUE",
}


def _reset_after_fork() -> None:  # a forked child must not inherit the parent's threads or held locks
    global _LOCK
    _LOCK = threading.Lock()
    _POOLS.clear()
    _SLOTS.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def read_slots(pool_size: int) -> threading.BoundedSemaphore:
    """This process's semaphore of ``pool_size`` read slots (one per size): every GDAL open and read of a
    cube holds a slot, whichever scheduler and thread runs it."""
    with _LOCK:
        slots = _SLOTS.get(pool_size)
        if slots is None:
            slots = _SLOTS[pool_size] = threading.BoundedSemaphore(pool_size)
        return slots


def read_pool(pool_size: int) -> ThreadPoolExecutor:
    """This process's thread pool for reads with ``pool_size`` threads (one per size, created once)."""
    with _LOCK:
        pool = _POOLS.get(pool_size)
        if pool is None:
            pool = _POOLS[pool_size] = ThreadPoolExecutor(pool_size, f"pixels-read-{pool_size}")
        return pool


@dataclass(frozen=True)
class ReaderOptions:
    """How the readers of a cube open their assets (one entry of ``resampling`` per band)."""

    reader: Any  # a stackstac ``Reader`` class or factory
    resampling: tuple[Any, ...]
    dtype: np.dtype
    fill_value: Any
    gdal_env: Any
    errors_as_nodata: tuple[Exception, ...]

    def token(self) -> tuple:
        """A deterministic summary for dask keys."""
        return (repr(self.reader), tuple(str(r) for r in self.resampling), str(self.dtype),
                repr(self.fill_value), repr(self.gdal_env), repr(self.errors_as_nodata))


def open_readers(table: np.ndarray, spec: Any, options: ReaderOptions) -> np.ndarray:
    """Reader table of a time chunk: ``(reader, asset window)`` per asset with an href, else ``None``.

    Readers open nothing until their first read (stackstac's ``Reader`` protocol).
    """
    out = np.empty(table.shape, dtype=object)
    for index, entry in np.ndenumerate(table):
        url = entry["url"]
        if url:
            reader = options.reader(url=url, spec=spec, resampling=options.resampling[index[1]],
                                    dtype=options.dtype, fill_value=options.fill_value,
                                    scale_offset=(1.0, 0.0), gdal_env=options.gdal_env,
                                    errors_as_nodata=options.errors_as_nodata)
            out[index] = (reader, windows.from_bounds(*entry["bounds"], transform=spec.transform))
    return out


def fetch_block(reader_table: np.ndarray, slices: tuple[slice, slice], dtype: np.dtype, fill_value: Any,
                pool_size: int) -> np.ndarray:
    """One ``(time, band, y, x)`` block: read every ``(reader, asset_window)`` entry overlapping ``slices``.

    ``reader_table`` is stackstac's reader table for the block's time chunk (entries ``None`` where an item
    lacks the asset or misses the grid). A block no asset overlaps is a read-only broadcast of the fill
    value (no memory), as in stackstac.
    """
    window = windows.Window.from_slices(*slices)
    shape = reader_table.shape + (window.height, window.width)
    jobs = [(index, entry[0]) for index, entry in np.ndenumerate(reader_table)
            if entry is not None and windows.intersect(window, entry[1])]
    if not jobs:
        return np.broadcast_to(np.array(fill_value, dtype), shape)
    out = np.empty(shape, dtype)  # every (time, band) slot is either read whole or filled here
    covered = np.zeros(reader_table.shape, bool)
    for index, _ in jobs:
        covered[index] = True
    out[~covered] = fill_value

    def read(job: tuple[tuple[int, ...], Any]) -> None:
        index, reader = job
        out[index] = reader.read(window)

    if len(jobs) == 1 or pool_size == 1:
        for job in jobs:
            read(job)
    else:
        for _ in read_pool(pool_size).map(read, jobs):  # re-raises the first failed read
            pass
    return out


class PixelsReader:
    """stackstac ``Reader`` that signs its href just before opening and again once the signature expires
    (``signer``, see ``signing``; the catalog's ``HrefGate`` refuses hrefs outside its allow-list with
    ``HrefRefused`` before anything is opened), and holds one of the process's ``pool_size`` read slots
    around each open and read. A file whose pixels are output pixels (nearest resampling) is read by direct
    windowed reads, ~10x faster than stackstac's WarpedVRT and value-identical; any other goes through
    stackstac's ``AutoParallelRioReader``. Error messages and warnings never carry the signed query string.
    Picklable (distributed workers rebuild it and use their own slots)."""

    def __init__(self, *, url: str, spec: Any, resampling: Any, dtype: np.dtype, fill_value: Any,
                 scale_offset: tuple[float, float], gdal_env: Any = None,
                 errors_as_nodata: tuple[Exception, ...] = (), pool_size: int = 8,
                 signer: Signer | None = None) -> None:
        self.url = url
        self.pool_size = pool_size
        self.signer = signer
        self.errors_as_nodata = errors_as_nodata
        self._state = {"url": url, "spec": spec, "resampling": resampling, "dtype": dtype,
                       "fill_value": fill_value, "scale_offset": scale_offset, "gdal_env": gdal_env}
        self._inner: Any = None
        self._expires: float | None = None
        self._broken = False  # an open failed and errors_as_nodata matched: nodata from now on
        self._lock = threading.Lock()

    def _reader(self) -> Any:
        """The open reader, (re)created with a fresh signature when there is none or it expired: a direct
        windowed reader when the file's pixels are output pixels, else stackstac's (through a WarpedVRT)."""
        from stackstac.rio_reader import AutoParallelRioReader

        with self._lock:
            if self._inner is None or (self._expires is not None and time.time() >= self._expires):
                signed = sign(self.signer, self.url)
                self._inner = _open_aligned(signed.href, self._state) or \
                    AutoParallelRioReader(**{**self._state, "url": signed.href})
                self._expires = signed.expires
            return self._inner

    def read(self, window: windows.Window, **kwargs: Any) -> np.ndarray:
        from stackstac.nodata_reader import exception_matches, nodata_for_window

        if not self._broken:
            with read_slots(self.pool_size):
                try:
                    return self._reader().read(window, **kwargs)
                except HrefRefused:  # outside the catalog's allow-list: never opened, never nodata
                    raise
                except Exception as exc:
                    message = redact(str(exc))
                    cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
                    if not (exception_matches(exc, self.errors_as_nodata)
                            or exception_matches(cause, self.errors_as_nodata)):
                        raise AssetReadError(message, redact(self.url)) from None
                    warnings.warn(message, stacklevel=2)
                    read_problems.record(self.url, message)  # nodata, but never silently
                    self._broken = message.startswith("Error opening")
        return nodata_for_window(window, self._state["fill_value"], self._state["dtype"])

    def close(self) -> None:
        with self._lock:
            if self._inner is not None:
                self._inner.close()
            self._inner = None

    def __getstate__(self) -> dict:
        return {**self._state, "errors_as_nodata": self.errors_as_nodata, "pool_size": self.pool_size,
                "signer": self.signer}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)  # type: ignore[misc]


def grid_offset(transform: Any, crs: Any, spec: Any) -> tuple[int, int] | None:
    """(column, row) of a raster's pixel (0, 0) in the output grid ``spec`` when its pixels are output
    pixels (same CRS, same north-up pixel size, whole-pixel offset), else ``None``."""
    xres, yres = spec.resolutions_xy
    t = transform
    if crs is None or t.b or t.d or not (math.isclose(t.a, xres, rel_tol=1e-9)
                                         and math.isclose(-t.e, yres, rel_tol=1e-9)):
        return None
    col, row = (t.c - spec.bounds[0]) / xres, (spec.bounds[3] - t.f) / yres
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6 or crs.to_epsg() != spec.epsg:
        return None
    return round(col), round(row)


def _open_aligned(href: str, state: dict) -> _AlignedReader | None:
    """A direct reader of ``href`` when nearest resampling is asked and its grid is the output grid."""
    from rasterio.enums import MaskFlags, Resampling
    from stackstac.rio_reader import DEFAULT_GDAL_ENV, MULTITHREADED_DRIVER_ALLOWLIST, \
        SelfCleaningDatasetReader, SingleThreadedRioDataset, ThreadLocalRioDataset

    if state["resampling"] != Resampling.nearest:
        return None
    env = state["gdal_env"] or DEFAULT_GDAL_ENV
    with env.open:
        try:
            ds = SelfCleaningDatasetReader(href, sharing=False)
        except Exception as exc:  # the same message stackstac gives, so errors_as_nodata rules match
            raise RuntimeError(f"Error opening {href!r}: {exc!r}") from exc
    offset = grid_offset(ds.transform, ds.crs, state["spec"])
    if offset is None or ds.count != 1:
        ds.close()
        return None
    threadsafe = ThreadLocalRioDataset if ds.driver in MULTITHREADED_DRIVER_ALLOWLIST else \
        SingleThreadedRioDataset
    plain = np.dtype(ds.dtypes[0]) == np.dtype(state["dtype"]) and \
        ds.mask_flag_enums[0] in ([MaskFlags.nodata], [MaskFlags.all_valid])
    return _AlignedReader(threadsafe(env, ds), offset, (ds.height, ds.width), state["dtype"],
                          state["fill_value"], ds.nodata, plain)


class _AlignedReader:
    """Windowed reads of a raster whose pixels are output pixels: no warping, exactly the file's values
    (nodata and outside the file → the fill value), as stackstac's VRT gives them at nearest. When the
    file's mask is just its nodata value (or all valid) and no cast is needed, pixels are read unmasked
    and nodata replaced afterwards (GDAL builds no mask array), and a window inside the file is returned
    as read, without a copy."""

    def __init__(self, dataset: Any, offset: tuple[int, int], shape: tuple[int, int], dtype: np.dtype,
                 fill_value: Any, nodata: Any, plain: bool) -> None:
        self._dataset, self._offset, self._shape = dataset, offset, shape
        self._dtype, self._fill, self._nodata, self._plain = dtype, fill_value, nodata, plain

    def read(self, window: windows.Window, **kwargs: Any) -> np.ndarray:
        col, row = int(window.col_off) - self._offset[0], int(window.row_off) - self._offset[1]
        height, width = int(window.height), int(window.width)
        r0, c0 = max(0, row), max(0, col)
        r1, c1 = min(self._shape[0], row + height), min(self._shape[1], col + width)
        if r1 <= r0 or c1 <= c0:
            return np.full((height, width), self._fill, self._dtype)
        data = self._pixels(windows.Window(c0, r0, c1 - c0, r1 - r0))
        if data.shape == (height, width):
            return data
        out = np.full((height, width), self._fill, self._dtype)
        out[r0 - row:r1 - row, c0 - col:c1 - col] = data
        return out

    def _pixels(self, window: windows.Window) -> np.ndarray:
        if not self._plain:
            masked = self._dataset.read(window, indexes=1, out_dtype=self._dtype, masked=True)
            return np.ma.filled(masked, self._fill)
        data = self._dataset.read(window, indexes=1, out_dtype=self._dtype)
        nodata, fill = self._nodata, self._fill
        if nodata is not None and not _same_value(nodata, fill):
            data[np.isnan(data) if _is_nan(nodata) else data == nodata] = fill
        return data

    def close(self) -> None:
        self._dataset.close()


def _is_nan(value: Any) -> bool:
    return isinstance(value, float | np.floating) and bool(np.isnan(value))


def _same_value(a: Any, b: Any) -> bool:
    return (_is_nan(a) and _is_nan(b)) or (not _is_nan(a) and not _is_nan(b) and a == b)


class _BoundedRioReader(RioReader):
    def __init__(self, src: Any, ctx: Any, pool_size: int, signer: Signer | None) -> None:
        super().__init__(src, ctx)
        self._pool_size = pool_size
        self._signer = signer

    def read(self, cfg: Any, dst_geobox: Any, *, dst: Any = None, selection: Any = None) -> Any:
        with read_slots(self._pool_size):
            src = self._src
            if self._signer is not None:  # odc opens the file in every read: sign each time (cached tokens)
                src = src.patch(uri=sign(self._signer, src.uri).href)
            try:
                return rio_read(src, cfg, dst_geobox, dst=dst, selection=selection)
            except Exception as exc:
                if src.uri == self._src.uri:
                    raise
                raise AssetReadError(redact(str(exc)), redact(src.uri)) from None


class BoundedRioDriver(RioDriver):
    """odc-stac's rasterio driver: every read (odc opens the file in each read) holds a read slot and
    reads a freshly signed href."""

    def __init__(self, pool_size: int, signer: Signer | None = None) -> None:
        from odc.stac._mdtools import StacAuxReader

        super().__init__(aux_reader=StacAuxReader())
        self.pool_size = pool_size
        self.signer = signer

    def open(self, src: Any, ctx: Any) -> Any:
        return _BoundedRioReader(src, ctx, self.pool_size, self.signer)


# ----------------------------------------------------------------------------------------------- stackstac's types
# The one place stackstac's modules are named (with the readers above): its grid spec, asset table dtype,
# coordinates and GDAL environment, so an upgrade of stackstac touches this file only.
def raster_spec(epsg: int, bounds: tuple[float, float, float, float], scale: float) -> Any:
    """stackstac's ``RasterSpec`` of an output grid (north-up, square pixels)."""
    from stackstac.raster_spec import RasterSpec

    return RasterSpec(epsg=epsg, bounds=bounds, resolutions_xy=(scale, scale))


def asset_table_dtype() -> np.dtype:
    """The structured dtype of stackstac's ``(item, band)`` asset table (url, bounds, scale_offset)."""
    from stackstac.prepare import ASSET_TABLE_DT

    return ASSET_TABLE_DT


def cube_coords(items: list[ParsedItem], names: list[str], spec: Any) -> tuple[dict, list[str]]:
    """stackstac's coordinates (time, band, pixel-centre y/x) and dims for items on ``spec``."""
    from stackstac.prepare import to_coords

    # to_coords reads only the id and the datetime string of each item
    stac = [{"id": i.id, "properties": {"datetime": i.properties.get("datetime") or i.datetime.isoformat()}}
            for i in items]
    return to_coords(stac, names, spec, xy_coords="center", properties=False, band_coords=False)


def gdal_env(extra: dict[str, Any]) -> Any:
    """stackstac's default GDAL environment with ``extra`` options always set."""
    import stackstac

    return stackstac.DEFAULT_GDAL_ENV.updated(always=extra)


# ----------------------------------------------------------------------------------------------- asset checks
def check_assets(items: Sequence[ParsedItem | dict],
                 config: PixelsConfig) -> tuple[list[ParsedItem], list[AssetProblem]]:
    """Open every asset's header (``pool_size`` at a time); returns (readable items, problems). ``items``:
    parsed items, or STAC dicts parsed here (``catalog.as_items``).

    Each problem is ``{"item", "asset", "href", "error"}``. With ``on_asset_error: fail`` the first problem
    raises ``AssetReadError`` naming the item and asset; with ``skip`` (default) the item is left out and
    the problem recorded.
    """
    import rasterio

    signer = signer_for(config.catalog)

    def open_error(href: str) -> str | None:
        try:
            with read_slots(config.pool_size):
                signed = sign(signer, href).href  # a token API failure is this asset's problem too
                with rasterio.Env(**GDAL_CLOUD_ENV), rasterio.open(signed) as ds:
                    ds.read(1, window=((0, 1), (0, 1)))
        except Exception as exc:
            return redact(" ".join(str(exc).split()))[:300]
        return None

    def probe(item: ParsedItem, source: RasterSource) -> AssetProblem | None:
        error = memo("asset-error", source.href, lambda: open_error(source.href))  # once per batch run
        if error is None:
            return None
        return AssetProblem(item=item.id, asset=source.name, href=redact(source.href), error=error)

    parsed = as_items(items, config)
    jobs = [(item, source) for item in parsed for source in item.sources.values()]
    results = list(read_pool(config.pool_size).map(lambda j: probe(*j), jobs))
    problems = [r for r in results if r is not None]
    if problems and config.on_asset_error == "fail":
        p = problems[0]
        raise AssetReadError(f"asset {p['asset']!r} unreadable: {p['error']}", f"item {p['item']!r}")
    bad = {p["item"] for p in problems}
    return [i for i in parsed if i.id not in bad], problems
