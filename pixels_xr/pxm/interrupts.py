"""Ctrl-C during a render on a local cluster: the worker side (a module of its own so that only a render
imports distributed, and workers import this by reference)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["IgnoreInterrupts", "quiet_worker"]


class IgnoreInterrupts(WorkerPlugin):
    """Workers of the local cluster ``render`` made ignore SIGINT.

    A terminal's Ctrl-C goes to the whole process group, worker processes included; each printed its
    KeyboardInterrupt traceback. Left to the client process, the interrupt cancels the tasks and closes
    the cluster, which stops the workers.
    """

    name = "pixels-xr-pxm-ignore-sigint"

    def setup(self, worker: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


async def quiet_worker() -> None:
    """On a worker about to be stopped after an interrupt: no warning per cancelled task (a coroutine:
    ``Client.run(..., wait=False)`` only takes those)."""
    logging.getLogger("distributed").setLevel(logging.ERROR)
