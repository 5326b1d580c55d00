"""A memo that lives for one batch run: what every feature would otherwise redo.

Inside ``with run_cache():`` a local catalog is parsed once (not once per feature) and each asset header is
checked once however many features overlap its item. Outside it nothing is cached, so interactive calls
always see the files as they are now. Thread-safe; two threads asking for a missing key at once may both
compute it (the results are equal).
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
        if (kind, key) in store:
            return store[(kind, key)]
    value = compute()
    with _lock:
        return store.setdefault((kind, key), value)
