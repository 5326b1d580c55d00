"""Zonal statistics per feature × time bin (Earth Engine's ``reduceRegions``): bands and spectral indices
reduced over each polygon, per group of nearby features on the workers; only the table comes back.

One row per feature × bin (× acquisition day in mode ``all``): ``id``, ``time`` (bin start or day),
``time_end``, ``items`` (the feature's own items behind the row), ``pixels`` (the polygon's area in pixels:
the sum of its coverage weights), ``clear_fraction`` (the share of that area, by weight, holding a valid value
in every band: clear in at least one observation of the bin for a median, clear in the picked one for a pick
mode) and, per band and index ``v``: ``v_count`` (sum of the weights of valid pixels), ``v_mean``, ``v_std``
(population, weighted), ``v_min``, ``v_max`` (over pixels touching the polygon, unweighted), ``v_median`` and
``v_pNN`` (weighted quantiles). Weights are exact coverage fractions of each pixel by the polygon, computed
by exactextract, with exactextract's definitions of every statistic (its weighted quantile included), so the
numbers equal exactextract's own on the same raster; ``coverage="centre"`` weighs 1 each pixel whose centre
lies inside the polygon (GDAL's rasterize rule), 0 the rest. A feature with no items, or a bin without
observations, is a row with counts 0 and NaN statistics. Values are reflectance (the configuration's
``output: raw`` is read as reflectance here).

Indices: per observation before the reduction where the mode reduces (``composite``/``median``: the median
NDVI is the median over the bin's clear observations of each one's NDVI, not the NDVI of the median bands —
that is what a per-field NDVI series means and what the ratio of two medians is not); for the modes that
pick one observation per pixel (``latest_pixel``, ``cloud_sorted_pixel``, the composite's ``first_clear``,
``quality``, ``qa_pixel`` and mode ``all``) the index of the picked observation, which is the index computed
on the picked bands (every band of a pixel comes from the same pick).

Scale: features are grouped (``groups.group_features``: one catalog query per group by
``catalog.search_many``, one cube on the group's grid from the union of the members' items, one composite).
Each group is one job on the cluster: a coverage task (exactextract over all members on the group's grid),
one task per time step reducing every member at once (segmented numpy: a member's cells are a flat index
list into the group's grid), and a task joining the steps into the group's table; the client receives tables
only. With ``out``, each group's table is a Parquet part (named by a hash of the configuration, the options
and the members) written atomically; a re-run skips the parts already there, and the final GeoParquet or CSV
(by ``out``'s suffix) is assembled from the parts at the end, geometry (lon/lat) included.

A member's statistics come from the group composite at the member's own pixels (a member's grid is an exact
window of the group's grid); a bin or day in which the member itself has no item is a row with count 0 even
where the group composite has data (an item whose footprint misses the polygon never counts for it).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
import types
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pixels_xr.errors import ConfigError
from pixels_xr.features import Feature

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Client

    from pixels_xr.config import ClusterOptions, PixelsConfig
    from pixels_xr.grid import Grid

log = logging.getLogger(__name__)

Coverage = Literal["exact", "centre"]
#: The statistics of every band and index, in column order (then the percentiles).
STATISTICS = ("count", "mean", "std", "min", "max", "median")
_PARTS_VERSION = 1


# ------------------------------------------------------------------------------------------ weights
def coverage_weights(geometries: Sequence[Any], grid: Grid, rule: Coverage = "exact"
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each polygon's pixels on ``grid`` (geometries, or their WKB, in the grid's CRS): ``(member, cell, weight)`` flat
    arrays, ``cell`` a row-major index into the grid, ``weight`` > 0 the exact coverage fraction
    (exactextract) or 1 for a pixel whose centre is inside (``centre``)."""
    import shapely

    geometries = [shapely.from_wkb(g) if isinstance(g, bytes) else g for g in geometries]
    members, cells, weights = [], [], []
    if rule == "exact":
        from exactextract import exact_extract
        from exactextract.raster import NumPyRasterSource

        left, bottom, right, top = grid.bounds
        raster = NumPyRasterSource(np.zeros(grid.shape, np.uint8), left, bottom, right, top)
        feats = [{"type": "Feature", "properties": {"k": k}, "geometry": shapely.geometry.mapping(g)}
                 for k, g in enumerate(geometries)]
        for row in exact_extract(raster, feats, ["cell_id", "coverage"], include_cols=["k"], output="geojson"):
            props = row["properties"]
            cell = np.asarray(props["cell_id"], np.int64)
            weight = np.asarray(props["coverage"], np.float64)
            keep = weight > 0
            members.append(np.full(int(keep.sum()), props["k"], np.int64))
            cells.append(cell[keep])
            weights.append(weight[keep])
    elif rule == "centre":
        height, width = grid.shape
        for k, geom in enumerate(geometries):
            minx, miny, maxx, maxy = geom.bounds
            c0 = max(int(np.floor((minx - grid.left) / grid.scale)), 0)
            c1 = min(int(np.ceil((maxx - grid.left) / grid.scale)), width)
            r0 = max(int(np.floor((grid.top - maxy) / grid.scale)), 0)
            r1 = min(int(np.ceil((grid.top - miny) / grid.scale)), height)
            rows, cols = np.mgrid[r0:max(r1, r0), c0:max(c1, c0)]
            xs = grid.left + (cols + 0.5) * grid.scale
            ys = grid.top - (rows + 0.5) * grid.scale
            inside = shapely.contains_xy(geom, xs, ys)
            members.append(np.full(int(inside.sum()), k, np.int64))
            cells.append((rows * width + cols)[inside].astype(np.int64))
            weights.append(np.ones(int(inside.sum()), np.float64))
    else:
        raise ConfigError(f"unknown coverage rule {rule!r}; use 'exact' or 'centre'", "coverage")
    if not members:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    return np.concatenate(members), np.concatenate(cells), np.concatenate(weights)


# ----------------------------------------------------------------------------------- the reductions
def zonal(values: np.ndarray, members: np.ndarray, weights: np.ndarray, n: int,
          quantiles: Sequence[float] = (), *, merge_ties: bool = True) -> dict[str, np.ndarray]:
    """Weighted statistics of ``values`` (one per cell of every member, NaN invalid) per member ``0..n-1``,
    with exactextract's definitions: ``count`` Σw, ``mean`` Σwx/Σw, ``std`` √(Σw(x−mean)²/Σw), ``min`` and
    ``max`` unweighted, ``median`` and each quantile ``q`` (0..1, keys ``q0``, ``q1`` …) its weighted
    quantile. That quantile runs over the member's distinct values, each weighing the sum of its cells'
    weights (exactextract builds it from its value-frequency table; ``merge_ties``): sorted by value,
    ``s_i = i·w_i + (m−1)·Σ_{j<i} w_j`` over the m distinct values, and the result is the value at
    ``q·(m−1)·Σw`` interpolated linearly in ``s``. Without ``merge_ties`` and with equal weights (the
    pixel-centre rule) it is numpy's default linear quantile of the cells."""
    ok = np.isfinite(values) & (weights > 0)
    x, lab, w = values[ok].astype(np.float64), members[ok], weights[ok]
    sw = np.bincount(lab, w, n)
    nan = np.full(n, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(sw > 0, np.bincount(lab, w * x, n) / np.where(sw > 0, sw, 1), nan)
        var = np.bincount(lab, w * (x - mean[lab]) ** 2, n) / np.where(sw > 0, sw, 1)
    out = {"count": sw, "mean": mean, "std": np.where(sw > 0, np.sqrt(var), nan)}
    keys = ["median", *(f"q{k}" for k in range(len(quantiles)))]
    if x.size == 0:
        return {**out, "min": nan, "max": nan, **{k: nan.copy() for k in keys}}
    order = np.lexsort((x, lab))
    x, lab, w = x[order], lab[order], w[order]
    if merge_ties:
        first = np.ones(x.size, bool)
        first[1:] = (lab[1:] != lab[:-1]) | (x[1:] != x[:-1])
        at = np.flatnonzero(first)
        x, lab, w = x[at], lab[at], np.add.reduceat(w, at)
    size = np.bincount(lab, minlength=n)
    start = np.concatenate(([0], np.cumsum(size)[:-1])).astype(np.int64)
    has = size > 0
    lo, hi = nan.copy(), nan.copy()
    lo[has], hi[has] = x[start[has]], x[start[has] + size[has] - 1]
    out["min"], out["max"] = lo, hi
    cum = np.cumsum(w)
    base = np.where(start > 0, cum[np.maximum(start - 1, 0)], 0.0)
    prev = cum - w - base[lab]  # Σ_{j<i} w_j within the member
    s = (np.arange(x.size) - start[lab]) * w + (size[lab] - 1) * prev
    sn = sw * (size - 1)
    last = x.size - 1
    for key, q in zip(keys, (0.5, *(float(v) for v in quantiles))):
        target = q * sn
        below = np.bincount(lab, s <= target[lab], n).astype(np.int64)  # s is non-decreasing per member
        left = np.minimum(start + np.maximum(below, 1) - 1, last)
        right = np.minimum(start + below, last)
        xl, xr, sl, sr = x[left], x[right], s[left], s[right]
        with np.errstate(invalid="ignore", divide="ignore"):
            mid = xl + (target - sl) * (xr - xl) / (sr - sl)
        out[key] = np.where(has, np.where(below >= size, xl, mid), nan)
    return out


def _assemble(blocks: Any) -> np.ndarray:
    """A 2-D step's spatial blocks (one block, or nested lists y, x) as one array."""
    return blocks if isinstance(blocks, np.ndarray) else np.block(blocks)


def _assemble_nd(blocks: Any, y_axis: int) -> np.ndarray:
    """An n-D chunk's spatial blocks (one block, or nested lists y, x; y then x the last two axes)."""
    if isinstance(blocks, np.ndarray):
        return blocks
    return np.concatenate([np.concatenate(row, axis=y_axis + 1) for row in blocks], axis=y_axis)


def _median_indices(data: list, clear: Any, *, scale: np.ndarray, offset: np.ndarray, nodata: Any,
                    names: list[str], indices: list) -> list[np.ndarray]:
    """Per observation of one bin: reflectance of the bands the indices read (``DN × scale + offset`` in
    float32, nodata → NaN, as ``cube.to_reflectance``), each index, then the median over the bin's clear
    observations (``reducers.clear_median``, the kernel of the band medians)."""
    from pixels_xr import reducers

    cube = np.concatenate([_assemble_nd(part, 2) for part in data], axis=1)
    mask = _assemble_nd(clear, 1)
    refl = {}
    for spec in indices:
        for band in spec.needs:
            if band not in refl:
                b = names.index(band)
                raw = cube[:, b]
                value = raw.astype(np.float32) * scale[:, b, None, None] + offset[:, b, None, None]
                refl[band] = value if nodata is None else np.where(raw != nodata, value, np.float32(np.nan))
    stack = np.stack([spec.compute(refl) for spec in indices], axis=1)
    stack[~np.isfinite(stack)] = np.nan
    out, _ = reducers.clear_median(np.ascontiguousarray(stack), np.ascontiguousarray(mask), np.float32(np.nan))
    return [out[k] for k in range(len(indices))]


def _step_table(weights: tuple[np.ndarray, np.ndarray, np.ndarray], n: int, bands: dict[str, Any],
                picked_indices: list, median_indices: list[np.ndarray] | None, index_names: list[str],
                band_nodata: dict[str, Any], quantiles: Sequence[float], merge_ties: bool) -> dict[str, np.ndarray]:
    """Every member's statistics of one time step (bands as 2-D blocks of the group's grid)."""
    members, cells, w = weights
    arrays = {}
    for name, blocks in bands.items():
        a = _assemble(blocks)
        nd = band_nodata.get(name)
        a = a.astype(np.float32) if a.dtype.kind == "f" else np.where(a == nd, np.nan, a).astype(np.float32)
        arrays[name] = a
    if median_indices is not None:
        values = dict(zip(index_names, median_indices))
    else:
        values = {spec.name: spec.compute(arrays) for spec in picked_indices}
    flat = {k: v.reshape(-1)[cells] for k, v in {**arrays, **values}.items()}
    valid = np.ones(cells.size, bool)
    for name in arrays:
        valid &= np.isfinite(flat[name])
    area = np.bincount(members, w, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"pixels": area, "clear_fraction": np.bincount(members, w * valid, n) / area}
    for name, v in flat.items():
        v = np.where(np.isfinite(v), v, np.nan)
        for key, col in zonal(v, members, w, n, [q / 100 for q in quantiles], merge_ties=merge_ties).items():
            label = key if not key.startswith("q") else _pname(quantiles[int(key[1:])])
            out[f"{name}_{label}"] = col
    return out


def _pname(q: float) -> str:
    return f"p{q:g}".replace(".", "_")


def _group_table(weights: tuple[np.ndarray, np.ndarray, np.ndarray], ids: list[str], steps: list[dict],
                 labels: list[tuple[Any, Any]], items: np.ndarray, columns: list[str],
                 keep: np.ndarray) -> pd.DataFrame:
    """The group's rows: members × steps (``keep[m, t]``: the row exists), counts 0 and NaN where the
    member had no item in the step."""
    import pandas as pd

    n = len(ids)
    rows = []
    area = np.bincount(weights[0], weights[2], n)
    for t, ((start, end), table) in enumerate(zip(labels, steps)):
        sel = np.flatnonzero(keep[:, t])
        if sel.size == 0:
            continue
        frame = {"id": [ids[k] for k in sel], "time": start, "time_end": end, "items": items[sel, t],
                 "pixels": area[sel]}
        has = items[sel, t] > 0
        for col in columns:
            if col == "pixels":
                continue
            src = table.get(col) if table is not None else None
            empty = 0.0 if col.endswith("_count") or col == "clear_fraction" else np.nan
            frame[col] = np.where(has, src[sel], empty) if src is not None else np.full(sel.size, empty)
        rows.append(pd.DataFrame(frame))
    if not rows:
        return pd.DataFrame({"id": [], "time": [], "time_end": [], "items": [], **{c: [] for c in columns}})
    return pd.concat(rows, ignore_index=True)


# ------------------------------------------------------------------------------------- the job graph
def _columns(config: PixelsConfig, percentiles: Sequence[float]) -> list[str]:
    names = [*config.band_names, *(s.name for s in config.spectral_indices)]
    stats = [*STATISTICS, *(_pname(q) for q in percentiles)]
    return ["pixels", "clear_fraction", *(f"{v}_{s}" for v in names for s in stats)]


def _member_steps(config: PixelsConfig, results: list, feature: Feature,
                  days: np.ndarray | None) -> tuple[list[tuple[Any, Any]], np.ndarray, np.ndarray]:
    """Step labels (start, end), each member's item count per step, and which rows exist."""
    from pixels_xr.timeslices import assign_bins

    n = len(results)
    if config.mode == "all":
        steps = [np.datetime64(d, "ns") for d in (days if days is not None else [])]
        labels = [(d, d) for d in steps]
        index = {str(d)[:10]: k for k, d in enumerate(steps)}
        items = np.zeros((n, len(steps)), np.int64)
        for m, found in enumerate(results):
            for item in found:
                k = index.get(item.datetime.date().isoformat())
                if k is not None:
                    items[m, k] += 1
        keep = items > 0
        none = ~keep.any(axis=1)
        if none.any():  # a member without any acquisition: one row (time NaT), counts 0
            labels.append((np.datetime64("NaT", "ns"), np.datetime64("NaT", "ns")))
            items = np.concatenate([items, np.zeros((n, 1), np.int64)], axis=1)
            keep = np.concatenate([keep, none[:, None]], axis=1)
        return labels, items, keep
    bins = config.bins(feature)
    labels = [(np.datetime64(b.start, "ns"), np.datetime64(b.end, "ns")) for b in bins]
    items = np.zeros((n, len(bins)), np.int64)
    for m, found in enumerate(results):
        for k in assign_bins([i.datetime.date() for i in found], bins):
            if k >= 0:
                items[m, k] += 1
    return labels, items, np.ones((n, len(bins)), bool)


def _grid_of(ds: Any, config: PixelsConfig) -> Grid:
    from pixels_xr.grid import Grid

    scale = config.resolved_scale
    xs, ys = ds.x.values, ds.y.values
    left, top = float(xs[0]) - scale / 2, float(ys[0]) + scale / 2
    return Grid(ds.rio.crs, scale, left, top - len(ys) * scale, left + len(xs) * scale, top)


def _wkb(members: list[Feature], grid: Grid) -> list[bytes]:
    import shapely

    return list(shapely.to_wkb(np.array([m.geometry_in(grid.crs) for m in members], dtype=object)))


def _lonlat(features: list[Feature]) -> list[Any]:
    """Every feature's geometry in lon/lat, one transformer per CRS (``Feature.lonlat_geometry`` builds one
    per call: 0.4 ms each, 4 s of a 10,000-parcel run)."""
    import shapely
    from pyproj import CRS, Transformer

    out: list[Any] = [None] * len(features)
    by_crs: dict[str, list[int]] = {}
    for k, f in enumerate(features):
        by_crs.setdefault(f.crs, []).append(k)
    for crs, ks in by_crs.items():
        try:
            src = CRS.from_user_input(crs)
        except Exception:  # noqa: BLE001 - a spelling only the features module reads: its own path
            for k in ks:
                out[k] = features[k].lonlat_geometry()
            continue
        if src == CRS.from_epsg(4326):
            for k in ks:
                out[k] = features[k].geometry
            continue
        tr = Transformer.from_crs(src, CRS.from_epsg(4326), always_xy=True)

        def xy(coords: np.ndarray, tr: Any = tr) -> np.ndarray:
            x, y = tr.transform(coords[:, 0], coords[:, 1])
            return np.column_stack([x, y])

        for k, g in zip(ks, shapely.transform(np.array([features[k].geometry for k in ks], dtype=object), xy)):
            out[k] = g
    return out


def _to_delayed(arr: Any) -> np.ndarray:
    return arr.to_delayed(optimize_graph=False)


def group_job(config: PixelsConfig, group: Any, results: list, *, percentiles: Sequence[float] = (),
              coverage: Coverage = "exact", reads_here: bool | None = None) -> Any:
    """One group's table as a ``dask.delayed`` (nothing computed here): see the module docstring.
    ``reads_here``: whether it is computed in this process (``observations``)."""
    from dask import delayed

    from pixels_xr.compose import composite, observations
    from pixels_xr.cube import output_grid

    cfg = config.model_copy(update={"clip": False, "output": "reflectance"})
    members: list[Feature] = list(group.features)
    area = group.as_feature() if group.bounds is not None else members[0]
    union: dict[str, Any] = {}
    for found in results:
        for item in found:
            union.setdefault(item.id, item)
    items = sorted(union.values(), key=lambda i: (i.datetime, i.id))
    columns = _columns(cfg, percentiles)
    ids = [m.id for m in members]
    if not items:
        grid = output_grid([], area, cfg)
        weights = delayed(coverage_weights)(_wkb(members, grid), grid, coverage)
        labels, counts, keep = _member_steps(cfg, results, area, None)
        return delayed(_group_table)(weights, ids, [None] * len(labels), labels, counts, columns, keep)
    obs = observations(cfg, area, items=items, reads_here=reads_here)
    ds = composite(obs, cfg, area)
    grid = _grid_of(ds, cfg)
    weights = delayed(coverage_weights)(_wkb(members, grid), grid, coverage)
    days = ds.time.values if cfg.mode == "all" else None
    labels, counts, keep = _member_steps(cfg, results, area, days)
    indices = cfg.spectral_indices
    median = cfg.mode == "composite" and cfg.method.reduction == "median"
    band_blocks = {b: _to_delayed(ds[b].data) for b in cfg.band_names}
    nodata = {b: ds[b].attrs.get("nodata") for b in cfg.band_names}
    per_step_cube = _cube_steps(obs, cfg, area) if median and indices else None
    steps = []
    for t in range(ds.sizes["time"]):
        bands = {b: _nest(blocks[t]) for b, blocks in band_blocks.items()}
        med = None
        if per_step_cube is not None:
            med = per_step_cube(t)
        steps.append(delayed(_step_table)(
            weights, len(members), bands, [] if median else indices, med, [s.name for s in indices], nodata,
            tuple(percentiles), coverage == "exact"))
    steps += [None] * (len(labels) - len(steps))  # mode all: the NaT row of members without acquisitions
    return delayed(_group_table)(weights, ids, steps, labels, counts, columns, keep)


def _cube_steps(obs: Any, config: PixelsConfig, feature: Feature) -> Callable[[int], Any] | None:
    """For a median with indices: a function of the bin index giving the delayed per-bin index medians
    (None for a bin without observations), from the observations' cube chunks of that bin."""
    import datetime as dt

    from dask import delayed

    from pixels_xr.timeslices import assign_bins

    cube, clear = obs.cube, obs.clear
    bins = config.bins(feature)
    steps = np.array(assign_bins([dt.date.fromisoformat(str(t)[:10]) for t in cube.time.values], bins))
    keep = np.flatnonzero(steps >= 0)
    keep = keep[np.argsort(steps[keep], kind="stable")]
    if not (keep.size == steps.size and np.array_equal(keep, np.arange(steps.size))):
        cube, clear, steps = cube.isel(time=keep), clear.isel(time=keep), steps[keep]
    bounds = np.flatnonzero(np.diff(steps)) + 1
    sizes = tuple(int(n) for n in np.diff(np.concatenate(([0], bounds, [steps.size]))))
    if cube.chunks is None or cube.chunks[0] != sizes:
        cube = cube.chunk({"time": sizes})
    clear = clear.chunk({"time": sizes, "y": cube.chunks[2], "x": cube.chunks[3]})
    cube_blocks, clear_blocks = _to_delayed(cube.data), _to_delayed(clear.data)
    edges = np.concatenate(([0], np.cumsum(sizes)))
    chunk_of = {int(steps[a]): j for j, a in enumerate(edges[:-1]) if a < steps.size}
    scale = cube.scale.values.astype(np.float32)
    offset = cube.offset.values.astype(np.float32)
    nodata = cube.attrs.get("nodata")
    names = [str(b) for b in cube.band.values]
    indices = config.spectral_indices

    def at(t: int) -> Any:
        j = chunk_of.get(t)
        if j is None:
            return None
        a, b = edges[j], edges[j + 1]
        return delayed(_median_indices)(
            [_nest(cube_blocks[j, kb]) for kb in range(cube_blocks.shape[1])], _nest(clear_blocks[j]),
            scale=scale[a:b], offset=offset[a:b], nodata=nodata, names=names, indices=indices)

    return at


def _nest(blocks: np.ndarray) -> Any:
    """A grid of delayed blocks as nested lists (one block: the block itself)."""
    if blocks.size == 1:
        return blocks.reshape(-1)[0]
    return [list(row) for row in blocks]


# ------------------------------------------------------------------------------------------- the run
def _part_name(identity: str, group: Any) -> str:
    h = hashlib.sha256(identity.encode())
    for f in group.features:
        h.update(f.id.encode() + b"\0" + f.geometry.wkb + f.crs.encode() + b"\1")
    return f"part-{h.hexdigest()[:24]}.parquet"


def _to_parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def stats(config: PixelsConfig, features: Sequence[Feature], out: str | None = None, *,
          percentiles: Sequence[float] = (), coverage: Coverage = "exact", cluster: str | None = "local",
          cluster_options: ClusterOptions | dict | None = None, client: Client | None = None,
          progress: bool = False, cell: int | None = None) -> pd.DataFrame:
    """Zonal statistics of every feature × time bin (module docstring) as a GeoDataFrame (geometry in
    lon/lat), also written to ``out`` (``.parquet``: GeoParquet; ``.csv``: geometry as WKT) when given.

    ``client`` reuses a connected client; otherwise ``cluster`` ("local", a scheduler address, "gateway")
    is opened for the run, or None computes in this process (dask's threads). With ``out`` the run is
    resumable: groups whose part is in ``OUT.parts/`` are not computed again. ``cell`` overrides the
    grouping cell (``groups.GROUP_CELL`` output pixels)."""
    import contextlib

    import geopandas as gpd
    import pandas as pd

    from pixels_xr.groups import group_features
    from pixels_xr.io import storage
    from pixels_xr.run_cache import run_cache

    qs = tuple(float(q) for q in percentiles)
    if any(not (0 <= q <= 100) for q in qs):
        raise ConfigError(f"percentiles must be within 0..100, got {list(percentiles)}", "percentiles")
    if coverage not in ("exact", "centre"):
        raise ConfigError(f"unknown coverage rule {coverage!r}; use 'exact' or 'centre'", "coverage")
    if out is not None and not str(out).endswith((".parquet", ".csv")):
        raise ConfigError("the output must end in .parquet (GeoParquet) or .csv", "out")
    features = list(features)
    if len({f.id for f in features}) != len(features):
        raise ConfigError("feature ids repeat; each row is named by its feature id", "features")
    identity = json.dumps({"v": _PARTS_VERSION, "config": config.output_identity, "percentiles": qs,
                           "coverage": coverage})
    parts = storage.check_url(f"{out}.parts") if out is not None else None
    groups = group_features(config, features) if cell is None else group_features(config, features, cell=cell)
    names = [_part_name(identity, g) for g in groups]
    done = set(storage.list_names(parts)) if parts is not None and storage.exists(parts) else set()
    tables: dict[int, pd.DataFrame] = {}
    for k, name in enumerate(names):
        if name in done:
            raw = storage.read_bytes(storage.join(parts, name))  # type: ignore[arg-type]
            if raw is not None:
                tables[k] = pd.read_parquet(io.BytesIO(raw))
    todo = [k for k in range(len(groups)) if k not in tables]
    if todo:
        with contextlib.ExitStack() as stack:
            stack.enter_context(run_cache())  # local catalog parsed and asset headers checked once per run
            if client is None and cluster is not None:
                from pixels_xr.cluster import open_client

                client = stack.enter_context(open_client(cluster, cluster_options or config.cluster,
                                                         quiet=not progress))
            for k, table in _compute(config, [groups[k] for k in todo], todo, client, qs, coverage):
                if parts is not None:
                    storage.write_bytes(storage.join(parts, names[k]), _to_parquet_bytes(table))
                tables[k] = table
                if progress:
                    log.info("stats: group %d of %d done (%d features)", k + 1, len(groups),
                             len(groups[k].features))
    frame = pd.concat([tables[k] for k in range(len(groups))], ignore_index=True) if groups else \
        pd.DataFrame({"id": []})
    geometry = dict(zip((f.id for f in features), _lonlat(features)))
    gdf = gpd.GeoDataFrame(frame, geometry=[geometry[i] for i in frame["id"]], crs="EPSG:4326")
    if out is not None:
        if str(out).endswith(".csv"):
            plain = pd.DataFrame(gdf.drop(columns="geometry"))
            plain["geometry"] = gdf.geometry.to_wkt()
            text = plain.to_csv(index=False)
            storage.write_bytes(out, text.encode())
        else:
            buf = io.BytesIO()
            gdf.to_parquet(buf, index=False)
            storage.write_bytes(out, buf.getvalue())
        storage.write_bytes(storage.join(parts, "manifest.json"), json.dumps(  # type: ignore[arg-type]
            {"identity": json.loads(identity), "parts": names, "rows": len(gdf), "out": str(out)}).encode())
    return gdf


def _compute(config: PixelsConfig, groups: list, keys: list[int], client: Client | None,
             percentiles: tuple[float, ...], coverage: Coverage) -> Any:
    """(key, table) of every group as it completes: searched and built here, reduced on the cluster; at
    most a few groups in flight, so that the client holds a few graphs, not all of them."""
    from pixels_xr.catalog import search_many

    def job(group: Any) -> Any:
        return group_job(config, group, search_many(config, list(group.features)), percentiles=percentiles,
                         coverage=coverage, reads_here=None if client is None else False)

    if client is None:
        import dask

        for k, group in zip(keys, groups):
            (table,) = dask.compute(job(group))
            yield k, table
        return
    from distributed import as_completed

    window = max(2, 2 * len(client.nthreads() or {1: 1}))
    pending = list(zip(keys, groups))
    futures = {}
    ready = as_completed()
    while pending or futures:
        while pending and len(futures) < window:
            k, group = pending.pop(0)
            future = client.compute(job(group))
            futures[future] = k
            ready.add(future)
        future = next(ready)
        k = futures.pop(future)
        yield k, future.result()


class _CallableModule(types.ModuleType):
    """``pixels_xr.stats`` names both this module and the public function: once the module is imported,
    Python sets the package's attribute ``stats`` to the module (after the package's lazy ``__getattr__``
    may have bound the function), so calling the module calls the function."""

    def __call__(self, *args: Any, **kwargs: Any) -> pd.DataFrame:
        return stats(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
