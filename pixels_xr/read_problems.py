"""Read errors that happen after the asset check, while blocks are read: recorded, never silent.

Under ``on_asset_error: skip`` a read that fails mid-run (a COG truncated or deleted after its header was
checked, a flaky server past its retries) becomes nodata for that block, as stackstac does — but it is also
recorded here: on a Dask worker as a cluster event (``Worker.log_event`` on ``TOPIC``, which the batch
client reads back when the feature's job completes and turns into *degraded* units that are reported and
not recorded done, so a re-run reads them again); outside a worker in a process-wide list
(``local_problems``) and as a warning. The href is recorded redacted.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pixels_xr.signing import redact

TOPIC = "pixels-xr-read-errors"

_local: list[dict[str, Any]] = []
_lock = threading.Lock()


def record(href: str, error: str) -> None:
    """Record one failed read of ``href`` (called by the readers where a failure becomes nodata)."""
    event = {"href": redact(href), "error": redact(" ".join(str(error).split()))[:300], "time": time.time()}
    worker = _this_worker()
    if worker is not None:
        worker.log_event(TOPIC, event)
    else:
        with _lock:
            _local.append(event)


def _this_worker() -> Any:
    """The Dask worker of this process, also from the readers' own pool threads (where ``get_worker``
    knows none: its state is per task thread)."""
    try:
        from distributed import Worker, get_worker
    except ImportError:
        return None
    try:
        return get_worker()
    except ValueError:
        workers = list(Worker._instances)  # one per worker process; in-process clusters share a scheduler
        return workers[0] if workers else None


def local_problems(since: float = 0.0) -> list[dict[str, Any]]:
    """Problems recorded in this process (outside any worker) since ``since`` (``time.time()``)."""
    with _lock:
        return [e for e in _local if e["time"] >= since]


def mark(client: Any) -> str:
    """Post a marker event now (stamped by the scheduler, stored in arrival order) and return its id:
    ``cluster_problems`` then counts only what arrived after it, whatever the workers' clocks say."""
    import uuid

    token = uuid.uuid4().hex
    if client is not None:
        client.log_event(TOPIC, {"mark": token})
    return token


def cluster_problems(client: Any, hrefs: set[str], since: str) -> list[dict[str, Any]]:
    """Problems recorded on the cluster after the marker ``since`` (from ``mark``) for any of ``hrefs``
    (given unredacted or redacted). Attribution is by href and order: a feature whose job overlapped
    another's failing read of a shared href is reported degraded too (redone by a re-run: never wrong data,
    at worst a second read)."""
    wanted = {redact(h) for h in hrefs}
    events = [msg for _, msg in client.get_events(TOPIC)] if client is not None else []
    marks = [k for k, e in enumerate(events) if isinstance(e, dict) and e.get("mark") == since]
    after = events[marks[0] + 1:] if marks else events
    return [e for e in after if isinstance(e, dict) and e.get("href") in wanted]
