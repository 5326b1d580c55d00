"""Reading JSON that a user supplies: one guard, so hostile input only ever raises the project's own errors."""

from __future__ import annotations

import json
import re
from typing import Any

from pixels_xr.errors import PixelsError

#: Nesting deeper than this is refused before decoding (the decoder itself recurses, and a deeply nested
#: document would otherwise end in ``RecursionError``); no configuration, feature or manifest needs it.
MAX_DEPTH = 64


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


def _too_deep(text: str, limit: int) -> bool:
    """True when brackets outside strings nest deeper than ``limit`` (strings cut by a regex, depth by a
    cumulative sum: fast enough for features files of a million parcels)."""
    import numpy as np

    brackets = _STRING.sub("", text).encode("utf-8", "replace")
    codes = np.frombuffer(brackets, np.uint8)
    steps = np.zeros(codes.shape, np.int32)
    steps[(codes == 0x5B) | (codes == 0x7B)] = 1
    steps[(codes == 0x5D) | (codes == 0x7D)] = -1
    return bool(steps.size) and int(np.cumsum(steps).max()) > limit


def loads(text: str | bytes, where: str, error: type[PixelsError] = PixelsError, **kwargs: Any) -> Any:
    """``json.loads`` whose every failure is ``error(message, where)``: bad syntax (with line and column),
    nesting deeper than ``MAX_DEPTH``, numbers the decoder cannot hold, text that is not UTF-8."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise error(f"not UTF-8 text: {exc.reason} at byte {exc.start}", where) from None
    if ("[" in text or "{" in text) and _too_deep(text, MAX_DEPTH):
        raise error(f"JSON nested deeper than {MAX_DEPTH} levels", where)
    try:
        return json.loads(text, **kwargs)
    except json.JSONDecodeError as exc:
        raise error(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", where) from None
    except (RecursionError, ValueError, OverflowError) as exc:  # int digits limit, hooks' own ValueErrors
        if isinstance(exc, PixelsError):
            raise
        raise error(f"not valid JSON: {' '.join(str(exc).split())[:200]}", where) from None
