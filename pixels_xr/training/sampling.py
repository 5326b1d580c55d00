"""Samples from one collected cube: labels rasterised on its grid, rejected, stratified, split by blocks."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import rasterio
import shapely
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from scipy import ndimage

from pixels_xr.errors import ConfigError
from pixels_xr.training.labels import Labels, geometries_in
from pixels_xr.training.split import block_split, kept_by_buffer


class SampleSpec(BaseModel):
    """What to cut from the cubes (every field is recorded in the manifest).

    ``kind`` ``pixels``: per-pixel time series (T × bands), a Parquet table; ``chips``: ``size × size`` windows
    centred on label pixels ((T ×) size × size × bands), a Zarr store. ``time`` keeps one time step (an
    index into the cube's ``time``; the sample has no time axis, as a model that ``predict`` runs on each
    date); ``None`` keeps them all. ``per_polygon``: at most this many pixels drawn from each label (a point
    is one pixel); ``max_per_class``: at most this many samples per class over the whole run (both seeded).
    A sample is rejected when more than ``max_nodata`` of its values are nodata, or when ``clear_count`` at
    its pixel (a chip's centre) is below ``min_clear`` in any time step it holds. Split and buffer: see
    ``training.split``; ``block_size`` and ``buffer`` are CRS units (metres), ``buffer`` defaults to the
    block size. ``class_weights`` ``balanced`` gives class c the weight N / (K · n_c) over the train split.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["pixels", "chips"] = "pixels"
    size: int = Field(16, ge=1, le=1024)
    time: int | None = None
    bands: list[str] | None = None
    per_polygon: int = Field(100, ge=1)
    max_per_class: int | None = Field(None, ge=1)
    max_nodata: float = Field(0.0, ge=0, le=1)
    min_clear: int = Field(0, ge=0)
    block_size: float = Field(1000.0, gt=0)
    buffer: float | None = Field(None, ge=0)
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    class_weights: Literal["balanced", "none"] = "balanced"
    normalise: Literal["standard", "none"] = "standard"
    seed: int = Field(0, ge=0, lt=2**63)

    @model_validator(mode="after")
    def _consistent(self) -> SampleSpec:
        if min(self.fractions) < 0 or sum(self.fractions) <= 0:
            raise ValueError("fractions: train, validation and test shares must be ≥ 0 and not all 0")
        return self

    @property
    def resolved_buffer(self) -> float:
        return self.block_size if self.buffer is None else self.buffer


def load_spec(value: SampleSpec | dict | None) -> SampleSpec:
    """A ``SampleSpec`` from itself, a dict or None (defaults); errors name the field."""
    if isinstance(value, SampleSpec):
        return value
    try:
        return SampleSpec.model_validate(value or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = "unknown key" if err["type"] == "extra_forbidden" else str(err.get("msg", "invalid")).removeprefix(
            "Value error, ")
        raise ConfigError(msg, f"samples.{loc}" if loc else "samples") from None


@dataclass
class Samples:
    """Samples of one cube (or a merged set): values float32 with NaN nodata, and one row of facts each.

    ``values``: (n, [time,] [size, size,] band) in ``bands`` order; ``label`` is the index of the label
    feature in the ``Labels`` (``label_id`` its id), ``cls`` the class index, ``x``/``y`` the centre in the
    cube's CRS (``epsg``), ``split`` 0 train / 1 validation / 2 test.
    """

    values: np.ndarray
    cls: np.ndarray
    weight: np.ndarray
    split: np.ndarray
    x: np.ndarray
    y: np.ndarray
    label_id: np.ndarray
    feature: str
    epsg: int
    bands: list[str]
    times: list[str]
    rejected: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cls)


def cube_bands(ds: xr.Dataset, bands: Sequence[str] | None) -> list[str]:
    """The band variables samples take: ``bands``, else every (time, y, x) variable but the engine's own, in
    the order of the configuration that made the cube (its ``config`` attribute) when it names them all."""
    if bands is not None:
        missing = [b for b in bands if b not in ds.data_vars]
        if missing:
            raise ConfigError(f"band {missing[0]!r} is not in the cube ({', '.join(map(str, ds.data_vars))})",
                              "samples.bands")
        return list(bands)
    names = [str(n) for n, v in ds.data_vars.items() if n not in {"clear_count", "source_time"}
             and set(v.dims) == {"time", "y", "x"}]
    try:  # the configuration's order (a store lists its variables in any order)
        import json

        configured = [str(b) for b in json.loads(ds.attrs.get("config", "{}")).get("bands", [])]
    except (TypeError, ValueError, AttributeError):
        configured = []
    if configured and sorted(configured) == sorted(names):
        return configured
    return names


def _epsg(ds: xr.Dataset) -> int:
    crs = ds.rio.crs
    epsg = crs.to_epsg() if crs is not None else None
    if epsg is None:
        raise ConfigError("the cube has no EPSG CRS (samples are split on blocks of its CRS)", "dataset")
    return int(epsg)


def _as_float(var: xr.DataArray) -> np.ndarray:
    """Values as float32 with NaN where the engine marks nodata (NaN floats, the ``nodata`` attribute)."""
    values = np.asarray(var.values)
    out = values.astype(np.float32)
    nodata = var.attrs.get("nodata")
    if values.dtype.kind != "f" and nodata is not None:
        out[values == nodata] = np.nan
    return out


def draw_samples(ds: xr.Dataset, labels: Labels, spec: SampleSpec | dict | None = None, *,
                 feature: str = "cube", which: Sequence[int] | None = None) -> Samples:
    """Samples of ``labels`` (the label indexes ``which``; default all) from a collected Dataset ``ds``.

    ``ds`` is any engine output — ``collect``, or a feature of a ``run_batch`` store (``open_feature``) — of
    any mode: (time, y, x) variables, ``clear_count``, CRS and transform. It is computed here (the caller
    cuts it to what the labels need). Every random choice is drawn from a generator seeded by
    ``(spec.seed, label id)``, so a label's samples do not depend on which other labels or features run.
    """
    spec = load_spec(spec)
    epsg = _epsg(ds)
    bands = cube_bands(ds, spec.bands)
    if "time" in ds.dims and spec.time is not None:
        if not -ds.sizes["time"] <= spec.time < ds.sizes["time"]:
            raise ConfigError(f"time step {spec.time} is outside the cube's {ds.sizes['time']} steps",
                              "samples.time")
        ds = ds.isel(time=[spec.time])
    which = list(range(len(labels))) if which is None else list(which)
    if not which:
        ds = ds.isel(y=slice(0, 2), x=slice(0, 2))  # only the layout is needed
    ds = ds.compute()
    transform = ds.rio.transform()
    height, width = ds.sizes["y"], ds.sizes["x"]
    times = [str(t)[:10] for t in ds["time"].values] if "time" in ds.coords else []
    data = np.stack([_as_float(ds[b].transpose("time", "y", "x")) for b in bands], axis=-1)  # (t, y, x, band)
    bad = np.isnan(data)
    clear = (ds["clear_count"].transpose("time", "y", "x").values if "clear_count" in ds
             else (~bad.any(-1)).astype(np.uint16))
    half = spec.size // 2 if spec.kind == "chips" else 0
    size = spec.size if spec.kind == "chips" else 1
    # nodata share of each sample centred on a pixel (a chip: box mean over its window)
    share = bad.mean(axis=(0, 3))
    if size > 1:
        # the window of centre r is rows r - size//2 … r - size//2 + size - 1, as scipy's (origin 0)
        share = ndimage.uniform_filter(share.astype(np.float64), size=size, mode="constant", cval=1.0)
    clear_ok = (clear >= spec.min_clear).all(axis=0)
    inside = np.zeros((height, width), bool)
    inside[half:height - (size - 1 - half), half:width - (size - 1 - half)] = True
    nodata_ok = share <= spec.max_nodata + 1e-9
    rejected = {"outside": 0, "nodata": 0, "clear_count": 0, "buffer": 0, "per_polygon": 0}
    picks: list[tuple[int, np.ndarray, np.ndarray]] = []
    geoms = geometries_in([labels.features[k] for k in which], f"EPSG:{epsg}")
    pixels = _label_pixels(list(zip(which, geoms)), transform, height, width)
    # the buffer rule once for every label pixel (one vectorised pass, not one per label)
    all_r = np.concatenate([r for _, r, _ in pixels]) if pixels else np.empty(0, np.int64)
    all_c = np.concatenate([c for _, _, c in pixels]) if pixels else np.empty(0, np.int64)
    x, y = transform.c + (all_c + 0.5) * transform.a, transform.f + (all_r + 0.5) * transform.e
    split = block_split(np.floor(x / spec.block_size).astype(np.int64), np.floor(y / spec.block_size).astype(
        np.int64), epsg, spec.seed, spec.fractions)
    buffered = kept_by_buffer(x, y, split, epsg=epsg, seed=spec.seed, fractions=spec.fractions,
                              block_size=spec.block_size, buffer=spec.resolved_buffer,
                              half=(half + 0.5) * abs(transform.a) if size > 1 else 0.0)  # the farthest edge
    ends = np.cumsum([0] + [len(r) for _, r, _ in pixels])
    for (k, rows, cols), a, b in zip(pixels, ends[:-1], ends[1:]):
        ok_in = inside[rows, cols]
        ok_nd = nodata_ok[rows, cols]
        ok_clear = clear_ok[rows, cols]
        rejected["outside"] += int((~ok_in).sum())
        rejected["nodata"] += int((ok_in & ~ok_nd).sum())
        rejected["clear_count"] += int((ok_in & ok_nd & ~ok_clear).sum())
        good = ok_in & ok_nd & ok_clear
        ok_buf = buffered[a:b]
        rejected["buffer"] += int((good & ~ok_buf).sum())
        idx = np.flatnonzero(good & ok_buf)
        if idx.size > spec.per_polygon:
            rng = np.random.default_rng([spec.seed, zlib.crc32(labels.features[k].id.encode())])
            rejected["per_polygon"] += int(idx.size - spec.per_polygon)
            idx = np.sort(rng.choice(idx, spec.per_polygon, replace=False))
        if idx.size:
            picks.append((k, rows[idx], cols[idx]))
    return _gather(data, picks, labels, spec, transform, epsg, bands, times, feature, rejected)


def _label_pixels(geoms: list[tuple[int, shapely.Geometry]], transform: rasterio.Affine, height: int,
                  width: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``(label, rows, cols)`` of each label that touches the window: the pixel under each point (all points
    at once), the pixels whose centre is inside a polygon (or, for a polygon smaller than a pixel, the pixels
    it touches)."""
    out: list[tuple[int, np.ndarray, np.ndarray]] = []
    points = [(k, g) for k, g in geoms if isinstance(g, shapely.Point)]
    if points:
        xy = shapely.get_coordinates([g for _, g in points])
        c, r = ~transform * (xy[:, 0], xy[:, 1])
        r, c = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
        for (k, _), ri, ci in zip(points, r, c):
            if 0 <= ri < height and 0 <= ci < width:
                out.append((k, np.array([ri]), np.array([ci])))
    for k, geom in geoms:
        if isinstance(geom, shapely.Point):
            continue
        parts = list(getattr(geom, "geoms", [geom]))
        xy = shapely.get_coordinates([p for p in parts if isinstance(p, shapely.Point)])
        c, r = ~transform * (xy[:, 0], xy[:, 1]) if len(xy) else (np.empty(0), np.empty(0))
        rows, cols = [np.floor(r).astype(np.int64)], [np.floor(c).astype(np.int64)]
        areas = [p for p in parts if not isinstance(p, shapely.Point)]
        if areas:  # tested on the polygon's own window of the grid, not the whole grid
            c0, r0, c1, r1 = _window(shapely.bounds(shapely.GeometryCollection(areas)), transform, height, width)
            if r1 > r0 and c1 > c0:
                rr, cc = _area_pixels(shapely.union_all(areas), transform, r0, r1, c0, c1)
                rows.append(rr)
                cols.append(cc)
        pix = np.stack([np.concatenate(rows), np.concatenate(cols)], 1)
        pix = np.unique(pix[(pix[:, 0] >= 0) & (pix[:, 0] < height) & (pix[:, 1] >= 0) & (pix[:, 1] < width)], axis=0)
        if len(pix):
            out.append((k, pix[:, 0], pix[:, 1]))
    return sorted(out, key=lambda t: t[0])


def _area_pixels(area: shapely.Geometry, transform: rasterio.Affine, r0: int, r1: int, c0: int,
                 c1: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of rows r0…r1, columns c0…c1 whose centre is in ``area``; none: those whose cell it touches.

    Shapely, not GDAL's rasterize: labels are drawn in several threads at once, and rasterio's rasterize
    there sometimes loses the transform of its in-memory dataset (NotGeoreferencedWarning, nothing burnt)."""
    rr, cc = np.mgrid[r0:r1, c0:c1]
    x, y = transform * (cc + 0.5, rr + 0.5)
    inside = shapely.contains_xy(area, x, y) | shapely.intersects_xy(shapely.boundary(area), x, y)
    if not inside.any():
        a, e = transform.a / 2, transform.e / 2
        cells = shapely.box(x - a, y - e, x + a, y + e)
        inside = shapely.intersects(cells, area)
    return rr[inside], cc[inside]


def _window(bounds: np.ndarray, transform: rasterio.Affine, height: int, width: int) -> tuple[int, int, int, int]:
    """Columns and rows ``c0, r0, c1, r1`` of the grid covering ``bounds`` (a pixel more on each side)."""
    xmin, ymin, xmax, ymax = (float(v) for v in bounds)
    ca, ra = ~transform * (xmin, ymax)
    cb, rb = ~transform * (xmax, ymin)
    c0, c1 = int(np.floor(min(ca, cb))) - 1, int(np.ceil(max(ca, cb))) + 1
    r0, r1 = int(np.floor(min(ra, rb))) - 1, int(np.ceil(max(ra, rb))) + 1
    return max(c0, 0), max(r0, 0), min(c1, width), min(r1, height)


def _gather(data: np.ndarray, picks: list[tuple[int, np.ndarray, np.ndarray]], labels: Labels, spec: SampleSpec,
            transform: rasterio.Affine, epsg: int, bands: list[str], times: list[str], feature: str,
            rejected: dict[str, int]) -> Samples:
    """The picked pixels' values: (n, t, band) series or (n, t, size, size, band) chips, time dropped when
    ``spec.time`` chose one step."""
    n_t = data.shape[0]
    size = spec.size
    half = size // 2
    chunks, cls, weight, xs, ys, ids = [], [], [], [], [], []
    for k, rows, cols in picks:
        if spec.kind == "pixels":
            chunks.append(np.moveaxis(data[:, rows, cols, :], 0, 1))  # (n, t, band)
        else:
            win = np.lib.stride_tricks.sliding_window_view(data, (size, size), axis=(1, 2))  # t, y, x, b, s, s
            sel = win[:, rows - half, cols - half]  # (t, n, band, s, s)
            chunks.append(np.ascontiguousarray(np.transpose(sel, (1, 0, 3, 4, 2))))  # (n, t, s, s, band)
        n = rows.size
        cls.append(np.full(n, labels.class_of[k], np.int16))
        weight.append(np.full(n, labels.weight_of[k], np.float32))
        xs.append(transform.c + (cols + 0.5) * transform.a)
        ys.append(transform.f + (rows + 0.5) * transform.e)
        ids.append(np.full(n, labels.features[k].id, object))
    shape = (0, n_t, *((size, size) if spec.kind == "chips" else ()), len(bands))
    values = np.concatenate(chunks).astype(np.float32) if chunks else np.empty(shape, np.float32)
    if spec.time is not None:
        values = values[:, 0]
        times = times[:1]
    x = np.concatenate(xs) if xs else np.empty(0)
    y = np.concatenate(ys) if ys else np.empty(0)
    split = block_split(np.floor(x / spec.block_size).astype(np.int64), np.floor(y / spec.block_size).astype(
        np.int64), epsg, spec.seed, spec.fractions)
    return Samples(values, np.concatenate(cls) if cls else np.empty(0, np.int16),
                   np.concatenate(weight) if weight else np.empty(0, np.float32), split, x, y,
                   np.concatenate(ids) if ids else np.empty(0, object), feature, epsg, bands, times, rejected)
