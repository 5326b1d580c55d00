"""Time bins: coverage of [start, end] inclusive, order, no overlap, calendar months, partial last bin."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pixels_xr.timeslices import assign_bins, dynamic_range, shift, time_bins

D = dt.date


def test_month_stepping_clamps_and_does_not_drift() -> None:
    bins = time_bins(D(2021, 1, 31), D(2021, 5, 20), "months", 1)
    assert [b.start for b in bins] == [D(2021, 1, 31), D(2021, 2, 28), D(2021, 3, 31), D(2021, 4, 30)]
    assert bins[0].end == D(2021, 2, 27)
    assert bins[-1].end == D(2021, 5, 20) and bins[-1].partial
    assert not time_bins(D(2021, 1, 31), D(2021, 5, 30), "months", 1)[-1].partial  # Apr 30 + 1 month = May 31


def test_end_day_is_included_and_trailing_partial_bin_kept() -> None:
    bins = time_bins(D(2020, 1, 1), D(2020, 1, 10), "weeks", 1)
    assert [(b.start, b.end, b.partial) for b in bins] == [
        (D(2020, 1, 1), D(2020, 1, 7), False), (D(2020, 1, 8), D(2020, 1, 10), True)]
    assert bins[-1].contains(D(2020, 1, 10))


def test_seed_example_two_month_bins() -> None:
    """The pixels documentation's example: interval months, interval_step 2."""
    bins = time_bins(D(2020, 1, 1), D(2020, 12, 31), "months", 2)
    assert len(bins) == 6 and not any(b.partial for b in bins)
    assert bins[1].start == D(2020, 3, 1) and bins[0].end == D(2020, 2, 29)


def test_seed_example_three_week_dynamic_window() -> None:
    """The documentation's dynamic example: interval weeks, step 3 → start = end − three weeks."""
    assert dynamic_range(D(2020, 6, 30), "weeks", 3) == (D(2020, 6, 9), D(2020, 6, 30))
    assert dynamic_range(D(2020, 3, 31), "months", 1) == (D(2020, 2, 29), D(2020, 3, 31))


def test_single_day_range() -> None:
    bins = time_bins(D(2020, 5, 5), D(2020, 5, 5), "days", 1)
    assert len(bins) == 1 and bins[0].start == bins[0].end == D(2020, 5, 5) and not bins[0].partial


def test_invalid_ranges() -> None:
    with pytest.raises(ValueError):
        time_bins(D(2020, 5, 5), D(2020, 5, 4), "days", 1)
    with pytest.raises(ValueError):
        time_bins(D(2020, 5, 5), D(2020, 5, 6), "days", 0)


def test_assign_bins() -> None:
    bins = time_bins(D(2020, 1, 1), D(2020, 3, 31), "months", 1)
    days = [D(2019, 12, 31), D(2020, 1, 1), D(2020, 1, 31), D(2020, 2, 1), D(2020, 3, 31), D(2020, 4, 1)]
    assert assign_bins(days, bins) == [-1, 0, 0, 1, 2, -1]


@settings(max_examples=300, deadline=None)
@given(start=st.dates(D(1990, 1, 1), D(2030, 12, 31)), length=st.integers(0, 1500),
       interval=st.sampled_from(["days", "weeks", "months"]), step=st.integers(1, 13))
def test_bins_cover_in_order_without_overlap(start: dt.date, length: int, interval: str, step: int) -> None:
    end = start + dt.timedelta(days=length)
    bins = time_bins(start, end, interval, step)  # type: ignore[arg-type]
    assert bins[0].start == start and bins[-1].end == end
    for a, b in zip(bins, bins[1:]):
        assert a.end + dt.timedelta(days=1) == b.start  # contiguous, ordered, no overlap
        assert not a.partial
    for i, b in enumerate(bins):
        assert b.start <= b.end
        assert b.start == shift(start, interval, i * step)  # anchored: no drift  # type: ignore[arg-type]
    full_end = shift(start, interval, len(bins) * step) - dt.timedelta(days=1)  # type: ignore[arg-type]
    assert bins[-1].partial == (full_end > end)
