"""Search STAC APIs and local catalogs for a feature; normalise items into plain dicts the cube can trust.

Normalised items keep the STAC Item shape but guarantee: a ``bbox``; an integer ``proj:epsg`` on the item and
on every kept asset (from ``proj:epsg``, ``proj:code``, WKT2 or PROJJSON); assets renamed to the
configuration's common band names (``B04`` → ``red``) plus the mask asset, each with exactly one
``raster:bands`` entry holding ``scale``, ``offset``, ``nodata`` and ``data_type`` (from STAC 1.0
``raster:bands``, STAC 1.1 ``bands`` or the platform's rule); and the original key as ``pixels_xr:key``.

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
import datetime as dt
import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import shapely
from pyproj import CRS
from shapely.geometry import mapping, shape

from pixels_xr.config import PixelsConfig
from pixels_xr.errors import CatalogError, ConfigError
from pixels_xr.features import Feature
from pixels_xr.platforms import PROVIDERS, Band, Platform, asset_candidates, canonical_band, \
    platform_of_item, reflectance_scale_offset
from pixels_xr.run_cache import memo
from pixels_xr.signing import ALLOWED_HREFS, SIGNERS, allow_hrefs, href_policy, is_remote, redact, redact_logs, \
    register_signer, registered_signer, signer_for

__all__ = ["ALLOWED_HREFS", "SIGNERS", "SearchResult", "allow_hrefs", "deduplicate", "find_asset", "href_policy",
           "is_remote", "item_datetime", "normalize_item", "read_local", "register_signer", "registered_signer",
           "search", "search_api", "signer_for", "tile_key"]

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
    """The items of a search (a plain list of normalised item dicts) and ``filtered``: how many items the
    catalog returned for the feature's area and dates that a filter then removed, by reason
    (``"platform landsat-7"``, ``"maxcloud"``, ``"collection other"``) — so no item is dropped unsaid."""

    filtered: dict[str, int]

    def __init__(self, items: Iterable[dict] = (), filtered: dict[str, int] | None = None) -> None:
        super().__init__(items)
        self.filtered = dict(filtered or {})


def search(config: PixelsConfig, feature: Feature) -> SearchResult:
    """Items for a feature over its whole date range: collection, datetime (end day inclusive), geometry,
    ``maxcloud`` and platform filters, duplicates resolved, normalised, oldest first, at most ``limit``.
    What the collection, cloud and platform filters removed is counted in ``.filtered`` (and logged)."""
    start, end = config.date_range(feature)
    geometry = feature.lonlat_geometry()
    raw = _search_raw(config, geometry, start, end)
    kept, filtered = [], {}
    for item in raw:
        reason = _rejection(item, config, geometry, start, end)
        if reason is None:
            kept.append(item)
        elif reason:  # "" is outside the search itself (area, dates): not a filter's doing
            filtered[reason] = filtered.get(reason, 0) + 1
    unusual = {r: n for r, n in filtered.items() if r != "maxcloud"}  # cloud filtering is routine
    if unusual:
        log.warning("feature %s: %s", feature.id, ", ".join(f"{n} items left out by {r}"
                                                           for r, n in sorted(unusual.items())))
    items = [normalize_item(i, config) for i in kept]
    items = deduplicate(items)
    items.sort(key=lambda i: (item_datetime(i), i["id"]))
    if config.limit is not None:
        items = items[: config.limit]
    return SearchResult(items, filtered)


def _search_raw(config: PixelsConfig, geometry: shapely.Geometry, start: dt.date, end: dt.date) -> list[dict]:
    catalog = config.catalog
    if is_remote(catalog):
        url = PROVIDERS.get(catalog, catalog)
        return search_api(url, config.collection_id, geometry, start, end, config.maxcloud, config.limit)
    return memo("local-catalog", str(Path(catalog).resolve()), lambda: list(read_local(catalog)))


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
def item_datetime(item: dict) -> dt.datetime:
    """Acquisition time of an item (``datetime`` or ``start_datetime``), timezone-aware UTC."""
    props = item.get("properties", {})
    value = props.get("datetime") or props.get("start_datetime")
    if not value:
        raise CatalogError("item has no datetime", f"item {item.get('id')!r}")
    t = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _rejection(item: dict, config: PixelsConfig, geometry: shapely.Geometry, start: dt.date,
               end: dt.date) -> str | None:
    """Why an item is left out: None (kept), "" (outside the feature's area or dates: not part of the
    search at all) or the filter that removes it (counted by ``search``)."""
    props = item.get("properties", {})
    day = item_datetime(item).date()
    if not start <= day <= end:
        return ""
    geom = item.get("geometry")
    footprint = shape(geom) if geom else (shapely.box(*item["bbox"]) if item.get("bbox") else None)
    if footprint is not None and not footprint.intersects(geometry):
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
        if code:
            epsg = CRS.from_user_input(code).to_epsg()
            if epsg:
                return int(epsg)
        for key in ("proj:wkt2", "proj:projjson"):
            if src.get(key):
                value = src[key]
                epsg = CRS.from_user_input(json.dumps(value) if isinstance(value, dict) else value).to_epsg()
                if epsg:
                    return int(epsg)
    raise CatalogError("item has no usable projection (proj:epsg, proj:code, proj:wkt2 or proj:projjson)",
                       f"item {item.get('id')!r}")


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


def normalize_item(item: dict, config: PixelsConfig) -> dict:
    """Plain-dict item with requested bands + mask asset under canonical names (see module docstring)."""
    out = copy.deepcopy(item)
    iid = out.get("id", "?")
    if not out.get("bbox"):
        if not out.get("geometry"):
            raise CatalogError("item has neither bbox nor geometry", f"item {iid!r}")
        out["bbox"] = list(shape(out["geometry"]).bounds)
    props = out.setdefault("properties", {})
    epsg = item_epsg(out)
    props["proj:epsg"] = epsg
    props.pop("proj:code", None)
    platform, level = item_platform(out, config), config.resolved_level
    assets: dict[str, dict] = {}
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
    for name, band in wanted:
        key = find_asset(out, band)
        if key is None:
            raise CatalogError(f"item has no asset for band {name!r} (looked for "
                               f"{', '.join(asset_candidates(band)) if isinstance(band, Band) else name} "
                               "and eo:bands common names)", f"item {iid!r}")
        src = out["assets"][key]
        meta = _band_meta(src)
        is_reflectance = isinstance(band, Band) and band.reflectance
        scale = meta.get("scale")
        offset = meta.get("offset")
        if scale is None and offset is None and is_reflectance:
            scale, offset = fallback_scale, fallback_offset
        asset = {k: v for k, v in src.items() if k not in {"raster:bands", "bands", "proj:code"}}
        asset["proj:epsg"] = item_epsg(out, src)
        asset["raster:bands"] = [{
            "scale": float(1.0 if scale is None else scale),
            "offset": float(0.0 if offset is None else offset),
            "nodata": meta.get("nodata", 0 if is_reflectance else None),
            "data_type": meta.get("data_type"),
        }]
        asset["pixels_xr:key"] = key
        asset["pixels_xr:reflectance"] = is_reflectance
        assets[name] = asset
    out["assets"] = assets
    out.setdefault("links", [])
    out.setdefault("stac_version", "1.0.0")
    out.setdefault("type", "Feature")
    return out


# ----------------------------------------------------------------------------------------------- duplicates
def tile_key(item: dict) -> str:
    """Identity of the tile/footprint an item covers (MGRS tile, WRS path/row, or EPSG + rounded bbox)."""
    p = item.get("properties", {})
    platform = str(p.get("platform", "")).lower()
    if p.get("s2:mgrs_tile"):
        return f"{platform}:{p['s2:mgrs_tile']}"
    if p.get("mgrs:utm_zone") is not None and p.get("mgrs:grid_square"):
        return f"{platform}:{p['mgrs:utm_zone']}{p.get('mgrs:latitude_band', '')}{p['mgrs:grid_square']}"
    if p.get("grid:code"):
        return f"{platform}:{p['grid:code']}"
    if p.get("landsat:wrs_path") is not None:
        return f"{platform}:{p['landsat:wrs_path']}/{p.get('landsat:wrs_row')}"
    bbox = ",".join(f"{v:.2f}" for v in item.get("bbox", []))
    return f"{platform}:{p.get('proj:epsg')}:{bbox}"


def _freshness(item: dict) -> tuple:
    p = item.get("properties", {})
    try:
        baseline = float(p.get("s2:processing_baseline") or 0)
    except ValueError:
        baseline = 0.0
    stamp = str(p.get("updated") or p.get("s2:generation_time") or p.get("created") or "")
    return baseline, stamp, item.get("id", "")


def deduplicate(items: list[dict]) -> list[dict]:
    """One item per (tile, day): the freshest reprocessing (see module docstring)."""
    best: dict[tuple[str, dt.date], dict] = {}
    for item in items:
        key = (tile_key(item), item_datetime(item).date())
        if key not in best or _freshness(item) > _freshness(best[key]):
            best[key] = item
    kept = {id(v) for v in best.values()}
    return [i for i in items if id(i) in kept]
