"""Normalised items + a feature → a lazy, pixel-aligned ``(time, band, y, x)`` DataArray (stackstac or odc-stac).

Grid: the feature's bounds in the output CRS snapped to ``scale`` on the sources' grid phase (see ``grid``),
read with ``snap_bounds=False`` so that at native scale output pixels are source pixels (bit-identical reads).
Values stay in the source integer type (raw DN, nodata → ``nodata`` attr); per-item ``scale``/``offset``
are ``(time, band)`` coordinates and ``to_reflectance`` applies them in float32. Mask bands always use
nearest resampling; reflectance uses ``config.resampling`` (default nearest: exact at native scale and no
mixing of cloudy and clear pixels when downsampling). ``clip`` keeps pixels whose centre is inside the
geometry (GDAL's default rasterisation, ``all_touched=False``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
from typing import Any, Literal

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from rasterio.enums import Resampling

from pixels_xr.catalog import SIGNERS, item_datetime
from pixels_xr.config import PixelsConfig
from pixels_xr.errors import AssetReadError
from pixels_xr.features import Feature
from pixels_xr.grid import Grid, common_phase
from pixels_xr.plan import check_size, feature_grid

log = logging.getLogger(__name__)

#: GDAL settings for cloud reads (added to stackstac's defaults; documented in the README).
GDAL_CLOUD_ENV: dict[str, Any] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no directory listings per open
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.TIF,.tiff,.TIFF,.jp2,.JP2",
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MAX_RETRY": "4",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_INGESTED_BYTES_AT_OPEN": "32768",  # one request fetches header + most COG IFDs
    "VSI_CACHE": "TRUE",
}

Loader = Literal["stackstac", "odc"]


def output_grid(items: list[dict], feature: Feature, config: PixelsConfig) -> Grid:
    """The feature's grid, anchored on the sources' phase when every source in the output CRS shares one."""
    grid = feature_grid(config, feature)
    origins = []
    for item in items:
        for asset in item["assets"].values():
            tr = asset.get("proj:transform")
            if asset.get("proj:epsg") == grid.epsg and tr and len(tr) >= 6:
                origins.append((float(tr[2]), float(tr[5])))
    if not origins and items:
        origins = _header_origins(items[0], grid.epsg)
    if origins:
        grid = feature_grid(config, feature, common_phase(origins, config.resolved_scale))
    check_size(config, feature, grid)
    return grid


def _header_origins(item: dict, epsg: int | None) -> list[tuple[float, float]]:
    """Grid origin read from the first asset's header when the metadata carries no ``proj:transform``."""
    import rasterio

    for asset in item["assets"].values():
        if asset.get("proj:epsg") != epsg:
            continue
        try:
            with rasterio.Env(**GDAL_CLOUD_ENV), rasterio.open(asset["href"]) as ds:
                return [(ds.transform.c, ds.transform.f)]
        except Exception:  # unreadable assets are reported by check_assets; fall back to phase 0
            return []
    return []


def _cube_dtype(items: list[dict], names: list[str]) -> np.dtype:
    declared = {a["raster:bands"][0].get("data_type") for i in items for n, a in i["assets"].items()
                if n in names}
    declared.discard(None)
    if not declared:
        return np.dtype("uint16")
    return np.result_type(*[np.dtype(d) for d in declared])


def _fill_value(items: list[dict], names: list[str], dtype: np.dtype) -> Any:
    nodata = {a["raster:bands"][0].get("nodata") for i in items for n, a in i["assets"].items()
              if n in names and a.get("pixels_xr:reflectance")}
    nodata.discard(None)
    if len(nodata) == 1:
        value = nodata.pop()
        if np.can_cast(np.min_scalar_type(value), dtype) or (np.iinfo(dtype).min <= value <= np.iinfo(dtype).max
                                                             if dtype.kind in "iu" else True):
            return dtype.type(value)
    return dtype.type(0) if dtype.kind == "u" else (dtype.type(np.iinfo(dtype).min) if dtype.kind == "i"
                                                    else dtype.type(np.nan))


def _sign(items: list[dict], config: PixelsConfig) -> list[dict]:
    signer = SIGNERS.get(config.catalog)
    return [signer(i) for i in items] if signer else items


def _empty(grid: Grid, names: list[str], dtype: np.dtype, fill: Any, reason: str) -> xr.DataArray:
    import dask.array as da

    data = da.full((0, len(names), grid.height, grid.width), fill, dtype=dtype, chunks=(1, 1, 1024, 1024))
    cube = xr.DataArray(data, dims=("time", "band", "y", "x"),
                        coords={"time": np.array([], dtype="datetime64[ns]"), "band": names,
                                "y": np.array(grid.ys()), "x": np.array(grid.xs()),
                                "id": ("time", np.array([], dtype=object))})
    cube.attrs["empty_reason"] = reason
    return cube


def build_cube(items: list[dict], feature: Feature, config: PixelsConfig, *,
               loader: Loader = "stackstac") -> xr.DataArray:
    """Lazy ``(time, band, y, x)`` cube of a feature from normalised items (``catalog.search`` output).

    Bands are the configuration's common names plus the mask asset (last). Coordinates: ``time``, ``band``,
    ``y``/``x`` (pixel centres), ``id``, ``eo:cloud_cover``, ``platform`` per time, ``scale``/``offset`` per
    (time, band). Attrs: ``nodata``, ``crs``/transform (rioxarray), ``mask_asset``. No items → an empty
    cube (time length 0) on the right grid with ``attrs["empty_reason"]``.
    """
    names = list(config.band_names)
    spec = config.mask_spec
    if spec is not None and spec.asset not in names:
        names.append(spec.asset)
    grid = output_grid(items, feature, config)
    dtype = _cube_dtype(items, names)
    fill = _fill_value(items, names, dtype)
    if not items:
        cube = _empty(grid, names, dtype, fill, "no items matched the search")
    else:
        items = _sign(sorted(items, key=lambda i: (item_datetime(i), i["id"])), config)
        mask_names = [n for n in names if not items[0]["assets"][n].get("pixels_xr:reflectance")]
        refl_names = [n for n in names if n not in mask_names]
        if loader == "odc":
            cube = _load_odc(items, names, mask_names, grid, dtype, fill, config)
        elif loader == "stackstac":
            parts = []
            if config.resampling == "nearest":
                parts.append(_load_stackstac(items, names, grid, dtype, fill, Resampling.nearest, config))
            else:
                parts.append(_load_stackstac(items, refl_names, grid, dtype, fill,
                                             Resampling[config.resampling], config))
                if mask_names:
                    parts.append(_load_stackstac(items, mask_names, grid, dtype, fill, Resampling.nearest, config))
            cube = parts[0] if len(parts) == 1 else xr.concat(parts, dim="band").sel(band=names)
        else:
            raise ValueError(f"unknown loader {loader!r}")
        scale = np.array([[i["assets"][n]["raster:bands"][0]["scale"] for n in names] for i in items], "float32")
        offset = np.array([[i["assets"][n]["raster:bands"][0]["offset"] for n in names] for i in items],
                          "float32")
        cube = cube.assign_coords(
            id=("time", np.array([i["id"] for i in items], dtype=object)),
            cloud_cover=("time", np.array([float(i["properties"].get("eo:cloud_cover", np.nan)) for i in items])),
            platform=("time", np.array([str(i["properties"].get("platform", "")) for i in items], dtype=object)),
            scale=(("time", "band"), scale), offset=(("time", "band"), offset))
        if config.clip:
            cube = cube.where(_inside(feature, grid), fill)
    cube = cube.assign_coords(reflectance=("band", np.array(
        [not (spec is not None and n == spec.asset) and _is_reflectance(config, n) for n in names])))
    cube.attrs.update({"nodata": fill.item() if hasattr(fill, "item") else fill, "feature": feature.id,
                       "mask_asset": spec.asset if spec is not None else "", "scale_m": grid.scale,
                       "pool_size": config.pool_size})
    cube = cube.rio.write_crs(grid.crs.to_wkt() if grid.epsg is None else f"EPSG:{grid.epsg}")
    cube = cube.rio.write_transform(grid.transform)
    return cube


def _is_reflectance(config: PixelsConfig, name: str) -> bool:
    from pixels_xr.platforms import canonical_band

    try:
        return canonical_band(config.platform, config.resolved_level, name).reflectance
    except Exception:
        return False


def _inside(feature: Feature, grid: Grid) -> xr.DataArray:
    from rasterio.features import geometry_mask

    geom = feature.geometry_in(grid.crs)
    inside = geometry_mask([geom], out_shape=grid.shape, transform=grid.transform, invert=True,
                           all_touched=False)
    return xr.DataArray(inside, dims=("y", "x"))


def _errors_as_nodata(config: PixelsConfig) -> tuple[Exception, ...]:
    from rasterio.errors import RasterioIOError

    if config.on_asset_error == "fail":
        return ()
    return (RasterioIOError(".*"), RuntimeError("Error (opening|reading)"))


def _load_stackstac(items: list[dict], names: list[str], grid: Grid, dtype: np.dtype, fill: Any,
                    resampling: Resampling, config: PixelsConfig) -> xr.DataArray:
    import stackstac

    env = stackstac.DEFAULT_GDAL_ENV.updated(always=GDAL_CLOUD_ENV)
    cube = stackstac.stack(
        items, assets=names, epsg=grid.epsg, resolution=grid.scale, bounds=grid.bounds, snap_bounds=False,
        resampling=resampling, chunksize=(1, 1, config.chunksize, config.chunksize), dtype=dtype,
        fill_value=fill, rescale=False, sortby_date=False, xy_coords="center", properties=False,
        band_coords=False, gdal_env=env, errors_as_nodata=_errors_as_nodata(config))
    return cube.drop_vars([c for c in cube.coords if c not in {"time", "band", "x", "y"}])


def _load_odc(items: list[dict], names: list[str], mask_names: list[str], grid: Grid, dtype: np.dtype,
              fill: Any, config: PixelsConfig) -> xr.DataArray:
    import odc.stac
    import pystac
    from odc.geo.geobox import GeoBox

    geobox = GeoBox(grid.shape, grid.transform, f"EPSG:{grid.epsg}")
    py_items = [pystac.Item.from_dict({**i, "links": []}, migrate=False) for i in items]
    resampling = {n: ("nearest" if n in mask_names else config.resampling) for n in names}
    ds = odc.stac.load(py_items, bands=names, geobox=geobox, chunks={"x": config.chunksize, "y": config.chunksize},
                       resampling=resampling, dtype=str(dtype), nodata=fill.item(), groupby="id",
                       fail_on_error=config.on_asset_error == "fail")
    cube = ds[names].to_array("band").transpose("time", "band", "y", "x")
    cube = cube.assign_coords(time=np.array([np.datetime64(item_datetime(i).replace(tzinfo=None), "ns")
                                             for i in items]))
    return cube.drop_vars([c for c in cube.coords if c not in {"time", "band", "x", "y"}])


def to_reflectance(cube: xr.DataArray) -> xr.DataArray:
    """Reflectance bands as float32: ``DN × scale + offset`` per item, nodata → NaN (mask bands dropped)."""
    refl = cube.sel(band=cube.reflectance.values)
    nodata = cube.attrs.get("nodata")
    valid = refl != nodata if nodata is not None and not (isinstance(nodata, float) and np.isnan(nodata)) else \
        refl.notnull()
    out = (refl.astype("float32") * refl.scale.astype("float32") + refl.offset.astype("float32"))
    out = out.where(valid)
    out.attrs = {**cube.attrs, "nodata": float("nan"), "units": "reflectance"}
    return out.astype("float32")


# ----------------------------------------------------------------------------------------------- asset checks
def check_assets(items: list[dict], config: PixelsConfig) -> tuple[list[dict], list[dict]]:
    """Open every asset's header (``pool_size`` at a time); returns (readable items, problems).

    Each problem is ``{"item", "asset", "href", "error"}``. With ``on_asset_error: fail`` the first problem
    raises ``AssetReadError`` naming the item and asset; with ``skip`` (default) the item is left out and
    the problem recorded.
    """
    import rasterio

    def probe(item: dict, name: str, asset: dict) -> dict | None:
        try:
            with rasterio.Env(**GDAL_CLOUD_ENV), rasterio.open(asset["href"]) as ds:
                ds.read(1, window=((0, 1), (0, 1)))
        except Exception as exc:
            return {"item": item["id"], "asset": name, "href": _redact(asset["href"]),
                    "error": " ".join(str(exc).split())[:300]}
        return None

    signed = _sign(items, config)
    jobs = [(orig, name, asset) for orig, item in zip(items, signed) for name, asset in item["assets"].items()]
    with concurrent.futures.ThreadPoolExecutor(max_workers=config.pool_size) as pool:
        results = list(pool.map(lambda j: probe(*j), jobs))
    problems = [r for r in results if r is not None]
    if problems and config.on_asset_error == "fail":
        p = problems[0]
        raise AssetReadError(f"asset {p['asset']!r} unreadable: {p['error']}", f"item {p['item']!r}")
    bad = {p["item"] for p in problems}
    return [i for i in items if i["id"] not in bad], problems


def _redact(href: str) -> str:
    """An href without query strings (SAS tokens and signatures never reach logs or reports)."""
    return re.sub(r"\?.*$", "", href)
