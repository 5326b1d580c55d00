"""Web Mercator tile math for rendering: zoom rules, tile ranges over EPSG:3857 bounds and meta-tile blocks.

Tiles follow the XYZ scheme of ``mercantile`` (row 0 at the north; MBTiles flips rows to TMS itself).

**Max zoom** (``native_zoom``): the zoom whose pixel size is nearest, in log2 scale, to the source's pixel
size in EPSG:3857 metres *at the source's latitude* (GDAL's suggested warp resolution, which scales ground
metres by 1/cos(latitude)): ``round(log2(C / (tile_size * res)))`` with C the equator length. A source pixel
is thus magnified at most √2× or reduced at most √2×. Several sources: the finest one decides.

**Min zoom** (``default_minzoom``): the largest zoom (≤ max zoom) at which the whole mosaic's bounds touch at
most 2 × 2 tiles, i.e. where the mosaic first fits a few tiles; no lower zoom is rendered by default.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import mercantile
import numpy as np

__all__ = [
    "EARTH",
    "MAX_ZOOM",
    "Bounds",
    "default_minzoom",
    "morton",
    "native_zoom",
    "tile_bounds",
    "tile_range",
    "tiles_in",
]

#: Length of the equator in EPSG:3857 metres (the width of the z0 tile).
EARTH: float = mercantile.CE
_ORIGIN = -EARTH / 2
MAX_ZOOM = 24

Bounds = tuple[float, float, float, float]  # (west, south, east, north) in EPSG:3857 metres


def tile_bounds(z: int, x: int, y: int, n: int = 1) -> Bounds:
    """EPSG:3857 bounds of the ``n`` × ``n`` block of tiles whose north-west tile is (z, x, y)."""
    west, _, _, north = mercantile.xy_bounds(x, y, z)
    span = EARTH / 2**z * n
    return west, north - span, west + span, north


def tile_range(bounds: Bounds, z: int) -> tuple[int, int, int, int]:
    """Inclusive tile range (x0, y0, x1, y1) at zoom ``z`` touching ``bounds`` (clamped to the world)."""
    west, south, east, north = bounds
    span = EARTH / 2**z
    last = 2**z - 1

    def col(v: float) -> int:
        return min(last, max(0, math.floor((v - _ORIGIN) / span)))

    def row(v: float) -> int:
        return min(last, max(0, math.floor((-_ORIGIN - v) / span)))

    eps = span * 1e-9  # a bound exactly on a tile edge does not touch the next tile
    return col(west), row(north), col(east - eps), row(south + eps)


def tiles_in(bounds: Iterable[Bounds], z: int) -> np.ndarray:
    """Distinct (x, y) tiles at zoom ``z`` touching any of ``bounds``, as an (n, 2) int64 array."""
    parts = []
    for b in bounds:
        x0, y0, x1, y1 = tile_range(b, z)
        xs, ys = np.meshgrid(np.arange(x0, x1 + 1), np.arange(y0, y1 + 1))
        parts.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
    if not parts:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(parts).astype(np.int64), axis=0)


def morton(x: int, y: int) -> int:
    """Z-order (Morton) key: sorting by it keeps spatial neighbours, and a parent's children, together."""
    key = 0
    for bit in range(32):
        key |= ((x >> bit) & 1) << (2 * bit) | ((y >> bit) & 1) << (2 * bit + 1)
    return key


def native_zoom(res_3857: float, tile_size: int) -> int:
    """Max zoom for a source whose pixel is ``res_3857`` EPSG:3857 metres: nearest zoom in log2 scale."""
    z = round(math.log2(EARTH / (tile_size * res_3857)))
    return int(min(MAX_ZOOM, max(0, z)))


def default_minzoom(bounds: Bounds, maxzoom: int) -> int:
    """Largest zoom ≤ ``maxzoom`` at which ``bounds`` touch at most 2 × 2 tiles (0 when none does)."""
    for z in range(maxzoom, -1, -1):
        x0, y0, x1, y1 = tile_range(bounds, z)
        if x1 - x0 <= 1 and y1 - y0 <= 1:
            return z
    return 0

