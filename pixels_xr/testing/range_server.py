"""A range-capable static HTTP file server on 127.0.0.1 (tests and benchmarks): what ``/vsicurl/`` reads.

Earth Search hrefs are ``https://…s3…amazonaws.com/…``: GDAL reads them through ``/vsicurl/`` with HTTP Range
requests, a different code path from ``/vsis3/``. Python's ``http.server`` ignores ``Range`` (it answers 200
with the whole file) and werkzeug's server closes every connection, so this is a small handler on
``http.server`` that answers as object storage does (RFC 9110 §14): ``Range: bytes=a-b`` (also ``a-`` and
the suffix ``-n``) gets ``206 Partial Content`` with ``Content-Range``; several ranges a
``multipart/byteranges`` 206; a range starting past the end ``416`` with ``Content-Range: bytes */size``;
a ``Range`` it cannot parse is ignored (200, the whole file); HEAD the size; a missing file 404; nothing
outside the folder is served. HTTP/1.1 keep-alive on a threaded server.

    python -m pixels_xr.testing.range_server FOLDER [--port N]
"""

from __future__ import annotations

import argparse
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pixels_xr.testing.latency_proxy import HOST, Endpoint

_RANGE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")
_BOUNDARY = "pixels-xr-byteranges"


def parse_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """Inclusive ``(first, last)`` byte ranges of a ``Range`` header for a file of ``size`` bytes: ``None``
    when the header is not a byte range set (ignored: the whole file), ``[]`` when none is satisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not spec.strip():
        return None
    out = []
    for part in spec.split(","):
        m = _RANGE.match(part)
        if m is None or m.groups() == ("", ""):
            return None
        first, last = m.groups()
        if first == "":  # suffix: the last n bytes
            n = int(last)
            if n:
                out.append((max(0, size - n), size - 1))
            continue
        a = int(first)
        b = size - 1 if last == "" else min(int(last), size - 1)
        if last != "" and int(last) < a:
            return None  # invalid range-spec: the whole header is ignored
        if a < size:
            out.append((a, b))
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 and CDNs answer
    disable_nagle_algorithm = True  # head and body are two writes: Nagle + delayed ACK would add 40 ms
    root: Path

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _file(self) -> Path | None:
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        path = (self.root / name).resolve()
        if not name or not path.is_relative_to(self.root) or not path.is_file():
            return None
        return path

    def _send(self, status: int, headers: dict[str, str], payload: bytes | list[bytes], body: bool,
              length: int | None = None) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        parts = payload if isinstance(payload, list) else [payload]
        self.send_header("Content-Length", str(sum(len(p) for p in parts) if length is None else length))
        self.end_headers()
        if body:
            for p in parts:
                self.wfile.write(p)

    def _answer(self, body: bool) -> None:
        path = self._file()
        if path is None:
            self._send(404, {"Content-Type": "text/plain"}, b"not found\n", body)
            return
        size = path.stat().st_size
        base = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        ranges = parse_ranges(self.headers.get("Range", ""), size) if "Range" in self.headers else None
        if ranges is None:
            self._send(200, base, path.read_bytes() if body else b"", body, length=size)
            return
        if not ranges:
            self._send(416, {**base, "Content-Range": f"bytes */{size}"}, b"", body)
            return
        with path.open("rb") as f:
            def read(a: int, b: int) -> bytes:
                f.seek(a)
                return f.read(b - a + 1)

            if len(ranges) == 1:
                a, b = ranges[0]
                self._send(206, {**base, "Content-Range": f"bytes {a}-{b}/{size}"}, read(a, b), body)
                return
            parts = []
            for a, b in ranges:
                parts += [f"--{_BOUNDARY}\r\nContent-Type: application/octet-stream\r\n"
                          f"Content-Range: bytes {a}-{b}/{size}\r\n\r\n".encode(), read(a, b), b"\r\n"]
            parts.append(f"--{_BOUNDARY}--\r\n".encode())
            self._send(206, {"Accept-Ranges": "bytes",
                             "Content-Type": f"multipart/byteranges; boundary={_BOUNDARY}"}, parts, body)


class RangeServer(Endpoint):
    """Serve ``root`` on ``host:port`` (0: a free port) from a daemon thread between ``start()`` and
    ``stop()``; ``url`` is ``http://host:port``."""

    def __init__(self, root: str | Path, *, host: str = HOST, port: int = 0) -> None:
        self.root = Path(root).resolve()
        handler = type("Handler", (_Handler,), {"root": self.root})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.host, self.port = host, self._server.server_port
        self._thread: threading.Thread | None = None

    def start(self) -> RangeServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="range-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="range-capable static file server on 127.0.0.1")
    ap.add_argument("root")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    server = RangeServer(args.root, port=args.port)
    print(server.url, flush=True)
    try:
        server._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._server.server_close()


if __name__ == "__main__":
    main()
