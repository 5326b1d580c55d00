"""Input features: GeoJSON loading, safe ids, their CRS, coordinate sanity and the output CRS they get.

Output CRS rule: a feature in a projected CRS keeps it; a feature in a geographic CRS (the GeoJSON default
EPSG:4326) gets the UTM zone of its centroid (326zz north, 327zz south). A config ``crs`` overrides both.

A feature's CRS is given the ways the original pixels and GeoJSON writers give it (``parse_crs``), at
collection level (``crs`` member) or per feature (``properties.crs``, or a ``crs`` member on the Feature).
Coordinates are checked against their CRS (``check_coordinates``) when features are loaded and again
where a ``Feature`` built in Python is first used for a grid or a search, so that metres read as degrees,
latitudes past the poles or NaN never reach the grid arithmetic.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from pyproj import CRS, Transformer
from shapely.geometry import shape

from pixels_xr import jsontext
from pixels_xr.errors import ConfigError

SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
#: Degrees a geographic coordinate may pass ±180 / ±90 by (rounding in files written by other tools).
GEO_TOLERANCE = 1e-6
_GEOMETRY_TYPES = {"Polygon", "MultiPolygon", "Point", "MultiPoint", "LineString", "MultiLineString",
                   "GeometryCollection"}
_EXAMPLE_CRS = '"crs": {"type": "name", "properties": {"name": "EPSG:32629"}}'


@dataclass(frozen=True)
class Feature:
    """One input geometry with its id, CRS and optional date (for dynamic date ranges).

    ``crs`` is anything ``parse_crs`` reads (usually ``"EPSG:NNNN"``). The coordinates are checked against
    it (``check_coordinates``) the first time the feature's output CRS or a reprojection is asked for; a
    bad one raises ``ConfigError`` naming the feature.
    """

    id: str
    geometry: shapely.Geometry
    crs: str = "EPSG:4326"
    date: dt.date | None = None
    properties: tuple[tuple[str, Any], ...] = ()

    def _checked(self) -> None:
        if not self.__dict__.get("_coordinates_checked"):
            check_coordinates(self.geometry, self.crs, f"feature {self.id!r}")
            object.__setattr__(self, "_coordinates_checked", True)

    @property
    def output_crs(self) -> CRS:
        """CRS of the output grid by the module's rule (projected as is, geographic → local UTM)."""
        self._checked()
        return output_crs_for(self.geometry, self.crs)

    def geometry_in(self, crs: CRS | str) -> shapely.Geometry:
        """The geometry reprojected to ``crs``; ``ConfigError`` when it has no finite coordinates there.
        Kept per CRS on the feature (a run asks for the same reprojection several times per feature)."""
        self._checked()
        src, dst = _crs(self.crs), _crs(crs)
        if src == dst:
            return self.geometry
        kept = self.__dict__.setdefault("_reprojected", {})
        key = dst.srs or dst.to_wkt()
        if key not in kept:
            out = reproject_geometry(self.geometry, src, dst)
            if not np.isfinite(shapely.get_coordinates(out)).all():
                raise ConfigError(f"the geometry cannot be expressed in {_name(dst)}: it lies outside that "
                                  "CRS's valid area", f"feature {self.id!r}")
            kept[key] = out
        return kept[key]

    def lonlat_geometry(self) -> shapely.Geometry:
        """The geometry in EPSG:4326 (for STAC searches)."""
        return self.geometry_in("EPSG:4326")


_TRANSFORMERS = threading.local()  # pyproj transformers are not safe to share between threads


def _transformer(src: CRS, dst: CRS) -> Transformer:
    """This thread's transformer from ``src`` to ``dst`` (x/y order): making one costs about 0.25 ms."""
    cache = _TRANSFORMERS.__dict__.setdefault("by_pair", {})
    key = (src.srs or src.to_wkt(), dst.srs or dst.to_wkt())
    if key not in cache:
        if len(cache) > 64:
            cache.clear()
        cache[key] = Transformer.from_crs(src, dst, always_xy=True)
    return cache[key]


def reproject_geometry(geometry: shapely.Geometry, src: CRS, dst: CRS) -> shapely.Geometry:
    """A geometry's coordinates transformed from ``src`` to ``dst`` (x/y order)."""
    tr = _transformer(src, dst)

    def _xy(coords: np.ndarray) -> np.ndarray:
        x, y = tr.transform(coords[:, 0], coords[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(geometry, _xy)


def utm_crs(lon: float, lat: float) -> CRS:
    """WGS 84 / UTM zone holding a longitude/latitude (``ConfigError`` for a point that is not on Earth)."""
    if not (math.isfinite(lon) and math.isfinite(lat)) or abs(lat) > 90 + GEO_TOLERANCE or \
            abs(lon) > 180 + GEO_TOLERANCE:
        raise ConfigError(f"({lon}, {lat}) is not a longitude/latitude (longitude −180..180, latitude −90..90)",
                          "crs")
    zone = min(60, max(1, int(math.floor((lon + 180.0) / 6.0)) + 1))
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def output_crs_for(geometry: shapely.Geometry, crs: str | CRS) -> CRS:
    """Output CRS for a geometry in ``crs`` (see module docstring)."""
    src = _crs(crs)
    if src.is_projected:
        return src
    if src.is_geographic:
        c = geometry.centroid
        if not src.equals(CRS.from_epsg(4326)):
            c = reproject_geometry(c, src, CRS.from_epsg(4326))
        return utm_crs(c.x, c.y)
    raise ConfigError(f"CRS {_name(src)!r} is neither projected nor geographic", "crs")


# ---------------------------------------------------------------------------------------------------------
# CRS members
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _crs_from_text(text: str) -> CRS:
    with warnings.catch_warnings():  # '+init=' strings: deprecated in PROJ, still what old files carry
        warnings.simplefilter("ignore")
        return CRS.from_user_input(text)


def _crs(value: CRS | str) -> CRS:
    return value if isinstance(value, CRS) else _crs_from_text(str(value))


def _name(crs: CRS) -> str:
    auth = crs.to_authority(min_confidence=90)
    if auth:
        return ":".join(auth)
    text = crs.name if crs.name and crs.name != "unknown" else crs.to_string()
    return text if len(text) <= 80 else text[:77] + "..."


def parse_crs(value: Any, where: str) -> str:
    """A CRS as GeoJSON files and the original pixels give it → a string ``pyproj`` reads back.

    Accepted (coordinates are always read x = easting/longitude, y = northing/latitude, GeoJSON's order,
    whatever axis order an authority defines for the CRS):

    - a string ``CRS.from_user_input`` reads: ``"EPSG:3857"``, ``"urn:ogc:def:crs:EPSG::3857"``,
      ``"urn:ogc:def:crs:OGC:1.3:CRS84"``, ``"+init=epsg:3857"``, a PROJ string or WKT; an integer EPSG code;
    - GeoJSON 2008 named CRS ``{"type": "name", "properties": {"name": "EPSG:3857"}}`` (any name above);
    - the pre-2008 form ``{"type": "EPSG", "properties": {"code": 3857}}``;
    - what the original pixels took (rasterio ``CRS.from_dict``): ``{"init": "EPSG:3857"}`` or a dict of
      PROJ parameters such as ``{"proj": "utm", "zone": 29, "datum": "WGS84"}``.

    Linked CRS (``{"type": "link", ...}``) are refused: their target is not fetched. Anything else is a
    ``ConfigError`` at ``where``.
    """
    spec: Any = value
    if isinstance(value, dict):
        kind = value.get("type")
        props = value.get("properties")
        if kind is not None:
            if not isinstance(kind, str):
                raise ConfigError(f"crs type must be a string, got {kind!r}"[:200], f"{where}.type")
            if not isinstance(props, dict):
                raise ConfigError(f"a crs of type {kind!r} needs a 'properties' object"[:200],
                                  f"{where}.properties")
            low = kind.lower()
            if low == "name":
                spec = props.get("name")
                if not isinstance(spec, str) or not spec.strip():
                    raise ConfigError("a named crs needs properties.name, e.g. 'EPSG:3857'",
                                      f"{where}.properties.name")
            elif low == "epsg":
                spec = props.get("code")
                if isinstance(spec, str) and spec.strip().isdigit():
                    spec = int(spec)
                if isinstance(spec, bool) or not isinstance(spec, int):
                    raise ConfigError(f"an EPSG crs needs an integer properties.code, got {spec!r}"[:200],
                                      f"{where}.properties.code")
            elif low == "link":
                raise ConfigError("linked CRS are not followed; name it instead, e.g. "
                                  '{"type": "name", "properties": {"name": "EPSG:3857"}}', where)
            else:
                raise ConfigError(f"unknown crs type {kind!r}; use a named crs "
                                  '({"type": "name", "properties": {"name": "EPSG:3857"}})'[:300], f"{where}.type")
        elif set(value) == {"init"}:
            spec = value["init"]
            if not isinstance(spec, str):
                raise ConfigError(f"crs init must be a string such as 'EPSG:3857', got {spec!r}"[:200],
                                  f"{where}.init")
            spec = spec.strip()
            spec = spec if ":" in spec else f"+init={spec}"
        else:
            if not value or not all(_proj_parameter(k, v) for k, v in value.items()):
                raise ConfigError("crs must be a named CRS ({\"type\": \"name\", \"properties\": {\"name\": "
                                  "\"EPSG:3857\"}}), {\"init\": \"EPSG:3857\"} or a dict of PROJ parameters", where)
            spec = " ".join(f"+{k}" if v is True else f"+{k}={v}" for k, v in value.items() if v is not False)
            spec += " +type=crs"
    if isinstance(spec, bool) or not isinstance(spec, (str, int)):
        raise ConfigError(f"crs must be a string such as 'EPSG:3857' or a crs object, got {_short(spec)}", where)
    if isinstance(spec, int):
        if not 0 < spec < 10**7:
            raise ConfigError(f"{spec} is not an EPSG code", where)
        spec = f"EPSG:{spec}"
    text = spec.strip()
    if not text or len(text) > 20000:
        raise ConfigError("crs is empty" if not text else "crs text is too long", where)
    try:
        crs = _crs_from_text(text)
    except Exception:  # pyproj raises CRSError and, for odd input, other types
        raise ConfigError(f"unknown CRS {_short(text)}", where) from None
    if not (crs.is_projected or crs.is_geographic):
        raise ConfigError(f"CRS {_short(text)} is neither projected nor geographic", where)
    auth = crs.to_authority(min_confidence=100)
    if auth and auth[0] in ("EPSG", "OGC"):
        return ":".join(auth)
    return text


def _proj_parameter(key: Any, value: Any) -> bool:
    """A PROJ ``+key=value`` pair that cannot smuggle in other parameters."""
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,31}", key):
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return bool(re.fullmatch(r"[A-Za-z0-9_.,:@\-]{1,200}", value))
    return isinstance(value, int)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------------------
# Coordinates against their CRS
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Domain:
    crs: CRS
    name: str
    degrees: bool  # a geographic CRS in degrees
    box: tuple[float, float, float, float] | None  # where coordinates may lie (projected CRS), loosely
    to_lonlat: Transformer | None


@functools.lru_cache(maxsize=256)
def _domain(text: str) -> _Domain:
    crs = _crs_from_text(text)
    name = _name(crs)
    if crs.is_geographic:
        unit = (crs.axis_info[0].unit_name if crs.axis_info else "degree") or "degree"
        return _Domain(crs, name, "degree" in unit, None, None)
    box = None
    to_lonlat = None
    try:
        to_lonlat = Transformer.from_crs(crs, CRS.from_epsg(4326), always_xy=True)
        aou = crs.area_of_use
        if aou is not None:
            fwd = Transformer.from_crs(CRS.from_epsg(4326), crs, always_xy=True)
            l, b, r, t = fwd.transform_bounds(*aou.bounds, densify_pts=21)
            if all(math.isfinite(v) for v in (l, b, r, t)) and r > l and t > b:
                pad = max(r - l, t - b)
                box = (l - pad, b - pad, r + pad, t + pad)
    except Exception:  # no transformation to lon/lat known: only the generic checks apply
        pass
    return _Domain(crs, name, False, box, to_lonlat)


def check_coordinates(geometry: shapely.Geometry, crs: str | CRS, where: str) -> None:
    """Refuse coordinates that cannot mean what their CRS says (``ConfigError`` at ``where``).

    - every coordinate must be a finite number (no NaN, no infinity);
    - geographic CRS in degrees: longitude within −180..180 and latitude within −90..90 (± ``GEO_TOLERANCE``);
      numbers past that are reported as probably metres of an undeclared projected CRS, or as latitude and
      longitude swapped;
    - projected CRS: the coordinates must lie within the CRS's area of use (``pyproj`` ``area_of_use``
      projected to the CRS) widened on every side by that area's own larger size — loose on purpose, so
      that fields a little past a UTM zone's edge stay accepted while 1e300, or a zone's metres given in
      another zone's CRS thousands of km away, are refused — and must transform to a finite
      longitude/latitude;
    - projected CRS with every coordinate within ±180 / ±90: these are degrees, not metres (such a
      geometry would fit in a 360 × 180 m box at the projection's origin and give a grid of a pixel or
      two). This is **refused**, not warned about: a one-pixel output is never what was meant, and the fix
      (declare ``EPSG:4326`` or give projected coordinates) is one line.
    """
    coords = shapely.get_coordinates(geometry)
    if coords.size == 0:
        return
    if not np.isfinite(coords).all():
        raise ConfigError("coordinates must be finite numbers; found NaN or infinity", where)
    dom = _domain(crs if isinstance(crs, str) else crs.to_wkt())
    minx, miny = coords.min(axis=0)
    maxx, maxy = coords.max(axis=0)
    bounds = f"({minx:.6g}, {miny:.6g}, {maxx:.6g}, {maxy:.6g})"
    if dom.crs.is_geographic:
        if not dom.degrees:
            return
        lon_ok = -180 - GEO_TOLERANCE <= minx and maxx <= 180 + GEO_TOLERANCE
        lat_ok = -90 - GEO_TOLERANCE <= miny and maxy <= 90 + GEO_TOLERANCE
        if lon_ok and lat_ok:
            return
        largest = max(abs(minx), abs(maxx), abs(miny), abs(maxy))
        if largest > 1e8:
            raise ConfigError(f"coordinates {bounds} are far too large for {dom.name} (degrees) and for metres on "
                              "Earth", where)
        if largest > 360:
            raise ConfigError(f"coordinates {bounds} are not degrees of {dom.name}; they look like metres of a "
                              f"projected CRS: declare the CRS, e.g. {_EXAMPLE_CRS}", where)
        if lon_ok and -180 <= miny and maxy <= 180 and -90 <= minx and maxx <= 90:
            raise ConfigError(f"latitude beyond ±90 in {bounds}: coordinates in latitude, longitude order? "
                              "GeoJSON is longitude, latitude", where)
        raise ConfigError(f"coordinates {bounds} outside longitude −180..180 / latitude −90..90 of {dom.name}",
                          where)
    if max(abs(minx), abs(maxx)) <= 180 and max(abs(miny), abs(maxy)) <= 90:
        raise ConfigError(f"coordinates {bounds} look like degrees (longitude, latitude), but {dom.name} is "
                          "projected: declare \"crs\": \"EPSG:4326\" (or give projected coordinates)", where)
    if dom.box is not None:
        l, b, r, t = dom.box
        if minx < l or maxx > r or miny < b or maxy > t:
            aou = dom.crs.area_of_use
            area = (f" (longitude {aou.west:g}..{aou.east:g}, latitude {aou.south:g}..{aou.north:g})"
                    if aou is not None else "")
            raise ConfigError(f"coordinates {bounds} lie far outside the area of use of {dom.name}{area}: "
                              "the wrong CRS declared?", where)
    if dom.to_lonlat is not None:
        xs = np.array([minx, maxx, minx, maxx, (minx + maxx) / 2])
        ys = np.array([miny, miny, maxy, maxy, (miny + maxy) / 2])
        with np.errstate(all="ignore"):
            lon, lat = dom.to_lonlat.transform(xs, ys, errcheck=False)
        if not (np.isfinite(lon).all() and np.isfinite(lat).all()):
            raise ConfigError(f"coordinates {bounds} are outside the valid domain of {dom.name}: the wrong CRS "
                              "declared?", where)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def _parse_date(value: Any, where: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except ValueError:
        raise ConfigError(f"date {_short(value)} is not an ISO date (YYYY-MM-DD)", where) from None


def check_id(value: str, where: str) -> str:
    """A feature id safe to become a path or key on storage (letters, digits, ``_ . -``; no ``..``)."""
    if not SAFE_ID.match(value) or ".." in value:
        raise ConfigError(f"id {_short(value)} is not safe as a storage name; use letters, digits, '_', '.', '-' "
                          "(max 128, not starting with '.' or '-', no '..')", where)
    return value


def _read(source: str | Path | dict) -> tuple[Any, str]:
    """The decoded GeoJSON and the name of where it came from."""
    if isinstance(source, dict):
        return source, "features"
    if isinstance(source, str) and source.lstrip().startswith(("{", "[")):
        return jsontext.loads(source, "features", ConfigError), "features"
    if not isinstance(source, (str, Path)):
        raise ConfigError(f"expected a path, a JSON string or a dict, got {type(source).__name__}", "features")
    try:
        path = Path(source)
        where = str(path)
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("features file not found", str(source)) from None
    except IsADirectoryError:
        raise ConfigError("is a directory; give a GeoJSON file", str(source)) from None
    except (OSError, ValueError) as exc:  # permissions, embedded NUL, name too long, ...
        raise ConfigError(f"cannot read features file: {getattr(exc, 'strerror', None) or exc}",
                          str(source)[:300]) from None
    return jsontext.loads(raw, where, ConfigError), where


def load_features(source: str | Path | dict, default_crs: str = "EPSG:4326") -> list[Feature]:
    """Features from a GeoJSON FeatureCollection, Feature or geometry (path, JSON string or dict).

    Ids come from the feature ``id`` member or ``properties.id`` (else the 0-based index). The CRS of a
    feature is, first found: its ``properties.crs``, a ``crs`` member on the Feature, the collection's (or
    geometry's) ``crs`` member, ``default_crs`` — in any form ``parse_crs`` accepts. ``properties.date`` is
    the feature's date for dynamic ranges. Coordinates are checked against their CRS
    (``check_coordinates``). Every problem is a ``ConfigError`` naming the file and feature.
    """
    data, where = _read(source)
    if not isinstance(data, dict):
        raise ConfigError("expected a GeoJSON object", where)
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ConfigError(f"expected a GeoJSON FeatureCollection, Feature or geometry, got type {_short(kind)}",
                          f"{where}.type")
    if kind == "FeatureCollection":
        raw = data.get("features")
        if not isinstance(raw, list) or not raw:
            raise ConfigError("FeatureCollection has no features", f"{where}.features")
    elif kind == "Feature":
        raw = [data]
    elif kind in _GEOMETRY_TYPES:
        raw = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:
        raise ConfigError(f"expected a GeoJSON FeatureCollection, Feature or geometry, got type {_short(kind)}",
                          where)
    collection_crs = (parse_crs(data["crs"], f"{where}.crs") if data.get("crs") is not None and kind != "Feature"
                      else parse_crs(default_crs, "default_crs"))
    features: list[Feature] = []
    seen: set[str] = set()
    for i, f in enumerate(raw):
        fw = f"{where}[{i}]" if kind == "FeatureCollection" else where
        if not isinstance(f, dict) or not isinstance(f.get("geometry"), dict):
            raise ConfigError("feature has no geometry", fw)
        props = f.get("properties") or {}
        if not isinstance(props, dict):
            raise ConfigError("properties must be an object", f"{fw}.properties")
        fid = f.get("id", props.get("id", i))
        if isinstance(fid, (dict, list)):
            raise ConfigError(f"id must be a string or a number, got {type(fid).__name__}", f"{fw}.id")
        fid = check_id(str(fid), f"{fw}.id")
        if fid in seen:
            raise ConfigError(f"duplicate feature id {fid!r}", f"{fw}.id")
        seen.add(fid)
        if props.get("crs") is not None:
            crs = parse_crs(props["crs"], f"{fw}.properties.crs")
        elif f.get("crs") is not None:
            crs = parse_crs(f["crs"], f"{fw}.crs")
        else:
            crs = collection_crs
        gw = f"{fw}.geometry"
        try:
            with warnings.catch_warnings():  # NaN coordinates: refused below with the feature named
                warnings.simplefilter("ignore", RuntimeWarning)
                geom = shape(f["geometry"])
        except Exception as exc:  # shapely raises several types for malformed coordinates
            raise ConfigError(f"invalid geometry: {' '.join(str(exc).split())[:200]}", gw) from None
        try:
            empty = geom.is_empty
            coords = shapely.get_coordinates(geom)
        except Exception as exc:
            raise ConfigError(f"invalid geometry: {' '.join(str(exc).split())[:200]}", gw) from None
        if empty or coords.size == 0:
            raise ConfigError("geometry is empty", gw)
        check_coordinates(geom, crs, f"{gw} (feature {fid!r})")
        try:
            if not geom.is_valid:
                geom = shapely.make_valid(geom)
        except Exception as exc:  # GEOS errors on degenerate input
            raise ConfigError(f"invalid geometry: {' '.join(str(exc).split())[:200]}", gw) from None
        date = _parse_date(props["date"], f"{fw}.properties.date") if props.get("date") else None
        feature = Feature(fid, geom, crs, date, tuple(sorted((k, v) for k, v in props.items()
                                                            if isinstance(v, (str, int, float, bool)))))
        object.__setattr__(feature, "_coordinates_checked", True)
        features.append(feature)
    return features
