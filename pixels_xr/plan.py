"""The resolved plan of a run before any I/O: per feature its date range, time bins, output grid and size."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pixels_xr.config import PixelsConfig
from pixels_xr.features import Feature
from pixels_xr.grid import Grid, check_size, feature_grid
from pixels_xr.timeslices import TimeBin


@dataclass(frozen=True)
class FeaturePlan:
    """What a run will do for one feature."""

    feature: Feature
    start: dt.date
    end: dt.date
    bins: list[TimeBin]
    grid: Grid

    @property
    def pixels(self) -> int:
        """Pixels of one time slice of one band."""
        return self.grid.width * self.grid.height


def plan_feature(config: PixelsConfig, feature: Feature) -> FeaturePlan:
    """Resolve dates, bins and grid for one feature; raises ``ConfigError`` for impossible requests."""
    start, end = config.date_range(feature)
    grid = feature_grid(config, feature)
    check_size(config, feature, grid)
    return FeaturePlan(feature, start, end, config.bins(feature), grid)


def plan(config: PixelsConfig, features: list[Feature]) -> list[FeaturePlan]:
    """Plans for all features, in order."""
    return [plan_feature(config, f) for f in features]
