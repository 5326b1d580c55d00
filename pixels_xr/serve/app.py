"""The map server: a Starlette app over one PATH (tilesets and/or a run output) and a uvicorn runner.

Routes: ``/`` (the page), ``/static/…`` (page and vendored JS, from the package), ``/api/layers`` (what PATH
holds), ``/files/…`` (files under PATH, with Range requests: what the pmtiles protocol reads),
``/tiles/<tileset>/<z>/<x>/<y>`` (MBTiles and XYZ), ``/run/<layer>/<bin>/<z>/<x>/<y>.png`` (run tiles
rendered on demand) and ``/run/pixel?lon=…&lat=…`` (one pixel's series).

Safety: the server binds 127.0.0.1 unless told otherwise and then also refuses requests whose ``Host`` is
not a loopback name (a page on another site cannot reach it by DNS rebinding). ``/files/`` resolves the
path with symlinks followed and answers only when the result is inside PATH (PATH itself when PATH is a
file). Starlette's ``FileResponse`` answers ``Range`` with 206 (one or several ranges) and an unsatisfiable
range with 416. A tile the tileset or run does not hold is 204 (MapLibre draws nothing and logs nothing).
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pixels_xr.errors import ConfigError, OutputError, PixelsError
from pixels_xr.serve.run import RunOutput, open_run
from pixels_xr.serve.tilesets import MEDIA, Tileset, find_tilesets, tile

__all__ = ["LOOPBACK", "MapServer", "Served", "make_app", "open_path"]

STATIC = Path(__file__).parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_NO_STORE = {"Cache-Control": "no-store"}


@dataclass
class Served:
    """What one PATH holds: its tilesets and/or a run output."""

    root: Path
    tilesets: dict[str, Tileset]
    run: RunOutput | None

    def layers(self) -> dict[str, Any]:
        return {"path": self.root.name, "tilesets": [t.as_json() for t in self.tilesets.values()],
                "run": self.run.describe() if self.run is not None else None}

    def file(self, rel: str) -> Path | None:
        """The file ``rel`` under the root (or the root file itself), None when outside or missing."""
        if self.root.is_file():
            return self.root if rel == self.root.name else None
        if rel.startswith(("/", "\\")) or "\x00" in rel:
            return None
        root = os.path.realpath(self.root)
        full = os.path.realpath(os.path.join(root, rel))
        if os.path.commonpath([full, root]) != root or not os.path.isfile(full):
            return None
        return Path(full)

    def location(self, tileset: Tileset) -> Path:
        if self.root.is_file() or self.root.name == tileset.path:
            return self.root
        return self.root / tileset.path


def open_path(path: str | Path) -> Served:
    """Open PATH: a run's Zarr store or COG folder, a tileset, or a folder of tilesets (``pxm render``'s
    ``--out``)."""
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise OutputError("no such file or folder", str(path))
    run = open_run(root)
    tilesets = {} if run is not None else {t.id: t for t in find_tilesets(root)}
    if run is None and not tilesets:
        raise OutputError("neither a run output (Zarr store or COG folder) nor PXM tilesets (.pmtiles, "
                          ".mbtiles, XYZ folders with metadata.json)", str(path))
    return Served(root, tilesets, run)


def _error(exc: PixelsError, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=status)


def make_app(served: Served, *, allowed_hosts: tuple[str, ...] | None = LOOPBACK) -> Starlette:
    """The Starlette app for ``served``; ``allowed_hosts`` None accepts any Host header."""

    def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=_NO_STORE)

    def layers(request: Request) -> Response:
        return JSONResponse(served.layers())

    def files(request: Request) -> Response:
        path = served.file(request.path_params["path"])
        if path is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        return FileResponse(path, headers={"Access-Control-Allow-Origin": "*"})

    def tileset_tile(request: Request) -> Response:
        p = request.path_params
        ts = served.tilesets.get(p["tileset"])
        if ts is None or ts.kind == "pmtiles":
            return JSONResponse({"error": f"no MBTiles or XYZ tileset {p['tileset']!r}"}, status_code=404)
        data = tile(ts, served.location(ts), p["z"], p["x"], p["y"])
        if data is None:
            return Response(status_code=204)
        return Response(data, media_type=MEDIA[ts.format])

    def run_tile(request: Request) -> Response:
        if served.run is None:
            return JSONResponse({"error": "PATH holds no run output"}, status_code=404)
        p = request.path_params
        try:
            data = served.run.tile(p["layer"], p["bin"], p["z"], p["x"], p["y"])
        except PixelsError as exc:
            return _error(exc, 404)
        if data is None:
            return Response(status_code=204)
        return Response(data, media_type="image/png")

    def run_pixel(request: Request) -> Response:
        if served.run is None:
            return JSONResponse({"error": "PATH holds no run output"}, status_code=404)
        try:
            lon, lat = float(request.query_params["lon"]), float(request.query_params["lat"])
        except (KeyError, ValueError):
            return JSONResponse({"error": "give lon and lat as numbers"}, status_code=400)
        found = served.run.pixel(lon, lat)
        return JSONResponse(found if found is not None else {"error": "no feature here"},
                            status_code=200 if found is not None else 404)

    routes = [
        Route("/", index),
        Route("/api/layers", layers),
        Route("/files/{path:path}", files, methods=["GET", "HEAD"]),
        Route("/tiles/{tileset}/{z:int}/{x:int}/{y:int}", tileset_tile),
        Route("/run/pixel", run_pixel),
        Route("/run/{layer}/{bin:int}/{z:int}/{x:int}/{y:int}.png", run_tile),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    app = Starlette(routes=routes)
    return _HostCheck(app, allowed_hosts) if allowed_hosts else app  # type: ignore[return-value]


class _HostCheck:
    """Answer 400 unless the request's ``Host`` (port stripped, IPv6 in brackets) is an allowed name.

    Starlette's ``TrustedHostMiddleware`` refuses every bracketed IPv6 ``Host`` (``[::1]:8000``), so a
    server on ``::1`` could not be reached at all; this check is all the server needs of it.
    """

    def __init__(self, app: Any, allowed: tuple[str, ...]) -> None:
        self.app, self.allowed = app, {h.strip("[]").lower() for h in allowed}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
            if name not in self.allowed:
                await Response("host not allowed", status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class MapServer:
    """``pixels-xr serve`` in a background thread (tests, notebooks): ``with MapServer(path) as s: s.url``."""

    def __init__(self, path: str | Path, *, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.served = open_path(path)
        hosts = LOOPBACK if host in LOOPBACK else None
        config = uvicorn.Config(make_app(self.served, allowed_hosts=hosts), host=host, port=port,
                                log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> Self:
        """Listen (a busy port or a bad host is one ``ConfigError``), then serve in a daemon thread."""
        try:
            family, kind, proto, _, address = socket.getaddrinfo(self.host, self.port,
                                                                 type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as err:
            raise ConfigError(f"cannot listen on {self.host}:{self.port}: {err.strerror or err}",
                              "--port") from None
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="pixels-xr-serve", daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise OutputError(f"the server stopped while starting on {self.host}:{self.port}", "serve")
            self._thread.join(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C raises KeyboardInterrupt here; the caller stops it)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
