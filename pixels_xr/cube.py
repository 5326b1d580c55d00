"""Parsed items + a feature → a lazy, pixel-aligned ``(time, band, y, x)`` DataArray (stackstac/odc-stac).

Grid: the feature's bounds in the output CRS snapped to ``scale`` on the sources' grid phase (see ``grid``),
read with ``snap_bounds=False`` so that at native scale output pixels are source pixels (bit-identical reads).
Values stay in the source integer type (raw DN, nodata → ``nodata`` attr); per-item ``scale``/``offset``
are ``(time, band)`` coordinates and ``to_reflectance`` applies them in float32. Mask bands always use
nearest resampling; reflectance uses ``config.resampling`` (default nearest: exact at native scale and no
mixing of cloudy and clear pixels when downsampling). ``clip`` keeps pixels whose centre is inside the
geometry (GDAL's default rasterisation, ``all_touched=False``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from rasterio.enums import Resampling

from pixels_xr.catalog import as_items, signer_for
from pixels_xr.config import PixelsConfig
from pixels_xr.errors import ConfigError
from pixels_xr.features import Feature
from pixels_xr.grid import Grid, check_size, common_phase, feature_grid
from pixels_xr.items import ParsedItem
from pixels_xr.readers import (
    GDAL_CLOUD_ENV,
    BoundedRioDriver,
    CogHeader,
    PixelsReader,
    ReaderOptions,
    asset_table_dtype,
    check_assets,
    cloud_env,
    cube_coords,
    fetch_block,
    gdal_env,
    known_headers,
    open_header,
    open_readers,
    raster_spec,
)
from pixels_xr.signing import Signer, sign

__all__ = ["GDAL_CLOUD_ENV", "Loader", "asset_table", "build_cube", "centres_inside", "check_assets", "inside_mask",
           "output_grid",
           "reflectance_bands", "to_reflectance"]

log = logging.getLogger(__name__)

Loader = Literal["stackstac", "odc"]


def output_grid(items: list[ParsedItem], feature: Feature, config: PixelsConfig,
                headers: dict[str, CogHeader] | None = None) -> Grid:
    """The feature's grid, anchored on the sources' phase when every source in the output CRS shares one
    (read from the first asset's header, from ``headers`` when the check fetched it, when the metadata has
    no ``proj:transform``)."""
    grid = feature_grid(config, feature)
    epsg = grid.epsg
    origins = {(tr[2], tr[5]) for item in items for source in item.sources.values()
               if source.epsg == epsg and (tr := source.transform) is not None}
    if not origins and items:
        origins = set(_header_origins(items[0], epsg, signer_for(config.catalog), headers or {}))
    if origins:
        grid = feature_grid(config, feature, common_phase(sorted(origins), config.resolved_scale))
    check_size(config, feature, grid)
    return grid


def _header_origins(item: ParsedItem, epsg: int | None, signer: Signer | None,
                    headers: dict[str, CogHeader]) -> list[tuple[float, float]]:
    """Grid origin read from the first asset's header when the metadata carries no ``proj:transform``
    (parsed from memory when the asset check fetched it)."""
    for source in item.sources.values():
        if source.epsg != epsg:
            continue
        try:
            href = sign(signer, source.href).href
            with cloud_env(), open_header(href, headers.get(source.href)) as ds:
                return [(ds.transform.c, ds.transform.f)]
        except Exception:  # unreadable assets are reported by check_assets; fall back to phase 0
            return []
    return []


def _cube_dtype(items: list[ParsedItem], names: list[str]) -> np.dtype:
    declared = {s.data_type for i in items for n, s in i.sources.items() if n in names}
    declared.discard(None)
    if not declared:
        return np.dtype("uint16")
    return np.result_type(*[np.dtype(d) for d in declared])


def _fill_value(items: list[ParsedItem], names: list[str], dtype: np.dtype) -> Any:
    nodata = {s.nodata for i in items for n, s in i.sources.items() if n in names and s.reflectance}
    nodata.discard(None)
    if len(nodata) == 1:
        value = nodata.pop()
        fits = np.iinfo(dtype).min <= value <= np.iinfo(dtype).max if dtype.kind in "iu" else True
        if np.can_cast(np.min_scalar_type(value), dtype) or fits:
            return dtype.type(value)
    return dtype.type(0) if dtype.kind == "u" else (dtype.type(np.iinfo(dtype).min) if dtype.kind == "i"
                                                    else dtype.type(np.nan))


def _empty(grid: Grid, names: list[str], dtype: np.dtype, fill: Any, reason: str) -> xr.DataArray:
    import dask.array as da

    data = da.full((0, len(names), grid.height, grid.width), fill, dtype=dtype, chunks=(1, 1, 1024, 1024))
    none = np.zeros((0, len(names)), "float32")
    cube = xr.DataArray(data, dims=("time", "band", "y", "x"),
                        coords={"time": np.array([], dtype="datetime64[ns]"), "band": names,
                                "y": np.array(grid.ys()), "x": np.array(grid.xs()),
                                "id": ("time", np.array([], dtype=object)),
                                "cloud_cover": ("time", np.array([], dtype=float)),
                                "platform": ("time", np.array([], dtype=object)),
                                "scale": (("time", "band"), none), "offset": (("time", "band"), none)})
    cube.attrs["empty_reason"] = reason
    return cube


def build_cube(items: Sequence[ParsedItem | dict], feature: Feature, config: PixelsConfig, *,
               loader: Loader = "stackstac", time_chunks: int | None = None) -> xr.DataArray:
    """Lazy ``(time, band, y, x)`` cube of a feature from items: ``catalog.search``'s parsed items, or STAC
    dicts / ``pystac.Item``s (parsed here for the configuration, see ``catalog.as_items``).

    Bands are the configuration's common names plus the mask asset (last). Coordinates: ``time``, ``band``,
    ``y``/``x`` (pixel centres), ``id``, ``eo:cloud_cover``, ``platform`` per time, ``scale``/``offset`` per
    (time, band). Attrs: ``nodata``, ``crs``/transform (rioxarray), ``mask_asset``. No items → an empty
    cube (time length 0) on the right grid with ``attrs["empty_reason"]``.

    Chunks (loader ``stackstac``): all bands together, ``chunksize`` pixels square, and along time one chunk
    per time bin of the configuration (per acquisition day in mode ``all``), so a bin's reduction needs no
    rechunk; ``time_chunks=N`` gives chunks of N items instead. Items whose assets all miss the grid are
    left out.
    """
    with _gc_paused():  # the build makes many small long-lived objects: collector passes would cost more
        return _build_cube(as_items(items, config), feature, config, loader, time_chunks, known_headers(items))


def _build_cube(items: list[ParsedItem], feature: Feature, config: PixelsConfig, loader: Loader,
                time_chunks: int | None, headers: dict[str, CogHeader]) -> xr.DataArray:
    names = list(config.band_names)
    spec = config.mask_spec
    if spec is not None and spec.asset not in names:
        names.append(spec.asset)
    grid = output_grid(items, feature, config, headers)
    dtype = _cube_dtype(items, names)
    fill = _fill_value(items, names, dtype)
    if not items:
        cube = _empty(grid, names, dtype, fill, "no items matched the search")
    else:
        items = sorted(items, key=lambda i: (i.datetime, i.id))
        mask_names = [n for n in names if not items[0].sources[n].reflectance]
        if loader == "odc":
            cube = _load_odc(items, names, mask_names, grid, dtype, fill, config)
        elif loader == "stackstac":
            cube, items = _load_stackstac(items, names, mask_names, grid, dtype, fill, config, feature,
                                          time_chunks, headers)
        else:
            raise ValueError(f"unknown loader {loader!r}")
        scale = np.array([[i.sources[n].scale for n in names] for i in items], "float32")
        offset = np.array([[i.sources[n].offset for n in names] for i in items], "float32")
        cube = cube.assign_coords(
            id=("time", np.array([i.id for i in items], dtype=object)),
            cloud_cover=("time", np.array([np.nan if i.cloud_cover is None else i.cloud_cover for i in items])),
            platform=("time", np.array([i.platform for i in items], dtype=object)),
            scale=(("time", "band"), scale.reshape(len(items), len(names))),
            offset=(("time", "band"), offset.reshape(len(items), len(names))))
        if config.clip:
            cube = cube.where(inside_mask(feature, grid), fill)
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


def inside_mask(feature: Feature, grid: Grid) -> xr.DataArray:
    """Pixels of ``grid`` whose centre is inside the feature (the ``clip`` rule)."""
    return xr.DataArray(centres_inside(feature.geometry_in(grid.crs), grid.shape, grid.transform),
                        dims=("y", "x"))


def centres_inside(geometry: Any, shape: tuple[int, int], transform: Any) -> np.ndarray:
    """The ``clip`` rule on a raster grid: pixels whose centre is inside ``geometry`` (GDAL's rasterisation,
    ``all_touched=False``); also what clips a group's member on its worker."""
    from rasterio.features import geometry_mask

    return geometry_mask([geometry], out_shape=shape, transform=transform, invert=True, all_touched=False)


def _errors_as_nodata(config: PixelsConfig) -> tuple[Exception, ...]:
    from rasterio.errors import RasterioIOError

    if config.on_asset_error == "fail":
        return ()
    return (RasterioIOError(".*"), RuntimeError("Error (opening|reading)"))


def _load_stackstac(items: list[ParsedItem], names: list[str], mask_names: list[str], grid: Grid, dtype: np.dtype,
                    fill: Any, config: PixelsConfig, feature: Feature, time_chunks: int | None,
                    headers: dict[str, CogHeader]) -> tuple[xr.DataArray, list[ParsedItem]]:
    """stackstac's readers and windows under a graph built here (see ``_read_graph``); returns the cube and
    the items kept (those overlapping the grid)."""
    if grid.epsg is None:
        raise ConfigError("the stackstac loader needs an output CRS with an EPSG code; use loader='odc'",
                          "crs")
    spec = raster_spec(grid.epsg, grid.bounds, grid.scale)
    table = asset_table(items, names, grid)
    keep = ~np.isnan(table["bounds"]).all(axis=(1, 2))
    if not keep.all():
        table = table[keep]
        items = [i for i, k in zip(items, keep) if k]
    if not items:
        return _empty(grid, names, dtype, fill, "no item overlaps the output grid"), items
    resampling = [Resampling.nearest if (n in mask_names or config.resampling == "nearest")
                  else Resampling[config.resampling] for n in names]
    env = gdal_env(GDAL_CLOUD_ENV)
    reader = functools.partial(PixelsReader, pool_size=config.pool_size, signer=signer_for(config.catalog))
    data = _read_graph(table, spec, _time_groups(items, config, feature, time_chunks), config.chunksize,
                       ReaderOptions(reader, tuple(resampling), dtype, fill, env, _errors_as_nodata(config)),
                       config.pool_size, feature.id, headers)
    coords, dims = cube_coords(items, names, spec)
    cube = xr.DataArray(data, coords=coords, dims=dims)
    return cube.drop_vars([c for c in cube.coords if c not in {"time", "band", "x", "y"}]), items


def asset_table(items: list[ParsedItem], names: list[str], grid: Grid) -> np.ndarray:
    """stackstac's ``(item, band)`` asset table (href, bounds in the grid's CRS, scale/offset 1/0), built
    with array arithmetic: bounds from ``proj:transform``/``proj:shape`` (corners reprojected once per
    source CRS) or, without them, from the item's lon/lat ``bbox``. Assets missing the grid get no href
    and NaN bounds."""
    n, m = len(items), len(names)
    sources = [i.sources.get(name) for i in items for name in names]
    tr = np.full((n * m, 6), np.nan)
    shape = np.full((n * m, 2), np.nan)
    epsg = np.array([s.epsg if s is not None else -1 for s in sources], dtype=np.int64)
    for k, s in enumerate(sources):
        if s is not None and s.transform is not None and s.shape is not None:
            tr[k], shape[k] = s.transform[:6], s.shape
    has_grid = ~np.isnan(tr).any(axis=1) & (epsg > 0)
    # corners (ul, ll, lr, ur) of each raster: x = a·col + b·row + c, y = d·col + e·row + f
    cols = np.array([0, 0, 1, 1])[None, :] * shape[:, 1:2]
    rows = np.array([0, 1, 1, 0])[None, :] * shape[:, 0:1]
    xs = tr[:, 0:1] * cols + tr[:, 1:2] * rows + tr[:, 2:3]
    ys = tr[:, 3:4] * cols + tr[:, 4:5] * rows + tr[:, 5:6]
    bbox = np.repeat(np.array([_lonlat_bbox(i) for i in items], dtype=float), m, axis=0)
    no_grid = ~has_grid
    xs[no_grid] = bbox[no_grid][:, [0, 0, 2, 2]]
    ys[no_grid] = bbox[no_grid][:, [3, 1, 1, 3]]
    src = np.where(has_grid, epsg, 4326)
    for code in np.unique(src):
        if code == grid.epsg:
            continue
        sel = src == code
        xs[sel], ys[sel] = _transformer(int(code), grid.epsg).transform(xs[sel], ys[sel])
    bounds = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)
    left, bottom, right, top = grid.bounds
    overlap = (bounds[:, 0] < right) & (bounds[:, 2] > left) & (bounds[:, 1] < top) & (bounds[:, 3] > bottom)
    table = np.full(n * m, None, dtype=asset_table_dtype())
    table["url"] = np.array([s.href if s is not None and ok else None for s, ok in zip(sources, overlap)],
                            dtype=object)
    table["bounds"] = np.where(overlap[:, None], bounds, np.nan)
    table["scale_offset"] = (1.0, 0.0)
    return table.reshape(n, m)


def _lonlat_bbox(item: ParsedItem) -> list[float]:
    """An item's 2-D lon/lat bbox (a 3-D bbox loses its heights; none → NaN)."""
    bbox = item.bbox
    if len(bbox) == 6:
        return [bbox[0], bbox[1], bbox[3], bbox[4]]
    return list(bbox[:4]) if len(bbox) == 4 else [np.nan] * 4


def _transformer(src: int, dst: int | None) -> Any:
    from pyproj import Transformer

    return Transformer.from_crs(src, dst, always_xy=True)


def _time_groups(items: list[ParsedItem], config: PixelsConfig, feature: Feature,
                 time_chunks: int | None) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` item ranges, one per time chunk: a bin (a day in mode ``all``) or N
    items."""
    from pixels_xr.timeslices import assign_bins

    n = len(items)
    if time_chunks is not None:
        return [(k, min(k + time_chunks, n)) for k in range(0, n, time_chunks)]
    days = [i.datetime.astimezone(dt.timezone.utc).date() for i in items]
    labels: list[Any] = days if config.mode == "all" else assign_bins(days, config.bins(feature))
    starts = [k for k in range(n) if k == 0 or labels[k] != labels[k - 1]]
    return list(zip(starts, starts[1:] + [n]))


def _read_graph(table: np.ndarray, spec: Any, groups: list[tuple[int, int]], chunksize: int,
                options: ReaderOptions, pool_size: int, feature_id: str,
                headers: dict[str, CogHeader] | None = None) -> Any:
    """Dask array over the asset table with one read task per (time chunk, y block, x block) and one
    reader-table task per time chunk, written as plain tasks: no per-asset task, no blockwise layer to
    expand at submit time, so the graph is ready to run as soon as it is built (``build_cube`` pauses the
    garbage collector meanwhile: generational passes over tens of thousands of new tasks cost 5x). A
    reader-table task carries the known headers of its chunk's remote assets (``headers``)."""
    import dask
    import dask.array as da

    from pixels_xr.graph import HighLevelGraph, Task, TaskRef

    height, width = spec.shape
    y_chunks, x_chunks = da.core.normalize_chunks((chunksize, chunksize), (height, width))
    y_edges, x_edges = np.cumsum((0,) + y_chunks), np.cumsum((0,) + x_chunks)
    windows = [(slice(int(y_edges[i]), int(y_edges[i + 1])), slice(int(x_edges[j]), int(x_edges[j + 1])))
               for i in range(len(y_chunks)) for j in range(len(x_chunks))]
    # keys name the feature too: distributed mixes up a key that concurrent computations share
    token = dask.base.tokenize(list(table["url"].ravel()), table["bounds"], spec.epsg, spec.bounds,
                               spec.resolutions_xy, groups, chunksize, options.token(), pool_size, feature_id)
    open_name, read_name = f"pixels-readers-{token}", f"pixels-read-{token}"
    fetch = functools.partial(fetch_block, dtype=options.dtype, fill_value=options.fill_value,
                              pool_size=pool_size)
    opener = functools.partial(open_readers, spec=spec, options=options)
    opens, reads = {}, {}
    nx = len(x_chunks)
    for k, (start, stop) in enumerate(groups):
        okey = (open_name, k)
        urls = table["url"][start:stop].ravel()
        known = {u: headers[u] for u in urls if u in headers} if headers else None  # only this chunk's
        opens[okey] = Task(okey, opener, table[start:stop], headers=known)
        ref = TaskRef(okey)
        for w, window in enumerate(windows):
            key = (read_name, k, 0, w // nx, w % nx)
            reads[key] = Task(key, fetch, ref, window)
    graph = HighLevelGraph({open_name: opens, read_name: reads}, {open_name: set(), read_name: {open_name}})
    chunks = (tuple(stop - start for start, stop in groups), (table.shape[1],), y_chunks, x_chunks)
    return da.Array(graph, read_name, chunks, meta=np.empty((0, 0, 0, 0), options.dtype))


def _load_odc(items: list[ParsedItem], names: list[str], mask_names: list[str], grid: Grid, dtype: np.dtype,
              fill: Any, config: PixelsConfig) -> xr.DataArray:
    import odc.stac
    import pystac
    from odc.geo.geobox import GeoBox

    geobox = GeoBox(grid.shape, grid.transform, f"EPSG:{grid.epsg}")
    py_items = [pystac.Item.from_dict({**i.to_stac(), "links": []}, migrate=False) for i in items]
    resampling = {n: ("nearest" if n in mask_names else config.resampling) for n in names}
    ds = odc.stac.load(py_items, bands=names, geobox=geobox,
                       chunks={"x": config.chunksize, "y": config.chunksize}, resampling=resampling,
                       dtype=str(dtype), nodata=fill.item(), groupby="id",
                       driver=BoundedRioDriver(config.pool_size, signer_for(config.catalog)),
                       fail_on_error=config.on_asset_error == "fail")
    cube = ds[names].to_array("band").transpose("time", "band", "y", "x")
    cube = cube.assign_coords(time=np.array([np.datetime64(i.datetime.replace(tzinfo=None), "ns")
                                             for i in items]))
    return cube.drop_vars([c for c in cube.coords if c not in {"time", "band", "x", "y"}])


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def reflectance_bands(cube: xr.DataArray) -> xr.DataArray:
    """The cube's reflectance bands, selected without an index array in the graph.

    ``cube.sel(band=<bool array>)`` makes a dask ``take`` whose index is a literal task keyed only by its
    values, so every feature's graph shares that key; distributed 2026.8 corrupts its state ("priority
    None", lost workers) when such a key is in several concurrent computations. A slice (or a concat of
    single positions) keeps every key specific to its cube.
    """
    positions = np.flatnonzero(np.asarray(cube.reflectance.values, dtype=bool))
    if positions.size and np.array_equal(positions, np.arange(positions[0], positions[-1] + 1)):
        return cube.isel(band=slice(int(positions[0]), int(positions[-1]) + 1))
    return xr.concat([cube.isel(band=slice(int(p), int(p) + 1)) for p in positions], dim="band")


def to_reflectance(cube: xr.DataArray) -> xr.DataArray:
    """Reflectance bands as float32: ``DN × scale + offset`` per item, nodata → NaN (mask bands dropped)."""
    refl = reflectance_bands(cube)
    nodata = cube.attrs.get("nodata")
    has_nodata = nodata is not None and not (isinstance(nodata, float) and np.isnan(nodata))
    valid = refl != nodata if has_nodata else refl.notnull()
    out = (refl.astype("float32") * refl.scale.astype("float32") + refl.offset.astype("float32"))
    out = out.where(valid)
    out.attrs = {**cube.attrs, "nodata": float("nan"), "units": "reflectance"}
    return out.astype("float32")
