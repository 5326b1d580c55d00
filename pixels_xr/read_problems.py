"""Read errors that happen after the asset check, while blocks are read: recorded, never silent.

Under ``on_asset_error: skip`` a read that fails mid-run (a COG truncated or deleted after its header was
checked, a flaky server past its retries) becomes nodata for that block, as stackstac does — but it is also
recorded here: on a Dask worker as a cluster event (``Worker.log_event`` on ``TOPIC``, which the batch
client reads back when the feature's job completes and turns into *degraded* units that are reported and
not recorded done, so a re-run reads them again). Outside a worker (an in-process ``compute``) the reader's
warning is the record. The href is recorded redacted.
"""

from __future__ import annotations

import time
from typing import Any

from pixels_xr.signing import redact

TOPIC = "pixels-xr-read-errors"

def record(href: str, error: str) -> None:
    """Record one failed read of ``href`` (called by the readers where a failure becomes nodata)."""
    worker = _this_worker()
    if worker is not None:
        worker.log_event(TOPIC, {"href": redact(href), "error": redact(" ".join(str(error).split()))[:300]})


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


def mark(client: Any) -> float:
    """The scheduler's clock now (``cluster_problems`` counts what the scheduler received after it, whatever
    the workers' clocks say). A clock read, not a marker event: the topic then holds read errors only, so
    reading it back per feature stays cheap in runs of 10,000 features."""
    if client is None:
        return 0.0
    return float(client.run_on_scheduler(time.time))


def cluster_problems(client: Any, hrefs: set[str], since: float,
                     events: list[tuple[float, Any]] | None = None) -> list[dict[str, Any]]:
    """Problems the scheduler received at or after ``since`` (from ``mark``, its own clock) for any of
    ``hrefs`` (given unredacted or redacted). Attribution is by href and time: a feature whose job
    overlapped another's failing read of a shared href is reported degraded too (redone by a re-run: never
    wrong data, at worst a second read). ``events``: the topic as ``read_events`` fetched it (one round trip
    for the many features whose jobs completed together)."""
    if client is None:
        return []
    recent = [msg for stamp, msg in (read_events(client) if events is None else events)
              if stamp >= since and isinstance(msg, dict)]
    if not recent:  # the usual case: nothing to attribute, no href redacted
        return []
    wanted = {redact(h) for h in hrefs}
    return [msg for msg in recent if msg.get("href") in wanted]


def read_events(client: Any) -> list[tuple[float, Any]]:
    """The read errors the scheduler holds (``(time, message)``), in one round trip."""
    return [] if client is None else list(client.get_events(TOPIC))
