"""Spatial-block split: square blocks of the CRS, a seeded split per block, a buffer between splits.

Why blocks: neighbouring pixels are nearly copies of each other, so a per-pixel random split scores a
model on its own training data. Blocks are squares of ``block_size`` CRS units (metres) anchored at the
CRS origin — block ``(i, j)`` covers ``[i·b, (i+1)·b) × [j·b, (j+1)·b)`` — so the same place falls in the
same block in every cube, feature and run. A block's split is a pure function of ``(EPSG, i, j, seed)``
(a 64-bit mix of them compared with the cumulative fractions): it needs no global pass over the labels, so
features can be sampled independently on a cluster and a resumed run agrees with an uninterrupted one. The
fractions therefore hold on average over many blocks, not exactly for a handful.

Why a buffer: samples on either side of a block edge are still neighbours. A sample is dropped when its
footprint (a pixel's centre, or a chip's square) lies within ``buffer`` of a block of a higher split
(test > validation > train): a test sample keeps its place, a validation sample near a test block goes,
a train sample near either goes. The footprints of the other split's samples can reach ``chip`` beyond
their block, so the distance is measured to the block grown by that much. Then any two samples of different
splits are at least ``buffer`` apart (Euclidean, in CRS units). The default buffer is the block size, the
range over which samples are taken to be correlated (blockCV's ``cv_buffer`` plays the same part). It costs
samples near every block edge; the manifest counts them. Cubes in different CRSs (UTM zones) do not see
each other's blocks: the guarantee holds within one CRS.
"""

from __future__ import annotations

import math

import numpy as np

#: Split names, in increasing priority (a higher split keeps samples near a lower one's blocks).
SPLITS = ("train", "validation", "test")

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(v: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    v = (v ^ (v >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    v = (v ^ (v >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return v ^ (v >> np.uint64(31))


def block_index(coord: np.ndarray, block_size: float) -> np.ndarray:
    """Block numbers (int64) of CRS coordinates."""
    return np.floor(np.asarray(coord, np.float64) / block_size).astype(np.int64)


def block_split(ix: np.ndarray, iy: np.ndarray, epsg: int, seed: int,
                fractions: tuple[float, float, float]) -> np.ndarray:
    """Split (0 train, 1 validation, 2 test) of blocks ``(ix, iy)``: seeded, order-free, reproducible."""
    with np.errstate(over="ignore"):
        h = _mix(np.asarray(ix, np.int64).astype(np.uint64) ^ _mix(np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15)))
        h = _mix(h ^ np.asarray(iy, np.int64).astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93))
        h = _mix(h ^ np.uint64(epsg))
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    edges = np.cumsum(fractions[:2]) / sum(fractions)
    return np.searchsorted(edges, u, side="right").astype(np.uint8)


def kept_by_buffer(x: np.ndarray, y: np.ndarray, split: np.ndarray, *, epsg: int, seed: int,
                   fractions: tuple[float, float, float], block_size: float, buffer: float,
                   half: float = 0.0) -> np.ndarray:
    """Samples (centres ``x, y``, footprint half-width ``half``) not within ``buffer`` of a block of a
    higher split than their own (see the module docstring)."""
    keep = np.ones(len(x), bool)
    if buffer <= 0 or len(x) == 0:
        return keep
    reach = buffer + 2 * half  # grown block: its samples' footprints + this one's
    rings = math.ceil(reach / block_size)
    ix, iy = block_index(x, block_size), block_index(y, block_size)
    for dx in range(-rings, rings + 1):
        for dy in range(-rings, rings + 1):
            if dx == 0 and dy == 0:
                continue
            other = block_split(ix + dx, iy + dy, epsg, seed, fractions)
            higher = other > split
            if not higher.any():
                continue
            x0, y0 = (ix + dx) * block_size - 2 * half, (iy + dy) * block_size - 2 * half
            x1, y1 = x0 + block_size + 4 * half, y0 + block_size + 4 * half
            gx = np.maximum(np.maximum(x0 - x, x - x1), 0.0)
            gy = np.maximum(np.maximum(y0 - y, y - y1), 0.0)
            near = np.hypot(gx, gy) < buffer
            keep &= ~(higher & near)
    return keep
