"""Pyramid steps on RGBA images: alpha-weighted 2× reduction, cutting blocks into tiles, compact transport.

A parent pixel is the alpha-weighted mean of its 2 × 2 children: ``rgb = Σ(rgb·a) / Σa`` and ``a = Σa / 4``,
so transparent children never darken an edge (a plain mean would pull edge colours towards black).
"""

from __future__ import annotations

import zlib

import numba
import numpy as np

__all__ = ["downsample", "pack", "split_tiles", "unpack"]


def downsample(rgba: np.ndarray) -> np.ndarray:
    """Halve an (H, W, 4) uint8 image (H, W even) with alpha-weighted 2 × 2 averaging (rounded)."""
    out = np.empty((rgba.shape[0] // 2, rgba.shape[1] // 2, 4), dtype=np.uint8)
    _downsample(np.ascontiguousarray(rgba), out)
    return out


@numba.njit(cache=True, nogil=True)
def _downsample(src: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            asum = red = green = blue = 0
            for dr in range(2):
                for dc in range(2):
                    px = src[2 * r + dr, 2 * c + dc]
                    a = np.int64(px[3])
                    asum += a
                    red += a * px[0]
                    green += a * px[1]
                    blue += a * px[2]
            if asum > 0:
                half = asum // 2
                out[r, c, 0] = (red + half) // asum
                out[r, c, 1] = (green + half) // asum
                out[r, c, 2] = (blue + half) // asum
            else:
                out[r, c, 0] = out[r, c, 1] = out[r, c, 2] = 0
            out[r, c, 3] = (asum + 2) // 4


def split_tiles(rgba: np.ndarray, tile_size: int) -> list[tuple[int, int, np.ndarray]]:
    """Cut an (n·T, n·T, 4) block into (column offset, row offset, tile) for its n × n tiles."""
    n = rgba.shape[0] // tile_size
    return [
        (i, j, rgba[j * tile_size:(j + 1) * tile_size, i * tile_size:(i + 1) * tile_size])
        for j in range(n)
        for i in range(n)
    ]


def pack(rgba: np.ndarray) -> bytes | None:
    """Lossless compact bytes of an (T, T, 4) uint8 image (zlib level 1); None when fully transparent."""
    if not rgba[..., 3].any():
        return None
    side = rgba.shape[0].to_bytes(4, "little")
    return side + zlib.compress(np.ascontiguousarray(rgba).tobytes(), 1)


def unpack(data: bytes) -> np.ndarray:
    """Inverse of :func:`pack`."""
    side = int.from_bytes(data[:4], "little")
    return np.frombuffer(zlib.decompress(data[4:]), dtype=np.uint8).reshape(side, side, 4)
