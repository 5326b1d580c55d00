"""The resolved plan of a run before any I/O: per feature its date range, time bins, output grid and size."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pixels_xr.config import PixelsConfig
from pixels_xr.errors import ConfigError
from pixels_xr.features import Feature
from pixels_xr.grid import Grid, make_grid
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


def feature_grid(config: PixelsConfig, feature: Feature, anchor: tuple[float, float] = (0.0, 0.0)) -> Grid:
    """Output grid of a feature: its bounds in the output CRS snapped to the scale (see ``grid``)."""
    crs = config.crs or feature.output_crs
    geom = feature.geometry_in(crs)
    return make_grid(geom.bounds, crs, config.resolved_scale, anchor)


def check_size(config: PixelsConfig, feature: Feature, grid: Grid) -> None:
    """Refuse grids past ``max_pixels`` (per band and slice) unless ``force``: such sizes are rarely meant."""
    pixels = grid.width * grid.height
    if pixels > config.max_pixels and not config.force:
        raise ConfigError(
            f"output grid of {grid.width}×{grid.height} = {pixels:,} pixels at scale {grid.scale} exceeds "
            f"max_pixels {config.max_pixels:,}; check scale and the geometry's CRS, or set force: true",
            f"feature {feature.id!r}")


def plan_feature(config: PixelsConfig, feature: Feature) -> FeaturePlan:
    """Resolve dates, bins and grid for one feature; raises ``ConfigError`` for impossible requests."""
    start, end = config.date_range(feature)
    grid = feature_grid(config, feature)
    check_size(config, feature, grid)
    return FeaturePlan(feature, start, end, config.bins(feature), grid)


def plan(config: PixelsConfig, features: list[Feature]) -> list[FeaturePlan]:
    """Plans for all features, in order."""
    return [plan_feature(config, f) for f in features]
