"""Helpers for the PXM render tests: upload real images to moto S3, build manifests, read tilesets back."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import numpy as np
from PIL import Image

from pixels_xr.pxm import validate_manifest

BUCKET = "pxm-render"
AERIAL = "201404_13SED190110_201404_0x1500m_CL_1"
FILES = [
    "rasterio_RGB.byte.tif",
    "rasterio_rgb1.tif",
    "rasterio_rgb2.tif",
    "rasterio_rgb3.tif",
    "rasterio_rgb4.tif",
    f"{AERIAL}_alpha.tif",
    f"{AERIAL}_mask.tif",
    f"{AERIAL}_extmask.tif",
    f"{AERIAL}_extmask.tif.msk",
    f"{AERIAL}_nodata.tif",
    "dop20c_32587_5922.tif",
]


def s3_key(name: str) -> str:
    """PXM basenames allow only [A-Za-z0-9_] before the extension: ``RGB.byte.tif`` -> ``RGB_byte.tif``."""
    return "render/" + name.replace(".byte", "_byte")


def manifest(*uris: str, tilesets: tuple[str, ...] = ("acme.test",), **info: object):
    base = {"tilesets": list(tilesets), "license": "CC-BY-4.0 Example Org", "notes": "Test mosaic notes",
            "account": "acme", "product": "aerial_2020", "date": "2020-06-01"}
    return validate_manifest({"version": "0.5.1", "sources": list(uris), "info": {**base, **info}})


def decode(data: bytes) -> np.ndarray:
    """An encoded tile as (T, T, 4) uint8 RGBA."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))


def mbtiles(path: Path) -> dict[tuple[int, int, int], bytes]:
    """Tiles of an MBTiles file keyed by XYZ (z, x, y): rows flipped back from TMS."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles").fetchall()
    return {(z, x, (1 << z) - 1 - r): bytes(d) for z, x, r, d in rows}


def metadata(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT name, value FROM metadata").fetchall())
