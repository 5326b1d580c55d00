"""Input features: GeoJSON loading, safe ids, their CRS and the output CRS they get.

Output CRS rule: a feature in a projected CRS keeps it; a feature in a geographic CRS (the GeoJSON default
EPSG:4326) gets the UTM zone of its centroid (326zz north, 327zz south). A config ``crs`` overrides both.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from pyproj import CRS, Transformer
from shapely.geometry import shape

from pixels_xr.errors import ConfigError

SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


@dataclass(frozen=True)
class Feature:
    """One input geometry with its id, CRS and optional date (for dynamic date ranges)."""

    id: str
    geometry: shapely.Geometry
    crs: str = "EPSG:4326"
    date: dt.date | None = None
    properties: tuple[tuple[str, Any], ...] = ()

    @property
    def output_crs(self) -> CRS:
        """CRS of the output grid by the module's rule (projected as is, geographic → local UTM)."""
        return output_crs_for(self.geometry, self.crs)

    def geometry_in(self, crs: CRS | str) -> shapely.Geometry:
        """The geometry reprojected to ``crs``."""
        src, dst = CRS.from_user_input(self.crs), CRS.from_user_input(crs)
        if src == dst:
            return self.geometry
        return reproject_geometry(self.geometry, src, dst)

    def lonlat_geometry(self) -> shapely.Geometry:
        """The geometry in EPSG:4326 (for STAC searches)."""
        return self.geometry_in("EPSG:4326")


def reproject_geometry(geometry: shapely.Geometry, src: CRS, dst: CRS) -> shapely.Geometry:
    """A geometry's coordinates transformed from ``src`` to ``dst`` (x/y order)."""
    tr = Transformer.from_crs(src, dst, always_xy=True)

    def _xy(coords: np.ndarray) -> np.ndarray:
        x, y = tr.transform(coords[:, 0], coords[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(geometry, _xy)


def utm_crs(lon: float, lat: float) -> CRS:
    """WGS 84 / UTM zone holding a longitude/latitude."""
    zone = min(60, max(1, int(math.floor((lon + 180.0) / 6.0)) + 1))
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def output_crs_for(geometry: shapely.Geometry, crs: str) -> CRS:
    """Output CRS for a geometry in ``crs`` (see module docstring)."""
    src = CRS.from_user_input(crs)
    if src.is_projected:
        return src
    if src.is_geographic:
        c = geometry.centroid
        if not src.equals(CRS.from_epsg(4326)):
            c = reproject_geometry(c, src, CRS.from_epsg(4326))
        return utm_crs(c.x, c.y)
    raise ConfigError(f"CRS {crs!r} is neither projected nor geographic", "crs")


def _crs_of_collection(fc: dict) -> str | None:
    crs = fc.get("crs")
    if isinstance(crs, dict):
        return (crs.get("properties") or {}).get("name")
    if isinstance(crs, str):
        return crs
    return None


def _parse_date(value: Any, where: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except ValueError:
        raise ConfigError(f"date {value!r} is not an ISO date (YYYY-MM-DD)", where) from None


def check_id(value: str, where: str) -> str:
    """A feature id safe to become a path or key on storage (letters, digits, ``_ . -``; no ``..``)."""
    if not SAFE_ID.match(value) or ".." in value:
        raise ConfigError(f"id {value!r} is not safe as a storage name; use letters, digits, '_', '.', '-' "
                          "(max 128, not starting with '.' or '-', no '..')", where)
    return value


def load_features(source: str | Path | dict, default_crs: str = "EPSG:4326") -> list[Feature]:
    """Features from a GeoJSON FeatureCollection, Feature or geometry (path, JSON string or dict).

    Ids come from the feature ``id`` member or ``properties.id`` (else the 0-based index); a per-feature
    ``properties.crs`` or a collection-level ``crs`` member overrides ``default_crs``; ``properties.date``
    is the feature's date for dynamic ranges.
    """
    where = "features"
    if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith(("{", "["))):
        path = Path(source)
        where = str(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError("features file not found", where) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"not valid JSON: {exc}", where) from None
    elif isinstance(source, str):
        try:
            data = json.loads(source)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not valid JSON: {exc}", where) from None
    else:
        data = source
    if not isinstance(data, dict):
        raise ConfigError("expected a GeoJSON object", where)
    kind = data.get("type")
    if kind == "FeatureCollection":
        raw = data.get("features")
        if not isinstance(raw, list) or not raw:
            raise ConfigError("FeatureCollection has no features", f"{where}.features")
    elif kind == "Feature":
        raw = [data]
    elif kind in {"Polygon", "MultiPolygon", "Point", "MultiPoint", "LineString", "MultiLineString"}:
        raw = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:
        raise ConfigError(f"expected a GeoJSON FeatureCollection, Feature or geometry, got type {kind!r}", where)
    collection_crs = _crs_of_collection(data) or default_crs
    features: list[Feature] = []
    seen: set[str] = set()
    for i, f in enumerate(raw):
        fw = f"{where}[{i}]"
        if not isinstance(f, dict) or not isinstance(f.get("geometry"), dict):
            raise ConfigError("feature has no geometry", fw)
        props = f.get("properties") or {}
        if not isinstance(props, dict):
            raise ConfigError("properties must be an object", f"{fw}.properties")
        fid = f.get("id", props.get("id", i))
        fid = check_id(str(fid), f"{fw}.id")
        if fid in seen:
            raise ConfigError(f"duplicate feature id {fid!r}", f"{fw}.id")
        seen.add(fid)
        try:
            geom = shape(f["geometry"])
        except Exception as exc:  # shapely raises several types for malformed coordinates
            raise ConfigError(f"invalid geometry: {exc}", f"{fw}.geometry") from None
        if geom.is_empty:
            raise ConfigError("geometry is empty", f"{fw}.geometry")
        if not geom.is_valid:
            geom = shapely.make_valid(geom)
        crs = str(props.get("crs") or collection_crs)
        try:
            CRS.from_user_input(crs)
        except Exception:
            raise ConfigError(f"unknown CRS {crs!r}", f"{fw}.properties.crs") from None
        date = _parse_date(props["date"], f"{fw}.properties.date") if props.get("date") else None
        features.append(Feature(fid, geom, crs, date, tuple(sorted((k, v) for k, v in props.items()
                                                                  if isinstance(v, (str, int, float, bool))))))
    return features
