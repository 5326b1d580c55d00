"""A STAC catalog of a run's outputs (pystac): ``OUT/stac/catalog.json``.

Zarr runs get one item per feature (asset: the feature's Zarr group); COG runs one item per feature × bin
(assets: the bands COG, ``clear_count`` and ``source_time``). Items carry the projection extension
(``proj:code``, ``proj:shape``, ``proj:transform``, ``proj:bbox``), the raster extension on raster assets
(nodata, data type, scale), ``start_datetime``/``end_datetime`` of the bin(s), and ``derived_from`` links to
every source item used (redacted: no userinfo, query string or token). Asset hrefs are relative to the item
so the output can be moved or synced as a whole.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from typing import Any

import pystac
from affine import Affine
from pyproj import CRS, Transformer
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from shapely.geometry import box, mapping

from pixels_xr.errors import OutputError
from pixels_xr.io import storage
from pixels_xr.io.layout import COG_LAYERS, CogUnit
from pixels_xr.signing import redact


def write_output_catalog(out: str, title: str, output_format: str, feature_ids: list[str],
                         items: dict[str, pystac.Item] | None = None, *,
                         sources: Callable[[str], dict[str, str]] = lambda fid: {},
                         done: Callable[[str], list[str]] = lambda fid: [],
                         keep: frozenset[str] | set[str] = frozenset(),
                         recorded: Callable[[str], dict[str, Any] | None] = lambda fid: None) -> str:
    """Write ``OUT/stac/catalog.json`` (titled ``title``) describing ``feature_ids``; returns its URL.

    ``items``: Zarr items already made (``zarr_item``) by the run that wrote those features, so their groups
    are not opened again; ``keep``: features this run left unchanged, whose item files are kept as written
    (a no-op re-run of many features rewrites only the catalog); the other features' groups are read back
    from the store. ``sources(fid)`` gives a feature's source item ids → hrefs (``derived_from``),
    ``done(fid)`` the bin labels of its finished COG units (the run's ledger knows both), ``recorded(fid)``
    a Zarr feature's item made from the ledger (``recorded_item``; None: its group is read back).

    Items are serialised one by one, outside a pystac catalog tree (relative links set here): resolving
    every link through the tree made pystac's save quadratic-looking in the number of items.
    """
    from pixels_xr.io.zarr_store import open_feature

    root = storage.join(out, "stac")
    items = items or {}
    ids: list[str] = []
    for fid in feature_ids:
        if fid in items:
            ids.append(_write_item(root, items[fid]))
            continue
        if output_format == "zarr":
            if fid in keep and storage.exists(storage.join(root, fid, f"{fid}.json")):
                ids.append(fid)
                continue
            made = recorded(fid)
            if made is not None:
                ids.append(_write_item(root, made))
                continue
            try:  # no dask: a Client in scope would compute every coordinate on the cluster, a round trip each
                ds = open_feature(out, fid, chunks=None)
            except OutputError:
                continue
            ids.append(_write_item(root, zarr_item(fid, ds, sources(fid))))
            continue
        used = None
        for label in done(fid):
            unit = CogUnit(out, fid, label)
            item_id = f"{fid}_{unit.name}"
            if fid in keep and storage.exists(storage.join(root, item_id, f"{item_id}.json")):
                ids.append(item_id)
                continue
            used = sources(fid) if used is None else used
            ids.append(_write_item(root, _cog_item(unit, used)))
    catalog = pystac.Catalog("pixels-xr-output", title, catalog_type=pystac.CatalogType.SELF_CONTAINED)
    record = catalog.to_dict(include_self_link=False, transform_hrefs=False)
    record["links"] = [{"rel": "root", "href": "./catalog.json", "type": pystac.MediaType.JSON},
                       *({"rel": "item", "href": f"./{i}/{i}.json", "type": pystac.MediaType.GEOJSON}
                         for i in ids)]
    url = storage.join(root, "catalog.json")
    storage.write_bytes(url, json.dumps(record, indent=1, allow_nan=False).encode())
    return url


def _write_item(root: str, item: pystac.Item | dict[str, Any]) -> str:
    """Write one item at ``root/<id>/<id>.json`` with links to the catalog and asset hrefs relative to it
    (they were given relative to OUT); returns its id. ``item``: a pystac Item, or the STAC JSON of one
    (``zarr_grid_item``; left unchanged)."""
    record = item.to_dict(include_self_link=False, transform_hrefs=False) if isinstance(item, pystac.Item) \
        else json.loads(json.dumps(item))
    for asset in record.get("assets", {}).values():
        asset["href"] = "../../" + asset["href"]
    record.setdefault("links", []).extend({"rel": rel, "href": "../catalog.json", "type": pystac.MediaType.JSON}
                                          for rel in ("root", "parent"))
    storage.write_bytes(storage.join(root, record["id"], f"{record['id']}.json"),
                        json.dumps(record, indent=1, allow_nan=False).encode())
    return record["id"]


def _grid_properties(crs: Any, transform: Any, height: int, width: int) -> tuple[dict, list[float]]:
    left, top = transform.c, transform.f
    right, bottom = left + transform.a * width, top + transform.e * height
    proj_bbox = [min(left, right), min(top, bottom), max(left, right), max(top, bottom)]
    code = _proj_code(crs)
    lonlat = list(_to_lonlat(code).transform_bounds(*proj_bbox, densify_pts=21))
    props = {"proj_code": code, "shape": [height, width], "transform": list(transform)[:6],
             "bbox": proj_bbox}
    return props, lonlat


_PROJECTION = ProjectionExtension.get_schema_uri()


def _proj_code(crs: Any) -> str:
    """``crs.to_string()`` (its authority code, else its text), once per CRS text: each feature's grid has
    its own pyproj CRS, and the first ``to_string`` of one looks its authority up (milliseconds: most of a
    member's STAC item)."""
    srs = getattr(crs, "srs", None)  # pyproj: the text it was made from
    return _code_of_text(srs) if isinstance(srs, str) and srs else crs.to_string()


@functools.lru_cache(maxsize=64)
def _code_of_text(srs: str) -> str:
    return CRS.from_user_input(srs).to_string()


@functools.lru_cache(maxsize=64)
def _to_lonlat(crs: str) -> Transformer:
    """A transformer to lon/lat, made once per CRS (making one costs milliseconds: once per item was most
    of a small feature's STAC item)."""
    return Transformer.from_crs(crs, "EPSG:4326", always_xy=True)


def _item(item_id: str, props: dict, lonlat: list[float], start: str, end: str, sources: dict[str, str],
          extra: dict[str, Any]) -> pystac.Item:
    item = pystac.Item(item_id, mapping(box(*lonlat)), lonlat, None,
                       {"start_datetime": f"{start}T00:00:00Z", "end_datetime": f"{end}T23:59:59Z", **extra})
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.code = props["proj_code"]
    proj.shape = props["shape"]
    proj.transform = props["transform"]
    proj.bbox = props["bbox"]
    for source_id, href in sorted(sources.items()):  # self links may carry tokens: never written
        item.add_link(pystac.Link("derived_from", redact(href), pystac.MediaType.JSON, title=source_id))
    return item


def zarr_item(fid: str, ds: Any, sources: dict[str, str]) -> dict[str, Any]:
    """The item of one feature's Zarr group, from its Dataset (as written, or the lazy one that was)."""
    times = ds["time"].values
    end = ds["time_end"].values[-1] if "time_end" in ds.coords else times[-1]
    return zarr_grid_item(fid, ds.rio.crs, ds.rio.transform(), (ds.sizes["y"], ds.sizes["x"]), str(times[0])[:10],
                          str(end)[:10], list(ds.data_vars), int(ds.sizes["time"]), sources)


def zarr_grid_item(fid: str, crs: Any, transform: Any, shape: tuple[int, int], start: str, end: str,
                   variables: list[str], steps: int, sources: dict[str, str]) -> dict[str, Any]:
    """The STAC JSON of a feature's Zarr group from its grid and time range (no Dataset needed: a group's
    members are written on workers). Written as JSON directly, as pystac writes the same item (the
    projection extension, ``derived_from`` links): building and serialising a pystac Item per feature was
    most of the catalog's time in runs of thousands of features (``tests/test_batch.py`` compares both)."""
    props, lonlat = _grid_properties(crs, transform, *shape)
    west, south, east, north = lonlat
    return {
        "type": "Feature", "stac_version": pystac.get_stac_version(), "stac_extensions": [_PROJECTION],
        "id": fid,
        "geometry": {"type": "Polygon", "coordinates": [[[east, south], [east, north], [west, north],
                                                          [west, south], [east, south]]]},
        "bbox": lonlat,
        "properties": {"start_datetime": f"{start}T00:00:00Z", "end_datetime": f"{end}T23:59:59Z",
                       "pixels_xr:variables": list(variables), "pixels_xr:time_steps": int(steps),
                       "proj:code": props["proj_code"], "proj:shape": list(props["shape"]),
                       "proj:transform": [float(v) for v in props["transform"]],
                       "proj:bbox": [float(v) for v in props["bbox"]], "datetime": None},
        "links": [{"rel": "derived_from", "href": redact(href), "type": pystac.MediaType.JSON, "title": source_id}
                  for source_id, href in sorted(sources.items())],
        "assets": {"data": {"href": fid, "type": "application/vnd+zarr", "title": f"feature {fid} (Zarr group)",
                            "roles": ["data"]}},
    }


def grid_record(crs: Any, transform: Any, shape: tuple[int, int], variables: list[str]) -> dict[str, Any]:
    """What a feature's Zarr item needs besides its time axis and sources, as JSON (kept in the run's ledger
    with the feature's records, so the item can be made again without opening the group)."""
    return {"crs": _proj_code(crs), "transform": [float(v) for v in list(transform)[:6]],
            "shape": [int(n) for n in shape], "variables": list(variables)}


def recorded_item(fid: str, grid: dict[str, Any], axis: list[str], sources: dict[str, str]) -> dict[str, Any]:
    """The STAC JSON of a feature's Zarr group from its ``grid_record`` and its time axis (``axis``: one
    label per step, ``start/end`` or the day), as ``zarr_item`` makes it from the group."""
    height, width = grid["shape"]
    return labelled_grid_item(fid, CRS.from_user_input(grid["crs"]), Affine(*grid["transform"]),
                              (height, width), axis, list(grid["variables"]), sources)


def labelled_grid_item(fid: str, crs: Any, transform: Any, shape: tuple[int, int], axis: list[str],
                       variables: list[str], sources: dict[str, str]) -> dict[str, Any]:
    """``zarr_grid_item`` with its time range and steps from the time axis' labels (``start/end`` or the
    day, one per step)."""
    start, end = axis[0].split("/")[0], axis[-1].split("/")[-1]
    return zarr_grid_item(fid, crs, transform, shape, start, end, variables, len(axis), sources)


def _cog_item(unit: CogUnit, sources: dict[str, str]) -> pystac.Item:
    import rasterio

    label = unit.label
    href = unit.path()
    path = href.replace("s3://", "/vsis3/", 1) if href.startswith("s3://") else href
    try:
        with rasterio.open(path) as src:
            props, lonlat = _grid_properties(src.crs, src.transform, src.height, src.width)
            tags = src.tags()
            nodata = "nan" if src.nodata is not None and math.isnan(src.nodata) else src.nodata  # STAC's NaN
            bands = [RasterBand.create(nodata=nodata, data_type=DataType(src.dtypes[i])) for i in range(src.count)]
            names = list(src.descriptions)
    except rasterio.errors.RasterioIOError as exc:
        raise OutputError(f"cannot read output COG: {exc}", href) from None
    start, _, end = label.partition("/")
    used = set(json.loads(tags.get("items", "[]")))
    item = _item(f"{unit.feature_id}_{unit.name}", props, lonlat, start, end or start,
                 {k: v for k, v in sources.items() if k in used}, {"pixels_xr:bands": names})
    for layer, asset_roles in COG_LAYERS.items():
        key = layer or "data"
        if layer == "source_time" and not storage.exists(unit.path(layer)):
            continue
        asset = pystac.Asset(unit.relative(layer), media_type=pystac.MediaType.COG, roles=asset_roles)
        item.add_asset(key, asset)
        if key == "data":
            RasterExtension.ext(asset, add_if_missing=True).bands = bands
    return item
