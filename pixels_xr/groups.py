"""Groups of nearby small features computed together: one search, one cube, one reduction per group.

Rule: features whose output grids share a CRS, a scale and a date range, and whose bounds' centres fall in
the same cell of a lattice of ``cell`` × ``cell`` output pixels, form a group (at most ``max_members``,
in input order). A feature wider or taller than half a cell, or whose CRS or date range cannot be worked out
here (the per-feature path then reports why), is a group of its own. A group's grid covers the union of its
members' bounds, snapped on the same lattice as theirs (``grid``), so each member's grid is an exact window
of it (``window``): at native scale a member's pixels are the very pixels a run of the member alone reads.

What a member keeps of its own: its items (those whose footprint meets its geometry), and so its empty bins,
its item ids per unit and its fingerprints; its clip (applied to its window after the reduction); its
failure (one member's write failing leaves the others written). What it shares: the reads, the clear mask
and the reduction. Where the result can differ from a run of the member alone, and why that is intended: the
morphological cleanup of the clear mask (opening, dilation) sees the pixels around the member on the
group's grid instead of the edge of the member's own small grid — the value a run over the whole area gives.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import shapely
from pyproj import CRS

from pixels_xr.features import Feature
from pixels_xr.grid import Grid

if TYPE_CHECKING:
    from pixels_xr.config import PixelsConfig

#: Side of a grouping cell, in output pixels: a group's grid is at most 1.5 cells wide (members up to half
#: a cell stick out of their cell by at most half a cell).
GROUP_CELL = 512
#: Most features in one group (bounds the work one failed read can spoil and the tasks of one job).
GROUP_MEMBERS = 512
_EPS = 1e-6


@dataclass(frozen=True)
class FeatureGroup:
    """Features computed together: their ids in input order, the output CRS and the union of their bounds
    in it. ``single`` groups (one member that could not be grouped) run the per-feature path."""

    key: str
    features: tuple[Feature, ...]
    crs: CRS | None
    bounds: tuple[float, float, float, float] | None

    @property
    def single(self) -> bool:
        return len(self.features) == 1

    def as_feature(self) -> Feature:
        """A feature covering the group's bounds (its id is the group key): what the group's search, cube
        and reduction are built for. Its date is the members' (they share one date range)."""
        assert self.crs is not None and self.bounds is not None
        epsg = self.crs.to_epsg()
        crs = f"EPSG:{epsg}" if epsg is not None else self.crs.to_wkt()
        return Feature(self.key, shapely.box(*self.bounds), crs, self.features[0].date)


@functools.lru_cache(maxsize=256)
def _epsg_of_text(text: str) -> int | None:
    return CRS.from_user_input(text).to_epsg()


def _epsg(crs: CRS) -> int | None:
    """``crs.to_epsg()``, looked up once per CRS text: pyproj's lookup costs 25-60 us, asked twice per
    feature (a quarter of the client's main thread in a no-op re-run of 1,024 features)."""
    return _epsg_of_text(crs.srs) if crs.srs else crs.to_epsg()


def group_features(config: PixelsConfig, features: Sequence[Feature], *, cell: int = GROUP_CELL,
                   max_members: int = GROUP_MEMBERS) -> list[FeatureGroup]:
    """Features in groups by the module's rule, in the order of each group's first member."""
    scale = config.resolved_scale
    side = cell * scale
    keyed: dict[tuple, list[tuple[Feature, tuple[float, float, float, float]]]] = {}
    order: list[tuple] = []
    for k, feature in enumerate(features):
        try:
            crs = CRS.from_user_input(config.crs) if config.crs else feature.output_crs
            bounds = feature.geometry_in(crs).bounds
            dates = config.date_range(feature)
            wide = max(bounds[2] - bounds[0], bounds[3] - bounds[1]) > side / 2
            epsg = _epsg(crs)
            ok = epsg is not None and all(math.isfinite(v) for v in bounds) and not wide
        except Exception:  # noqa: BLE001 - reported by the feature's own path, which raises the same error
            ok = False
        if not ok:
            key: tuple = ("single", k)
            keyed[key] = [(feature, None)]  # type: ignore[list-item]
            order.append(key)
            continue
        cx, cy = (bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2
        base = (epsg, dates, math.floor(cx / side), math.floor(cy / side))
        members = keyed.get(base + (0,))
        part = 0
        while members is not None and len(members) >= max_members:  # a full group: the next part
            part += 1
            members = keyed.get(base + (part,))
        key = base + (part,)
        if members is None:
            keyed[key] = members = []
            order.append(key)
        members.append((feature, bounds))
    groups = []
    for n, key in enumerate(order):
        members = keyed[key]
        if key[0] == "single":
            groups.append(FeatureGroup(f"group-{n}", (members[0][0],), None, None))
            continue
        union = (min(b[0] for _, b in members), min(b[1] for _, b in members),
                 max(b[2] for _, b in members), max(b[3] for _, b in members))
        groups.append(FeatureGroup(f"group-{n}", tuple(f for f, _ in members), CRS.from_epsg(key[0]), union))
    return groups


def window(outer: Grid, inner: Grid) -> tuple[slice, slice] | None:
    """Rows and columns of ``outer`` that are ``inner``'s pixels, or None when ``inner`` is not a window of
    it (another CRS or scale, another lattice phase, or not inside)."""
    if outer.crs != inner.crs or abs(outer.scale - inner.scale) > _EPS * outer.scale:
        return None
    col, row = (inner.left - outer.left) / outer.scale, (outer.top - inner.top) / outer.scale
    if abs(col - round(col)) > _EPS or abs(row - round(row)) > _EPS:
        return None
    col, row = int(round(col)), int(round(row))
    if col < 0 or row < 0 or col + inner.width > outer.width or row + inner.height > outer.height:
        return None
    return slice(row, row + inner.height), slice(col, col + inner.width)
