"""PNG tiles: decoded, they hold exactly the pixels of the previous encoder (Pillow RGB/RGBA), on real
rendered blocks (opaque, partly transparent, few colours) and on edge cases of the palette choice."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rasterio.enums import Resampling
from render_helpers import AERIAL, decode

from pixels_xr.pxm.encode import encode_png, encode_tile
from pixels_xr.pxm.pyramid import split_tiles
from pixels_xr.pxm.tiles import tile_range
from pixels_xr.pxm.warp import describe_source, render_block


def previous_png(rgba: np.ndarray) -> bytes:
    """The encoder this module replaced: Pillow, RGB when opaque else RGBA, zlib level 2."""
    opaque = bool((rgba[..., 3] == 255).all())
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba[..., :3] if opaque else rgba)).save(buf, "PNG", compress_level=2)
    return buf.getvalue()


def rendered_tiles(path: Path, z: int) -> list[np.ndarray]:
    """Every non-empty 256 px tile of the block of 4 × 4 tiles at the north-west corner of a real source."""
    info = {"tilesets": ["a.b"], "license": "x", "notes": "x", "account": "a", "product": "p", "date": "2020"}
    spec = describe_source(str(path), info, ())
    x0, y0, _, _ = tile_range(spec.bounds, z)
    img = render_block((spec,), z, x0, y0, 4, 256, Resampling.bilinear)
    return [] if img is None else [t for _, _, t in split_tiles(img, 256) if t[..., 3].any()]


@pytest.mark.parametrize(("name", "z"), [("rasterio_RGB.byte.tif", 9), (f"{AERIAL}_alpha.tif", 21),
                                         ("s2_l2a_S2A_29RKH_20200219_TCI_100m.tif", 11)])
def test_png_tiles_decode_to_the_previous_encoders_pixels(shared_data: Path, name: str, z: int) -> None:
    tiles = rendered_tiles(shared_data / "rgb" / name, z)
    assert tiles
    new_total = old_total = 0
    for tile in tiles:
        fmt, data = encode_tile(tile, "png")
        old = previous_png(tile)
        assert fmt == "png"
        np.testing.assert_array_equal(decode(data), decode(old))
        np.testing.assert_array_equal(decode(data), tile)
        new_total += len(data)
        old_total += len(old)
    assert new_total < old_total


def test_palette_rgb_and_rgba_are_chosen_by_content() -> None:
    rng = np.random.default_rng(0)
    few = np.zeros((256, 256, 4), np.uint8)
    few[..., :3] = rng.integers(0, 4, (256, 256, 3)) * 60  # 64 colours
    few[..., 3] = 255
    partial = few.copy()
    partial[:100, :, 3] = 0
    partial[100:110, :, 3] = 128  # semi-transparent entries go to tRNS
    many = np.zeros((256, 256, 4), np.uint8)
    many[..., :3] = rng.integers(0, 256, (256, 256, 3))
    many[..., 3] = 255
    many_partial = many.copy()
    many_partial[:, :50, 3] = 0
    exactly_256 = np.zeros((256, 256, 4), np.uint8)
    exactly_256[..., 0] = np.arange(256)[None, :]
    exactly_256[..., 3] = 255
    over_256 = exactly_256.copy()
    over_256[0, 0, 1] = 1
    cases = [(few, "P"), (partial, "P"), (many, "RGB"), (many_partial, "RGBA"), (exactly_256, "P"),
             (over_256, "RGB")]
    for rgba, mode in cases:
        data = encode_png(rgba)
        img = Image.open(io.BytesIO(data))
        assert img.mode == mode
        np.testing.assert_array_equal(np.asarray(img.convert("RGBA")), rgba)
        np.testing.assert_array_equal(decode(data), decode(previous_png(rgba)))


def test_empty_tiles_are_not_encoded_and_auto_is_jpeg_only_when_opaque() -> None:
    rgba = np.zeros((256, 256, 4), np.uint8)
    assert encode_tile(rgba, "png") is None
    rgba[..., 3] = 255
    assert encode_tile(rgba, "auto")[0] == "jpeg"
    rgba[0, 0, 3] = 0
    assert encode_tile(rgba, "auto")[0] == "png"
