"""A latency-injecting HTTP/1.1 proxy on 127.0.0.1 that counts requests and bytes (tests and benchmarks).

Object storage in a user's region answers each request after 10–30 ms; on loopback moto_server answers in
well under one. ``LatencyProxy`` sits between a client (GDAL, boto3, obstore) and an upstream server
(moto_server, ``range_server``) and holds every request ``delay`` seconds before forwarding it, so the
cost of a request shows the way it does in the cloud. ``tc netem`` is not available on these machines, and
netem would delay packets, not requests: a keep-alive connection carrying 50 requests must cost 50 delays.

Why HTTP framing instead of a byte pipe: counting and delaying are per HTTP request, and one TCP
connection carries many (curl keeps connections alive). Each request's head and body are read (by
``Content-Length`` or chunked framing), held, forwarded verbatim on the connection's own upstream
connection, and the response is read whole (by ``Content-Length``, chunked framing, no body for HEAD, 1xx,
204 and 304, or up to the close), counted, and relayed verbatim. Nothing is rewritten except ``Expect: 100-continue``, which the
proxy answers itself (it has to read the body before the delay anyway). Requests of different connections
run concurrently, as they would against S3.

Use it in a thread (``with LatencyProxy("127.0.0.1:9000", delay=0.02) as proxy: ... proxy.stats()``) or as
its own process, which a benchmark prefers so the proxy never competes for the GIL with the code measured::

    python -m pixels_xr.testing.latency_proxy 127.0.0.1:9000 --delay-ms 20 --port 0 --control-port 0

The process prints ``{"port": P, "control_port": C}`` on one line; ``ProxyProcess`` wraps it: ``GET /stats``
on the control port returns the counters, ``POST /reset`` clears them, ``POST /delay?ms=N`` changes the
delay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

HOST = "127.0.0.1"
_HEAD_LIMIT = 1 << 16  # longest request or response head accepted (bytes)
_COPY = 1 << 16  # relay buffer


@dataclass(frozen=True)
class RequestRecord:
    """One proxied request: method, target (path and query), ``Range`` header ("" when none), response
    status and the response body's size in bytes."""

    method: str
    target: str
    range: str
    status: int
    body_bytes: int


@dataclass
class ProxyStats:
    """Counters since the last reset: requests (by method), TCP connections accepted from clients, bytes
    of response bodies and of request bodies, and every request's record."""

    requests: int = 0
    by_method: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    response_bytes: int = 0
    request_bytes: int = 0
    records: list[RequestRecord] = field(default_factory=list)

    @property
    def gets(self) -> int:
        return self.by_method.get("GET", 0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "records": [asdict(r) for r in self.records]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProxyStats:
        return cls(**{**data, "records": [RequestRecord(**r) for r in data["records"]]})


class _Closed(Exception):
    """The peer closed the connection before a complete message."""


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """(start line, lower-cased header names → value) of a message head (the last value of a repeated
    header wins: only framing headers are read, and those are never repeated)."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """A message head up to and including the blank line; ``None`` on a clean EOF before any byte."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise _Closed from exc
    except asyncio.LimitOverrunError as exc:
        raise _Closed from exc


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], *, until_close: bool
                     ) -> tuple[bytes, int]:
    """One message body framed by ``headers`` (chunked, ``Content-Length``, or up to EOF when
    ``until_close``), verbatim; returns it and the payload's size (chunk framing excluded)."""
    kept = bytearray()
    size = 0
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = await reader.readuntil(b"\r\n")
            length = int(line.split(b";", 1)[0].strip() or b"0", 16)
            kept += line
            if length == 0:  # trailers, then the blank line
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    kept += trailer
                return bytes(kept + b"\r\n"), size
            kept += await reader.readexactly(length + 2)
            size += length
    if "content-length" in headers:
        kept += await reader.readexactly(int(headers["content-length"]))
        return bytes(kept), len(kept)
    if until_close:
        while data := await reader.read(_COPY):
            kept += data
        return bytes(kept), len(kept)
    return b"", 0


class Endpoint:
    """A service on ``host:port`` (started by ``start()``, also on entering a ``with`` block)."""

    host: str = HOST
    port: int = 0

    @property
    def host_port(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host_port}"

    def start(self) -> Any:
        return self

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LatencyProxy(Endpoint):
    """Proxy from ``host:port`` (0: a free port) to ``upstream`` ("host:port"), holding every request
    ``delay`` seconds; runs its own event loop in a daemon thread between ``start()`` and ``stop()``."""

    def __init__(self, upstream: str, delay: float = 0.0, *, host: str = HOST, port: int = 0) -> None:
        up_host, _, up_port = upstream.removeprefix("http://").rstrip("/").rpartition(":")
        self.upstream = (up_host, int(up_port))
        self.delay = float(delay)
        self.host, self.port = host, port
        self._stats = ProxyStats()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    # ---------------------------------------------------------------------------------------- counters
    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        with self._lock:
            s = self._stats
            return ProxyStats(s.requests, dict(s.by_method), s.connections, s.response_bytes, s.request_bytes,
                              list(s.records))

    def reset(self) -> None:
        with self._lock:
            self._stats = ProxyStats()

    def _count(self, record: RequestRecord, request_bytes: int) -> None:
        with self._lock:
            s = self._stats
            s.requests += 1
            s.by_method[record.method] = s.by_method.get(record.method, 0) + 1
            s.response_bytes += record.body_bytes
            s.request_bytes += request_bytes
            s.records.append(record)

    # ---------------------------------------------------------------------------------------- lifecycle
    async def serve(self) -> asyncio.AbstractServer:
        """Start listening on the running loop (the port is known afterwards)."""
        self._server = await asyncio.start_server(self._client, self.host, self.port, limit=_HEAD_LIMIT,
                                                  backlog=512)
        self.port = self._server.sockets[0].getsockname()[1]
        return self._server

    def start(self) -> LatencyProxy:
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="latency-proxy", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.serve(), loop).result(10)
        return self

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        loop.close()

    # ---------------------------------------------------------------------------------------- one connection
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._stats.connections += 1
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    return
                start, headers = _parse_head(head)
                method, target = (start.split(" ") + ["", ""])[:2]
                if headers.get("expect", "").lower() == "100-continue":
                    head = b"".join(line + b"\r\n" for line in head.split(b"\r\n")[:-2]
                                    if not line.lower().startswith(b"expect:")) + b"\r\n"
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                body, body_size = await _read_body(reader, headers, until_close=False)
                if self.delay > 0:
                    await asyncio.sleep(self.delay)
                upstream, status, size, keep, response = await self._forward(upstream, head + body, method)
                # counted before the client has the answer: a caller reading stats() right after its
                # read finished sees that read
                self._count(RequestRecord(method, target, headers.get("range", ""), status, size), body_size)
                writer.write(response)
                await writer.drain()
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (_Closed, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        except asyncio.CancelledError:  # stop(): end quietly (asyncio logs a cancelled connection task)
            return
        finally:
            for w in (writer, upstream[1] if upstream else None):
                if w is not None:
                    with contextlib.suppress(Exception):
                        w.close()

    async def _forward(self, upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, request: bytes,
                       method: str
                       ) -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, int, int, bool, bytes]:
        """Send ``request`` upstream (a fresh connection when the kept one was closed meanwhile) and read the
        whole response; returns (upstream connection or None, status, body size, keep-alive, response)."""
        for attempt in (0, 1):
            if upstream is None or upstream[0].at_eof():
                if upstream is not None:
                    upstream[1].close()
                upstream = await asyncio.open_connection(*self.upstream, limit=_HEAD_LIMIT)
            up_reader, up_writer = upstream
            try:
                up_writer.write(request)
                await up_writer.drain()
                head = await _read_head(up_reader)
                while head is not None and head.split(b" ", 2)[1:2] in ([b"100"], [b"102"], [b"103"]):
                    head = await _read_head(up_reader)  # interim answers of the upstream: not relayed
            except (ConnectionError, _Closed):
                head = None
            if head is None:  # the kept connection was closed under us: retry once on a fresh one
                up_writer.close()
                upstream = None
                if attempt == 0:
                    continue
                raise _Closed
            break
        start, headers = _parse_head(head)
        status = int(start.split(" ", 2)[1])
        no_body = method == "HEAD" or status in (204, 304)
        delimited = "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower()
        body, size = (b"", 0) if no_body else await _read_body(up_reader, headers, until_close=True)
        keep = headers.get("connection", "").lower() != "close" and (no_body or delimited)
        if not keep:
            upstream[1].close()
            upstream = None
        return upstream, status, size, keep, head + body


# ------------------------------------------------------------------------------------------ as a process
async def _control(proxy: LatencyProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The control port: ``GET /stats``, ``POST /reset``, ``POST /delay?ms=N`` (one request per connection)."""
    try:
        head = await _read_head(reader)
        if head is None:
            return
        start, headers = _parse_head(head)
        await _read_body(reader, headers, until_close=False)
        method, target = (start.split(" ") + ["", ""])[:2]
        path, _, query = target.partition("?")
        if method == "POST" and path == "/reset":
            proxy.reset()
        elif method == "POST" and path == "/delay":
            proxy.delay = float(dict(p.split("=", 1) for p in query.split("&") if "=" in p)["ms"]) / 1000
        body = json.dumps(proxy.stats().to_dict() | {"delay": proxy.delay}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
    finally:
        writer.close()


async def _main_async(args: argparse.Namespace) -> None:
    proxy = LatencyProxy(args.upstream, args.delay_ms / 1000, port=args.port)
    await proxy.serve()
    control = await asyncio.start_server(lambda r, w: _control(proxy, r, w), HOST, args.control_port)
    print(json.dumps({"port": proxy.port, "control_port": control.sockets[0].getsockname()[1]}), flush=True)
    await asyncio.Event().wait()  # until killed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="HTTP/1.1 proxy on 127.0.0.1 holding each request a set delay")
    ap.add_argument("upstream", help="host:port of the server to forward to")
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--control-port", type=int, default=0)
    args = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main_async(args))


class ProxyProcess(Endpoint):
    """``LatencyProxy`` in its own process (``python -m pixels_xr.testing.latency_proxy``): same counters,
    read over its control port."""

    def __init__(self, upstream: str, delay: float = 0.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "pixels_xr.testing.latency_proxy", upstream,
                                      "--delay-ms", str(delay * 1000)], stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            self.proc.kill()
            raise RuntimeError(f"latency proxy did not start (exit status {self.proc.wait()})")
        ports = json.loads(line)
        self.port, self._control = ports["port"], f"http://{HOST}:{ports['control_port']}"

    def _call(self, method: str, path: str) -> dict[str, Any]:
        req = urllib.request.Request(self._control + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def stats(self) -> ProxyStats:
        data = self._call("GET", "/stats")
        data.pop("delay")
        return ProxyStats.from_dict(data)

    def reset(self) -> None:
        self._call("POST", "/reset")

    def set_delay(self, delay: float) -> None:
        self._call("POST", f"/delay?ms={delay * 1000}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()


def minimum_requests(files: list[Any], bounds: tuple[float, float, float, float], *, header_bytes: int = 16384,
                     gap: int = 1024) -> tuple[int, int]:
    """(requests, tiles) the area ``bounds`` costs at the least: per GeoTIFF, one header read of its first
    ``header_bytes`` plus one request per run of the full-resolution tiles inside ``bounds`` that the header
    read did not bring (runs: tile byte ranges sorted, merged where at most ``gap`` bytes apart — tile
    leaders and trailers). Byte ranges come from GDAL's ``BLOCK_OFFSET``/``BLOCK_SIZE`` metadata."""
    import rasterio
    from rasterio.windows import from_bounds

    requests = tiles = 0
    for path in files:
        with rasterio.open(path) as ds:
            bh, bw = ds.block_shapes[0]
            win = from_bounds(*bounds, transform=ds.transform)
            c0, r0 = max(0, int(win.col_off // bw)), max(0, int(win.row_off // bh))
            c1 = min(-(-ds.width // bw), -int(-(win.col_off + win.width) // bw))
            r1 = min(-(-ds.height // bh), -int(-(win.row_off + win.height) // bh))
            spans = sorted((int(ds.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=1)),
                            int(ds.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=1)))
                           for r in range(r0, r1) for c in range(c0, c1))
        tiles += len(spans)
        runs, end = 0, None
        for offset, length in spans:
            if offset + length <= header_bytes:
                continue
            if end is None or offset > end + gap:
                runs += 1
            end = offset + length if end is None else max(end, offset + length)
        requests += 1 + runs
    return requests, tiles


def requests_per_path(records: list[RequestRecord]) -> Counter[str]:
    """How many requests each path received (which files were read how often)."""
    return Counter(r.target.split("?", 1)[0] for r in records)


if __name__ == "__main__":
    main()
