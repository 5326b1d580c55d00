"""Tile storage for a render: a resumable scratch store, then MBTiles 1.3, PMTiles v3 or XYZ folders.

Rendered tiles go once into a scratch SQLite store (``TileStore``) in a hidden work folder beside the outputs;
each finished task is one transaction, so an interrupted render resumes from the tasks already done. Every
tileset is then written from the store (several tilesets share the same tiles) under a temporary name and
renamed into place, so an output is either complete or absent. Each output records the render's
fingerprint, so a re-run with the same manifest and options is a no-op.

**Object storage** (``s3://bucket/prefix``, any fsspec URL): the scratch store stays on local disk (a re-run
resumes from it, see ``renderer``). MBTiles and PMTiles are built locally, then uploaded as one object (a
single PUT, or a multipart upload that is completed only once every part is in, and aborted on failure):
the object appears once, complete, carrying the fingerprint in its metadata (``x-amz-meta-pixels-xr-
fingerprint``), so the no-op check is one HEAD. An XYZ tileset is many objects, each one PUT (complete or
absent); ``metadata.json`` goes last and marks the tileset complete. While tiles go up, a marker object
``.pxm-upload.json`` holds the fingerprint: an interrupted upload of the same render resumes, skipping
tiles already there with the right size; a marker or tileset of another render is removed first.

Declared tile format: the one format of all tiles, or ``png`` for ``auto`` mixes of JPEG and PNG (image
decoders sniff the bytes; choose ``--tile-format png`` or ``webp`` for a single format). XYZ folders hold
``{z}/{x}/{y}.{ext}`` (XYZ rows, north first) and a TileJSON ``metadata.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pmtiles.reader import MmapSource, Reader
from pmtiles.tile import Compression, TileType, zxy_to_tileid
from pmtiles.writer import Writer

from pixels_xr.errors import OutputError
from pixels_xr.io.storage import filesystem

__all__ = [
    "OUTPUT_FORMATS",
    "OutputFormat",
    "TileStore",
    "TilesetMeta",
    "output_fingerprint",
    "output_path",
    "remote_exists",
    "remote_fingerprint",
    "remote_partial",
    "write_output",
    "write_remote",
]

OutputFormat = Literal["mbtiles", "pmtiles", "xyz"]
OUTPUT_FORMATS: tuple[str, ...] = ("mbtiles", "pmtiles", "xyz")
FINGERPRINT_KEY = "pixels_xr_fingerprint"
OBJECT_FINGERPRINT = "pixels-xr-fingerprint"  # user metadata of uploaded archives (S3 lowercases keys)
UPLOAD_MARKER = ".pxm-upload.json"
_UPLOAD_BATCH = 256  # XYZ tiles per concurrent fsspec ``pipe`` call
_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_PM_TYPE = {"jpeg": TileType.JPEG, "png": TileType.PNG, "webp": TileType.WEBP}

TileRow = tuple[int, int, int, str, bytes]  # z, x, y (XYZ), format, data


class TileStore:
    """A render's scratch SQLite store: encoded tiles, images passed between pyramid stages, done tasks."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.executescript(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);"
            "CREATE TABLE IF NOT EXISTS tiles"
            " (tid INTEGER PRIMARY KEY, z INT, x INT, y INT, fmt TEXT, data BLOB);"
            "CREATE TABLE IF NOT EXISTS tops (z INT, x INT, y INT, data BLOB, PRIMARY KEY (z, x, y));"
            "CREATE TABLE IF NOT EXISTS done (stage INT, bx INT, by INT, PRIMARY KEY (stage, bx, by));"
        )
        row = self.db.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('fingerprint', ?)", (fingerprint,))
        elif row[0] != fingerprint:
            raise OutputError("scratch store of another render; remove it", where=str(path))

    def done(self, stage: int) -> set[tuple[int, int]]:
        """Blocks of ``stage`` finished by this or an interrupted earlier run."""
        return {(bx, by) for bx, by in self.db.execute("SELECT bx, by FROM done WHERE stage = ?", (stage,))}

    def add(self, stage: int, block: tuple[int, int], tiles: Iterable[TileRow],
            top: tuple[int, int, int, bytes] | None) -> None:
        """Record one finished task atomically: its tiles, its top image (for the next stage), done."""
        db = self.db
        db.execute("BEGIN")
        try:
            db.executemany("INSERT OR REPLACE INTO tiles VALUES (?, ?, ?, ?, ?, ?)",
                           ((zxy_to_tileid(z, x, y), z, x, y, f, d) for z, x, y, f, d in tiles))
            if top is not None:
                db.execute("INSERT OR REPLACE INTO tops VALUES (?, ?, ?, ?)", top)
            db.execute("INSERT OR REPLACE INTO done VALUES (?, ?, ?)", (stage, *block))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def tops(self, z: int, x0: int, y0: int, n: int) -> dict[tuple[int, int], bytes]:
        """Top images of zoom ``z`` in the ``n`` × ``n`` block at (x0, y0), keyed by offset (i, j)."""
        rows = self.db.execute(
            "SELECT x, y, data FROM tops WHERE z = ? AND x >= ? AND x < ? AND y >= ? AND y < ?",
            (z, x0, x0 + n, y0, y0 + n))
        return {(x - x0, y - y0): data for x, y, data in rows}

    def top_tiles(self, z: int) -> list[tuple[int, int]]:
        return [(x, y) for x, y in self.db.execute("SELECT x, y FROM tops WHERE z = ?", (z,))]

    def tiles(self) -> Iterator[TileRow]:
        """Every stored tile in PMTiles tile-id order (zoom, then Hilbert curve): clustered archives."""
        for z, x, y, f, d in self.db.execute("SELECT z, x, y, fmt, data FROM tiles ORDER BY tid"):
            yield z, x, y, f, d

    def summary(self) -> tuple[dict[int, int], dict[str, int], int]:
        """(tiles per zoom, tiles per format, total bytes)."""
        by_zoom = dict(self.db.execute("SELECT z, count(*) FROM tiles GROUP BY z").fetchall())
        by_fmt = dict(self.db.execute("SELECT fmt, count(*) FROM tiles GROUP BY fmt").fetchall())
        size = self.db.execute("SELECT coalesce(sum(length(data)), 0) FROM tiles").fetchone()[0]
        return by_zoom, by_fmt, int(size)

    def close(self) -> None:
        self.db.close()


@dataclass(frozen=True)
class TilesetMeta:
    """Metadata written into every output (MBTiles 1.3 names; PMTiles/XYZ carry the same JSON)."""

    name: str
    format: str
    bounds: tuple[float, float, float, float]  # lon/lat
    minzoom: int
    maxzoom: int
    attribution: str
    description: str
    product: str
    date: str
    tile_size: int
    fingerprint: str

    @property
    def center(self) -> tuple[float, float, int]:
        w, s, e, n = self.bounds
        return (w + e) / 2, (s + n) / 2, min(self.maxzoom, self.minzoom + 2)

    def as_mbtiles(self) -> dict[str, str]:
        return {
            "name": self.name,
            "format": _EXT[self.format],
            "bounds": ",".join(f"{v:.8f}" for v in self.bounds),
            "center": "{:.8f},{:.8f},{}".format(*self.center),
            "minzoom": str(self.minzoom),
            "maxzoom": str(self.maxzoom),
            "attribution": self.attribution,
            "description": self.description,
            "type": "overlay",
            "version": "1.3",
            "product": self.product,
            "date": self.date,
            "tile_size": str(self.tile_size),
            FINGERPRINT_KEY: self.fingerprint,
        }


def output_path(out: Path, tileset: str, fmt: OutputFormat) -> Path:
    """Where a tileset goes: ``out/<id>.mbtiles``, ``out/<id>.pmtiles`` or the folder ``out/<id>``."""
    return out / output_name(tileset, fmt)


def output_name(tileset: str, fmt: OutputFormat) -> str:
    """A tileset's file, folder or key name: ``<id>.mbtiles``, ``<id>.pmtiles`` or ``<id>``."""
    if not tileset or "/" in tileset or "\\" in tileset or tileset.startswith(".") or ".." in tileset:
        raise OutputError(f"unsafe tileset id {tileset!r} for a file name", where="info.tilesets")
    return tileset if fmt == "xyz" else f"{tileset}.{fmt}"


def output_fingerprint(path: Path, fmt: OutputFormat) -> str | None:
    """The fingerprint recorded in an existing output, None when absent or unreadable."""
    try:
        if fmt == "mbtiles":
            if not path.is_file():
                return None
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                row = db.execute("SELECT value FROM metadata WHERE name = ?", (FINGERPRINT_KEY,)).fetchone()
            return None if row is None else str(row[0])
        if fmt == "pmtiles":
            if not path.is_file():
                return None
            with open(path, "rb") as f:
                return Reader(MmapSource(f)).metadata().get(FINGERPRINT_KEY)
        meta = path / "metadata.json"
        return json.loads(meta.read_text()).get(FINGERPRINT_KEY) if meta.is_file() else None
    except (OSError, ValueError, sqlite3.Error, KeyError):
        return None


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def _publish(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` onto ``path`` (replacing a file, or a folder moved aside first)."""
    if path.is_dir() and not path.is_symlink():
        old = _temp(path)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def write_output(store: TileStore, path: Path, fmt: OutputFormat, meta: TilesetMeta) -> None:
    """Write one tileset from the store to ``path`` atomically (temporary name, then rename)."""
    tmp = _temp(path)
    try:
        {"mbtiles": _write_mbtiles, "pmtiles": _write_pmtiles, "xyz": _write_xyz}[fmt](store, tmp, meta)
        _publish(tmp, path)
    except OSError as err:
        raise OutputError(f"cannot write: {err.strerror or err}", where=str(path)) from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _write_mbtiles(store: TileStore, tmp: Path, meta: TilesetMeta) -> None:
    db = sqlite3.connect(tmp)
    try:
        db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
            "CREATE TABLE metadata (name TEXT, value TEXT);"
            "CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB);"
        )
        db.execute("ATTACH DATABASE ? AS scratch", (str(store.path),))
        db.execute("INSERT INTO tiles SELECT z, x, (1 << z) - 1 - y, data FROM scratch.tiles ORDER BY tid")
        db.execute("CREATE UNIQUE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row)")
        db.executemany("INSERT INTO metadata VALUES (?, ?)", meta.as_mbtiles().items())
        db.commit()
        db.execute("DETACH DATABASE scratch")
    finally:
        db.close()


def _tilejson(meta: TilesetMeta) -> dict[str, Any]:
    doc: dict[str, Any] = dict(meta.as_mbtiles())
    doc.update(bounds=list(meta.bounds), center=list(meta.center), minzoom=meta.minzoom, maxzoom=meta.maxzoom,
               tile_size=meta.tile_size)
    return doc


def _write_pmtiles(store: TileStore, tmp: Path, meta: TilesetMeta) -> None:
    w, s, e, n = meta.bounds
    lon, lat, zoom = meta.center
    header = {
        "tile_type": _PM_TYPE[meta.format], "tile_compression": Compression.NONE,
        "min_lon_e7": int(w * 1e7), "min_lat_e7": int(s * 1e7), "max_lon_e7": int(e * 1e7),
        "max_lat_e7": int(n * 1e7), "center_zoom": zoom, "center_lon_e7": int(lon * 1e7),
        "center_lat_e7": int(lat * 1e7),
    }
    with open(tmp, "wb") as f:
        writer = Writer(f)
        for z, x, y, _, data in store.tiles():
            writer.write_tile(zxy_to_tileid(z, x, y), data)
        writer.finalize(header, _tilejson(meta))


def _write_xyz(store: TileStore, tmp: Path, meta: TilesetMeta) -> None:
    ext = _EXT[meta.format]
    made: set[tuple[int, int]] = set()
    for z, x, y, _, data in store.tiles():
        folder = tmp / str(z) / str(x)
        if (z, x) not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add((z, x))
        (folder / f"{y}.{ext}").write_bytes(data)
    tmp.mkdir(exist_ok=True)
    (tmp / "metadata.json").write_bytes(_xyz_metadata(meta))


def _xyz_metadata(meta: TilesetMeta) -> bytes:
    """The TileJSON ``metadata.json`` of an XYZ tileset."""
    ext = _EXT[meta.format]
    doc = _tilejson(meta)
    doc.update(tilejson="3.0.0", scheme="xyz", tiles=[f"{{z}}/{{x}}/{{y}}.{ext}"])
    return json.dumps(doc, indent=1).encode()


# ------------------------------------------------------------------------------------------- object storage


def _remote_error(url: str, err: Exception) -> OutputError:
    return OutputError(f"object storage: {getattr(err, 'strerror', None) or err}", where=url)


def remote_exists(url: str, fmt: OutputFormat) -> bool:
    """Whether anything is stored for this tileset (an archive object, or any object under an XYZ prefix)."""
    fs, path = filesystem(url)
    try:
        fs.invalidate_cache(path)
        return bool(fs.exists(path))
    except OSError as err:
        raise _remote_error(url, err) from None


def remote_fingerprint(url: str, fmt: OutputFormat) -> str | None:
    """The fingerprint of a complete tileset on object storage, None when absent or incomplete."""
    fs, path = filesystem(url)
    try:
        if fmt == "xyz":
            meta = f"{path}/metadata.json"
            if not fs.exists(meta):
                return None
            return json.loads(fs.cat_file(meta)).get(FINGERPRINT_KEY)
        if not fs.exists(path):
            return None
        return fs.metadata(path).get(OBJECT_FINGERPRINT)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, AttributeError):
        return None
    except OSError as err:
        raise _remote_error(url, err) from None


def remote_partial(url: str, fmt: OutputFormat) -> str | None:
    """The fingerprint of an interrupted XYZ upload there (its marker), None when there is none."""
    if fmt != "xyz":
        return None
    fs, path = filesystem(url)
    try:
        return json.loads(fs.cat_file(f"{path}/{UPLOAD_MARKER}")).get(FINGERPRINT_KEY)
    except FileNotFoundError:
        return None
    except (ValueError, AttributeError):
        return None
    except OSError as err:
        raise _remote_error(url, err) from None


def write_remote(store: TileStore, url: str, fmt: OutputFormat, meta: TilesetMeta, work: Path) -> None:
    """Write one tileset from the store to object storage (module docstring: atomic, resumable)."""
    fs, path = filesystem(url)
    try:
        if fmt == "xyz":
            _upload_xyz(store, fs, path, meta)
            return
        local = work / f"upload.{fmt}"
        try:
            {"mbtiles": _write_mbtiles, "pmtiles": _write_pmtiles}[fmt](store, local, meta)
            fs.put_file(str(local), path, Metadata={OBJECT_FINGERPRINT: meta.fingerprint},
                        ContentType="application/octet-stream")
        finally:
            local.unlink(missing_ok=True)
        fs.invalidate_cache(path)
    except OSError as err:
        raise _remote_error(url, err) from None


def _put_batch(fs: Any, batch: dict[str, bytes]) -> None:
    """PUT a batch of tiles concurrently (one object each)."""
    fs.pipe(batch)


def _upload_xyz(store: TileStore, fs: Any, root: str, meta: TilesetMeta) -> None:
    marker = f"{root}/{UPLOAD_MARKER}"
    fs.invalidate_cache(root)
    resuming = False
    if fs.exists(marker):
        with contextlib.suppress(ValueError):
            resuming = json.loads(fs.cat_file(marker)).get(FINGERPRINT_KEY) == meta.fingerprint
    present: dict[str, int] = {}
    if resuming:
        present = {p: int(info.get("size", -1)) for p, info in fs.find(root, detail=True).items()}
    else:
        if fs.exists(root):  # another render's tiles (complete or not): none may survive into this one
            fs.rm(root, recursive=True)
        fs.pipe_file(marker, json.dumps({FINGERPRINT_KEY: meta.fingerprint}).encode())
    ext = _EXT[meta.format]
    batch: dict[str, bytes] = {}
    for z, x, y, _, data in store.tiles():
        key = f"{root}/{z}/{x}/{y}.{ext}"
        if present.get(key) != len(data):
            batch[key] = data
        if len(batch) >= _UPLOAD_BATCH:
            _put_batch(fs, batch)
            batch = {}
    if batch:
        _put_batch(fs, batch)
    fs.pipe_file(f"{root}/metadata.json", _xyz_metadata(meta))
    fs.rm_file(marker)
    fs.invalidate_cache(root)
