"""PXM tilesets under a served folder: PMTiles, MBTiles 1.3 and XYZ folders as ``pxm render`` writes them.

PMTiles are not opened per tile here: the page reads them itself through the pmtiles protocol (HTTP Range
requests on ``/files/…``), so the server only reads their header for the layer list. MBTiles (TMS rows) and
XYZ folders (``{z}/{x}/{y}.{ext}`` + TileJSON ``metadata.json``) are answered by ``tile()``. A tile the
tileset does not hold is ``None``: ``pxm render`` stores no empty tile, so inside the bounds that means
"transparent", not an error.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pmtiles.reader import MmapSource, Reader
from pmtiles.tile import TileType

from pixels_xr.errors import OutputError

__all__ = ["Tileset", "find_tilesets", "open_tileset", "tile"]

Kind = Literal["pmtiles", "mbtiles", "xyz"]
MEDIA = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}
_PM_FORMATS = {TileType.PNG: "png", TileType.JPEG: "jpg", TileType.WEBP: "webp"}


@dataclass(frozen=True)
class Tileset:
    """One tileset: its id (the file or folder name: unique in a folder, ``a.mbtiles`` beside ``a.pmtiles``),
    where it is (relative to the served root, ``/``-separated) and what the map needs."""

    id: str
    kind: Kind
    path: str
    format: str  # png, jpg or webp
    bounds: tuple[float, float, float, float]  # lon/lat
    minzoom: int
    maxzoom: int
    tile_size: int
    attribution: str

    def as_json(self) -> dict:
        return asdict(self)


def _bounds(value: object, where: str) -> tuple[float, float, float, float]:
    parts = value.split(",") if isinstance(value, str) else value
    try:
        west, south, east, north = (float(v) for v in parts)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise OutputError(f"bounds {value!r} are not four numbers", where) from None
    return west, south, east, north


def _ext(value: object, where: str) -> str:
    fmt = str(value).lower()
    if fmt not in MEDIA:
        raise OutputError(f"tile format {value!r} is not png, jpg or webp", where)
    return "jpg" if fmt == "jpeg" else fmt


def _size_and_attribution(meta: dict) -> tuple[int, str]:
    return int(meta.get("tile_size", 256)), str(meta.get("attribution", ""))


def open_tileset(path: Path, root: Path) -> Tileset:
    """Describe the tileset at ``path`` (a .pmtiles/.mbtiles file or an XYZ folder with metadata.json)."""
    rel = path.relative_to(root).as_posix() if path != root else path.name
    where = str(path)
    try:
        if path.suffix == ".pmtiles":
            with open(path, "rb") as f:
                reader = Reader(MmapSource(f))
                header, meta = reader.header(), reader.metadata()
            fmt = _PM_FORMATS.get(header["tile_type"])
            if fmt is None:
                raise OutputError(f"PMTiles tile type {header['tile_type']} is not a raster image", where)
            bounds = (header["min_lon_e7"] / 1e7, header["min_lat_e7"] / 1e7, header["max_lon_e7"] / 1e7,
                      header["max_lat_e7"] / 1e7)
            return Tileset(path.name, "pmtiles", rel, fmt, bounds, int(header["min_zoom"]),
                           int(header["max_zoom"]), *_size_and_attribution(meta))
        if path.suffix == ".mbtiles":
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                meta = dict(db.execute("SELECT name, value FROM metadata").fetchall())
                if "minzoom" not in meta or "maxzoom" not in meta:
                    low, high = db.execute("SELECT min(zoom_level), max(zoom_level) FROM tiles").fetchone()
                    meta.setdefault("minzoom", low or 0)
                    meta.setdefault("maxzoom", high or 0)
            return Tileset(path.name, "mbtiles", rel, _ext(meta.get("format", "png"), where),
                           _bounds(meta.get("bounds", "-180,-85.05,180,85.05"), where), int(meta["minzoom"]),
                           int(meta["maxzoom"]), *_size_and_attribution(meta))
        meta = json.loads((path / "metadata.json").read_text())
        return Tileset(path.name, "xyz", rel, _ext(meta.get("format", "png"), where),
                       _bounds(meta.get("bounds", [-180, -85.05, 180, 85.05]), where),
                       int(meta.get("minzoom", 0)), int(meta.get("maxzoom", 0)), *_size_and_attribution(meta))
    except (OSError, sqlite3.Error, ValueError, KeyError) as err:
        raise OutputError(f"not a readable tileset ({err.__class__.__name__}: {err})", where) from None


def is_tileset(path: Path) -> bool:
    return (path.is_file() and path.suffix in (".pmtiles", ".mbtiles")) or (
        path.is_dir() and (path / "metadata.json").is_file())


def find_tilesets(root: Path) -> list[Tileset]:
    """The tilesets at ``root`` (itself one) or directly inside it (a ``pxm render --out`` folder)."""
    if is_tileset(root):
        return [open_tileset(root, root.parent if root.is_file() else root)]
    if not root.is_dir():
        return []
    found = [open_tileset(p, root) for p in sorted(root.iterdir())
             if not p.name.startswith(".") and is_tileset(p)]
    return found


def tile(tileset: Tileset, location: Path, z: int, x: int, y: int) -> bytes | None:
    """The stored bytes of tile (z, x, y) (XYZ rows) of an MBTiles or XYZ tileset at ``location``."""
    if not (0 <= z <= 30 and 0 <= x < 2**z and 0 <= y < 2**z):
        return None
    if tileset.kind == "mbtiles":
        with sqlite3.connect(f"file:{location}?mode=ro", uri=True) as db:
            row = db.execute("SELECT tile_data FROM tiles WHERE zoom_level = ? AND tile_column = ? AND"
                             " tile_row = ?", (z, x, (1 << z) - 1 - y)).fetchone()
        return None if row is None else bytes(row[0])
    if tileset.kind == "xyz":
        path = location / str(z) / str(x) / f"{y}.{tileset.format}"  # ints only: stays inside the tileset
        return path.read_bytes() if path.is_file() else None
    raise OutputError("PMTiles are read by the page through Range requests", tileset.path)
