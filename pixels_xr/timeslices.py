"""Date ranges (fixed or per-feature dynamic) and the time bins that slice them.

Bins are ordered, contiguous, non-overlapping and cover ``[start, end]`` inclusive of the end day. Month
stepping is calendar-correct and anchored on the start date (bin k starts at ``start + k·step months``,
clamped to the month's last day), so Jan 31 → Feb 28 → Mar 31 never drifts. The last bin is cut at
``end`` and flagged ``partial`` when it is shorter than a full interval.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from dateutil.relativedelta import relativedelta

Interval = Literal["days", "weeks", "months"]


@dataclass(frozen=True)
class TimeBin:
    """One time slice: ``start`` and ``end`` are both inclusive days."""

    start: dt.date
    end: dt.date
    partial: bool = False

    def contains(self, day: dt.date) -> bool:
        """True when ``day`` falls inside the bin."""
        return self.start <= day <= self.end

    @property
    def label(self) -> str:
        """ISO start/end label, e.g. ``2021-01-01/2021-02-28``."""
        return f"{self.start.isoformat()}/{self.end.isoformat()}"


def shift(day: dt.date, interval: Interval, n: int) -> dt.date:
    """``day`` moved by ``n`` intervals (calendar months clamp to the month end)."""
    if interval == "days":
        return day + dt.timedelta(days=n)
    if interval == "weeks":
        return day + dt.timedelta(weeks=n)
    if interval == "months":
        return day + relativedelta(months=n)
    raise ValueError(f"unknown interval {interval!r}")


def dynamic_range(end: dt.date, interval: Interval, step: int) -> tuple[dt.date, dt.date]:
    """Per-feature range for dynamic dates: ``end`` is the feature's date, ``start = end − step × interval``."""
    return shift(end, interval, -step), end


def time_bins(start: dt.date, end: dt.date, interval: Interval, step: int = 1) -> list[TimeBin]:
    """Contiguous bins of ``step × interval`` covering ``[start, end]`` inclusive; the last may be partial."""
    if end < start:
        raise ValueError(f"end {end} is before start {start}")
    if step < 1:
        raise ValueError("step must be >= 1")
    bins: list[TimeBin] = []
    k = 0
    while True:
        try:
            bin_start = shift(start, interval, k * step)
        except (OverflowError, ValueError):  # past the calendar's last day: past ``end`` too
            break
        if bin_start > end:
            break
        try:
            full_end = shift(start, interval, (k + 1) * step) - dt.timedelta(days=1)
        except (OverflowError, ValueError):  # the next bin would start past the calendar's last day
            full_end = dt.date.max
        bins.append(TimeBin(bin_start, min(full_end, end), partial=full_end > end))
        k += 1
    return bins


def assign_bins(days: list[dt.date], bins: list[TimeBin]) -> list[int]:
    """Index of the bin holding each day, or -1 when it is outside every bin."""
    import bisect

    starts = [b.start for b in bins]
    out = []
    for day in days:
        i = bisect.bisect_right(starts, day) - 1
        out.append(i if i >= 0 and bins[i].contains(day) else -1)
    return out
