"""Typed, frozen models of the STAC items a run reads: parsed once by ``catalog``, trusted downstream.

``catalog.parse_item`` turns a raw STAC item into a ``ParsedItem`` (odc-stac's ``ParsedItem`` and
``RasterSource`` are the model): the acquisition time, an integer EPSG, a lon/lat bbox and one
``RasterSource`` per band the configuration reads (the mask asset last), each holding the rules that raw
STAC spreads over string keys — the catalog's asset key, the href, its CRS, ``scale``/``offset``/``nodata``/
``data_type`` (from STAC 1.0 ``raster:bands``, STAC 1.1 ``bands`` or the platform's rule) and whether the
band is reflectance. Cube, readers, batch and plot read these attributes, never a nested dict.

``to_stac()`` gives back the normalised STAC dict (assets under the canonical names, one
``raster:bands`` entry each, the original key as ``pixels_xr:key``) for loaders that speak STAC
(stackstac's coordinates, odc-stac). ``ParsedItem.from_stac`` reads such a dict back, so normalised items
written out by an earlier version (or by a user) still load.

The models are frozen: a field cannot be reassigned. Their mappings (``properties``, ``geometry``,
``extra``) are plain dicts so that items pickle to workers; treat them as read-only. Hashing and
``__dask_tokenize__`` use the item's identity: id, collection, time, processing version and its sources.
"""

from __future__ import annotations

import dataclasses
import functools
import datetime as dt
from collections.abc import Mapping
from typing import Any, TypedDict

from pixels_xr.errors import CatalogError

__all__ = ["AssetProblem", "ParsedItem", "RasterSource", "item_datetime", "processing_version"]

#: Keys of a normalised asset dict that ``RasterSource`` holds as fields (the rest stays in ``extra``).
_SOURCE_KEYS = frozenset({"href", "proj:epsg", "proj:transform", "proj:shape", "raster:bands", "pixels_xr:key",
                          "pixels_xr:reflectance"})


class AssetProblem(TypedDict):
    """An asset the asset check could not read: recorded per item and asset in ``attrs["asset_problems"]``
    and the run report (a plain dict, so it is JSON as it is)."""

    item: str
    asset: str  #: the band name the asset is read as
    href: str  #: redacted (no tokens)
    error: str  #: one line, redacted


def item_datetime(item: Mapping[str, Any] | ParsedItem) -> dt.datetime:
    """Acquisition time of an item (``datetime`` or ``start_datetime``), timezone-aware UTC."""
    if isinstance(item, ParsedItem):
        return item.datetime
    props = item.get("properties", {})
    value = props.get("datetime") or props.get("start_datetime")
    if not value:
        raise CatalogError("item has no datetime", f"item {item.get('id')!r}")
    t = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def processing_version(properties: Mapping[str, Any]) -> tuple[float, str]:
    """How fresh a processing of a scene is: (processing baseline, ``updated``/generation/created stamp)."""
    try:
        baseline = float(properties.get("s2:processing_baseline") or 0)
    except (TypeError, ValueError):
        baseline = 0.0
    stamp = str(properties.get("updated") or properties.get("s2:generation_time") or properties.get("created")
                or "")
    return baseline, stamp


@dataclasses.dataclass(frozen=True)
class RasterSource:
    """One asset of an item as the cube reads it."""

    name: str  #: the configuration's band name (``red``) or the mask asset's
    key: str  #: the catalog's asset key (``B04``)
    href: str
    epsg: int
    scale: float
    offset: float
    nodata: float | int | None
    data_type: str | None
    reflectance: bool  #: a reflectance band (scaled to reflectance); False for masks and other bands
    transform: tuple[float, ...] | None = None  #: ``proj:transform`` (at least 6 terms) when known
    shape: tuple[int, int] | None = None  #: ``proj:shape`` (rows, cols) when known
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)  #: the asset's other STAC fields

    def to_stac(self) -> dict[str, Any]:
        """The normalised STAC asset dict."""
        asset = {**self.extra, "href": self.href, "proj:epsg": self.epsg}
        if self.transform is not None:
            asset["proj:transform"] = list(self.transform)
        if self.shape is not None:
            asset["proj:shape"] = list(self.shape)
        asset["raster:bands"] = [{"scale": self.scale, "offset": self.offset, "nodata": self.nodata,
                                  "data_type": self.data_type}]
        asset["pixels_xr:key"] = self.key
        asset["pixels_xr:reflectance"] = self.reflectance
        return asset

    @classmethod
    def from_stac(cls, name: str, asset: Mapping[str, Any]) -> RasterSource:
        """A normalised asset dict (``to_stac``'s form) back into a source."""
        band = (asset.get("raster:bands") or [{}])[0]
        transform, shape = asset.get("proj:transform"), asset.get("proj:shape")
        return cls(name=name, key=str(asset.get("pixels_xr:key", name)), href=str(asset["href"]),
                   epsg=int(asset["proj:epsg"]), scale=float(band.get("scale", 1.0)),
                   offset=float(band.get("offset", 0.0)), nodata=band.get("nodata"),
                   data_type=band.get("data_type"), reflectance=bool(asset.get("pixels_xr:reflectance", False)),
                   transform=tuple(float(v) for v in transform) if transform else None,
                   shape=(int(shape[0]), int(shape[1])) if shape and len(shape) >= 2 else None,
                   extra={k: v for k, v in asset.items() if k not in _SOURCE_KEYS})

    def __hash__(self) -> int:
        return hash((self.name, self.href, self.scale, self.offset))

    def __dask_tokenize__(self) -> tuple:
        return ("pixels_xr.RasterSource", self.name, self.key, self.href, self.epsg, self.scale, self.offset,
                self.nodata, self.data_type, self.reflectance, self.transform, self.shape)


@dataclasses.dataclass(frozen=True)
class ParsedItem:
    """A STAC item parsed for a run: its time, CRS, footprint and the sources of the bands read."""

    id: str
    datetime: dt.datetime  #: acquisition time, timezone-aware UTC
    epsg: int  #: the item's CRS (each source has its own too)
    bbox: tuple[float, ...]  #: lon/lat, 4 or 6 numbers
    sources: dict[str, RasterSource] = dataclasses.field(repr=False)  #: band name → source, mask last
    properties: dict[str, Any] = dataclasses.field(repr=False)  #: STAC properties (``proj:epsg`` = ``epsg``)
    collection: str | None = None
    geometry: dict[str, Any] | None = dataclasses.field(default=None, repr=False)
    links: tuple[dict[str, Any], ...] = dataclasses.field(default=(), repr=False)
    stac_version: str = dataclasses.field(default="1.0.0", repr=False)
    stac_extensions: tuple[str, ...] = dataclasses.field(default=(), repr=False)

    @property
    def cloud_cover(self) -> float | None:
        value = self.properties.get("eo:cloud_cover")
        return None if value is None else float(value)

    @property
    def platform(self) -> str:
        return str(self.properties.get("platform", ""))

    @functools.cached_property  # asked for every feature and bin the item is in
    def version(self) -> tuple[float, str]:
        """Processing version (baseline, update stamp): what tells two processings of one scene apart."""
        return processing_version(self.properties)

    @property
    def self_href(self) -> str | None:
        """The item's own URL (its ``self`` link), when the catalog gives one."""
        return next((str(link["href"]) for link in self.links if link.get("rel") == "self" and link.get("href")),
                    None)

    def to_stac(self) -> dict[str, Any]:
        """The normalised STAC item dict (assets under the band names; see the module docstring)."""
        out: dict[str, Any] = {"type": "Feature", "stac_version": self.stac_version, "id": self.id}
        if self.stac_extensions:
            out["stac_extensions"] = list(self.stac_extensions)
        if self.collection is not None:
            out["collection"] = self.collection
        out.update({"geometry": self.geometry, "bbox": list(self.bbox), "properties": dict(self.properties),
                    "links": [dict(link) for link in self.links],
                    "assets": {name: s.to_stac() for name, s in self.sources.items()}})
        return out

    @classmethod
    def from_stac(cls, item: Mapping[str, Any]) -> ParsedItem:
        """A normalised item dict (``to_stac``'s form, every asset with ``pixels_xr:key``) back into a model."""
        props = dict(item.get("properties") or {})
        iid = str(item.get("id"))
        try:
            epsg = int(props["proj:epsg"])
            sources = {name: RasterSource.from_stac(name, a) for name, a in (item.get("assets") or {}).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise CatalogError(f"not a normalised item ({exc})", f"item {iid!r}") from None
        return cls(id=iid, datetime=item_datetime(item), epsg=epsg, bbox=tuple(item.get("bbox") or ()),
                   sources=sources, properties=props, collection=item.get("collection"),
                   geometry=item.get("geometry"), links=tuple(item.get("links") or ()),
                   stac_version=str(item.get("stac_version", "1.0.0")),
                   stac_extensions=tuple(item.get("stac_extensions") or ()))

    @staticmethod
    def is_normalised(item: Mapping[str, Any]) -> bool:
        """Whether a dict is already in ``to_stac``'s form (every asset carries ``pixels_xr:key``)."""
        assets = item.get("assets") or {}
        return bool(assets) and all(isinstance(a, Mapping) and "pixels_xr:key" in a for a in assets.values()) \
            and (item.get("properties") or {}).get("proj:epsg") is not None

    def __hash__(self) -> int:
        return hash((self.id, self.collection, self.datetime, self.version))

    def __dask_tokenize__(self) -> tuple:
        return ("pixels_xr.ParsedItem", self.id, self.collection, self.datetime.isoformat(), self.version,
                tuple(s.__dask_tokenize__() for s in self.sources.values()))
