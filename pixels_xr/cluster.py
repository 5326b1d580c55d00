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
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import psutil
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin
from pydantic import ValidationError

from pixels_xr.config import ClusterOptions
from pixels_xr.errors import ConfigError

#: Environment variables (by prefix) copied to workers: GDAL/PROJ tuning and object-store credentials.
FORWARDED_PREFIXES = ("GDAL_", "CPL_", "VSI_", "AWS_", "AZURE_", "GS_", "GOOGLE_", "PROJ_", "PIXELS_XR_")
#: Worker settings used where neither the client nor the worker's own environment has one. GDAL's block
#: cache defaults to 5 % of RAM per process and fills with tiles a chunked read never asks for twice: one
#: 5376×3072 px field over 48 items peaked at 1.46 GB per worker with it, 0.84 GB with 64 MB
#: (``benchmarks/bench_batch.py --big``).
WORKER_DEFAULTS = {"GDAL_CACHEMAX": "128"}


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

    Only what the client itself has set travels: the cube's cloud-read settings (``cube.GDAL_CLOUD_ENV``)
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
            if not value.isdigit():
                raise ConfigError(f"must be a whole number, got {value!r}", f"PIXELS_XR_{name.upper()}")
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
    with contextlib.ExitStack() as stack:
        if spec == "local":
            workers, threads, memory = local_cluster_size(opts)
            lc = stack.enter_context(LocalCluster(
                n_workers=workers, threads_per_worker=threads, processes=True,
                memory_limit=opts.memory_limit or memory, dashboard_address=":0"))
            client = stack.enter_context(Client(lc))
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
