"""Date ranges (fixed or per-feature dynamic) and the time bins that slice them.

Bins are ordered, contiguous, non-overlapping and cover ``[start, end]`` inclusive of the end day. Month
stepping is calendar-correct and anchored on the start date (bin k starts at ``start + k·step months``,
clamped to the month's last day), so Jan 31 → Feb 28 → Mar 31 never drifts. The last bin is cut at
``end`` and flagged ``partial`` when it is shorter than a full interval.

Rolling ranges (nightly jobs): ``start``/``end`` may be spelled relative to the run date — ``"today"``,
``"-12 months"``, ``"today - 30 days"``, ``"+1 week"`` (units day, week, month, year; plural or not) — and are
resolved against ``run_date()``: ``$PIXELS_XR_RUN_DATE`` (``YYYY-MM-DD``) or today's UTC date. A rolling
``start`` of a binned mode is snapped back onto the interval's calendar grid (months: the first of a month
whose index since year 0 is a multiple of the step; weeks: a Monday, multiple of the step since
1970-01-05; days: a multiple of the step since 1970-01-01), so the bins of tomorrow's run are today's bins
plus new ones, never a shifted set.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
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

    @functools.cached_property  # bins are made once per range (``_time_bins``), labels asked per feature
    def label(self) -> str:
        """ISO start/end label, e.g. ``2021-01-01/2021-02-28``."""
        return f"{self.start.isoformat()}/{self.end.isoformat()}"


#: Environment override of the run date rolling ranges resolve against (``YYYY-MM-DD``).
RUN_DATE_ENV = "PIXELS_XR_RUN_DATE"
_ROLLING = re.compile(r"^\s*(today)?\s*(?:([+-])\s*(\d{1,5})\s*(day|week|month|year)s?)?\s*$", re.IGNORECASE)


def run_date() -> dt.date:
    """The day rolling ranges resolve against: ``$PIXELS_XR_RUN_DATE`` or today (UTC)."""
    value = os.environ.get(RUN_DATE_ENV)
    if value:
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"${RUN_DATE_ENV} must be a date YYYY-MM-DD, got {value!r}") from None
    return dt.datetime.now(dt.timezone.utc).date()


def rolling_spelling(text: str) -> str | None:
    """The canonical spelling of a rolling date (``today``, ``today-12months``), or None when ``text`` is not
    one."""
    m = _ROLLING.match(text)
    if not m or not (m.group(1) or m.group(2)):
        return None
    if not m.group(2):
        return "today"
    return f"today{m.group(2)}{int(m.group(3))}{m.group(4).lower()}s"


def resolve_rolling(spelling: str, today: dt.date | None = None) -> dt.date:
    """A rolling date (``rolling_spelling``'s form or any accepted spelling) on the run date."""
    canonical = rolling_spelling(spelling)
    if canonical is None:
        raise ValueError(f"not a rolling date: {spelling!r}")
    day = today or run_date()
    m = _ROLLING.match(canonical)
    assert m is not None
    if not m.group(2):
        return day
    n = int(m.group(3)) * (1 if m.group(2) == "+" else -1)
    unit = m.group(4).lower()
    return day + (relativedelta(years=n) if unit == "year" else relativedelta(months=n) if unit == "month"
                  else dt.timedelta(weeks=n) if unit == "week" else dt.timedelta(days=n))


def on_interval_grid(day: dt.date, interval: Interval, step: int) -> dt.date:
    """The latest day on or before ``day`` where a bin of ``step × interval`` starts on the calendar grid."""
    if interval == "months":
        index = day.year * 12 + day.month - 1
        index -= index % step
        return dt.date(index // 12, index % 12 + 1, 1)
    epoch, length = (dt.date(1970, 1, 5), 7 * step) if interval == "weeks" else (dt.date(1970, 1, 1), step)
    return day - dt.timedelta(days=(day - epoch).days % length)


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
    return list(_time_bins(start, end, interval, step))


@functools.lru_cache(maxsize=1024)
def _time_bins(start: dt.date, end: dt.date, interval: Interval, step: int) -> tuple[TimeBin, ...]:
    """``time_bins``, made once per range: every feature of a run with fixed dates asks for the same bins
    (a calendar walk per feature was a tenth of a small feature's planning)."""
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
    return tuple(bins)


def assign_bins(days: list[dt.date], bins: list[TimeBin]) -> list[int]:
    """Index of the bin holding each day, or -1 when it is outside every bin."""
    import bisect

    starts = [b.start for b in bins]
    out = []
    for day in days:
        i = bisect.bisect_right(starts, day) - 1
        out.append(i if i >= 0 and bins[i].contains(day) else -1)
    return out
