"""Reading cube blocks: per-process read concurrency (``pool_size``) and the task that fills one block.

A cube block holds one time chunk (a time bin, or one acquisition day in mode ``all``) × all bands × one
spatial window. Its task reads every asset of the chunk that overlaps the window through a per-process
thread pool of ``pool_size`` threads, so a bin of many scenes is read in parallel even when the block is a
single task. Independently of who calls, every GDAL open and read holds one of the process's
``pool_size`` read slots (``PixelsReader`` for stackstac, ``BoundedRioDriver`` for odc-stac), so a
process never runs more than ``pool_size`` reads at once whatever the scheduler and its thread count.

Remote assets (S3, HTTP): the asset check fetches each header once (``CogHeader``: one ranged GET), and
every later open of that asset parses it from memory, so a read costs only its tile requests (see the
``remote headers`` section below).
"""

from __future__ import annotations

import functools
import io
import math
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import stackstac  # noqa: F401  (imported once here: first imports from planner threads raced on stackstac.prepare)
import stackstac.prepare  # noqa: F401
from odc.loader._rio import RioDriver, RioReader, rio_read
from rasterio import windows
from rasterio._vsiopener import MultiByteRangeResource, MultiByteRangeResourceContainer

from pixels_xr import read_problems
from pixels_xr.catalog import as_items, signer_for
from pixels_xr.config import PixelsConfig
from pixels_xr.errors import AssetReadError
from pixels_xr.items import AssetProblem, ParsedItem, RasterSource
from pixels_xr.local_raster import LocalRaster, libgdal
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


_THREAD_ENVS = threading.local()


def cloud_env() -> Any:
    """A ``rasterio.Env`` of ``GDAL_CLOUD_ENV`` for this thread, made once per thread and set of ``AWS_*``
    variables and entered anew by each caller (never nested in itself).

    A new ``rasterio.Env`` builds a boto3 session whenever AWS keys are in the environment (botocore's
    handlers, credential chain and an SSL context: tens of ms of CPU). Made per call, that was most of the
    asset check's time, one per asset, and most of the client's CPU over S3."""
    import rasterio

    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    cached = getattr(_THREAD_ENVS, "env", None)
    if cached is None or cached[0] != key:
        cached = _THREAD_ENVS.env = (key, rasterio.Env(**GDAL_CLOUD_ENV))
    return cached[1]


def _reset_after_fork() -> None:  # a forked child must not inherit the parent's threads or held locks
    global _LOCK
    _LOCK = threading.Lock()
    _POOLS.clear()
    _SLOTS.clear()
    _HTTP.clear()
    checked_rasters.forget()


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


def open_readers(table: np.ndarray, spec: Any, options: ReaderOptions,
                 headers: dict[str, CogHeader] | None = None) -> np.ndarray:
    """Reader table of a time chunk: ``(reader, asset window)`` per asset with an href, else ``None``.

    Readers open nothing until their first read (stackstac's ``Reader`` protocol). ``headers``: the known
    headers of remote assets (from the asset check), given to the readers so no open fetches them again.
    """
    out = np.empty(table.shape, dtype=object)
    for index, entry in np.ndenumerate(table):
        url = entry["url"]
        if url:
            known = {"header": headers[url]} if headers and url in headers else {}
            reader = options.reader(url=url, spec=spec, resampling=options.resampling[index[1]],
                                    dtype=options.dtype, fill_value=options.fill_value,
                                    scale_offset=(1.0, 0.0), gdal_env=options.gdal_env,
                                    errors_as_nodata=options.errors_as_nodata, **known)
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
        if hasattr(reader, "read_into"):  # straight into the block: no temporary, no copy
            reader.read_into(window, out[index])
        else:
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
    stackstac's ``AutoParallelRioReader``. With a ``header`` (a remote asset the check already fetched),
    the direct reader parses it from memory and fetches only tiles. Error messages and warnings never carry
    the signed query string. Picklable (distributed workers rebuild it and use their own slots)."""

    def __init__(self, *, url: str, spec: Any, resampling: Any, dtype: np.dtype, fill_value: Any,
                 scale_offset: tuple[float, float], gdal_env: Any = None,
                 errors_as_nodata: tuple[Exception, ...] = (), pool_size: int = 8,
                 signer: Signer | None = None, header: CogHeader | None = None) -> None:
        self.url = url
        self.pool_size = pool_size
        self.signer = signer
        self.header = header
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
                self._inner = _open_aligned(signed.href, self._state, self.header) or \
                    AutoParallelRioReader(**{**self._state, "url": signed.href})
                self._expires = signed.expires
            return self._inner

    def read(self, window: windows.Window, **kwargs: Any) -> np.ndarray:
        from stackstac.nodata_reader import nodata_for_window

        if not self._broken:
            with read_slots(self.pool_size), self._errors_as_nodata():
                return self._reader().read(window, **kwargs)
        return nodata_for_window(window, self._state["fill_value"], self._state["dtype"])

    def read_into(self, window: windows.Window, out: np.ndarray) -> None:
        """``read(window)`` written into ``out`` (the window's slot of a block): the direct reader decodes
        into it in place; the warped reader's result is copied."""
        if not self._broken:
            with read_slots(self.pool_size), self._errors_as_nodata():
                inner = self._reader()
                if isinstance(inner, _AlignedReader):
                    inner.read_into(window, out)
                else:
                    out[...] = inner.read(window)
                return
        out[...] = self._state["fill_value"]

    @contextmanager
    def _errors_as_nodata(self) -> Iterator[None]:
        """A read error matching ``errors_as_nodata`` becomes a warning and a recorded read problem, and
        the block is left to the fill value (an open failure: this asset's later reads too); any other
        error is an ``AssetReadError`` naming the (unsigned) href."""
        from stackstac.nodata_reader import exception_matches

        try:
            yield
        except HrefRefused:  # outside the catalog's allow-list: never opened, never nodata
            raise
        except Exception as exc:
            message = redact(str(exc))
            cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
            if not (exception_matches(exc, self.errors_as_nodata)
                    or exception_matches(cause, self.errors_as_nodata)):
                raise AssetReadError(message, redact(self.url)) from None
            warnings.warn(message, stacklevel=4)
            read_problems.record(self.url, message)  # nodata, but never silently
            self._broken = message.startswith("Error opening")

    def close(self) -> None:
        with self._lock:
            if self._inner is not None:
                self._inner.close()
            self._inner = None

    def __getstate__(self) -> dict:
        return {**self._state, "errors_as_nodata": self.errors_as_nodata, "pool_size": self.pool_size,
                "signer": self.signer, "header": self.header}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)  # type: ignore[misc]


def grid_offset(transform: Any, epsg: int | None, spec: Any) -> tuple[int, int] | None:
    """(column, row) of a raster's pixel (0, 0) in the output grid ``spec`` when its pixels are output
    pixels (same CRS, given by its EPSG code, same north-up pixel size, whole-pixel offset), else ``None``."""
    xres, yres = spec.resolutions_xy
    t = transform
    if epsg is None or t.b or t.d or not (math.isclose(t.a, xres, rel_tol=1e-9)
                                          and math.isclose(-t.e, yres, rel_tol=1e-9)):
        return None
    col, row = (t.c - spec.bounds[0]) / xres, (spec.bounds[3] - t.f) / yres
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6 or epsg != spec.epsg:
        return None
    return round(col), round(row)


def _open_aligned(href: str, state: dict, header: CogHeader | None = None) -> _AlignedReader | None:
    """A direct reader of ``href`` when nearest resampling is asked and its grid is the output grid; with a
    ``header`` (remote assets) opened from it, fetching only tiles."""
    from rasterio.enums import MaskFlags, Resampling
    from stackstac.rio_reader import (
        DEFAULT_GDAL_ENV,
        SelfCleaningDatasetReader,
    )

    if state["resampling"] != Resampling.nearest:
        return None
    env = state["gdal_env"] or DEFAULT_GDAL_ENV
    remote = _RemoteSource(href, header, env) if header is not None and _Vsi.get() is not None else None
    if remote is None and _local_file(href):
        direct = _open_local(href, state, env)
        if direct is not None:
            return direct
    with env.open:
        try:
            ds = remote.open() if remote is not None else SelfCleaningDatasetReader(href, sharing=False)
        except Exception as exc:  # the same message stackstac gives, so errors_as_nodata rules match
            raise RuntimeError(f"Error opening {href!r}: {exc!r}") from exc
    offset = grid_offset(ds.transform, ds.crs.to_epsg() if ds.crs is not None else None, state["spec"])
    if offset is None or ds.count != 1:
        ds.close()
        return None
    # Unmasked reads when the mask is just the nodata value and every file value is exact in the output
    # dtype (GDAL casts as it decodes; then nodata is found after the cast as before it).
    plain = np.can_cast(ds.dtypes[0], state["dtype"], "safe") and \
        ds.mask_flag_enums[0] in ([MaskFlags.nodata], [MaskFlags.all_valid])
    shape, nodata = (ds.height, ds.width), ds.nodata
    if remote is not None:  # the tiles of all the grid needs from this file: one request per run of them
        remote.plan(ds, offset, state["spec"].shape)
        ds.close()
        dataset: Any = _OpenPerRead(env, remote)
    else:
        dataset = _LockedDataset(env, ds)
    return _AlignedReader(dataset, offset, shape, state["dtype"], state["fill_value"], nodata, plain, remote)


def _open_local(href: str, state: dict, env: Any) -> _AlignedReader | None:
    """A direct reader of a local file through GDAL's C API (``local_raster``) when that describes it
    exactly and its pixels are output pixels read without a mask; None when rasterio must open it (then
    the file is opened twice; an open without the CRS costs a fraction of rasterio's)."""
    try:
        options = env.open.options  # the options rasterio would open it with
        raster = checked_rasters.take(href, options) or LocalRaster.open(href, options)
    except LookupError:
        return None
    except OSError as exc:  # the message stackstac gives, so errors_as_nodata rules match
        raise RuntimeError(f"Error opening {href!r}: {exc!r}") from exc
    offset = grid_offset(raster.transform, raster.epsg, state["spec"]) if raster.exact else None
    if offset is None or not np.can_cast(raster.dtype, state["dtype"], "safe"):
        raster.close()
        return None
    return _AlignedReader(_LockedDataset(env, raster), offset, (raster.height, raster.width), state["dtype"],
                          state["fill_value"], raster.nodata, True)


class _LockedDataset:
    """One open dataset of an asset, read by whichever thread asks, one read at a time (a GDAL dataset is
    not thread-safe). stackstac's ``ThreadLocalRioDataset`` opens a copy per thread instead: with a read
    pool, each block of an asset landed on another thread and opened the file again.

    A local file is read outside rasterio's read environment: its options are HTTP ones, and entering
    and leaving it (``GDALEnv.start`` checks data paths on disk every time) took about a quarter of a
    direct read. A ``/vsi`` or URL path reads inside it."""

    def __init__(self, env: Any, ds: Any) -> None:
        self._env, self._ds = env, ds
        self._remote = not _local_file(str(ds.name))
        self._lock = threading.Lock()

    def read(self, window: windows.Window, **kwargs: Any) -> np.ndarray:
        with self._lock:
            if not self._remote:
                return self._ds.read(window=window, **kwargs)
            with self._env.read:
                return self._ds.read(window=window, **kwargs)

    def close(self) -> None:
        with self._lock:
            self._ds.close()


class _AlignedReader:
    """Windowed reads of a raster whose pixels are output pixels: no warping, exactly the file's values
    (nodata and outside the file → the fill value), as stackstac's VRT gives them at nearest. When the
    file's mask is just its nodata value (or all valid) and no cast is needed, pixels are read unmasked
    and nodata replaced afterwards (GDAL builds no mask array), and a window inside the file is returned
    as read, without a copy."""

    def __init__(self, dataset: Any, offset: tuple[int, int], shape: tuple[int, int], dtype: np.dtype,
                 fill_value: Any, nodata: Any, plain: bool, remote: _RemoteSource | None = None) -> None:
        self._dataset, self._offset, self._shape = dataset, offset, shape
        self._dtype, self._fill, self._nodata, self._plain = dtype, fill_value, nodata, plain
        self._remote = remote

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

    def read_into(self, window: windows.Window, out: np.ndarray) -> None:
        """``read(window)`` decoded straight into ``out`` (a ``(height, width)`` view, strided or not: GDAL
        writes with the view's strides); the parts outside the file get the fill value."""
        col, row = int(window.col_off) - self._offset[0], int(window.row_off) - self._offset[1]
        height, width = int(window.height), int(window.width)
        r0, c0 = max(0, row), max(0, col)
        r1, c1 = min(self._shape[0], row + height), min(self._shape[1], col + width)
        if r1 <= r0 or c1 <= c0:
            out[...] = self._fill
            return
        top, left, bottom, right = r0 - row, c0 - col, r1 - row, c1 - col
        out[:top], out[bottom:] = self._fill, self._fill
        out[top:bottom, :left], out[top:bottom, right:] = self._fill, self._fill
        self._pixels(windows.Window(c0, r0, c1 - c0, r1 - r0), out[top:bottom, left:right])

    def _pixels(self, window: windows.Window, out: np.ndarray | None = None) -> np.ndarray:
        if self._remote is not None:
            self._remote.prefetch_planned()
        if not self._plain:
            masked = self._dataset.read(window, indexes=1, out_dtype=self._dtype, masked=True)
            if out is None:
                return np.ma.filled(masked, self._fill)
            out[...] = np.ma.filled(masked, self._fill)
            return out
        data = self._dataset.read(window, indexes=1, out_dtype=self._dtype) if out is None else \
            self._dataset.read(window, indexes=1, out=out)
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


# ----------------------------------------------------------------------------------------------- remote headers
# On object storage requests, not decoding, set the pace (10–30 ms each in a region). A remote asset's
# header is fetched once (the asset check does it: one ranged GET through GDAL's own virtual file system, so
# credentials, endpoints and retries are GDAL's), kept as bytes in a ``CogHeader`` that travels with the
# reader table, and every later open of that asset (any feature, worker or thread) parses it from memory
# through rasterio's opener interface; only tile bytes are fetched after that, one request per run of
# adjacent tiles (GDAL merges them and asks our opener for them in one multi-range call), as plain ranged
# GETs of the URL GDAL signs for the object (``_Vsi.ranges``): no probe of the file per worker process.

#: Bytes the header read fetches (GDAL's GDAL_INGESTED_BYTES_AT_OPEN is 16 KiB; a COG's IFDs for a 10980²
#: Sentinel-2 band fit in 32 KiB). More is fetched on demand when the IFDs go further.
HEADER_BYTES = 32768
#: The most compressed bytes a reader fetches up front for all of an asset's pixels in the output grid
#: (reused by every block of that asset read in the process); a larger asset is fetched per block.
PREFETCH_LIMIT = 8 << 20

_REMOTE_SCHEMES = ("s3://", "http://", "https://", "gs://", "az://", "/vsis3/", "/vsicurl/", "/vsigs/",
                   "/vsiaz/")


def _local_file(path: str) -> bool:
    """Whether GDAL reads ``path`` from a plain file (no ``/vsi`` handler, no URL): rasterio's Env, whose
    options are HTTP ones, is then not entered around it."""
    return not (path.startswith("/vsi") or "://" in path)


def is_remote(href: str) -> bool:
    """Whether ``href`` is read over the network (object storage or HTTP)."""
    return href.startswith(_REMOTE_SCHEMES)


def vsi_path(href: str) -> str:
    """GDAL's virtual file system path of a remote href (``s3://b/k`` → ``/vsis3/b/k``, ``https://…`` →
    ``/vsicurl/https://…``), as rasterio would open it."""
    from rasterio._path import _parse_path

    path = _parse_path(href)
    return path.as_vsi() if hasattr(path, "as_vsi") else str(path.path)


class _Vsi:
    """GDAL's virtual file API (``VSIFOpenL``, ``VSIFReadL``, ``VSIFReadMultiRangeL``) on the libgdal that
    rasterio loaded, through ctypes (rasterio exposes no raw byte reads): byte ranges fetched with GDAL's
    settings and connection pool, the GIL released while they are in flight."""

    def __init__(self, lib: Any) -> None:
        import ctypes

        self.lib = lib
        c = ctypes
        lib.VSIFOpenL.restype, lib.VSIFOpenL.argtypes = c.c_void_p, [c.c_char_p, c.c_char_p]
        lib.VSIFReadL.restype, lib.VSIFReadL.argtypes = c.c_size_t, [c.c_void_p, c.c_size_t, c.c_size_t,
                                                                    c.c_void_p]
        lib.VSIFSeekL.restype, lib.VSIFSeekL.argtypes = c.c_int, [c.c_void_p, c.c_uint64, c.c_int]
        lib.VSIFTellL.restype, lib.VSIFTellL.argtypes = c.c_uint64, [c.c_void_p]
        lib.VSIFCloseL.restype, lib.VSIFCloseL.argtypes = c.c_int, [c.c_void_p]
        lib.VSIFReadMultiRangeL.restype = c.c_int
        lib.VSIFReadMultiRangeL.argtypes = [c.c_int, c.POINTER(c.c_void_p), c.POINTER(c.c_uint64),
                                            c.POINTER(c.c_size_t), c.c_void_p]
        lib.CPLGetLastErrorMsg.restype, lib.CPLGetLastErrorMsg.argtypes = c.c_char_p, []
        lib.CPLErrorReset.restype, lib.CPLErrorReset.argtypes = None, []
        lib.CPLGetConfigOption.restype = c.c_char_p
        lib.CPLGetConfigOption.argtypes = [c.c_char_p, c.c_char_p]
        lib.VSIGetSignedURL.restype, lib.VSIGetSignedURL.argtypes = c.c_void_p, [c.c_char_p, c.c_void_p]
        lib.VSIFree.restype, lib.VSIFree.argtypes = None, [c.c_void_p]

    @staticmethod
    @functools.cache
    def get() -> _Vsi | None:
        """The binding (one per process), or None where no libgdal can be found (then headers are not
        shared)."""
        lib = libgdal()
        return _Vsi(lib) if lib is not None else None

    def _error(self, vsi: str, what: str) -> OSError:
        message = (self.lib.CPLGetLastErrorMsg() or b"").decode("utf-8", "replace").strip()
        return OSError(f"{what} {vsi}: {message or 'No such file or directory'}")

    def _open(self, vsi: str) -> int:
        self.lib.CPLErrorReset()
        handle = self.lib.VSIFOpenL(vsi.encode(), b"rb")
        if not handle:
            raise self._error(vsi, "cannot open")
        return handle

    def head(self, vsi: str, length: int) -> tuple[bytes, int]:
        """The first ``length`` bytes of ``vsi`` (fewer if it is shorter) and its size: one request."""
        import ctypes

        handle = self._open(vsi)
        try:
            buf = ctypes.create_string_buffer(length)
            got = self.lib.VSIFReadL(buf, 1, length, handle)
            if got == 0 and self.lib.CPLGetLastErrorMsg():
                raise self._error(vsi, "cannot read")
            self.lib.VSIFSeekL(handle, 0, 2)  # SEEK_END: the size came with the answer (Content-Range)
            return buf.raw[:got], int(self.lib.VSIFTellL(handle))
        finally:
            self.lib.VSIFCloseL(handle)

    def option(self, name: str) -> str | None:
        """GDAL's value of config option ``name`` in this thread (environment variables included)."""
        value = self.lib.CPLGetConfigOption(name.encode(), None)
        return value.decode() if value else None

    def direct_url(self, vsi: str) -> str | None:
        """The plain HTTP(S) URL that fetches ``vsi``'s bytes as GDAL would (``/vsicurl/`` URLs as they are,
        object stores signed by GDAL with its credentials and endpoint: no request), or None when GDAL must
        do the fetch itself (its HTTP options add headers, proxies, cookies or TLS settings that a plain
        request would lose)."""
        import ctypes

        if any(self.option(name) for name in _GDAL_ONLY_HTTP_OPTIONS):
            return None
        if vsi.startswith("/vsicurl/"):
            url = vsi[len("/vsicurl/"):]
            return url if url.startswith(("http://", "https://")) else None
        if not vsi.startswith(("/vsis3/", "/vsigs/", "/vsiaz/", "/vsiadls/", "/vsioss/", "/vsiswift/")):
            return None
        pointer = self.lib.VSIGetSignedURL(vsi.encode(), None)
        if not pointer:
            return None
        try:
            url = ctypes.string_at(pointer).decode()
        finally:
            self.lib.VSIFree(pointer)
        return url if url.startswith(("http://", "https://")) else None

    def ranges(self, vsi: str, spans: list[tuple[int, int]]) -> list[bytes]:
        """Bytes of each ``(offset, length)`` of ``vsi``, fetched concurrently (GDAL merges adjacent ones).

        Through GDAL's URL for ``vsi`` with plain ranged GETs where it has one (``direct_url``): opening a
        file through GDAL's VSI costs a probe request per file and process (it checks that the file exists
        and its size, which the header read already knows), so a worker's first read of each asset cost one
        request more than the tiles. Else through ``VSIFReadMultiRangeL``."""
        url = self.direct_url(vsi)
        pool = _http_pool(self, url) if url is not None else None
        if pool is not None:
            timeout = float(self.option("GDAL_HTTP_TIMEOUT") or 0) or None
            return _http_ranges(pool, url, spans, vsi, self._retry(), timeout)
        import ctypes

        handle = self._open(vsi)
        try:
            n = len(spans)
            bufs = [ctypes.create_string_buffer(length) for _, length in spans]
            data = (ctypes.c_void_p * n)(*[ctypes.cast(b, ctypes.c_void_p) for b in bufs])
            offsets = (ctypes.c_uint64 * n)(*[o for o, _ in spans])
            sizes = (ctypes.c_size_t * n)(*[length for _, length in spans])
            if self.lib.VSIFReadMultiRangeL(n, data, offsets, sizes, handle) != 0:
                raise self._error(vsi, "cannot read ranges of")
            return [b.raw for b in bufs]
        finally:
            self.lib.VSIFCloseL(handle)


    def _retry(self) -> Any:
        import urllib3

        tries = int(self.option("GDAL_HTTP_MAX_RETRY") or 0)
        delay = float(self.option("GDAL_HTTP_RETRY_DELAY") or 30)
        return urllib3.Retry(total=tries, backoff_factor=delay, status_forcelist=_RETRY_STATUS,
                             allowed_methods=["GET"], raise_on_status=False, respect_retry_after_header=True)


#: GDAL HTTP options that a plain request would not honour: with any set, GDAL fetches the bytes itself.
#: (CA bundles and proxies are honoured: ``_http_pool``.)
_GDAL_ONLY_HTTP_OPTIONS = (
    "GDAL_HTTP_HEADERS", "GDAL_HTTP_HEADER_FILE", "GDAL_HTTP_AUTH", "GDAL_HTTP_USERPWD", "GDAL_HTTP_BEARER",
    "GDAL_HTTP_COOKIE", "GDAL_HTTP_COOKIEFILE", "GDAL_HTTP_PROXY", "GDAL_HTTPS_PROXY", "GDAL_HTTP_PROXYUSERPWD",
    "GDAL_HTTP_UNSAFESSL", "GDAL_HTTP_SSLCERT", "GDAL_HTTP_SSLKEY", "GDAL_HTTP_CAPATH", "GDAL_HTTP_VERSION",
    "AWS_REQUEST_PAYER", "CPL_CURL_VERBOSE",
)
_CA_OPTIONS = ("GDAL_CURL_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")  # curl's order in GDAL
_RETRY_STATUS = (429, 500, 502, 503, 504)
_HTTP: dict[Any, Any] = {}  # CA bundle → urllib3 pool manager, "threads" → executor; per process


def _http_pool(vsi: _Vsi, url: str) -> Any:
    """The process's connection pool for ``url`` with the CA bundle GDAL would use, or None when a proxy
    applies to its host (the proxy environment variables, as curl reads them): then GDAL fetches."""
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    if (parts.scheme in proxies or "all" in proxies) and not urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    ca = next((v for v in map(vsi.option, _CA_OPTIONS) if v), None)
    with _LOCK:
        pool = _HTTP.get(ca)
        if pool is None:
            import urllib3

            pool = _HTTP[ca] = urllib3.PoolManager(num_pools=64, maxsize=32, ca_certs=ca)
        return pool


def _http_threads() -> ThreadPoolExecutor:
    with _LOCK:
        if "threads" not in _HTTP:
            _HTTP["threads"] = ThreadPoolExecutor(16, thread_name_prefix="pixels-xr-ranges")
        return _HTTP["threads"]


def _http_ranges(pool: Any, url: str, spans: list[tuple[int, int]], vsi: str, retry: Any,
                 timeout: float | None) -> list[bytes]:
    """Each ``(offset, length)`` of ``url``, one ranged GET per span, concurrently; errors as GDAL's."""

    def get(span: tuple[int, int]) -> bytes:
        offset, length = span
        try:
            r = pool.request("GET", url, headers={"Range": f"bytes={offset}-{offset + length - 1}"},
                             retries=retry, timeout=timeout, preload_content=True, decode_content=False)
        except Exception as exc:  # urllib3's errors name the signed URL: only the href is named
            raise OSError(f"cannot read ranges of {redact(vsi)}: {type(exc).__name__}") from None
        data = r.data
        if r.status == 200:  # a server that ignores Range sends the whole object
            data = data[offset:offset + length]
        elif r.status != 206:
            raise OSError(f"cannot read ranges of {redact(vsi)}: HTTP error code : {r.status}")
        if len(data) != length:
            raise OSError(f"cannot read ranges of {redact(vsi)}: got {len(data)} of {length} bytes at "
                          f"offset {offset}")
        return data

    if len(spans) == 1:
        return [get(spans[0])]
    try:
        rest = [_http_threads().submit(get, s) for s in spans[1:]]
    except RuntimeError:  # the interpreter is shutting down (a read still running): no new threads
        return [get(s) for s in spans]
    return [get(spans[0]), *(f.result() for f in rest)]


@dataclass(frozen=True)
class CogHeader:
    """The first bytes of a remote raster and its size: what every open of it parses (no request), plus
    whatever else opens needed (IFDs past the first read), fetched once."""

    size: int
    spans: dict[int, bytes]  # offset → bytes

    def covers(self, offset: int, length: int) -> bytes | None:
        """The bytes ``[offset, offset + length)`` when one held span has them all (clipped at the end)."""
        length = max(0, min(length, self.size - offset))
        for start, data in list(self.spans.items()):
            if start <= offset and offset + length <= start + len(data):
                return data[offset - start:offset - start + length]
        return None


def fetch_header(href: str) -> CogHeader:
    """One ranged GET of a remote raster's first ``HEADER_BYTES`` (signed href), in GDAL's cloud settings."""
    vsi = _Vsi.get()
    if vsi is None:
        raise OSError("libgdal not found: cannot share headers")
    with cloud_env():
        data, size = vsi.head(vsi_path(href), HEADER_BYTES)
    return CogHeader(size, {0: data})


def open_header(href: str, header: CogHeader | None) -> Any:
    """A rasterio dataset of ``href`` (signed): parsed from ``header`` in memory when it is known, else
    opened as usual. Call inside the GDAL environment."""
    import rasterio

    if header is None or _Vsi.get() is None:
        return rasterio.open(href)
    return _RemoteSource(href, header, gdal_env(GDAL_CLOUD_ENV)).open()


class _RangeFile(io.RawIOBase, MultiByteRangeResource):
    """A read-only file over a remote raster: the header's bytes from memory, the rest fetched through
    GDAL's virtual file system (GDAL asks for tiles with ``get_byte_ranges``, one call per window)."""

    def __init__(self, source: _RemoteSource) -> None:
        self._source, self._pos = source, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._source.header.size)[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = self._source.header.size if size is None or size < 0 else min(self._pos + size,
                                                                              self._source.header.size)
        if end <= self._pos:
            return b""
        data = self._source.get([(self._pos, end - self._pos)])[0]
        self._pos = end
        return data

    def get_byte_ranges(self, offsets: list[int], sizes: list[int]) -> list[bytes]:
        return self._source.get(list(zip(offsets, sizes)))


class _RemoteSource:
    """What the opener serves for one remote raster: its header, the spans fetched since, and fetches of
    the rest (through GDAL's VSI on the signed href). Shared by every thread's dataset of the asset."""

    def __init__(self, href: str, header: CogHeader, gdal_env: Any) -> None:
        self.href, self._env = href, gdal_env
        self.header = CogHeader(header.size, dict(header.spans))
        self.name = f"pixels-xr/{os.path.basename(href.split('?', 1)[0]) or 'asset'}"
        self._opener = _Opener(self.name, self)
        self._planned: list[tuple[int, int]] = []
        self._lock, self._plan_lock = threading.Lock(), threading.Lock()

    def open(self) -> Any:
        """A rasterio dataset of this raster parsed from the header in memory (no request)."""
        import rasterio

        return rasterio.open(self.name, opener=self._opener, sharing=False)

    def plan(self, ds: Any, offset: tuple[int, int], grid_shape: tuple[int, int]) -> None:
        """Remember the byte ranges of every full-resolution tile of ``ds`` inside the output grid (its
        pixel (0, 0) at ``offset``), to fetch at the first read when they total at most ``PREFETCH_LIMIT``:
        every block of this asset then reads from memory, and tiles next to each other on disk cost one
        request although different blocks need them."""
        try:
            bh, bw = ds.block_shapes[0]
            col, row = offset
            c0, r0 = max(0, -col) // bw, max(0, -row) // bh
            c1 = -(-min(ds.width, grid_shape[1] - col) // bw)
            r1 = -(-min(ds.height, grid_shape[0] - row) // bh)
            spans = [(int(ds.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=1)),
                      int(ds.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=1)))
                     for r in range(r0, r1) for c in range(c0, c1)]
        except (TypeError, ValueError):  # not a tiled GeoTIFF: GDAL asks per window
            return
        # sparse tiles are not stored; GDAL reads a tile with the 4-byte leader and trailer COGs have
        spans = [(max(0, o - _GHOST), n + 2 * _GHOST) for o, n in spans if n > 0]
        if sum(n for _, n in spans) <= PREFETCH_LIMIT:
            self._planned = spans

    def prefetch_planned(self) -> None:
        """Fetch the planned tiles once; a second thread reading meanwhile waits for them."""
        with self._plan_lock:
            spans, self._planned = self._planned, []
            if spans:
                self.prefetch(spans)

    def prefetch(self, spans: list[tuple[int, int]]) -> None:
        """Fetch ``spans`` (merged where they touch) unless already held."""
        size = self.header.size
        missing = [(o, min(n, size - o)) for o, n in spans if o < size and self.header.covers(o, n) is None]
        if missing:
            self._fetch(_merge(missing))

    def get(self, spans: list[tuple[int, int]]) -> list[bytes]:
        self.prefetch(spans)
        return [self.header.covers(*s) or b"" for s in spans]

    def _fetch(self, spans: list[tuple[int, int]]) -> None:
        vsi = _Vsi.get()
        assert vsi is not None
        with self._env.read:
            parts = vsi.ranges(vsi_path(self.href), spans)
        with self._lock:
            for (offset, _), data in zip(spans, parts):
                self.header.spans[offset] = data


class _OpenPerRead:
    """A remote raster opened from its header in memory for each read and closed by the same thread: no
    request (the header and the planned tiles are held by its ``_RemoteSource``), and no dataset outlives
    the thread that opened it (rasterio's opener registry is per thread context, so a dataset closed by
    another thread, or by the garbage collector, cannot reach its opener)."""

    def __init__(self, env: Any, remote: _RemoteSource) -> None:
        self._env, self._remote = env, remote

    def read(self, window: windows.Window, **kwargs: Any) -> np.ndarray:
        with self._env.open, self._remote.open() as ds:
            return ds.read(window=window, **kwargs)

    def close(self) -> None:
        pass


_GHOST = 8  # bytes around a tile that GDAL may read with it (COG tile leader and trailer)


def _merge(spans: list[tuple[int, int]], gap: int = 1024) -> list[tuple[int, int]]:
    """Byte ranges merged where they touch or lie within ``gap`` bytes (tile leaders, trailers)."""
    out: list[list[int]] = []
    for offset, length in sorted(spans):
        if out and offset <= out[-1][0] + out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], offset + length - out[-1][0])
        else:
            out.append([offset, length])
    return [(o, n) for o, n in out]


class _Opener(MultiByteRangeResourceContainer):
    """rasterio's opener for one remote raster: only its own name exists (GDAL's side-car probes —
    ``.aux.xml``, ``.msk``, ``.ovr`` — find nothing, as ``GDAL_DISABLE_READDIR_ON_OPEN`` makes them)."""

    def __init__(self, name: str, source: _RemoteSource) -> None:
        self._name, self._source = name, source

    def open(self, path: str, mode: str = "r", **kwargs: Any) -> _RangeFile:
        if path != self._name:
            raise FileNotFoundError(path)
        return _RangeFile(self._source)

    def isfile(self, path: str) -> bool:
        return path == self._name

    def isdir(self, path: str) -> bool:
        return False

    def ls(self, path: str) -> list[str]:
        return []

    def mtime(self, path: str) -> int:
        return 0

    def size(self, path: str) -> int:
        if path != self._name:
            raise FileNotFoundError(path)
        return self._source.header.size

    def rm(self, path: str) -> None:
        raise PermissionError(path)


# ----------------------------------------------------------------------------------------------- asset checks
class CheckedItems(list):
    """The readable items ``check_assets`` returns, with ``headers``: href → ``CogHeader`` of every remote
    asset it fetched, which ``build_cube`` hands to the readers (as ``search`` results carry ``filtered``)."""

    headers: dict[str, CogHeader]


def known_headers(items: Any) -> dict[str, CogHeader]:
    """The headers ``check_assets`` fetched for ``items`` (none for items it did not return)."""
    return dict(getattr(items, "headers", None) or {})


def check_assets(items: Sequence[ParsedItem | dict], config: PixelsConfig,
                 keep_open: bool | None = None) -> tuple[CheckedItems, list[AssetProblem]]:
    """Open every asset's header (``pool_size`` at a time); returns (readable items, problems). ``items``:
    parsed items, or STAC dicts parsed here (``catalog.as_items``).

    Each problem is ``{"item", "asset", "href", "error"}``. With ``on_asset_error: fail`` the first problem
    raises ``AssetReadError`` naming the item and asset; with ``skip`` (default) the item is left out and
    the problem recorded.

    A local asset is opened and its pixel (0, 0) read. A remote one costs one request, the header read the
    cube's readers then reuse (``CheckedItems.headers``; once per batch run for every feature): its header
    is fetched, parsed from memory, and its first tile must lie inside the file (a file cut short); the
    tile is decoded only when the header read brought it, since fetching it would be a second request.
    ``keep_open``: leave each local file open for this process's first reader of it (``checked_rasters``);
    by default when dask's active scheduler runs tasks here (threads, an in-process cluster), not when
    they run in worker processes, where those open files would only be held.
    """
    import rasterio

    keep = reads_in_this_process() if keep_open is None else keep_open

    signer = signer_for(config.catalog)

    def open_error(href: str) -> tuple[str | None, CogHeader | None]:
        try:
            with read_slots(config.pool_size):
                signed = sign(signer, href).href  # a token API failure is this asset's problem too
                if is_remote(signed) and _Vsi.get() is not None:
                    return None, _checked_header(signed)
                if _local_file(signed) and _checked_local(signed, keep):
                    return None, None
                # outside rasterio's Env for a local file, as its reader reads it (``_LockedDataset``)
                with (nullcontext() if _local_file(signed) else cloud_env()), \
                        rasterio.open(signed) as ds:
                    ds.read(1, window=((0, 1), (0, 1)))
        except Exception as exc:
            return redact(" ".join(str(exc).split()))[:300], None
        return None, None

    def probe(item: ParsedItem, source: RasterSource) -> tuple[AssetProblem | None, CogHeader | None]:
        error, header = memo("asset-header", source.href, lambda: open_error(source.href))  # once per run
        if error is None:
            return None, header
        return AssetProblem(item=item.id, asset=source.name, href=redact(source.href), error=error), None

    parsed = as_items(items, config)
    jobs = [(item, source) for item in parsed for source in item.sources.values()]
    results = list(read_pool(config.pool_size).map(lambda j: probe(*j), jobs))
    problems = [p for p, _ in results if p is not None]
    if problems and config.on_asset_error == "fail":
        p = problems[0]
        raise AssetReadError(f"asset {p['asset']!r} unreadable: {p['error']}", f"item {p['item']!r}")
    bad = {p["item"] for p in problems}
    kept = CheckedItems(i for i in parsed if i.id not in bad)
    kept.headers = {s.href: h for (_, s), (_, h) in zip(jobs, results) if h is not None}
    return kept, problems


def reads_in_this_process() -> bool:
    """Whether dask's active scheduler runs tasks in this process: the threaded or synchronous one, or a
    default distributed client of an in-process cluster; not processes, nor a client of worker
    processes, nor a scheduler it does not know."""
    import dask.base
    import dask.local
    import dask.threaded

    scheduler = dask.base.get_scheduler()
    if scheduler is None or scheduler in (dask.threaded.get, dask.local.get_sync):
        return True  # None: dask's default for arrays, the threaded scheduler
    address = getattr(getattr(getattr(scheduler, "__self__", None), "scheduler", None), "address", None)
    return isinstance(address, str) and address.startswith("inproc://")


def _checked_local(path: str, keep: bool = True) -> bool:
    """Check a local file as rasterio would (it opens, and its pixel (0, 0) reads) through GDAL's C API
    (``local_raster``: half the cost), opened as the cube's readers open it and, with ``keep``, left open
    for the first of them (``checked_rasters``). False when that binding cannot read it (rasterio then
    checks it)."""
    options = _reader_open_options()
    stamp = file_stamp(path) if keep else None
    try:
        raster = LocalRaster.open(path, options)
    except LookupError:
        return False
    try:
        if raster.dtype is None or not raster.count:
            raster.close()
            return False
        raster.read(windows.Window(0, 0, 1, 1))
    except BaseException:
        raster.close()
        raise
    checked_rasters.put(path, options, raster, stamp)  # closed there without a stamp
    return True


@functools.cache
def _reader_open_options() -> dict[str, Any]:
    return dict(gdal_env(GDAL_CLOUD_ENV).open.options)


class CheckedRasters:
    """Local rasters the asset check opened, each handed to the first reader of that file in this process
    that opens it with the same options while the file is unchanged (same inode, size and modification
    time): the check's open, and its decode of the first tile (kept in GDAL's block cache), are then the
    read's, not a second open of every asset (measured: RESULTS.md, ``end-to-end``).

    Bounded (``limit``, oldest closed first; by default an eighth of the process's file descriptors, at
    most 1,024): where the check runs on a client whose workers read in other processes, nothing takes them.
    """

    def __init__(self, limit: int | None = None) -> None:
        if limit is None:
            try:
                import resource
            except ImportError:  # not a Unix
                limit = 128
            else:
                soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                limit = 1024 if soft == resource.RLIM_INFINITY else max(16, min(1024, soft // 8))
        self._limit = limit
        self._open: dict[tuple[str, frozenset], tuple[tuple[int, int, int], int, LocalRaster]] = {}
        self._lock = threading.Lock()

    def put(self, path: str, options: dict[str, Any], raster: LocalRaster,
            stamp: tuple[int, int, int] | None) -> None:
        """Keep ``raster`` for ``take``; ``stamp`` is ``file_stamp(path)`` taken *before* it was opened (a
        file replaced during the open then fails the comparison); without one it is closed, not kept."""
        if stamp is None:
            raster.close()
            return
        key = (path, _options_key(options))
        with self._lock:
            old = self._open.pop(key, None)
            self._open[key] = (stamp, os.getpid(), raster)
            oldest = [self._open.pop(k)[2] for k in list(self._open)[:max(0, len(self._open) - self._limit)]]
        for r in [*([old[2]] if old else []), *oldest]:
            r.close()

    def take(self, path: str, options: dict[str, Any]) -> LocalRaster | None:
        with self._lock:
            entry = self._open.pop((path, _options_key(options)), None)
        if entry is None:
            return None
        stamp, pid, raster = entry
        if pid != os.getpid():  # inherited through a fork: the parent's dataset and file offset, not ours
            return None
        if stamp != file_stamp(path):  # replaced or rewritten since the check: open it as it is now
            raster.close()
            return None
        return raster

    def forget(self) -> None:
        """Drop every entry without closing it (a forked child: the datasets are its parent's)."""
        with self._lock:
            self._open.clear()

    def __len__(self) -> int:
        return len(self._open)


def _options_key(options: dict[str, Any]) -> frozenset:
    return frozenset((k, str(v)) for k, v in options.items())


def file_stamp(path: str) -> tuple[int, int, int] | None:
    """(inode, size, modification time in ns) of a local file, None when it cannot be stat'ed (a GDAL-only
    syntax such as ``GTIFF_DIR:1:…``, or gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


checked_rasters = CheckedRasters()


def _checked_header(href: str) -> CogHeader:
    """A remote asset's header (one request), checked as the local check checks a file: it opens, and its
    first tile is inside the file (decoded when the header read brought it)."""
    header = fetch_header(href)
    source = _RemoteSource(href, header, gdal_env(GDAL_CLOUD_ENV))
    with cloud_env(), source.open() as ds:
        try:
            first = (int(ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1)),
                     int(ds.get_tag_item("BLOCK_SIZE_0_0", "TIFF", bidx=1)))
        except (TypeError, ValueError):  # not a tiled GeoTIFF: read pixel (0, 0) as for a local file
            first = None
        if first is not None and sum(first) > header.size:
            raise OSError(f"{redact(href)}: file cut short: its first tile ends at byte {sum(first)}, "
                          f"the file has {header.size}")
        if first is None or source.header.covers(*first) is not None:
            ds.read(1, window=((0, 1), (0, 1)))
    return CogHeader(header.size, source.header.spans)
