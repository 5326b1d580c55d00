"""Search STAC APIs and local catalogs for a feature; parse items once into the typed models the cube trusts.

Every kept item is parsed (``parse_item``) into a frozen ``ParsedItem`` (``pixels_xr.items``): a ``bbox``;
an integer EPSG on the item and on every source (from ``proj:epsg``, ``proj:code``, WKT2 or PROJJSON); one
``RasterSource`` per configured band plus the mask asset, under the configuration's common band names
(``B04`` → ``red``), holding ``scale``, ``offset``, ``nodata`` and ``data_type`` (from STAC 1.0
``raster:bands``, STAC 1.1 ``bands`` or the platform's rule) and the original asset key.
``ParsedItem.to_stac()`` (and ``normalize_item``) give the same as a normalised STAC dict.

Same-day duplicates of one tile (reprocessings) keep one item: the highest processing baseline, then the
latest ``updated``/``created``/processing time, then the greatest id.

Hrefs stay unsigned here: the readers sign them just before opening, through the signer registered for
the catalog (``SIGNERS``; Planetary Computer by default), and again when the signature expires. Before
that, every href is checked against the catalog's allow-list (``href_policy``: schemes and hosts derived
from where the catalog lives, see ``pixels_xr.signing``); ``signer_for`` gives readers both in one callable.

STAC API requests (landing page, conformance, every search page) have a connect timeout
(``STAC_CONNECT_TIMEOUT``) and a read timeout (``STAC_READ_TIMEOUT``: the longest wait for the next bytes of
a response), overridable with ``$PIXELS_XR_STAC_TIMEOUT`` (``SECONDS`` or ``CONNECT,READ``). A timed-out
request is retried within the same budget as 429/5xx answers (``RETRY_TOTAL``, backoff 0, 1, 2, 4, 8 s;
a ``Retry-After`` is honoured up to ``RETRY_AFTER_MAX`` s), so one request gives up after at most
(RETRY_TOTAL + 1) × (connect or read timeout) + 15 s + RETRY_TOTAL × RETRY_AFTER_MAX, and the search
raises a one-line ``CatalogError`` naming the (redacted) URL. Secrets in the catalog URL (userinfo, query
tokens) never reach errors or logs (pystac-client's and urllib3's request logs are redacted).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import functools
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import shapely
from pyproj import CRS
from shapely.geometry import mapping, shape

from pixels_xr.config import PixelsConfig
from pixels_xr.errors import CatalogError, ConfigError
from pixels_xr.features import Feature
from pixels_xr.items import ParsedItem, RasterSource, item_datetime, processing_version
from pixels_xr.platforms import (
    PROVIDERS,
    Band,
    Platform,
    asset_candidates,
    canonical_band,
    platform_of_item,
    reflectance_scale_offset,
)
from pixels_xr.run_cache import memo
from pixels_xr.signing import (
    ALLOWED_HREFS,
    SIGNERS,
    allow_hrefs,
    href_policy,
    is_remote,
    redact,
    redact_logs,
    register_signer,
    registered_signer,
    signer_for,
)

__all__ = ["ALLOWED_HREFS", "SIGNERS", "ParsedItem", "RasterSource", "SearchResult", "allow_hrefs", "as_items",
           "deduplicate", "find_asset", "href_policy", "is_remote", "item_datetime", "normalize_item", "parse_item",
           "read_local", "register_signer", "registered_signer", "search", "search_api", "search_many",
           "signer_for", "tile_key"]

log = logging.getLogger(__name__)

#: HTTP statuses retried with exponential backoff by STAC API searches.
RETRY_STATUSES = (429, 500, 502, 503, 504)
#: Total retries per request, of 429/5xx answers and timeouts alike (backoff 0, 1, 2, 4, 8 s: ~15 s).
RETRY_TOTAL = 5
#: Longest ``Retry-After`` (seconds) a STAC API may ask for before a retry; a longer one is cut to this.
RETRY_AFTER_MAX = 30.0
#: Seconds to wait for a STAC API's TCP (and TLS) connection, per try.
STAC_CONNECT_TIMEOUT = 10.0
#: Seconds to wait for the next bytes of a STAC API response (headers or body), per try.
STAC_READ_TIMEOUT = 60.0
#: Environment override of both timeouts: ``SECONDS`` (connect and read) or ``CONNECT,READ``.
STAC_TIMEOUT_ENV = "PIXELS_XR_STAC_TIMEOUT"

# ----------------------------------------------------------------------------------------------- search
class SearchResult(list):
    """The items of a search (a plain list of ``ParsedItem``) and ``filtered``: how many items the
    catalog returned for the feature's area and dates that a filter then removed, by reason
    (``"platform landsat-7"``, ``"maxcloud"``, ``"collection other"``) — so no item is dropped unsaid."""

    filtered: dict[str, int]

    def __init__(self, items: Iterable[ParsedItem] = (), filtered: dict[str, int] | None = None) -> None:
        super().__init__(items)
        self.filtered = dict(filtered or {})


def search(config: PixelsConfig, feature: Feature) -> SearchResult:
    """Items for a feature over its whole date range: collection, datetime (end day inclusive), geometry,
    ``maxcloud`` and platform filters, duplicates resolved, normalised, oldest first, at most ``limit``.
    What the collection, cloud and platform filters removed is counted in ``.filtered`` (and logged)."""
    start, end = config.date_range(feature)
    geometry = feature.lonlat_geometry()
    raw, located = _search_raw(config, geometry, start, end)
    return _select(config, feature, raw, located, geometry, start, end)


def search_many(config: PixelsConfig, features: Sequence[Feature]) -> list[SearchResult]:
    """``search`` of every feature (sharing one date range), from one catalog query over their bounds: a
    STAC API is asked once per group of nearby features (``groups``), not once per feature. Each feature
    then keeps the items whose footprint meets its own geometry, filtered as ``search`` filters them. With
    ``limit`` on a STAC API the features are searched one by one (the API's first N over a larger area are
    not each feature's first N)."""
    if len(features) < 2 or (config.limit is not None and is_remote(config.catalog)):
        return [search(config, f) for f in features]
    start, end = config.date_range(features[0])
    if any(config.date_range(f) != (start, end) for f in features[1:]):
        raise ValueError("search_many: the features do not share one date range")
    geometries = [f.lonlat_geometry() for f in features]
    seen = _Seen()  # one date range and items an index located: an item's verdict is the same for all
    if not is_remote(config.catalog):  # the local index answers each feature from memory
        return [_select(config, f, *_search_raw(config, g, start, end), g, start, end, seen)
                for f, g in zip(features, geometries)]
    raw, _ = _search_raw(config, shapely.box(*shapely.total_bounds(geometries)), start, end)
    index = _LocalIndex(raw)
    return [_select(config, f, index.intersecting(g), True, g, start, end, seen)
            for f, g in zip(features, geometries)]


def _select(config: PixelsConfig, feature: Feature, raw: list[dict], located: bool, geometry: shapely.Geometry,
            start: dt.date, end: dt.date, seen: _Seen | None = None) -> SearchResult:
    """A feature's search result from the catalog's raw items for its area and dates. ``seen``: verdicts
    and parsed items shared by features searched together (``search_many``)."""
    shared = seen if located and seen is not None else _Seen()  # unlocated: the verdict needs the geometry
    kept, filtered = [], {}
    for item in raw:
        key = id(item)
        if key not in shared.verdicts:
            shared.verdicts[key] = _rejection(item, config, geometry, start, end, located)
        reason = shared.verdicts[key]
        if reason is None:
            kept.append(item)
        elif reason:  # "" is outside the search itself (area, dates): not a filter's doing
            filtered[reason] = filtered.get(reason, 0) + 1
    unusual = {r: n for r, n in filtered.items() if r != "maxcloud"}  # cloud filtering is routine
    if unusual:
        log.warning("feature %s: %s", feature.id, ", ".join(f"{n} items left out by {r}"
                                                           for r, n in sorted(unusual.items())))
    parse_key = _parse_key(config)
    parsed = []
    for item in kept:  # a run parses each item once, however many features share it
        key = id(item)
        if key not in shared.parsed:
            shared.parsed[key] = memo("parsed-item", (parse_key, _identity(item)),
                                      lambda item=item: parse_item(item, config))
        parsed.append(shared.parsed[key])
    items = deduplicate(parsed)
    items.sort(key=lambda i: (i.datetime, i.id))
    if config.limit is not None:
        items = items[: config.limit]
    return SearchResult(items, filtered)


@dataclasses.dataclass
class _Seen:
    """Per raw item (by ``id``: the caller keeps the items alive), its ``_rejection`` verdict and its parse,
    for features searched together: with one date range and located items the verdict does not depend on
    the feature (in a no-op re-run of 1,024 features, ``_rejection`` and item identities per feature and
    item were a third of the planning's CPU)."""

    verdicts: dict[int, str | None] = dataclasses.field(default_factory=dict)
    parsed: dict[int, ParsedItem] = dataclasses.field(default_factory=dict)


def _search_raw(config: PixelsConfig, geometry: shapely.Geometry, start: dt.date,
                end: dt.date) -> tuple[list[dict], bool]:
    """The catalog's items for the area and dates, and whether they are known to intersect the area."""
    catalog = config.catalog
    if is_remote(catalog):
        url = PROVIDERS.get(catalog, catalog)
        return search_api(url, config.collection_id, geometry, start, end, config.maxcloud, config.limit), False
    index = memo("local-catalog", str(Path(catalog).resolve()), lambda: _LocalIndex(list(read_local(catalog))))
    return index.intersecting(geometry), True


class _LocalIndex:
    """A local catalog's items with a spatial index of their footprints (geometry, else bbox), parsed once
    per run: a feature's search visits only the items whose footprint intersects it."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items
        self.footprints = [_footprint(i) for i in items]
        located = [k for k, f in enumerate(self.footprints) if f is not None]
        self.unlocated = [items[k] for k, f in enumerate(self.footprints) if f is None]
        self.located = located
        self.tree = shapely.STRtree([self.footprints[k] for k in located])

    def intersecting(self, geometry: shapely.Geometry) -> list[dict]:
        hits = sorted(self.located[k] for k in self.tree.query(geometry, predicate="intersects"))
        return [self.items[k] for k in hits] + self.unlocated  # order of the catalog, as a full scan gives


def _footprint(item: Mapping[str, Any]) -> shapely.Geometry | None:
    geom = item.get("geometry")
    if geom:
        return shape(geom)
    bbox = item.get("bbox")
    return shapely.box(*(bbox[:2] + bbox[3:5] if len(bbox) == 6 else bbox)) if bbox else None


def _parse_key(config: PixelsConfig) -> tuple:
    """What of a configuration decides how an item parses (bands, mask asset, platforms, level)."""
    spec = config.mask_spec
    return (tuple(config.band_names), spec.asset if spec is not None else None, config.platform_names,
            config.resolved_level, config.catalog)


def _identity(item: Mapping[str, Any]) -> tuple:
    props = item.get("properties") or {}
    return (item.get("id"), item.get("collection"), props.get("datetime"), processing_version(props))


def _datetime_range(start: dt.date, end: dt.date) -> str:
    return f"{start.isoformat()}T00:00:00Z/{end.isoformat()}T23:59:59.999999Z"


def search_api(url: str, collection: str | None, geometry: shapely.Geometry, start: dt.date, end: dt.date,
               maxcloud: float = 100.0, limit: int | None = None, page_size: int = 100) -> list[dict]:
    """Search a STAC API with pystac-client: intersects + datetime + collection (+ cloud filter the server
    advertises: CQL2 ``filter`` or ``query``), following every page, retrying 429/5xx with backoff."""
    from pystac_client import Client

    timeout = stac_timeouts()
    redact_logs()  # pystac-client's and urllib3's debug logs print request URLs and headers
    try:
        client = Client.open(url, stac_io=_stac_io(timeout), timeout=timeout)
        kwargs: dict[str, Any] = {}
        if maxcloud < 100:
            if _has_conformance(client, "FILTER"):
                kwargs["filter"] = {"op": "<=", "args": [{"property": "eo:cloud_cover"}, maxcloud]}
                kwargs["filter_lang"] = "cql2-json"
            elif _has_conformance(client, "QUERY"):
                kwargs["query"] = {"eo:cloud_cover": {"lte": maxcloud}}
        result = client.search(collections=[collection] if collection else None,
                               intersects=mapping(geometry), datetime=_datetime_range(start, end),
                               limit=page_size, max_items=None, **kwargs)
        return list(result.items_as_dicts())
    except CatalogError:
        raise
    except Exception as exc:  # requests/urllib3/pystac-client raise many types; all mean "search failed"
        if _timed_out(exc):
            raise CatalogError(f"STAC API did not answer in time (connect timeout {timeout[0]:g} s, read "
                               f"timeout {timeout[1]:g} s, {RETRY_TOTAL + 1} tries; set "
                               f"${STAC_TIMEOUT_ENV} to wait longer): {redact(_first_line(exc))}",
                               redact(url)) from None
        raise CatalogError(f"STAC search failed: {type(exc).__name__}: {redact(_first_line(exc))}",
                           redact(url)) from None


def stac_timeouts() -> tuple[float, float]:
    """(connect, read) timeouts in seconds of STAC API requests: ``$PIXELS_XR_STAC_TIMEOUT`` (``SECONDS`` or
    ``CONNECT,READ``) when set, else ``STAC_CONNECT_TIMEOUT`` and ``STAC_READ_TIMEOUT``."""
    raw = os.environ.get(STAC_TIMEOUT_ENV, "").strip()
    if not raw:
        return float(STAC_CONNECT_TIMEOUT), float(STAC_READ_TIMEOUT)
    try:
        values = [float(v) for v in raw.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"must be SECONDS or CONNECT,READ (positive numbers), got {raw!r}", STAC_TIMEOUT_ENV)
    return values[0], values[-1]


_STAC_IO: Any = None


def _stac_io(timeout: tuple[float, float]) -> Any:
    """A pystac-client ``StacApiIO`` with retries (``RETRY_TOTAL``: 429/5xx, connection errors and
    timeouts) and the timeouts on every request. pystac-client 0.9.1's ``Client.from_file`` calls
    ``stac_io.update(timeout=None)``, which would reset them (no timeout: a silent API stalls forever);
    this subclass keeps its timeout when ``update`` passes none."""
    global _STAC_IO
    if _STAC_IO is None:
        from pystac_client.stac_api_io import StacApiIO
        from urllib3.util.retry import Retry

        class CappedRetry(Retry):
            """``Retry`` honouring ``Retry-After`` up to ``RETRY_AFTER_MAX`` seconds."""

            def parse_retry_after(self, retry_after: str) -> float:
                return min(float(super().parse_retry_after(retry_after)), float(RETRY_AFTER_MAX))

        class TimedStacApiIO(StacApiIO):
            def update(self, headers: Any = None, parameters: Any = None, request_modifier: Any = None,
                       timeout: Any = None) -> None:
                keep = getattr(self, "timeout", None)
                super().update(headers=headers, parameters=parameters, request_modifier=request_modifier,
                               timeout=keep if timeout is None else timeout)

        _STAC_IO = (TimedStacApiIO, CappedRetry)
    io_class, retry_class = _STAC_IO
    retry = retry_class(total=RETRY_TOTAL, backoff_factor=0.5, status_forcelist=RETRY_STATUSES,
                        allowed_methods=None, raise_on_status=True)
    return io_class(max_retries=retry, timeout=timeout)


def _timed_out(exc: BaseException) -> bool:
    """Whether a failed request (any wrapping: pystac-client's APIError, requests, urllib3) timed out."""
    import requests
    import urllib3

    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, requests.exceptions.Timeout | urllib3.exceptions.TimeoutError | TimeoutError):
            return True
        if isinstance(e, BaseException):
            todo += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
    return False


def _has_conformance(client: Any, name: str) -> bool:
    from pystac_client.conformance import ConformanceClasses

    try:
        getattr(ConformanceClasses, name)
    except AttributeError:
        return False
    try:
        return bool(client.conforms_to(getattr(ConformanceClasses, name)))
    except Exception:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def read_local(path: str | Path) -> Iterable[dict]:
    """Items of a local catalog: static ``catalog.json``/collection, ItemCollection JSON, ndjson or
    stac-geoparquet."""
    p = Path(path)
    if not p.exists():
        raise CatalogError("local catalog not found", str(p))
    try:
        if p.suffix == ".parquet":
            return _read_parquet(p)
        if p.suffix == ".ndjson":
            return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CatalogError(f"not valid JSON/ndjson: {exc}", str(p)) from None
    except CatalogError:
        raise
    except Exception as exc:
        raise CatalogError(f"cannot read catalog: {_first_line(exc)}", str(p)) from None
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "FeatureCollection":
        return [_absolute_hrefs(f, p.parent) for f in data.get("features", [])]
    if kind == "Feature":
        return [_absolute_hrefs(data, p.parent)]
    if kind in {"Catalog", "Collection"}:
        return _walk_static(p)
    raise CatalogError("not a STAC catalog, collection, item or item collection", str(p))


def _read_parquet(p: Path) -> list[dict]:
    import rustac

    ic = rustac.read_sync(str(p))
    return list(ic["features"])


def _walk_static(root: Path) -> list[dict]:
    import pystac

    cat = pystac.read_file(str(root))
    items = []
    for item in cat.get_items(recursive=True):
        item.make_asset_hrefs_absolute()
        d = item.to_dict(transform_hrefs=False)
        if item.collection_id:
            d["collection"] = item.collection_id
        items.append(d)
    return items


def _absolute_hrefs(item: dict, base: Path) -> dict:
    for asset in (item.get("assets") or {}).values():
        href = asset.get("href", "")
        if href and "://" not in href and not href.startswith("/"):
            asset["href"] = str((base / href).resolve())
    return item


# ----------------------------------------------------------------------------------------------- filters
def _rejection(item: dict, config: PixelsConfig, geometry: shapely.Geometry, start: dt.date,
               end: dt.date, located: bool = False) -> str | None:
    """Why an item is left out: None (kept), "" (outside the feature's area or dates: not part of the
    search at all) or the filter that removes it (counted by ``search``); ``located``: the item is known to
    intersect ``geometry`` (a local catalog's spatial index found it)."""
    props = item.get("properties", {})
    day = item_datetime(item).date()
    if not start <= day <= end:
        return ""
    if not located and (footprint := _footprint(item)) is not None and not footprint.intersects(geometry):
        return ""
    collection = config.collection_id
    if collection and item.get("collection") not in (None, collection):
        return f"collection {item.get('collection')}"
    cloud = props.get("eo:cloud_cover")
    if cloud is not None and float(cloud) > config.maxcloud:
        return "maxcloud"
    platform = props.get("platform")
    if platform and any(p.stac_platform for p in config.platform_list) and \
            platform_of_item(props, config.platform_list) is None:
        return f"platform {platform}"
    return None


def item_platform(item: dict, config: PixelsConfig) -> Platform:
    """The configured platform an item belongs to (its STAC ``platform``), else the first configured."""
    return platform_of_item(item.get("properties", {}), config.platform_list) or config.platform


# ----------------------------------------------------------------------------------------------- normalise
def item_epsg(item: dict, asset: dict | None = None) -> int:
    """EPSG code of an item/asset from proj:epsg, proj:code, proj:wkt2 or proj:projjson."""
    for src in (asset or {}, item.get("properties", {})):
        if src.get("proj:epsg") is not None:
            return int(src["proj:epsg"])
        code = src.get("proj:code")
        if code and (epsg := _epsg_of_code(str(code))):
            return epsg
        for key in ("proj:wkt2", "proj:projjson"):
            if src.get(key):
                value = src[key]
                epsg = CRS.from_user_input(json.dumps(value) if isinstance(value, dict) else value).to_epsg()
                if epsg:
                    return int(epsg)
    raise CatalogError("item has no usable projection (proj:epsg, proj:code, proj:wkt2 or proj:projjson)",
                       f"item {item.get('id')!r}")


@functools.lru_cache(maxsize=4096)
def _epsg_of_code(code: str) -> int | None:
    """EPSG of a ``proj:code`` (``EPSG:32629``, …): pyproj's parse costs ~100 µs, and every asset has one."""
    if code.upper().startswith("EPSG:") and code[5:].isdigit():
        return int(code[5:])
    epsg = CRS.from_user_input(code).to_epsg()
    return int(epsg) if epsg else None


def _band_meta(asset: dict) -> dict:
    """First band entry of an asset: STAC 1.0 ``raster:bands`` or STAC 1.1 ``bands``, unified keys."""
    entry: dict[str, Any] = {}
    if asset.get("raster:bands"):
        entry = dict(asset["raster:bands"][0])
    elif asset.get("bands"):
        b = asset["bands"][0]
        entry = {k.removeprefix("raster:"): v for k, v in b.items()}
    for key in ("nodata", "data_type"):
        if key not in entry and key in asset:
            entry[key] = asset[key]
    for key in ("raster:scale", "raster:offset"):
        if key in asset and key.removeprefix("raster:") not in entry:
            entry[key.removeprefix("raster:")] = asset[key]
    return entry


def _common_names(asset: dict) -> set[str]:
    names = set()
    for b in (asset.get("eo:bands") or []) + (asset.get("bands") or []):
        for k in ("common_name", "eo:common_name", "name"):
            if b.get(k):
                names.add(str(b[k]).lower())
    return names


def find_asset(item: dict, band: Band | str) -> str | None:
    """Key of the asset holding ``band`` in an item: by key (either naming), then by eo/STAC 1.1 common
    name."""
    assets = item.get("assets", {})
    if isinstance(band, str):
        if band in assets:
            return band
        lower = {k.lower(): k for k in assets}
        return lower.get(band.lower())
    for key in asset_candidates(band):
        if key in assets:
            return key
    wanted = {band.name.lower(), *(a.lower() for a in band.aliases)}
    for key, asset in assets.items():
        roles = set(asset.get("roles") or [])
        if roles and "data" not in roles:
            continue
        if (_common_names(asset) & wanted) and len(asset.get("eo:bands") or asset.get("bands") or [1]) == 1:
            return key
    return None


def parse_item(item: Mapping[str, Any] | Any, config: PixelsConfig) -> ParsedItem:
    """A raw STAC item (dict or ``pystac.Item``) parsed for a configuration: the requested bands and the
    mask asset as typed sources under the configuration's names (see ``pixels_xr.items``)."""
    if hasattr(item, "to_dict") and not isinstance(item, Mapping):
        item = item.to_dict(transform_hrefs=False)
    iid = str(item.get("id", "?"))
    bbox = item.get("bbox")
    if not bbox:
        if not item.get("geometry"):
            raise CatalogError("item has neither bbox nor geometry", f"item {iid!r}")
        bbox = list(shape(item["geometry"]).bounds)
    props = dict(item.get("properties") or {})
    epsg = item_epsg(item)
    props["proj:epsg"] = epsg
    props.pop("proj:code", None)
    platform, level = item_platform(item, config), config.resolved_level
    wanted: list[tuple[str, Band | str]] = [(b, canonical_band(platform, level, b))
                                            for b in config.band_names]
    spec = config.mask_spec
    if spec is not None and spec.asset not in config.band_names:
        mask_band: Band | str
        try:
            mask_band = canonical_band(platform, level, spec.asset)
        except Exception:
            mask_band = spec.asset
        wanted.append((spec.asset, mask_band))
    fallback_scale, fallback_offset = reflectance_scale_offset(platform, props)
    sources: dict[str, RasterSource] = {}
    for name, band in wanted:
        key = find_asset(item, band)
        if key is None:
            raise CatalogError(f"item has no asset for band {name!r} (looked for "
                               f"{', '.join(asset_candidates(band)) if isinstance(band, Band) else name} "
                               "and eo:bands common names)", f"item {iid!r}")
        src = item["assets"][key]
        meta = _band_meta(src)
        is_reflectance = isinstance(band, Band) and band.reflectance
        scale, offset = meta.get("scale"), meta.get("offset")
        if scale is None and offset is None and is_reflectance:
            scale, offset = fallback_scale, fallback_offset
        transform, raster_shape = src.get("proj:transform"), src.get("proj:shape")
        sources[name] = RasterSource(
            name=name, key=key, href=str(src["href"]), epsg=item_epsg(item, src),
            scale=float(1.0 if scale is None else scale), offset=float(0.0 if offset is None else offset),
            nodata=meta.get("nodata", 0 if is_reflectance else None), data_type=meta.get("data_type"),
            reflectance=is_reflectance,
            transform=tuple(float(v) for v in transform) if transform and len(transform) >= 6 else None,
            shape=(int(raster_shape[0]), int(raster_shape[1])) if raster_shape and len(raster_shape) >= 2
            else None,
            extra={k: copy.deepcopy(v) for k, v in src.items() if k not in _RAW_SOURCE_KEYS})
    return ParsedItem(id=iid, datetime=item_datetime(item), epsg=epsg, bbox=tuple(float(v) for v in bbox),
                      sources=sources, properties=copy.deepcopy(props), collection=item.get("collection"),
                      geometry=copy.deepcopy(item.get("geometry")),
                      links=tuple(copy.deepcopy(link) for link in item.get("links") or ()),
                      stac_version=str(item.get("stac_version", "1.0.0")),
                      stac_extensions=tuple(item.get("stac_extensions") or ()))


#: Keys of a raw asset that ``parse_item`` turns into typed fields (not copied into ``RasterSource.extra``).
_RAW_SOURCE_KEYS = frozenset({"href", "raster:bands", "bands", "proj:code", "proj:epsg", "proj:transform",
                              "proj:shape"})


def normalize_item(item: dict, config: PixelsConfig) -> dict:
    """``parse_item`` as a normalised STAC dict (``ParsedItem.to_stac``), for tools that want STAC."""
    return parse_item(item, config).to_stac()


def as_items(items: Iterable[ParsedItem | Mapping[str, Any] | Any], config: PixelsConfig) -> list[ParsedItem]:
    """Items for the cube: parsed items as they are; normalised dicts read back; raw STAC dicts and
    ``pystac.Item``s parsed for the configuration."""
    out = []
    for item in items:
        if isinstance(item, ParsedItem):
            out.append(item)
        elif isinstance(item, Mapping) and ParsedItem.is_normalised(item):
            out.append(ParsedItem.from_stac(item))
        else:
            out.append(parse_item(item, config))
    return out


# ----------------------------------------------------------------------------------------------- duplicates
def _properties(item: Mapping[str, Any] | ParsedItem) -> Mapping[str, Any]:
    return item.properties if isinstance(item, ParsedItem) else item.get("properties", {})


def tile_key(item: Mapping[str, Any] | ParsedItem) -> str:
    """Identity of the tile/footprint an item covers (MGRS tile, WRS path/row, or EPSG + rounded bbox)."""
    p = _properties(item)
    platform = str(p.get("platform", "")).lower()
    if p.get("s2:mgrs_tile"):
        return f"{platform}:{p['s2:mgrs_tile']}"
    if p.get("mgrs:utm_zone") is not None and p.get("mgrs:grid_square"):
        return f"{platform}:{p['mgrs:utm_zone']}{p.get('mgrs:latitude_band', '')}{p['mgrs:grid_square']}"
    if p.get("grid:code"):
        return f"{platform}:{p['grid:code']}"
    if p.get("landsat:wrs_path") is not None:
        return f"{platform}:{p['landsat:wrs_path']}/{p.get('landsat:wrs_row')}"
    bbox = item.bbox if isinstance(item, ParsedItem) else item.get("bbox", [])
    return f"{platform}:{p.get('proj:epsg')}:{','.join(f'{v:.2f}' for v in bbox)}"


def _freshness(item: Mapping[str, Any] | ParsedItem) -> tuple:
    item_id = item.id if isinstance(item, ParsedItem) else item.get("id", "")
    return (*processing_version(_properties(item)), item_id)


Item = TypeVar("Item", ParsedItem, dict)


def deduplicate(items: list[Item]) -> list[Item]:
    """One item per (tile, day): the freshest reprocessing (see module docstring); raw or parsed items."""
    best: dict[tuple[str, dt.date], Item] = {}
    for item in items:
        key = (tile_key(item), item_datetime(item).date())
        if key not in best or _freshness(item) > _freshness(best[key]):
            best[key] = item
    kept = {id(v) for v in best.values()}
    return [i for i in items if id(i) in kept]
