"""Tile image encoding: empty tiles skipped, small lossless PNGs, and ``auto`` picking the format from alpha.

``auto``: a fully opaque tile becomes JPEG (quality 85, no alpha needed), a partly transparent one PNG with
alpha; ``png`` always PNG; ``jpeg`` always JPEG (transparent pixels become black); ``webp`` always lossy WebP
(quality 85, alpha kept when partial). A tile with no opaque pixel is empty and never encoded or stored.

**PNG** (``encode_png``), chosen by measurement on the rendered tiles of the render benchmark (a 200-tile
sample of zooms 6–13 of a real Sentinel-2 TCI): an 8-bit palette (with a ``tRNS`` chunk when some pixel is
not opaque) when the tile has at most 256 distinct RGBA values, else RGB when every pixel is opaque, else
RGBA. Every row gets the PNG *Up* filter and the stream is compressed by libdeflate at level 6. Against
Pillow's encoder (adaptive filters, zlib) on the same tiles: level 2 (what this module used before) 7.79 MB
at 6.0 ms/tile, level 6 5.98 MB at 16.3 ms, level 9 5.77 MB at 207 ms; libdeflate with Up at level 4
6.06 MB at 3.2 ms, **6 5.74–5.90 MB at 4.7–5.6 ms**, 7 5.71 MB at 8.5 ms, 8 5.55 MB at 18.5 ms, 9 5.31 MB
at 29.8 ms; Sub and Paeth filters were 6–11 % larger than Up on these smooth (resampled) images; oxipng
(level 1) 5.29 MB but at 75 ms/tile. Palette tiles use no filter (filters on indices defeat the
compressor). Decoded, every variant gives back exactly the RGBA pixels given (tested).

Filters measured again on the RGB/RGBA tiles of that render (``png_filters`` in ``bench_pxm_render.py``, which
``--png-filters`` runs; libdeflate 6; filters other than Up in plain numpy, so their times are upper bounds).
At zooms up to the source's native zoom (all 37 tiles): Up 1.145 MB at 3.2 ms/tile, Average 1.115 MB (−2.6 %)
at 4.6 ms, Paeth 1.118 MB at 7.9 ms, libpng's per-row choice (least sum of absolute differences) 1.109 MB
(−3.1 %) at 11.6 ms, the smaller of Up and that per tile 1.108 MB at 13.7 ms. Above it (a 300-tile sample of
the 784 magnified tiles, which hold 96 % of the bytes) Up is the smallest: Average +3.6 %, Paeth +5.2 %, the
per-row choice +5.1 %, the smaller of Up and it per tile −0.3 % at about 4× the time. Nothing gains more than
3 % anywhere without at least 1.4× the encode time, which is a third of a render's CPU, so Up stays
everywhere.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Literal

import deflate
import numpy as np
from PIL import Image

__all__ = ["TILE_FORMATS", "TileFormat", "encode_png", "encode_tile"]

TileFormat = Literal["auto", "png", "jpeg", "webp"]
TILE_FORMATS: tuple[str, ...] = ("auto", "png", "jpeg", "webp")

JPEG_QUALITY = 85
WEBP_QUALITY = 85
PNG_LEVEL = 6  # libdeflate level (module docstring: 7 is +50 % time for −3 % size)
_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPE = {3: 2, 4: 6}  # channels → PNG colour type (RGB, RGBA); palette is 3


def encode_tile(rgba: np.ndarray, tile_format: TileFormat) -> tuple[str, bytes] | None:
    """Encode one (T, T, 4) uint8 tile; returns (format name "png"/"jpeg"/"webp", bytes), None when empty."""
    alpha = rgba[..., 3]
    if not alpha.any():
        return None
    opaque = bool((alpha == 255).all())
    fmt = tile_format if tile_format != "auto" else ("jpeg" if opaque else "png")
    if fmt == "png":
        return fmt, encode_png(rgba, opaque)
    buf = io.BytesIO()
    if fmt == "jpeg":
        rgb = rgba[..., :3] if opaque else np.where(alpha[..., None] > 0, rgba[..., :3], 0).astype(np.uint8)
        Image.fromarray(np.ascontiguousarray(rgb)).save(buf, "JPEG", quality=JPEG_QUALITY)
    else:
        img = Image.fromarray(np.ascontiguousarray(rgba[..., :3] if opaque else rgba))
        img.save(buf, "WEBP", quality=WEBP_QUALITY, method=2)
    return fmt, buf.getvalue()


def encode_png(rgba: np.ndarray, opaque: bool | None = None) -> bytes:
    """Lossless PNG of an (H, W, 4) uint8 image: palette, RGB or RGBA, whichever fits (module docstring)."""
    if opaque is None:
        opaque = bool((rgba[..., 3] == 255).all())
    pixels = np.ascontiguousarray(rgba[..., :3] if opaque else rgba)
    h, w, c = pixels.shape
    # Pillow's getcolors stops counting past 256: a cheap test before building the palette.
    colours = Image.fromarray(pixels).getcolors(256)
    if colours is not None:
        return _palette_png(pixels, [colour for _, colour in colours])
    rows = pixels.reshape(h, w * c)
    filtered = np.empty((h, w * c + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # Up: each byte minus the byte above it (the row above the first is zeros)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    return _png(w, h, 8, _COLOUR_TYPE[c], filtered, ())


def _palette_png(pixels: np.ndarray, colours: list[tuple[int, ...]]) -> bytes:
    """Palette PNG of ``pixels`` (H, W, C) whose distinct colours are ``colours``, in byte order.

    Each pixel becomes one big-endian integer of its bytes, so integer order is byte order and the palette
    comes out as sorted as ``np.unique`` on the raw pixels made it (same bytes); the index is a binary
    search of 256 keys (``np.unique`` on void records was 2 s of a 953-tile render's 23 CPU seconds).
    """
    h, w, c = pixels.shape
    if c == 4:
        keys = pixels.reshape(-1, 4).view(">u4").ravel().astype(np.uint32)
    else:
        wide = pixels.reshape(-1, 3).astype(np.uint32)
        keys = (wide[:, 0] << 16) | (wide[:, 1] << 8) | wide[:, 2]
    palette = np.array(sorted(colours), dtype=np.uint8).reshape(-1, c)
    table = palette.astype(np.uint32) @ (256 ** np.arange(c - 1, -1, -1, dtype=np.uint32))
    filtered = np.empty((h, w + 1), dtype=np.uint8)
    filtered[:, 0] = 0  # None
    filtered[:, 1:] = np.searchsorted(table, keys).reshape(h, w)
    extra = [(b"PLTE", palette[:, :3].tobytes())]
    if c == 4:
        extra.append((b"tRNS", palette[:, 3].tobytes()))
    return _png(w, h, 8, 3, filtered, extra)


def _png(w: int, h: int, depth: int, colour: int, filtered: np.ndarray,
         extra: tuple | list) -> bytes:
    chunks = [(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)), *extra,
              (b"IDAT", deflate.zlib_compress(filtered.tobytes(), PNG_LEVEL)), (b"IEND", b"")]
    out = [_SIGNATURE]
    for tag, data in chunks:
        out.append(struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data)))
    return b"".join(out)
