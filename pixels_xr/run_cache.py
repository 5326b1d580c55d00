"""A memo that lives for one batch run: what every feature would otherwise redo.

Inside ``with run_cache():`` a local catalog is parsed once (not once per feature) and each asset header is
checked once however many features overlap its item. Outside it nothing is cached, so interactive calls
always see the files as they are now. Thread-safe, and a key is computed once: a second thread asking for
a key being computed waits for that result (two pystac walks of one local catalog at once, from the
batch's two planning threads, could fail with "does not resolve to a STAC object").
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_store: dict[tuple[str, Hashable], Any] | None = None
_depth = 0


@contextlib.contextmanager
def run_cache() -> Iterator[None]:
    """Enable the memo for the duration of a run (nested uses share the outermost one)."""
    global _store, _depth
    with _lock:
        _depth += 1
        if _store is None:
            _store = {}
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _store = None


def memo(kind: str, key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()`` once per ``(kind, key)`` while a run cache is active; otherwise every time."""
    store = _store
    if store is None:
        return compute()
    with _lock:
        slot = store.get((kind, key))
        owner = slot is None
        if owner:
            slot = store[(kind, key)] = _Slot()
    assert slot is not None
    if owner:
        try:
            slot.value = compute()
        except BaseException as exc:
            slot.error = exc
            with _lock:  # a failure is not remembered: the next caller tries again
                if store.get((kind, key)) is slot:
                    del store[(kind, key)]
            raise
        finally:
            slot.done.set()
        return slot.value
    slot.done.wait()
    if slot.error is not None:
        raise slot.error
    return slot.value


class _Slot:
    """A value being computed by one thread, waited for by the others."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
