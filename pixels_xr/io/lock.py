"""One writer per output: an exclusive lock object next to the run ledger, local or on an object store.

The lock is ``OUT/.pixels_xr/lock.json``, created exclusively (``O_CREAT | O_EXCL`` locally; a conditional
PUT, ``If-None-Match: *``, on S3 and stores that honour it), holding who took it (host, pid, run id) and a
heartbeat that the holder refreshes every ``HEARTBEAT_S`` seconds. A second run finds the lock and is refused
with one line naming the holder.

Stale-lock rule: a lock is stale, and is broken by the next run, when its heartbeat is older than
``STALE_AFTER_S`` (the holder died or lost its storage: a live holder refreshes it 10× within that time), or
when it was taken on this host by a process that no longer exists (a ``kill -9`` or a crash on this machine
frees the output at once). ``PIXELS_XR_LOCK_STALE_S`` overrides the age. Breaking a lock is itself
exclusive: the breaker deletes it and must then win the exclusive create like anyone else.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from pixels_xr.errors import OutputError
from pixels_xr.io import storage

LOCK_NAME = "lock.json"
#: Seconds between heartbeats of the lock holder.
HEARTBEAT_S = 30.0
#: A heartbeat older than this (seconds) marks the lock stale.
STALE_AFTER_S = 300.0


def _stale_after() -> float:
    try:
        return float(os.environ.get("PIXELS_XR_LOCK_STALE_S", STALE_AFTER_S))
    except ValueError:
        return STALE_AFTER_S


def _create_exclusive(url: str, data: bytes) -> bool:
    """Write ``data`` to ``url`` only if nothing is there; False when something is."""
    if storage.is_remote(url):
        fs, path = storage.filesystem(url)
        try:
            fs.pipe_file(path, data, mode="create")  # If-None-Match: *
        except Exception as exc:  # FileExistsError, or botocore's ClientError for the 412 with older s3fs
            if isinstance(exc, FileExistsError) or "PreconditionFailed" in str(exc) or "412" in str(exc):
                return False
            raise OutputError(f"cannot create the output lock: {exc}", url) from None
        return True
    path = storage.local_path(url)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        kind = ReadOnlyOutput if _read_only(exc) else OutputError
        raise kind(f"cannot create the output lock: {exc.strerror}", url) from None
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(holder: dict[str, Any]) -> bool:
    beat = holder.get("heartbeat", 0)
    if not isinstance(beat, int | float) or time.time() - beat > _stale_after():
        return True
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    return (f"process {holder.get('pid')} on {holder.get('host')}" + (f" since {started}" if started else "")
            + f", last heartbeat {max(0, round(time.time() - float(holder.get('heartbeat', 0))))} s ago")


class ReadOnlyOutput(OutputError):
    """The output's storage refuses writes (a read-only mount or bucket): no lock can be taken, and a run
    may only find that everything is already done."""


def _read_only(exc: OSError) -> bool:
    import errno

    return exc.errno in {errno.EROFS, errno.EACCES, errno.EPERM}


class OutputLock:
    """The exclusive lock of one output (see the module docstring); use as a context manager."""

    def __init__(self, out: str, manifest_dir: str) -> None:
        self.out = out
        self.url = storage.join(out, manifest_dir, LOCK_NAME)
        self.run_id = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    def _record(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": self._started, "heartbeat": time.time()}).encode()

    def _holder(self) -> dict[str, Any] | None:
        data = storage.read_bytes(self.url)
        if data is None:
            return None
        try:
            holder = json.loads(data)
        except ValueError:
            holder = None
        return holder if isinstance(holder, dict) else {"heartbeat": 0}

    def acquire(self) -> None:
        """Take the lock or raise ``OutputError`` naming the run that holds it."""
        for _ in range(3):
            if _create_exclusive(self.url, self._record()):
                self._thread = threading.Thread(target=self._beat, name="pixels-xr-lock", daemon=True)
                self._thread.start()
                return
            holder = self._holder()
            if holder is None:
                continue  # released between our create and our read: try again
            if not _is_stale(holder):
                raise OutputError(f"another run is writing this output ({_describe(holder)}); wait for it "
                                  f"to finish, or delete {self.url} if that run is gone", self.out)
            storage.remove_tree(self.url)  # stale: break it, then compete for the create again
        raise OutputError("could not take the output lock (other runs keep taking it)", self.url)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a missed beat is retried; STALE_AFTER_S is 10 beats
                holder = self._holder()
                if holder is not None and holder.get("run_id") == self.run_id:
                    storage.write_bytes(self.url, self._record())

    def release(self) -> None:
        """Stop the heartbeat and delete the lock (only our own)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            with contextlib.suppress(Exception):
                holder = self._holder()
                if holder is not None and holder.get("run_id") == self.run_id:
                    storage.remove_tree(self.url)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def locked(out: str, manifest_dir: str) -> Iterator[OutputLock]:
    """``with locked(out, ".pixels_xr"):`` — hold the output's lock for the block."""
    lock = OutputLock(out, manifest_dir)
    with lock:
        yield lock
