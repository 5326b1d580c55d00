"""Output pixel grids: a feature's bounds in the output CRS snapped to ``scale`` around a grid phase.

Rule: the grid's edges sit on ``anchor + k × scale`` for integer k, where ``anchor`` is the source grid's
origin (its phase) when every source shares one phase at this scale in the output CRS, and 0 otherwise.
The grid covers the feature's bounds completely (edges rounded outwards), so at native scale output
pixels coincide with source pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from typing import TYPE_CHECKING

from affine import Affine
from pyproj import CRS

from pixels_xr.errors import ConfigError

if TYPE_CHECKING:  # the grid rules read a config and a feature; neither module imports this one
    from pixels_xr.config import PixelsConfig
    from pixels_xr.features import Feature

_EPS = 1e-6


@dataclass(frozen=True)
class Grid:
    """A north-up pixel grid: CRS, pixel size, bounds (left, bottom, right, top) and shape."""

    crs: CRS
    scale: float
    left: float
    bottom: float
    right: float
    top: float

    @property
    def width(self) -> int:
        return int(round((self.right - self.left) / self.scale))

    @property
    def height(self) -> int:
        return int(round((self.top - self.bottom) / self.scale))

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width)."""
        return self.height, self.width

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return self.left, self.bottom, self.right, self.top

    @property
    def transform(self) -> Affine:
        return Affine(self.scale, 0.0, self.left, 0.0, -self.scale, self.top)

    @property
    def epsg(self) -> int | None:
        return self.crs.to_epsg()

    def xs(self) -> list[float]:
        """Pixel-centre x coordinates."""
        return [self.left + (i + 0.5) * self.scale for i in range(self.width)]

    def ys(self) -> list[float]:
        """Pixel-centre y coordinates (north to south)."""
        return [self.top - (j + 0.5) * self.scale for j in range(self.height)]


def phase(origin: float, scale: float) -> float:
    """Offset of a grid line from the multiples of ``scale``, in [0, scale)."""
    p = math.fmod(origin, scale)
    if p < 0:
        p += scale
    return 0.0 if abs(p - scale) < _EPS * scale or p < _EPS * scale else p


def snap_bounds(bounds: tuple[float, float, float, float], scale: float,
                anchor: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float, float, float]:
    """Bounds rounded outwards onto the lattice ``anchor + k × scale``."""
    left, bottom, right, top = bounds
    ax, ay = anchor
    snap_down = lambda v, a: a + math.floor((v - a) / scale + _EPS) * scale  # noqa: E731
    snap_up = lambda v, a: a + math.ceil((v - a) / scale - _EPS) * scale  # noqa: E731
    l, b = snap_down(left, ax), snap_down(bottom, ay)
    r, t = snap_up(right, ax), snap_up(top, ay)
    if r <= l:
        r = l + scale
    if t <= b:
        t = b + scale
    return l, b, r, t


def make_grid(bounds: tuple[float, float, float, float], crs: CRS | str, scale: float,
              anchor: tuple[float, float] = (0.0, 0.0)) -> Grid:
    """Grid covering ``bounds`` (in ``crs``) at ``scale``, edges on ``anchor + k × scale``."""
    l, b, r, t = snap_bounds(bounds, scale, (phase(anchor[0], scale), phase(anchor[1], scale)))
    return Grid(CRS.from_user_input(crs), float(scale), l, b, r, t)


def common_phase(origins: list[tuple[float, float]], scale: float) -> tuple[float, float]:
    """Shared (x, y) phase of source grid origins at ``scale``, or (0, 0) when they disagree."""
    phases = {(round(phase(x, scale), 6), round(phase(y, scale), 6)) for x, y in origins}
    if len(phases) == 1:
        return phases.pop()
    return 0.0, 0.0


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
