"""Render a PXM manifest to web-map tilesets on Dask: meta-tile tasks, a pyramid of stages, atomic outputs.

Work is cut into blocks of ``n`` × ``n`` tiles (n·tile_size = 2048 px). **Stage 0** renders each block of
the max zoom from the sources (``warp.render_block``: mosaic, first source wins) and reduces it inside the
task down to one tile (zooms z … z − log2 n). **Later stages** gather the one-tile tops of n × n finished
blocks (alpha-weighted 2× reductions only, from ``pyramid``) and reduce them again, until the min zoom: full
resolution is read once, never per zoom. Tasks run at most two per thread in flight; their tiles are recorded
in a resumable scratch store and written to every tileset at the end (``archives``).

**Where tasks run** (``cluster``): ``"threads"`` (the default) is a pool of threads in this process, one per
core unless ``cluster_options={"workers": n}``; ``"local"`` a Dask ``LocalCluster`` of worker processes; a
scheduler address or ``"gateway"`` a Dask cluster elsewhere (see ``cluster.open_client``). Threads are the
default because a task's work releases the GIL — GDAL's reads and warps, pyproj, the numba passes
(``nogil``), libdeflate and zlib — so threads use every core, and a render then pays the start-up of one
process, not of a client, a scheduler and one process per worker, each importing distributed, rasterio and
numba (measured in ``benchmarks/bench_pxm_render.py``: RESULTS.md ``pxm-render``).

**Unreadable sources** (missing, truncated, refused by ``sources.open_source``): the render goes on with
the rest, so one run names them all, but writes no tileset (an output silently missing a source's pixels
would also pass for up to date on the next run). Every source is opened first; if any fails, nothing is
rendered. A source failing while blocks render (a truncated file opens, then a block read fails) costs
the blocks that read it: they are not stored, every other block is, the reduction stages are skipped and
:class:`UnreadableSources` is raised carrying the :class:`RenderReport` (``failed_sources``); a re-run of
the same manifest once the files are fixed resumes from the stored blocks. Errors leave the workers
as plain ``PixelsError`` text (GDAL's chained exceptions do not unpickle on the client).

**Interrupts**: on threads, Ctrl-C cancels the queued tasks and waits for the running ones (one block
each). Workers of a local cluster made here ignore SIGINT (a terminal's Ctrl-C reaches the whole process
group), so only this process handles it: it cancels the tasks, quiets the workers' cancellation warnings
and closes the cluster. Either way no output is half-written (outputs are renamed into place when
complete) and finished blocks stay in the scratch store for a resume.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import queue
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mercantile
import numpy as np
from rasterio.enums import Resampling

from pixels_xr.errors import ConfigError, OutputError, PixelsError, SourceError
from pixels_xr.io.storage import check_url
from pixels_xr.pxm.archives import (
    OUTPUT_FORMATS,
    OutputFormat,
    TileRow,
    TilesetMeta,
    TileStore,
    output_fingerprint,
    output_name,
    output_path,
    remote_exists,
    remote_fingerprint,
    remote_partial,
    write_output,
    write_remote,
)
from pixels_xr.pxm.color import format_formula
from pixels_xr.pxm.encode import TILE_FORMATS, TileFormat, encode_tile
from pixels_xr.pxm.manifest import Manifest, validate_manifest
from pixels_xr.pxm.pyramid import downsample, pack, split_tiles, unpack
from pixels_xr.pxm.sources import GDAL_ERRORS, MAX_PIXELS, gdal_message
from pixels_xr.pxm.tiles import MAX_ZOOM, Bounds, default_minzoom, morton, native_zoom, tiles_in
from pixels_xr.pxm.warp import SourceSpec, describe_source, render_block

__all__ = ["BLOCK_PIXELS", "RESAMPLING", "RenderReport", "UnreadableSources", "render"]

RENDER_VERSION = 1
BLOCK_PIXELS = 2048
RESAMPLING: tuple[str, ...] = ("nearest", "bilinear", "cubic", "cubic_spline", "lanczos", "average")
Failures = tuple[tuple[str, str], ...]  # (source URI, message) per source that failed in a task
TaskOut = tuple[list[TileRow], tuple[int, int, int, bytes] | None, Failures]


@dataclass(frozen=True)
class RenderReport:
    """What a render did: outputs per tileset id, zooms, tiles written (per zoom/format), bytes, time."""

    outputs: dict[str, Path | str]  # local paths, or URLs on object storage
    format: str
    tile_format: str
    tile_size: int
    minzoom: int
    maxzoom: int
    tiles: int
    tiles_by_zoom: dict[int, int] = field(default_factory=dict)
    tiles_by_format: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    tasks: int = 0
    resumed_tasks: int = 0
    seconds: float = 0.0
    skipped: bool = False
    failed_sources: dict[str, str] = field(default_factory=dict)
    failed_tasks: int = 0
    work: Path | None = None

    @property
    def complete(self) -> bool:
        """Whether every source rendered and the outputs were written (or were already up to date)."""
        return not self.failed_sources

    def __str__(self) -> str:
        if self.failed_sources:
            return (f"no tileset written: {len(self.failed_sources)} source(s) unreadable; "
                    f"{self.tasks - self.failed_tasks} of {self.tasks} block task(s) rendered"
                    + (f" (+{self.resumed_tasks} from an earlier run)" if self.resumed_tasks else "")
                    + f" and kept in {self.work} for a re-run of this manifest once the sources are fixed")
        if self.skipped:
            return f"up to date: {', '.join(map(str, self.outputs.values()))} (nothing to do)"
        rate = self.tiles / self.seconds if self.seconds else 0.0
        return (f"{self.tiles} tiles, zooms {self.minzoom}-{self.maxzoom}, {self.bytes / 1e6:.1f} MB, "
                f"{self.seconds:.1f} s ({rate:.0f} tiles/s), {self.tasks} tasks"
                + (f" ({self.resumed_tasks} resumed)" if self.resumed_tasks else "")
                + f" -> {', '.join(map(str, self.outputs.values()))}")


class UnreadableSources(SourceError):
    """Sources that could not be read; nothing was written.

    ``failures`` maps each source URI to its first error message (``where`` and the message are the first
    one's); ``report`` is the :class:`RenderReport` when blocks had been rendered (None when a source
    failed to open, before any rendering).
    """

    def __init__(self, failures: dict[str, str], report: RenderReport | None = None) -> None:
        uri, message = next(iter(failures.items()))
        more = len(failures) - 1
        super().__init__(message + (f" (and {more} more unreadable source(s))" if more else ""), where=uri)
        self.failures = dict(failures)
        self.report = report

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.failures, self.report))


# ------------------------------------------------------------------------------------------------ tasks


def _emit(img: np.ndarray, z: int, x0: int, y0: int, n: int, tile_size: int, tile_format: TileFormat,
          minzoom: int) -> tuple[list[TileRow], tuple[int, int, int, bytes] | None]:
    """Encode the tiles of a block image and reduce it zoom by zoom to one tile (or to ``minzoom``)."""
    tiles: list[TileRow] = []
    while True:
        for i, j, tile in split_tiles(img, tile_size):
            enc = encode_tile(tile, tile_format)
            if enc is not None:
                tiles.append((z, x0 + i, y0 + j, *enc))
        if n == 1 or z == minzoom:
            break
        img, z, n, x0, y0 = downsample(img), z - 1, n // 2, x0 // 2, y0 // 2
    packed = pack(img) if n == 1 and z > minzoom else None
    return tiles, None if packed is None else (z, x0, y0, packed)


def _worker_task(fn: Callable[..., TaskOut]) -> Callable[..., TaskOut]:
    """Errors leave a task as a fresh PixelsError (message and where): no chained GDAL exception, which
    tblib pickles on the worker but cannot unpickle on the client (it became a bare ``Exception``)."""

    @functools.wraps(fn)
    def task(*args: Any) -> TaskOut:
        try:
            return fn(*args)
        except PixelsError as err:
            clean: PixelsError = type(err)(err.message, err.where)
        except GDAL_ERRORS as err:
            clean = SourceError(gdal_message(err), where=f"render task {fn.__name__}")
        raise clean  # outside the handler: no __context__

    return task


@_worker_task
def leaf_task(specs: tuple[SourceSpec, ...], z: int, bx: int, by: int, n: int, tile_size: int,
              resampling: Resampling, tile_format: TileFormat, minzoom: int) -> TaskOut:
    """Stage 0: render block (bx, by) of the max zoom from the sources, then its reductions.

    A block where some source failed returns no tiles, only the failures (it is not stored)."""
    failures: list[tuple[str, str]] = []
    img = render_block(specs, z, bx * n, by * n, n, tile_size, resampling, failures)
    if failures:
        return [], None, tuple(failures)
    if img is None:
        return [], None, ()
    return (*_emit(img, z, bx * n, by * n, n, tile_size, tile_format, minzoom), ())


@_worker_task
def stage_task(children: dict[tuple[int, int], bytes], zc: int, bx: int, by: int, n: int, tile_size: int,
               tile_format: TileFormat, minzoom: int) -> TaskOut:
    """Later stages: n × n child tiles of zoom ``zc`` (packed RGBA) → their parents down to one tile."""
    size = n * tile_size
    img = np.zeros((size, size, 4), dtype=np.uint8)
    for (i, j), data in children.items():
        img[j * tile_size:(j + 1) * tile_size, i * tile_size:(i + 1) * tile_size] = unpack(data)
    tiles, top = _emit(downsample(img), zc - 1, bx * n // 2, by * n // 2, n // 2, tile_size, tile_format, minzoom)
    return tiles, top, ()


# ---------------------------------------------------------------------------------------------- planning


def _block_counts(cand: np.ndarray, shifts: range, m: int) -> dict[tuple[int, int], int]:
    """Candidate tiles per block over the zooms a task emits (``cand`` at the task's input zoom)."""
    counts: dict[tuple[int, int], int] = {}
    for s in shifts:
        tiles = np.unique(cand >> s, axis=0)
        keys, num = np.unique(tiles >> (m - s), axis=0, return_counts=True)
        for (bx, by), k in zip(keys.tolist(), num.tolist(), strict=True):
            counts[(bx, by)] = counts.get((bx, by), 0) + k
    return counts


def _check_options(fmt: str, tile_format: str, tile_size: int, resampling: str | Resampling) -> Resampling:
    if fmt not in OUTPUT_FORMATS:
        raise OutputError(f"unknown output format {fmt!r}; use {', '.join(OUTPUT_FORMATS)}", where="format")
    if tile_format not in TILE_FORMATS:
        raise OutputError(f"unknown tile format {tile_format!r}; use {', '.join(TILE_FORMATS)}",
                          where="tile_format")
    if tile_size not in (256, 512):
        raise OutputError(f"tile size must be 256 or 512, got {tile_size!r}", where="tile_size")
    name = resampling.name if isinstance(resampling, Resampling) else str(resampling)
    if name not in RESAMPLING:
        raise OutputError(f"unknown resampling {name!r}; use {', '.join(RESAMPLING)}", where="resampling")
    return Resampling[name]


def _zooms(specs: tuple[SourceSpec, ...], tile_size: int, minzoom: int | None,
           maxzoom: int | None) -> tuple[int, int]:
    for name, value in (("minzoom", minzoom), ("maxzoom", maxzoom)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value <= MAX_ZOOM):
            raise OutputError(f"must be an integer 0-{MAX_ZOOM}, got {value!r}", where=name)
    top = maxzoom if maxzoom is not None else max(native_zoom(s.res, tile_size) for s in specs)
    low = minzoom if minzoom is not None else default_minzoom(_union(specs), top)
    if low > top:
        raise OutputError(f"minzoom {low} is above maxzoom {top}", where="minzoom")
    return low, top


def _union(specs: tuple[SourceSpec, ...]) -> Bounds:
    return (min(s.bounds[0] for s in specs), min(s.bounds[1] for s in specs),
            max(s.bounds[2] for s in specs), max(s.bounds[3] for s in specs))


def _lonlat(bounds: Bounds) -> tuple[float, float, float, float]:
    west, south = mercantile.lnglat(bounds[0], bounds[1])
    east, north = mercantile.lnglat(bounds[2], bounds[3])
    return west, south, east, north


def _fingerprint(manifest: Manifest, specs: tuple[SourceSpec, ...], opts: dict[str, Any]) -> str:
    info = manifest.info
    doc = {
        "render": RENDER_VERSION, **opts,
        "sources": [[s.uri, s.bidx, s.crs, s.ndv, format_formula(list(s.ops)) if s.ops else ""]
                    for s in specs],
        "info": [info.license, info.notes, info.product, info.date],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- running


class _Threads:
    """A pool of threads in this process with the part of ``distributed.Client`` that ``_run`` uses."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="pxm-render")

    def nthreads(self) -> dict[str, int]:
        return {"threads": self.threads}

    def scatter(self, data: Any, broadcast: bool = False) -> Any:
        return data  # shared memory: nothing to send

    def submit(self, fn: Callable[..., Any], *args: Any, pure: bool = True) -> Future:
        return self.pool.submit(fn, *args)


class _Completed:
    """Futures of a ``_Threads`` pool in completion order (what ``distributed.as_completed`` does for a
    client): ``add`` them, iterate until every added one is out."""

    def __init__(self) -> None:
        self.done: queue.SimpleQueue[Future] = queue.SimpleQueue()
        self.pending = 0

    def add(self, fut: Future) -> None:
        self.pending += 1
        fut.add_done_callback(self.done.put)

    def __iter__(self) -> Iterator[Future]:
        while self.pending:
            fut = self.done.get()
            self.pending -= 1
            yield fut


def _threads(options: dict[str, Any] | None) -> int:
    """Threads of a ``"threads"`` render: ``options["workers"]`` (1 … 4 per core), else one per core."""
    options = dict(options or {})
    value = options.pop("workers", None)
    if options:
        raise ConfigError(f"cluster 'threads' takes only workers, not {', '.join(sorted(options))}", "cluster")
    cores = os.cpu_count() or 1
    if value is None:
        return cores
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4 * cores:
        raise ConfigError(f"must be a whole number from 1 to {4 * cores} (4 threads per core), got {value!r}",
                          "cluster.workers")
    return value


@contextlib.contextmanager
def _client(cluster: str | None, client: Any, cluster_options: dict[str, Any] | None,
            quiet: bool) -> Iterator[Any]:
    """The given client (its workers get the GDAL/AWS environment), a pool of threads in this process
    (``"threads"``, the default), or a client from ``cluster.open_client``.

    Workers of a local cluster made here ignore SIGINT; on KeyboardInterrupt the workers' and this
    process's distributed loggers are quieted before the cluster closes (its tasks are cancelled). A
    thread pool cancels its queued tasks and waits for the running ones.
    """
    spec = (cluster or "threads").strip()
    if client is None and spec == "threads":
        pool = _Threads(_threads(cluster_options))  # checked by render already
        try:
            yield pool
        finally:
            pool.pool.shutdown(wait=True, cancel_futures=True)
        return
    from pixels_xr.cluster import EnvironmentPlugin, open_client, worker_environment
    from pixels_xr.pxm.interrupts import IgnoreInterrupts, quiet_worker

    if client is not None:
        client.register_plugin(EnvironmentPlugin(worker_environment()))
        yield client
        return
    log = logging.getLogger("distributed")
    level = log.level
    try:
        with open_client(spec, cluster_options, quiet=quiet) as made:
            if spec == "local":
                made.register_plugin(IgnoreInterrupts())
            try:
                yield made
            except KeyboardInterrupt:
                log.setLevel(logging.ERROR)  # the cluster's close reports every cancelled task
                with contextlib.suppress(Exception):
                    made.run(quiet_worker, wait=False)
                raise
    finally:
        log.setLevel(level)


def _run(client: Any, fn: Callable[..., TaskOut], jobs: Iterator[tuple[tuple[int, int], tuple[Any, ...]]],
         done: Callable[[tuple[int, int], TaskOut], None]) -> int:
    """Submit ``fn(*args)`` per job (args made lazily) with at most 2 per worker thread in flight.

    ``done(key, result)`` runs on each result in completion order; returns the number of tasks run.
    """
    if isinstance(client, _Threads):
        completed: Any = _Completed()
    else:
        from distributed import as_completed

        completed = as_completed()
    window = max(2, 2 * sum(client.nthreads().values()))
    running: dict[Any, tuple[int, int]] = {}
    count = 0

    def submit() -> None:
        nonlocal count
        job = next(jobs, None)
        if job is not None:
            fut = client.submit(fn, *job[1], pure=False)
            running[fut] = job[0]
            completed.add(fut)
            count += 1

    for _ in range(window):
        submit()
    for fut in completed:
        key = running.pop(fut)
        result = fut.result()
        if hasattr(fut, "release"):
            fut.release()
        done(key, result)
        submit()
    return count


def _progress(enabled: bool, total: int) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("rendering tiles"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not enabled, transient=False)
    task = bar.add_task("tiles", total=total)
    return bar, lambda k: bar.advance(task, k)


def render(
    manifest: Manifest | str | Path | dict,
    out: str | Path,
    *,
    format: OutputFormat = "mbtiles",
    tile_format: TileFormat = "auto",
    tile_size: int = 256,
    minzoom: int | None = None,
    maxzoom: int | None = None,
    resampling: str | Resampling = "bilinear",
    cluster: str | None = "threads",
    client: Any = None,
    cluster_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    max_pixels: int | None = MAX_PIXELS,
) -> RenderReport:
    """Render a PXM manifest's sources to one tileset per ``info.tilesets`` id under the folder ``out``.

    ``format``: ``mbtiles`` (``out/<id>.mbtiles``), ``pmtiles`` (``out/<id>.pmtiles``) or ``xyz``
    (``out/<id>/{z}/{x}/{y}.<ext>``). ``out`` may be an object-storage URL (``s3://bucket/prefix``): each
    tileset is uploaded when complete (atomic per archive object; XYZ: ``metadata.json`` last), the
    scratch store then lives in the temporary folder (see :mod:`pixels_xr.pxm.archives`). Zooms default to
    the rules in :mod:`pixels_xr.pxm.tiles`. Tasks run on ``client`` when one is given, else on
    ``cluster``: ``"threads"`` (this process; ``cluster_options={"workers": n}`` threads, default one per
    core) or what :func:`pixels_xr.cluster.open_client` takes with ``cluster_options``.
    An output already made from the same manifest and options is kept (no-op); one made differently is an
    error unless ``overwrite``. An interrupted render resumes from ``out/.pxm-render-*`` (removed on success).
    A source declaring more than ``max_pixels`` pixels is refused (None: no limit). Unreadable sources
    raise :class:`UnreadableSources` after the rest was rendered, with nothing written (module docstring).
    """
    t0 = time.perf_counter()
    if not isinstance(manifest, Manifest):
        manifest = validate_manifest(manifest)
    rs = _check_options(format, tile_format, tile_size, resampling)
    if client is None and (cluster or "threads").strip() == "threads":
        _threads(cluster_options)
    remote = _remote_url(out)
    if remote is None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise OutputError("exists and is not a folder", where=str(out))
    described, failed = [], {}
    for uri in manifest.sources:  # open them all: one run names every source that cannot be opened
        try:
            described.append(describe_source(uri, manifest.info, manifest.color_ops(uri), max_pixels))
        except SourceError as err:
            failed.setdefault(uri, err.message)
    if failed:
        raise UnreadableSources(failed)
    specs = tuple(described)
    low, top = _zooms(specs, tile_size, minzoom, maxzoom)
    fp = _fingerprint(manifest, specs, {"tile_format": tile_format, "tile_size": tile_size, "minzoom": low,
                                        "maxzoom": top, "resampling": rs.name})
    paths: dict[str, Path | str]
    if remote is None:
        paths = {ts: output_path(out, ts, format) for ts in manifest.info.tilesets}
    else:
        paths = {ts: f"{remote}/{output_name(ts, format)}" for ts in manifest.info.tilesets}
    todo = {}
    for ts, path in paths.items():
        if isinstance(path, Path):
            found, there = output_fingerprint(path, format), path.exists()
        else:
            found = remote_fingerprint(path, format)
            # an interrupted upload of this very render is not in the way: it resumes
            there = found is not None or (remote_partial(path, format) != fp and remote_exists(path, format))
        if found != fp and there and not overwrite:
            raise OutputError("exists from another manifest or other options (pass overwrite to replace it)",
                              where=str(path))
        if found != fp:
            todo[ts] = path
    common = dict(outputs=paths, format=format, tile_format=tile_format, tile_size=tile_size, minzoom=low,
                  maxzoom=top)
    if not todo:
        return RenderReport(**common, tiles=0, seconds=time.perf_counter() - t0, skipped=True)
    work = _work_folder(out if remote is None else remote, fp)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create: {err.strerror or err}", where=str(work)) from None
    store = TileStore(work / "store.sqlite", fp)
    try:
        with _client(cluster, client, cluster_options, quiet=not progress) as cl:
            tasks, resumed, failed, failed_tasks = _pyramid(cl, store, specs, low, top, tile_size, rs,
                                                            tile_format, progress)
        if failed:  # the scratch store keeps every block rendered without a failure, for a re-run
            raise UnreadableSources(failed, RenderReport(
                **common, tiles=0, tasks=tasks, resumed_tasks=resumed, seconds=time.perf_counter() - t0,
                failed_sources=failed, failed_tasks=failed_tasks, work=work))
        by_zoom, by_fmt, size = store.summary()
        if not by_zoom:
            shutil.rmtree(work, ignore_errors=True)
            raise OutputError(f"no valid pixel in zooms {low}-{top}: nothing to write", where=str(out))
        declared = next(iter(by_fmt)) if len(by_fmt) == 1 else "png"
        info = manifest.info
        for ts, path in todo.items():
            meta = TilesetMeta(name=ts, format=declared, bounds=_lonlat(_union(specs)), minzoom=min(by_zoom),
                               maxzoom=max(by_zoom), attribution=info.license, description=info.notes,
                               product=info.product, date=info.date, tile_size=tile_size, fingerprint=fp)
            if isinstance(path, Path):
                write_output(store, path, format, meta)
            else:
                write_remote(store, path, format, meta, work)
    finally:
        store.close()
    shutil.rmtree(work, ignore_errors=True)
    return RenderReport(**common, tiles=sum(by_zoom.values()), tiles_by_zoom=by_zoom, tiles_by_format=by_fmt,
                        bytes=size, tasks=tasks, resumed_tasks=resumed, seconds=time.perf_counter() - t0)


def _remote_url(out: str | Path) -> str | None:
    """``out`` as an object-storage URL without a trailing slash (``s3://b/p``), None for a local folder."""
    text = str(out)
    if not re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", text):
        return None
    if isinstance(out, Path) or "://" not in text:  # a Path collapsed the // of s3://…
        raise OutputError("give an object-storage URL as a string, not a path", where=text)
    if text.startswith("file://"):
        raise OutputError("give a local folder as a plain path", where=text)
    url = check_url(text).rstrip("/")
    if not url.split("://", 1)[1]:
        raise OutputError("names no bucket", where=text)
    return url


def _work_folder(out: Path | str, fp: str) -> Path:
    """The scratch folder of a render: beside a local output, in the temporary folder for a remote one
    (named by the URL and the fingerprint, so a re-run finds it and resumes)."""
    if isinstance(out, Path):
        return out / f".pxm-render-{fp[:16]}"
    where = hashlib.sha256(out.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "pixels-xr-pxm" / f"{where}-{fp[:16]}"


def _pyramid(client: Any, store: TileStore, specs: tuple[SourceSpec, ...], low: int, top: int,
             tile_size: int, rs: Resampling, tile_format: TileFormat,
             progress: bool) -> tuple[int, int, dict[str, str], int]:
    """Run stage 0 and the reduction stages.

    Returns (tasks run, tasks reused from an earlier run, {source: message} of unreadable sources, tasks
    that hit one). A task with failures is not stored; after a stage with failures no later stage runs.
    """
    n = BLOCK_PIXELS // tile_size
    m = int(math.log2(n))
    cand = tiles_in((s.bounds for s in specs), top)
    total = sum(len(np.unique(cand >> s, axis=0)) for s in range(top - low + 1))
    bar, advance = _progress(progress, total)
    tasks = resumed = failed_tasks = 0
    failed: dict[str, str] = {}
    with bar:
        spec_future = client.scatter(specs, broadcast=True)
        stage, zc = 0, top
        while True:
            first = stage == 0
            shifts = range(0, min(m, zc - low) + 1) if first else range(1, min(m, zc - low) + 1)
            counts = _block_counts(cand, shifts, m)
            done = store.done(stage)
            present = None if first else {(x >> m, y >> m) for x, y in store.top_tiles(zc)}
            run = [b for b in sorted(counts, key=lambda b: morton(*b))
                   if b not in done and (present is None or b in present)]
            resumed += len(done & counts.keys())
            advance(sum(counts.values()) - sum(counts[b] for b in run))

            def args(block: tuple[int, int]) -> tuple[Any, ...]:
                bx, by = block
                if first:
                    return (spec_future, zc, bx, by, n, tile_size, rs, tile_format, low)
                return (store.tops(zc, bx * n, by * n, n), zc, bx, by, n, tile_size, tile_format, low)

            def finished(block: tuple[int, int], result: TaskOut) -> None:
                nonlocal failed_tasks
                tiles, top_tile, failures = result
                if failures:
                    failed_tasks += 1
                    for uri, message in failures:
                        failed.setdefault(uri, message)
                else:
                    store.add(stage, block, tiles, top_tile)
                advance(counts[block])

            tasks += _run(client, leaf_task if first else stage_task, ((b, args(b)) for b in run), finished)
            zc -= m
            if failed or zc <= low or not store.top_tiles(zc):
                return tasks, resumed, failed, failed_tasks
            cand = np.unique(cand >> m, axis=0)
            stage += 1
