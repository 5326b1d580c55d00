"""Dask clusters behind one call: a LocalCluster, a running scheduler's address, or Dask Gateway.

``open_client(cluster)`` yields a ``distributed.Client`` and closes whatever it created:

- ``"local"`` (default): a ``LocalCluster`` sized to the machine — one worker process per 2 cores (at least
  one), threads filling the cores, memory split evenly from what the machine has;
- ``"tcp://host:port"`` (or any ``scheme://`` address): connect to that scheduler, create nothing;
- ``"gateway"``: a new Dask Gateway cluster. Address, proxy and auth come from ``GatewayOptions`` or from
  dask-gateway's own configuration (``DASK_GATEWAY__ADDRESS``, ``DASK_GATEWAY__AUTH__TYPE``, …); fixed
  size or adaptive (``adapt_min``/``adapt_max``); ``cluster_options`` go to the gateway's options form.

GDAL/AWS settings travel to every worker through a worker plugin (the client's current values of the
variables named in ``FORWARDED_PREFIXES``), so workers read cloud assets exactly like the client; where
neither the client nor the worker sets them, ``WORKER_DEFAULTS`` apply. The dashboard link is printed to
stderr when ``quiet`` is false.

Sizes are checked before anything starts (``check_options``): workers ≥ 1 (and at most
``max_local_workers()`` for a local cluster), threads ≥ 1, ``memory_limit`` a byte size, a fraction or
``"auto"`` (``parse_memory_limit``). A local cluster's worker processes are started with SIGINT blocked,
so that Ctrl-C in a terminal (sent to the whole process group) interrupts only the client, which then
closes the cluster within ``CLOSE_TIMEOUT`` seconds and kills any worker process still alive after it.
Its workers are spawned processes that re-import the ``__main__`` script; a script that starts a local
cluster at its top level, outside ``if __name__ == "__main__":``, is refused with one clear error instead
of dask's "Nanny failed to start" after a long wait.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import math
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import dask
import psutil
from dask.utils import format_bytes, parse_bytes
from distributed import Client, LocalCluster
from distributed.deploy.spec import SpecCluster
from distributed.diagnostics.plugin import WorkerPlugin
from pydantic import ValidationError

from pixels_xr.config import ClusterOptions
from pixels_xr.errors import ConfigError, PixelsError

#: Environment variables (by prefix) copied to workers: GDAL/PROJ tuning and object-store credentials.
FORWARDED_PREFIXES = ("GDAL_", "CPL_", "VSI_", "AWS_", "AZURE_", "GS_", "GOOGLE_", "PROJ_", "PIXELS_XR_")
#: Worker settings used where neither the client nor the worker's own environment has one. GDAL's block
#: cache defaults to 5 % of RAM per process and fills with tiles a chunked read never asks for twice: one
#: 5376×3072 px field over 48 items peaked at 1.46 GB per worker with it, 0.84 GB with 64 MB
#: (``benchmarks/bench_batch.py --big``).
WORKER_DEFAULTS = {"GDAL_CACHEMAX": "128"}
#: Seconds a local cluster gets to close (client first, then cluster) before its worker processes are killed.
CLOSE_TIMEOUT = 15
#: Smallest ``memory_limit`` per worker: a worker process with its imports already holds ~150 MB, and dask
#: pauses a worker past 80 % of its limit, so less than this would stall the run instead of running it.
MIN_WORKER_MEMORY = 256 * 2**20


def max_local_workers() -> int:
    """Most worker processes a local cluster may start: 4 per core, at most 256.

    Each worker is a process with its own imports (~150 MB) and its share of memory; past a few per core
    they only compete for the same cores, and a number like 100000 would exhaust memory and process slots
    while the cluster waits for workers that never come. For more concurrent reads per core raise
    ``threads_per_worker`` (or the config's ``pool_size``) instead.
    """
    return max(1, min(256, 4 * (os.cpu_count() or 1)))


def check_workers(value: Any, where: str, *, local: bool) -> int:
    """A worker count: a whole number ≥ 1, and at most ``max_local_workers()`` for a local cluster."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"must be a whole number, got {value!r}", where)
    if value < 1:
        raise ConfigError(f"must be at least 1, got {value}", where)
    limit = max_local_workers()
    if local and value > limit:
        raise ConfigError(f"{value} workers is more than a local cluster on {os.cpu_count() or 1} cores takes "
                          f"(at most {limit}: 4 processes per core); for more concurrency raise "
                          "threads_per_worker", where)
    return value


def parse_memory_limit(value: Any, where: str = "cluster.memory_limit") -> int | float | str | None:
    """``cluster.memory_limit`` as ``LocalCluster`` takes it, checked: ``None`` (the machine's memory split
    evenly), ``"auto"`` (dask's split by threads), a fraction in (0, 1] of the machine's memory per worker
    (``0.5`` or ``"0.5"``), or a size per worker (``"4GiB"``, ``"2 GB"``, ``4e9``) of at least
    ``MIN_WORKER_MEMORY``. Anything else is a ``ConfigError`` at ``where``."""
    if value is None:
        return None
    hint = "use a size such as '4GiB' or '2 GB', a fraction of the machine's memory such as 0.5, or 'auto'"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{value!r} is not a memory size; {hint}", where)
    text = str(value).strip()
    if text.lower() == "auto":
        return "auto"
    try:
        number: float | None = float(text)
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number) or number <= 0:
            raise ConfigError(f"{text!r} is not a memory size; {hint}", where)
        if number <= 1:
            return number
        nbytes = int(number)
    else:
        try:
            nbytes = parse_bytes(text)
        except (ValueError, TypeError, OverflowError):
            raise ConfigError(f"{text[:40]!r} is not a memory size; {hint}", where) from None
    if nbytes < MIN_WORKER_MEMORY:
        raise ConfigError(f"{text!r} is {format_bytes(max(nbytes, 0))} per worker; a worker needs at least "
                          f"{format_bytes(MIN_WORKER_MEMORY)}", where)
    return nbytes


def check_options(opts: ClusterOptions, *, local: bool) -> None:
    """Every sizing field of ``opts`` checked before a cluster is asked for (see the module docstring)."""
    if opts.workers is not None:
        check_workers(opts.workers, "cluster.workers", local=local)
    for name in ("threads_per_worker", "adapt_max"):
        value = getattr(opts, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"must be a whole number ≥ 1, got {value!r}", f"cluster.{name}")
    if opts.adapt_min is not None and (not isinstance(opts.adapt_min, int) or opts.adapt_min < 0):
        raise ConfigError(f"must be a whole number ≥ 0, got {opts.adapt_min!r}", "cluster.adapt_min")
    if opts.adapt_min is not None and opts.adapt_max is not None and opts.adapt_min > opts.adapt_max:
        raise ConfigError(f"adapt_min {opts.adapt_min} is above adapt_max {opts.adapt_max}", "cluster.adapt_min")
    parse_memory_limit(opts.memory_limit)


class EnvironmentPlugin(WorkerPlugin):
    """Sets environment variables in every worker process (before any task reads data); ``defaults`` only
    where the worker has no value of its own."""

    name = "pixels-xr-environment"

    def __init__(self, env: dict[str, str], defaults: dict[str, str] | None = None) -> None:
        self.env = dict(env)
        self.defaults = {k: v for k, v in (defaults or {}).items() if k not in self.env}

    def setup(self, worker: Any) -> None:
        for key, value in self.defaults.items():
            os.environ.setdefault(key, value)
        os.environ.update(self.env)


def worker_environment() -> dict[str, str]:
    """The client's GDAL/PROJ/object-store variables, for the workers.

    Only what the client itself has set travels: the cube's cloud-read settings (``readers.GDAL_CLOUD_ENV``)
    are applied per read by the loader, not process-wide, because e.g. ``GDAL_DISABLE_READDIR_ON_OPEN``
    would hide ``.msk`` masks and ``.ovr`` overviews from every other reader in the worker.
    """
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}


def _options(options: ClusterOptions | dict | None) -> ClusterOptions:
    if isinstance(options, ClusterOptions):
        return options
    try:
        return ClusterOptions(**(options or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ConfigError(err["msg"], f"cluster.{field}") from None


def _with_environment(opts: ClusterOptions) -> ClusterOptions:
    """Unset sizing fields filled from PIXELS_XR_WORKERS / PIXELS_XR_ADAPT_MIN / PIXELS_XR_ADAPT_MAX."""
    updates = {}
    for name in ("workers", "adapt_min", "adapt_max"):
        value = os.environ.get(f"PIXELS_XR_{name.upper()}")
        if getattr(opts, name) is None and value:
            if not value.strip().isdigit() or (name != "adapt_min" and int(value) < 1):
                raise ConfigError(f"must be a whole number{' ≥ 1' if name != 'adapt_min' else ''}, got {value!r}",
                                  f"PIXELS_XR_{name.upper()}")
            updates[name] = int(value)
    return opts.model_copy(update=updates) if updates else opts


def local_cluster_size(options: ClusterOptions) -> tuple[int, int, int]:
    """(workers, threads per worker, memory bytes per worker) for a LocalCluster on this machine."""
    cores = os.cpu_count() or 1
    workers = options.workers or max(1, cores // 2)
    threads = options.threads_per_worker or max(1, cores // workers)
    memory = int(psutil.virtual_memory().total * 0.8 // workers)
    return workers, threads, memory


@contextlib.contextmanager
def open_client(cluster: str | None = "local", options: ClusterOptions | dict | None = None, *,
                quiet: bool = False) -> Iterator[Client]:
    """A ``distributed.Client`` on ``cluster`` ("local", a scheduler address or "gateway"); closes what it made."""
    opts = _with_environment(_options(options))
    spec = (cluster or "local").strip()
    check_options(opts, local=spec == "local")
    with contextlib.ExitStack() as stack:
        if spec == "local":
            _refuse_unguarded_main()
            workers, threads, memory = local_cluster_size(opts)
            limit = parse_memory_limit(opts.memory_limit)
            lc = _start_local_cluster(stack, n_workers=workers, threads_per_worker=threads, processes=True,
                                      memory_limit=memory if limit is None else limit, dashboard_address=":0")
            client = Client(lc)
            stack.callback(_close_quietly, client.close, timeout=CLOSE_TIMEOUT)
        elif spec == "gateway":
            client = stack.enter_context(_gateway_client(opts))
        elif "://" in spec:
            try:
                client = stack.enter_context(Client(spec, timeout="10s"))
            except OSError as exc:
                raise ConfigError(f"cannot reach the Dask scheduler at {spec}: {exc}", "cluster") from None
        else:
            raise ConfigError(f"unknown cluster {spec!r}; use 'local', a scheduler address "
                              "(tcp://host:port) or 'gateway'", "cluster")
        client.register_plugin(EnvironmentPlugin(worker_environment(), WORKER_DEFAULTS))
        if not quiet:
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
        yield client


def _start_local_cluster(stack: contextlib.ExitStack, **kwargs: Any) -> LocalCluster:
    """A LocalCluster whose worker processes never see SIGINT, closed (bounded) by ``stack``.

    SIGINT is blocked in this thread while the cluster starts: its event-loop thread, created now, inherits
    the mask, and so does every worker process its nannies spawn from it, restarts included (a blocked
    signal survives fork and exec). Ctrl-C in a terminal reaches the whole process group; without this the
    workers died of it, their nannies restarted them, and closing the cluster waited for them forever.
    """
    blocked = hasattr(signal, "pthread_sigmask")
    if blocked:
        # multiprocessing's resource tracker, when it starts, blocks SIGINT around its launch and then
        # *unblocks* it (not restoring the previous mask) in the calling thread: started from the cluster's
        # loop thread it would undo the mask for every worker after. Started here first, it never is there.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    # Other threads of this process may still take the signal and interrupt this one mid-start, leaving a
    # half-made cluster behind: the first Ctrl-C while starting is held until the cluster is up and closable
    # (then raised), a second one interrupts at once (and whatever was made is closed).
    held = _HeldInterrupt()
    previous = None
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous = signal.signal(signal.SIGINT, held)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if blocked else None
    try:
        instances = getattr(SpecCluster, "_instances", set())
        before = set(instances)
        try:
            lc = LocalCluster(**kwargs)
        except BaseException:
            for made in set(instances) - before:
                _close_local_cluster(made)
            raise
        stack.callback(_close_local_cluster, lc)
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if held.count:
        raise KeyboardInterrupt
    return lc


class _HeldInterrupt:
    """A SIGINT handler that holds the first signal (counted) and raises ``KeyboardInterrupt`` on the next."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt


def _close_quietly(close: Any, **kwargs: Any) -> None:
    """Run a close call; a timeout or a second Ctrl-C while closing must not leave the rest unclosed."""
    with contextlib.suppress(Exception, KeyboardInterrupt):
        close(**kwargs)


def _close_local_cluster(lc: LocalCluster) -> None:
    """Close ``lc`` within ``CLOSE_TIMEOUT`` seconds, then kill any of its worker processes still alive."""
    pids = set()
    for nanny in list(getattr(lc, "workers", {}).values()):
        pid = None
        with contextlib.suppress(Exception):
            pid = nanny.pid  # the worker process of a Nanny
        if isinstance(pid, int) and pid > 0:
            pids.add(pid)
    _close_quietly(lc.close, timeout=CLOSE_TIMEOUT)
    lc.shutdown_on_close = False  # closed (or given up on) here: no second attempt at interpreter exit
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.ppid() == os.getpid():
                proc.kill()
                proc.wait(5)


def _refuse_unguarded_main() -> None:
    """Refuse to start a local cluster from the top level of a ``__main__`` script outside a main guard.

    The workers of a local cluster are spawned processes (``distributed.worker.multiprocessing-method``,
    spawn by default; forkserver too) that import the main script again as ``__mp_main__``; a cluster
    started at its top level starts again in every worker, which fails, and the client only reports
    "Nanny failed to start" after its timeout. Decided from the stack: the main script's module-level frame
    calling us must sit inside an ``if __name__ == "__main__":`` block. Interactive sessions, ``-c``
    commands and notebooks have no main file and are never refused.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise PixelsError("a local cluster was started while a worker process imported the main script; put the "
                          "code that runs the batch under `if __name__ == \"__main__\":`", "cluster")
    if dask.config.get("distributed.worker.multiprocessing-method", "spawn") == "fork":
        return
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not main_file:
        return
    main_file = os.path.abspath(main_file)
    frame: FrameType | None = sys._getframe(1)
    top: FrameType | None = None
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__" and \
                os.path.abspath(frame.f_code.co_filename) == main_file:
            top = frame
        frame = frame.f_back
    if top is None:
        return
    guarded = _main_guard_lines(main_file)
    if guarded is None or any(first <= top.f_lineno <= last for first, last in guarded):
        return
    raise PixelsError(f"line {top.f_lineno} starts a local Dask cluster at the top level of the script, which "
                      "every worker process imports again; put the code that runs the batch under "
                      "`if __name__ == \"__main__\":`", main_file)


@functools.lru_cache(maxsize=8)
def _main_guard_lines(path: str) -> tuple[tuple[int, int], ...] | None:
    """Line ranges of the bodies of ``if __name__ == "__main__":`` blocks in ``path`` (None: unreadable)."""
    try:
        with open(path, "rb") as fh:
            tree = ast.parse(fh.read(), path)
    except (OSError, SyntaxError, ValueError):
        return None

    def is_name(node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id == "__name__"

    def is_main(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and node.value == "__main__"

    ranges = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1 and \
                isinstance(node.test.ops[0], ast.Eq):
            left, right = node.test.left, node.test.comparators[0]
            if (is_name(left) and is_main(right)) or (is_main(left) and is_name(right)):
                ranges.append((node.body[0].lineno, node.body[-1].end_lineno or node.body[-1].lineno))
    return tuple(ranges)


@contextlib.contextmanager
def _gateway_client(opts: ClusterOptions) -> Iterator[Client]:
    try:
        from dask_gateway import Gateway
    except ImportError:
        raise ConfigError("cluster 'gateway' needs the gateway extra: pip install 'pixels-xr[gateway]'",
                          "cluster") from None
    kwargs: dict[str, Any] = {}
    if opts.gateway_address:
        kwargs["address"] = opts.gateway_address
    if opts.gateway_proxy_address:
        kwargs["proxy_address"] = opts.gateway_proxy_address
    if opts.gateway_auth:
        kwargs["auth"] = _gateway_auth(opts)
    try:
        gateway = Gateway(**kwargs)
    except ValueError as exc:  # no address configured
        raise ConfigError(f"Dask Gateway: {exc}", "cluster.gateway_address") from None
    with gateway:
        try:
            cluster_options = gateway.cluster_options() if opts.cluster_options else None
            if cluster_options is not None:
                for key, value in opts.cluster_options.items():
                    cluster_options[key] = value
            gw_cluster = gateway.new_cluster(cluster_options)
        except (OSError, ValueError, KeyError) as exc:
            where = "cluster.cluster_options" if isinstance(exc, (KeyError, ValueError)) else "cluster"
            raise ConfigError(f"Dask Gateway at {gateway.address}: {exc}", where) from None
        try:
            if opts.adapt_max:
                gw_cluster.adapt(minimum=opts.adapt_min or 0, maximum=opts.adapt_max)
            else:
                gw_cluster.scale(opts.workers or 2)
            with gw_cluster.get_client(set_as_default=False) as client:
                if not opts.adapt_max:
                    client.wait_for_workers(1, timeout=300)
                yield client
        finally:
            gw_cluster.shutdown()


def _gateway_auth(opts: ClusterOptions) -> Any:
    from dask_gateway import auth as gw_auth

    kind = (opts.gateway_auth or "").lower()
    if kind == "basic":
        return gw_auth.BasicAuth(username=opts.gateway_username, password=opts.gateway_password)
    if kind in {"kerberos", "jupyterhub"}:
        return gw_auth.get_auth(kind)
    raise ConfigError(f"unknown Gateway auth {opts.gateway_auth!r}; use basic, kerberos or jupyterhub",
                      "cluster.gateway_auth")
