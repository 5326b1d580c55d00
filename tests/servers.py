"""Real servers on 127.0.0.1 for the tests: helpers that start them as subprocesses and stop them.

Imported from tests as ``from servers import ...`` (tests/ has no ``__init__.py``; pytest's default
``prepend`` import mode puts tests/ on ``sys.path``). The fixtures that wrap these live in conftest.py.

Every server here is a child process started in its own session (process group), with stdout+stderr
captured to a log file, so that:

* a start that fails or times out raises :class:`ServerStartError` carrying the captured log;
* :meth:`Server.stop` terminates the whole process tree (children found with psutil, plus the process
  group), first with SIGTERM, then SIGKILL after a grace period, even when the tests failed.

No mocks: moto_server, rustac, dask and dask-gateway-server are the real executables from the venv.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil

HOST = "127.0.0.1"
#: Directory of the running interpreter's executables (the venv's bin/): moto_server, rustac, dask, ...
BIN = Path(sys.executable).parent


def venv_exe(name: str) -> str:
    """Absolute path of executable ``name`` next to ``sys.executable`` (the venv), else from PATH."""
    p = BIN / name
    if p.exists():
        return str(p)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"executable {name!r} not found in {BIN} nor on PATH")
    return found


def free_port(host: str = HOST) -> int:
    """A currently free TCP port on ``host``, found by binding port 0 (the OS picks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerStartError(RuntimeError):
    """A server process did not become ready; the message includes its captured stdout/stderr."""


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether a TCP connection to (host, port) succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """Whether GET ``url`` answers with any HTTP status below 500."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (OSError, ValueError):
        return False


def kill_tree(pid: int, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
    """Send ``sig`` to process ``pid`` and all its descendants; SIGKILL whatever is left after ``timeout``."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = [root]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.send_signal(sig)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)


#: Every Server started in this process and not yet stopped; an atexit hook stops them, so that even an
#: interrupted pytest run (Ctrl-C, a crashing fixture) leaves no server behind.
_RUNNING: set[Server] = set()


@atexit.register
def _stop_all() -> None:
    for srv in list(_RUNNING):
        with contextlib.suppress(Exception):
            srv.stop(timeout=3.0)


class Server:
    """One server subprocess: its command, url, log file, and how to stop it.

    Start it with :meth:`start` (or the ``start_*`` helpers below); use it as a context manager or call
    :meth:`stop` (idempotent) to terminate the process and every descendant.
    """

    def __init__(
        self,
        name: str,
        cmd: list[str],
        *,
        url: str = "",
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.name = name
        self.cmd = [str(c) for c in cmd]
        self.url = url
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self._own_log_dir = log_dir is None
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"pxr-{name}-")) if log_dir is None else Path(log_dir)
        self.log_path = self.log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._cleanups: list[Callable[[], None]] = []

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, ready: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> Server:
        """Launch the process and poll ``ready()`` until true; raise ServerStartError (with log) if not."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it; closed right after Popen
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # own process group: stop() can signal the whole group
            )
        finally:
            log.close()
        _RUNNING.add(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self._fail(f"exited with code {self.proc.returncode} before becoming ready")
            try:
                if ready():
                    return self
            except Exception:  # a readiness probe that raises just means "not yet"
                pass
            if time.monotonic() > deadline:
                self._fail(f"not ready after {timeout:.0f} s")
            time.sleep(interval)
            interval = min(interval * 1.5, 0.5)

    def _fail(self, why: str) -> None:
        log = self.log()
        self.stop()
        raise ServerStartError(
            f"{self.name} {why}\ncommand: {' '.join(self.cmd)}\n--- captured output ({self.log_path}) ---\n"
            f"{log[-8000:]}"
        )

    def log(self) -> str:
        """The captured stdout+stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def on_stop(self, fn: Callable[[], None]) -> None:
        """Register ``fn`` to run after the process is stopped (e.g. remove a temp dir)."""
        self._cleanups.append(fn)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the process and all its descendants (SIGTERM, then SIGKILL). Idempotent."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                kill_tree(proc.pid, signal.SIGTERM, timeout)
            # Anything still in the group (e.g. orphans re-parented away from the tree).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        _RUNNING.discard(self)
        while self._cleanups:
            with contextlib.suppress(Exception):
                self._cleanups.pop()()
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self._own_log_dir = False

    def kill(self) -> None:
        """SIGKILL the process tree at once (a crash, for fault tests); cleanups are not run."""
        if self.proc is not None and self.proc.poll() is None:
            kill_tree(self.proc.pid, signal.SIGKILL, timeout=5.0)
            self.proc.wait(5.0)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "alive" if self.alive() else "stopped"
        return f"<Server {self.name} {self.url or ''} pid={self.pid} {state}>"


# =============================================================================================
# S3: moto_server as a subprocess
# =============================================================================================

#: Dummy credentials for moto (rasterio refuses them inside rasterio.Env, so they go in os.environ).
S3_ACCESS_KEY = "testing"
S3_SECRET_KEY = "testing"
S3_REGION = "us-east-1"
#: Variables that could point clients at a real AWS account; removed while the S3 env is active.
_AWS_UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
              "AWS_NO_SIGN_REQUEST", "AWS_REQUEST_PAYER", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


def start_moto(timeout: float = 30.0) -> Server:
    """Start ``moto_server -H 127.0.0.1 -p PORT`` (a subprocess: the in-process threaded server deadlocks
    on GDAL writes). ``server.url`` is ``http://127.0.0.1:PORT``."""
    port = free_port()
    url = f"http://{HOST}:{port}"
    env = dict(os.environ)
    # moto itself must not try to reach anything; keep its own env free of real-AWS settings.
    for k in _AWS_UNSET:
        env.pop(k, None)
    srv = Server("moto", [venv_exe("moto_server"), "-H", HOST, "-p", str(port)], url=url, env=env)
    return srv.start(lambda: http_ok(f"{url}/moto-api/"), timeout=timeout)


def s3_env(host_port: str) -> dict[str, str]:
    """Environment for GDAL (/vsis3/), boto3 and s3fs to talk to the S3 server at ``host_port``."""
    return {
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_REGION": S3_REGION,
        # GDAL
        "AWS_S3_ENDPOINT": host_port,
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
        "CPL_VSIL_USE_TEMP_FILE_FOR_RANDOM_WRITE": "YES",
        # boto3 / botocore / aiobotocore (s3fs)
        "AWS_ENDPOINT_URL": f"http://{host_port}",
        "AWS_ENDPOINT_URL_S3": f"http://{host_port}",
    }


@contextlib.contextmanager
def patched_environ(set_vars: Mapping[str, str], unset: tuple[str, ...] = ()) -> Iterator[None]:
    """Set/unset variables in ``os.environ`` and restore the previous values exactly on exit."""
    keys = set(set_vars) | set(unset)
    saved = {k: os.environ.get(k) for k in keys}
    try:
        for k in unset:
            os.environ.pop(k, None)
        os.environ.update(set_vars)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class S3Server:
    """A running moto_server plus conveniences. Attributes: ``endpoint_url`` ("http://127.0.0.1:PORT"),
    ``host_port`` ("127.0.0.1:PORT"), ``client`` (boto3 S3 client), ``server`` (the :class:`Server`)."""

    def __init__(self, server: Server) -> None:
        import boto3

        self.server = server
        self.endpoint_url = server.url
        self.host_port = server.url.removeprefix("http://")
        self.env = s3_env(self.host_port)
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
            region_name=S3_REGION,
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (≥3 characters) if absent; return the name."""
        if len(name) < 3:
            raise ValueError(f"S3 bucket names need at least 3 characters: {name!r}")
        try:
            self.client.create_bucket(Bucket=name)
        except self.client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def upload(self, local_path: str | os.PathLike[str], bucket: str, key: str) -> str:
        """Upload one file (creating the bucket if needed); return its ``s3://bucket/key`` URL."""
        self.make_bucket(bucket)
        self.client.upload_file(str(local_path), bucket, key)
        return f"s3://{bucket}/{key}"

    def upload_dir(self, local_dir: str | os.PathLike[str], bucket: str, prefix: str = "") -> list[str]:
        """Upload every file under ``local_dir`` to ``bucket`` at ``prefix/<relative path>``; return keys."""
        self.make_bucket(bucket)
        root = Path(local_dir)
        prefix = prefix.strip("/")
        keys = []
        for p in sorted(root.rglob("*")):
            if p.is_file():
                rel = p.relative_to(root).as_posix()
                key = f"{prefix}/{rel}" if prefix else rel
                self.client.upload_file(str(p), bucket, key)
                keys.append(key)
        return keys

    def url(self, bucket: str, key: str = "") -> str:
        return f"s3://{bucket}/{key}"

    @contextlib.contextmanager
    def activate(self) -> Iterator[S3Server]:
        """Set :func:`s3_env` in ``os.environ`` (removing real-AWS variables) and restore it on exit."""
        with patched_environ(self.env, unset=_AWS_UNSET):
            yield self

    def stop(self) -> None:
        self.server.stop()


# =============================================================================================
# STAC API: `rustac serve` (in-memory backend) as a subprocess
# =============================================================================================
#
# Behaviour of rustac 0.9.18 (server core "rustac v0.17.7", memory backend), checked against the real
# items in ../shared/data/stac by tests/test_servers.py:
#
# * Supported: GET and POST /search with ``bbox``, ``datetime`` (instants and open/closed ranges),
#   ``collections``, ``ids``, ``intersects`` and paging (``limit`` + a ``next`` link that pystac-client
#   follows); ``/collections``, ``/collections/{id}/items``. ``numberMatched`` is not reported.
# * Items WITHOUT ``bbox`` (5 of pc_landsat-8-c2-l2_legacy_*.json) are accepted; bbox/intersects searches
#   use their geometry, so they are found (and not found) exactly like items with a bbox.
# * ``query`` and ``filter`` are NOT ignored, contrary to what one might expect (and to DESIGN.md §4):
#   any POST ``query`` (even an always-true one like ``{"eo:cloud_cover": {"gte": 0}}``) or any ``filter``
#   (cql2-json or cql2-text) makes the search return ZERO items; a GET ``filter`` with an unescaped ``<``
#   is a 400. ``sortby`` is silently ignored (items come back in load order). So code under test must not
#   send ``query``/``filter`` to this server, and must filter on the client.
# * Collections: items whose collection is not loaded get one generated by rustac ("This collection was
#   generated by rustac ..."); start_stac_api() writes its own minimal collection per id anyway.
# * ``.parquet`` hrefs given alone switch rustac to a DuckDB backend whose /search answered nothing in
#   this build; start_stac_api() therefore always writes JSON (read parquet with rustac.read_sync first).
# * Links in responses use ``--addr``, so it is always passed as 127.0.0.1:PORT.


def _item_bbox(item: Mapping[str, Any]) -> list[float] | None:
    """An item's [minx, miny, maxx, maxy]: its bbox (2D part) or computed from its geometry."""
    bbox = item.get("bbox")
    if bbox:
        b = list(bbox)
        return [b[0], b[1], b[3], b[4]] if len(b) == 6 else b[:4]
    geom = item.get("geometry")
    if not geom:
        return None
    xs: list[float] = []
    ys: list[float] = []

    def walk(c: Any) -> None:
        if isinstance(c, (list, tuple)) and c and isinstance(c[0], (int, float)):
            xs.append(c[0])
            ys.append(c[1])
        elif isinstance(c, (list, tuple)):
            for sub in c:
                walk(sub)

    if geom.get("type") == "GeometryCollection":
        for g in geom.get("geometries", []):
            walk(g.get("coordinates"))
    else:
        walk(geom.get("coordinates"))
    return [min(xs), min(ys), max(xs), max(ys)] if xs else None


def minimal_collection(collection_id: str, items: list[Mapping[str, Any]]) -> dict[str, Any]:
    """A minimal valid STAC 1.0 Collection for ``items``: extent from their bboxes/geometries and times."""
    bboxes = [b for b in (_item_bbox(i) for i in items) if b]
    spatial = (
        [min(b[0] for b in bboxes), min(b[1] for b in bboxes), max(b[2] for b in bboxes), max(b[3] for b in bboxes)]
        if bboxes
        else [-180.0, -90.0, 180.0, 90.0]
    )
    times = sorted(
        t
        for i in items
        for t in (
            i.get("properties", {}).get("datetime"),
            i.get("properties", {}).get("start_datetime"),
            i.get("properties", {}).get("end_datetime"),
        )
        if t
    )
    return {
        "type": "Collection",
        "stac_version": "1.0.0",
        "stac_extensions": [],
        "id": collection_id,
        "description": f"Test collection {collection_id} ({len(items)} items)",
        "license": "other",
        "extent": {
            "spatial": {"bbox": [spatial]},
            "temporal": {"interval": [[times[0], times[-1]] if times else [None, None]]},
        },
        "links": [],
    }


def load_stac_items(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Items from a STAC file: an Item, an ItemCollection/FeatureCollection (.json/.geojson), ndjson, or
    stac-geoparquet (.parquet, read with rustac)."""
    p = Path(path)
    if p.suffix == ".parquet":
        import rustac

        return list(rustac.read_sync(str(p))["features"])
    if p.suffix == ".ndjson":
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    d = json.loads(p.read_text())
    if d.get("type") == "Feature":
        return [d]
    if d.get("type") == "FeatureCollection":
        return list(d["features"])
    raise ValueError(f"{p} holds a {d.get('type')!r}, not STAC items")


def start_stac_api(
    items: list[Mapping[str, Any]],
    collections: list[Mapping[str, Any]] | None = None,
    timeout: float = 60.0,
    port: int | None = None,
) -> Server:
    """Serve ``items`` with ``rustac serve`` on 127.0.0.1:PORT (``port``: a given one, e.g. to restart a
    catalog with more items at the same URL); ``server.url`` is the API root URL.

    Items and collections are written to a temp dir (removed on stop) as one ItemCollection and one
    file per collection. Without ``collections``, a minimal collection is generated for each distinct
    ``collection`` id found in the items. See the module comments above for what rustac supports
    (notably: a ``query`` or ``filter`` makes it return nothing).
    """
    tmp = Path(tempfile.mkdtemp(prefix="pxr-stac-"))
    try:
        items = [dict(i) for i in items]
        if collections is None:
            by_id: dict[str, list[Mapping[str, Any]]] = {}
            for it in items:
                if it.get("collection"):
                    by_id.setdefault(it["collection"], []).append(it)
            collections = [minimal_collection(cid, its) for cid, its in by_id.items()]
        hrefs = []
        for n, c in enumerate(collections):
            f = tmp / f"collection-{n}.json"
            f.write_text(json.dumps(c))
            hrefs.append(str(f))
        items_file = tmp / "items.json"
        items_file.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
        hrefs.append(str(items_file))
        port = port or free_port()
        url = f"http://{HOST}:{port}"
        srv = Server("rustac", [venv_exe("rustac"), "serve", "--addr", f"{HOST}:{port}", *hrefs], url=url,
                     log_dir=tmp)
        srv.on_stop(lambda: shutil.rmtree(tmp, ignore_errors=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Ready when the landing page answers AND the items are loaded (rustac binds after loading, but
    # check /search too so a half-started server never reaches a test).
    return srv.start(lambda: http_ok(f"{url}/") and http_ok(f"{url}/search?limit=1"), timeout=timeout)


# =============================================================================================
# Dask distributed: `dask scheduler` + `dask worker` subprocesses
# =============================================================================================

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for dask/gateway children: the current os.environ (so S3 settings set by the
    s3_server fixture reach the workers), plus the repo and tests/ on PYTHONPATH so that functions
    defined in test modules (pickled by reference) and pixels_xr import on the workers."""
    env = dict(os.environ)
    paths = [str(REPO_DIR), str(TESTS_DIR)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def scheduler_worker_names(address: str, timeout: float = 5.0) -> set[str]:
    """Names of the workers currently registered with the scheduler at ``address``."""
    from distributed import Client

    with Client(address, timeout=timeout, set_as_default=False) as c:
        return {str(w.get("name")) for w in c.scheduler_info(n_workers=-1)["workers"].values()}


class DaskCluster:
    """A real ``dask scheduler`` and N ``dask worker --no-nanny`` processes on 127.0.0.1.

    ``address`` is "tcp://127.0.0.1:PORT". Workers are named ``w0``, ``w1``, ...; ``kill_worker(i)``
    SIGKILLs worker i (its process is the worker itself: no nanny, so nothing restarts it) and
    ``restart_worker(i)`` starts it again and waits until the scheduler sees it.
    """

    def __init__(
        self,
        n_workers: int = 2,
        nthreads: int = 1,
        memory_limit: str = "2GiB",
        timeout: float = 60.0,
    ) -> None:
        self.n_workers = n_workers
        self.nthreads = nthreads
        self.memory_limit = memory_limit
        self.timeout = timeout
        self.dir = Path(tempfile.mkdtemp(prefix="pxr-dask-"))
        self.env = child_env()
        self.port = free_port()
        self.address = f"tcp://{HOST}:{self.port}"
        self.workers: list[Server | None] = [None] * n_workers
        self.scheduler = Server(
            "dask-scheduler",
            [venv_exe("dask"), "scheduler", "--host", HOST, "--port", str(self.port), "--no-dashboard"],
            url=self.address, env=self.env, cwd=self.dir, log_dir=self.dir,
        )

    def start(self) -> DaskCluster:
        try:
            self.scheduler.start(lambda: port_open(HOST, self.port), timeout=self.timeout)
            for i in range(self.n_workers):
                self._launch_worker(i)
            self.wait_for_workers()
        except BaseException:
            self.stop()
            raise
        return self

    def _worker_cmd(self, i: int) -> list[str]:
        return [
            venv_exe("dask"), "worker", self.address, "--name", f"w{i}", "--host", HOST,
            "--nthreads", str(self.nthreads), "--memory-limit", self.memory_limit, "--no-nanny",
            "--no-dashboard", "--local-directory", str(self.dir / f"w{i}"), "--death-timeout", "60",
        ]

    def _launch_worker(self, i: int) -> Server:
        srv = Server(f"dask-worker-{i}", self._worker_cmd(i), env=self.env, cwd=self.dir, log_dir=self.dir)
        self.workers[i] = srv
        # "Ready" here means only "process is up"; registration is awaited by wait_for_workers().
        return srv.start(lambda: True, timeout=self.timeout)

    def wait_for_workers(self, names: set[str] | None = None, timeout: float | None = None) -> None:
        """Wait until the scheduler lists all ``names`` (default: every live worker)."""
        want = names if names is not None else {f"w{i}" for i, w in enumerate(self.workers) if w and w.alive()}
        deadline = time.monotonic() + (timeout or self.timeout)
        seen: set[str] = set()
        while True:
            for i, w in enumerate(self.workers):
                if w is not None and f"w{i}" in want and not w.alive():
                    raise ServerStartError(f"dask worker w{i} exited\n--- captured output ---\n{w.log()[-8000:]}")
            with contextlib.suppress(Exception):
                seen = scheduler_worker_names(self.address)
                if want <= seen:
                    return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {w.name} ---\n{w.log()[-3000:]}" for w in self.workers if w)
                raise ServerStartError(
                    f"dask workers {sorted(want - seen)} not registered after {timeout or self.timeout:.0f} s\n"
                    f"--- scheduler ---\n{self.scheduler.log()[-3000:]}\n{logs}"
                )
            time.sleep(0.2)

    def kill_worker(self, i: int) -> None:
        """SIGKILL worker ``i`` (a crash: the scheduler sees its connection drop)."""
        w = self.workers[i]
        if w is not None:
            w.kill()

    def restart_worker(self, i: int) -> None:
        """(Re)start worker ``i`` (stopping it first if alive) and wait until it is registered."""
        w = self.workers[i]
        if w is not None and w.alive():
            w.stop()
        # Wait for the scheduler to drop the old worker of that name, so the new one can register.
        deadline = time.monotonic() + self.timeout
        while f"w{i}" in scheduler_worker_names(self.address) and time.monotonic() < deadline:
            time.sleep(0.2)
        self._launch_worker(i)
        self.wait_for_workers({f"w{i}"})

    def lost_workers(self) -> list[int]:
        """Indices of the workers whose process has exited or that the scheduler no longer lists."""
        registered = scheduler_worker_names(self.address, timeout=30.0)  # a loaded machine answers slowly
        return [i for i, w in enumerate(self.workers)
                if w is None or not w.alive() or f"w{i}" not in registered]

    def logs(self) -> str:
        return "\n".join(f"--- {s.name} ---\n{s.log()}" for s in (self.scheduler, *self.workers) if s)

    def stop(self) -> None:
        for w in self.workers:
            if w is not None:
                w.stop()
        self.scheduler.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> DaskCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# =============================================================================================
# Dask Gateway: `dask-gateway-server` subprocess, UnsafeLocalBackend + SimpleAuthenticator
# =============================================================================================
#
# Config names checked against dask_gateway_server 2026.3.0 (`dask-gateway-server --help-all`): the app
# class is ``DaskGateway`` (address, backend_class, authenticator_class), not ``Gateway``; the public
# HTTP and scheduler (TCP) proxy listen at ``Proxy.address`` / ``Proxy.tcp_address`` (the proxy is the
# bundled Go binary dask-gateway-proxy, a child of the server); ``SimpleAuthenticator.password``;
# cluster options are on ``ClusterConfig`` (also applies to the local backend's LocalClusterConfig).
# distributed no longer ships ``dask-scheduler``/``dask-worker`` executables, so scheduler_cmd and
# worker_cmd are ``[<venv>/bin/dask, "scheduler"|"worker"]``.
# The local backend passes only a whitelist of variables to clusters
# (``LocalBackend.inherited_environment``: PATH, PYTHONPATH, VIRTUAL_ENV, ...), so the S3 variables are
# added to that list here; clusters get PYTHONPATH with the repo and tests/ (see child_env()).

GATEWAY_INHERITED_ENV = [
    "PATH", "PYTHONPATH", "CONDA_ROOT", "CONDA_DEFAULT_ENV", "VIRTUAL_ENV", "LANG", "LC_ALL",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_S3_ENDPOINT",
    "AWS_HTTPS", "AWS_VIRTUAL_HOSTING", "CPL_VSIL_USE_TEMP_FILE_FOR_RANDOM_WRITE", "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3", "GDAL_DISABLE_READDIR_ON_OPEN", "GDAL_HTTP_MAX_RETRY", "GDAL_HTTP_RETRY_DELAY",
]


def patch_gateway_client_del() -> None:
    """Make ``dask_gateway.Gateway.__del__`` quiet when the Gateway was already closed.

    dask_gateway 2026.3 with distributed 2026.8: a sync ``Gateway`` closed explicitly (``with Gateway()``,
    ``cluster.shutdown()``) calls ``close()`` again in ``__del__``, which raises "Accessing the loop
    property while the loop is not running is not supported". When the garbage collector runs that
    finalizer in the middle of ``ast.parse`` (pytest rewriting a module being imported), the unraisable-
    exception hook re-enters the compiler and CPython 3.11 aborts the import with "SystemError: AST
    constructor recursion depth mismatch" -- failing an unrelated test or the whole session. This wraps
    ``__del__`` to swallow that RuntimeError (a compatibility patch for an upstream bug, not a mock)."""
    from dask_gateway import client

    orig = client.Gateway.__del__
    if getattr(orig, "_pxr_quiet", False):
        return

    def __del__(self: Any) -> None:
        try:
            orig(self)
        except RuntimeError:
            pass

    __del__._pxr_quiet = True  # type: ignore[attr-defined]
    client.Gateway.__del__ = __del__  # type: ignore[method-assign]


class GatewayServer:
    """A running dask-gateway-server. Attributes: ``address`` (public HTTP API, "http://127.0.0.1:P"),
    ``proxy_address`` (scheduler proxy, "gateway://127.0.0.1:Q"), ``password``, ``username``, ``auth``
    (a ``dask_gateway.BasicAuth``), ``server`` (the :class:`Server`); ``gateway()`` opens a client."""

    def __init__(self, server: Server, address: str, proxy_address: str, username: str, password: str):
        from dask_gateway import BasicAuth

        patch_gateway_client_del()
        self.server = server
        self.address = address
        self.proxy_address = proxy_address
        self.username = username
        self.password = password
        self.auth = BasicAuth(username=username, password=password)

    def gateway(self, **kwargs: Any):
        """A ``dask_gateway.Gateway`` connected to this server (close it, or use it as a context manager)."""
        from dask_gateway import Gateway

        return Gateway(self.address, proxy_address=self.proxy_address, auth=self.auth, **kwargs)

    def stop(self) -> None:
        self.server.stop(timeout=15.0)  # SIGTERM lets the gateway stop its clusters first


def start_gateway(
    password: str = "pxr-test-password",
    username: str = "pxr",
    worker_cores: int = 1,
    worker_memory: str = "2 G",
    max_workers: int = 4,
    timeout: float = 60.0,
) -> GatewayServer:
    """Start ``dask-gateway-server`` with a config file written to a temp dir (removed on stop)."""
    tmp = Path(tempfile.mkdtemp(prefix="pxr-gateway-"))
    http_port, tcp_port, api_port = free_port(), free_port(), free_port()
    dask = venv_exe("dask")
    config = f"""
c = get_config()  # noqa: F821
c.DaskGateway.address = "{HOST}:{api_port}"
c.DaskGateway.backend_class = "dask_gateway_server.backends.local.UnsafeLocalBackend"
c.DaskGateway.authenticator_class = "dask_gateway_server.auth.SimpleAuthenticator"
c.DaskGateway.log_level = "INFO"
c.SimpleAuthenticator.password = {password!r}
c.Proxy.address = "{HOST}:{http_port}"
c.Proxy.tcp_address = "{HOST}:{tcp_port}"
c.LocalBackend.clusters_directory = {str(tmp / "clusters")!r}
c.LocalBackend.inherited_environment = {GATEWAY_INHERITED_ENV!r}
c.DBBackendBase.cluster_start_timeout = 120.0
c.DBBackendBase.worker_start_timeout = 120.0
c.ClusterConfig.scheduler_cmd = [{dask!r}, "scheduler"]
c.ClusterConfig.worker_cmd = [{dask!r}, "worker"]
c.ClusterConfig.scheduler_cores = 1
c.ClusterConfig.scheduler_memory = "1 G"
c.ClusterConfig.worker_cores = {worker_cores}
c.ClusterConfig.worker_threads = {worker_cores}
c.ClusterConfig.worker_memory = {worker_memory!r}
c.ClusterConfig.cluster_max_workers = {max_workers}
c.ClusterConfig.idle_timeout = 600.0
"""
    cfg = tmp / "dask_gateway_config.py"
    cfg.write_text(config)
    (tmp / "clusters").mkdir()
    srv = Server(
        "dask-gateway",
        [venv_exe("dask-gateway-server"), "--config", str(cfg)],
        url=f"http://{HOST}:{http_port}",
        env=child_env(),
        cwd=tmp,
        log_dir=tmp,
    )
    srv.on_stop(lambda: shutil.rmtree(tmp, ignore_errors=True))
    # Ready = an authenticated cluster listing answers 200 through the proxy. (/api/health can answer
    # before the proxy has its route to the API, and a too-early new_cluster() then gets 404 Not Found.)
    import base64

    token = base64.b64encode(f"{username}:{password}".encode()).decode()

    def ready() -> bool:
        req = urllib.request.Request(f"http://{HOST}:{http_port}/api/v1/clusters/",
                                     headers={"Authorization": f"Basic {token}"})
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status == 200 and port_open(HOST, tcp_port)
        except (OSError, ValueError):
            return False

    srv.start(ready, timeout=timeout)
    return GatewayServer(srv, srv.url, f"gateway://{HOST}:{tcp_port}", username, password)


def _scheduler_snapshot(dask_scheduler: Any) -> dict[str, Any]:
    """Runs on the scheduler: its tasks not in memory (state, worker, who wants them, unfinished
    dependencies) and its workers (status, tasks processing)."""
    tasks = {}
    for key, ts in dask_scheduler.tasks.items():
        if ts.state not in ("memory", "released", "forgotten"):
            tasks[str(key)] = {
                "state": ts.state, "on": getattr(ts.processing_on, "address", None),
                "wanted_by": sorted(c.client_key for c in ts.who_wants or ()),
                "waits_on": sorted(f"{d.key} ({d.state})" for d in ts.dependencies if d.state != "memory")[:3]}
    workers = {w.address: {"status": str(w.status), "processing": len(w.processing)}
               for w in dask_scheduler.workers.values()}
    return {"tasks": tasks, "workers": workers, "clients": sorted(dask_scheduler.clients)}


def _worker_snapshot(dask_worker: Any) -> dict[str, Any]:
    """Runs on a worker: its tasks not in memory and the innermost frames of its busy threads."""
    import traceback

    stacks = {}
    for ident, frame in sys._current_frames().items():
        lines = traceback.format_stack(frame)[-4:]
        if not any("work_queue.get" in line or "selector" in line or "wait(timeout)" in line for line in lines):
            stacks[str(ident)] = "".join(lines)
    return {"status": str(dask_worker.status), "stacks": stacks,
            "tasks": {str(k): ts.state for k, ts in dask_worker.state.tasks.items() if ts.state != "memory"}}


def cluster_snapshot(client: Any, limit: int = 6000) -> str:
    """What a real cluster is doing, as JSON of at most ``limit`` characters: the scheduler's unfinished
    tasks and workers, each worker's unfinished tasks and busy threads, and the calling process's busy
    threads. For a test's failure message when a computation does not finish (an explained hang instead of
    a timeout's thread dump)."""
    import traceback

    here = {}
    for ident, frame in sys._current_frames().items():
        lines = traceback.format_stack(frame)[-4:]
        if not any("work_queue.get" in line or "selector" in line for line in lines):
            here[str(ident)] = "".join(lines)
    try:
        snapshot: dict[str, Any] = {"scheduler": client.run_on_scheduler(_scheduler_snapshot, callback_timeout=20),
                                    "workers": client.run(_worker_snapshot, callback_timeout=20)}
    except Exception as exc:  # noqa: BLE001 - a snapshot of a broken cluster says so
        snapshot = {"error": repr(exc)}
    snapshot["client_threads"] = here
    return json.dumps(snapshot, default=str)[:limit]
