"""A run's outputs (Zarr store or COG folder) as map layers: tiles rendered on demand, and one pixel's series.

Every feature becomes a lazy ``(time, y, x)`` Dataset (bands, ``clear_count``, ``source_time`` as
datetime64), whichever format the run wrote, so the rendering below has one path. A tile reads only the
window of each feature it touches (features are found with an STRtree of their EPSG:3857 footprints) and
warps it with GDAL nearest-neighbour: an output pixel stays one colour (what an analyst inspects), and the
colour of a pixel on the map is exactly the stretch of its value.

Layers:

- ``rgb``: red/green/blue (or the first band in grey) with a 2–98 % stretch computed once for the whole run
  (every bin and feature share it, so bins and fields compare); values are sampled on a regular decimated
  grid of at most ``STRETCH_PIXELS`` pixels per feature and bin, from at most ``STRETCH_FEATURES`` features
  spread over the run.
- ``clear_count``: viridis over 0 … the run's largest count (the quicklook's colours; 0 is white).
- ``source_time``: where in its bin each pixel's acquisition lies, viridis from the bin's first day (dark)
  to its last (yellow).

Bins are matched across features by their label (``start/end``); the time slider walks the run's labels.
Tiles are rendered up to ``ZOOM_ABOVE_NATIVE`` zooms past the data's native zoom, so one output pixel spans
several tile pixels and the browser's own scaling never blends neighbouring pixels.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_bounds
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window
from rasterio.windows import from_bounds as window_from_bounds

from pixels_xr.errors import OutputError
from pixels_xr.io.layout import MANIFEST_DIR, SOURCE_TIME_NODATA, label_of
from pixels_xr.plot import band_values
from pixels_xr.pxm.encode import encode_tile
from pixels_xr.pxm.tiles import native_zoom, tile_bounds

__all__ = ["LAYERS", "FeatureLayer", "RunOutput", "open_run"]

LAYERS = ("rgb", "clear_count", "source_time")
STRETCH_PIXELS = 256 * 256
STRETCH_FEATURES = 64
ZOOM_ABOVE_NATIVE = 3
CACHE_PIXELS = 512 * 512
CACHE_ENTRIES = 64  # at most 64 × 3 bands × 0.25 Mpx float32: 192 MiB, typically far less
TILE = 256
WEB_MERCATOR = CRS.from_epsg(3857)
WGS84 = CRS.from_epsg(4326)
_META = ("clear_count", "source_time")
# rasterio's reproject of numpy arrays warns about its own in-memory datasets now and then; a filter here, as
# catch_warnings() is not thread-safe and tiles are rendered in a thread pool.
warnings.filterwarnings("ignore", message="Dataset has no geotransform", category=NotGeoreferencedWarning,
                        module="rasterio.warp")


class FeatureLayer:
    """One feature of a run: grid, footprints, bin labels (index = time position) and its Dataset, opened
    on first use (a COG output's feature is a file per bin and layer: opening them all at start would cost
    a run of many features minutes)."""

    def __init__(self, fid: str, crs: CRS, transform: Any, shape: tuple[int, int], labels: list[str],
                 load: Callable[[], xr.Dataset]) -> None:
        self.id, self.crs, self.transform, self.shape, self.labels = fid, crs, transform, shape, labels
        self._load, self._ds, self._lock = load, None, threading.Lock()
        h, w = shape
        native = (transform.c, transform.f + h * transform.e, transform.c + w * transform.a, transform.f)
        self.bounds_3857 = transform_bounds(crs, WEB_MERCATOR, *native, densify_pts=21)
        self.bounds_lonlat = transform_bounds(crs, WGS84, *native, densify_pts=21)

    @property
    def ds(self) -> xr.Dataset:
        with self._lock:
            if self._ds is None:
                self._ds = self._load()
            return self._ds

    def window(self, bounds_3857: tuple[float, float, float, float]) -> Window | None:
        """Pixels of the feature under ``bounds_3857`` (one pixel of margin), None when none."""
        b = transform_bounds(WEB_MERCATOR, self.crs, *bounds_3857, densify_pts=21)
        win = window_from_bounds(*b, transform=self.transform)
        c0, r0 = max(0, math.floor(win.col_off) - 1), max(0, math.floor(win.row_off) - 1)
        c1 = min(self.shape[1], math.ceil(win.col_off + win.width) + 1)
        r1 = min(self.shape[0], math.ceil(win.row_off + win.height) + 1)
        return Window(c0, r0, c1 - c0, r1 - r0) if c1 > c0 and r1 > r0 else None


def _labels(ds: xr.Dataset) -> list[str]:
    starts = [str(t)[:10] for t in ds.time.values]
    if "time_end" not in ds.coords:
        return starts
    ends = [str(t)[:10] for t in ds.time_end.values]
    return [f"{s}/{e}" for s, e in zip(starts, ends)]


def _zarr_features(store: Path) -> list[FeatureLayer]:
    """Every feature of a run's Zarr store, its grid and bins read from the group's small coordinate arrays;
    xarray opens the group (the slow part: decoding every variable's metadata) at its first tile or click."""
    import zarr

    from pixels_xr.io.zarr_store import open_feature
    from pixels_xr.plot import store_features

    root = zarr.open_group(str(store), mode="r")
    out = []
    for fid in store_features(str(store)):
        def load(fid: str = fid) -> xr.Dataset:
            ds = open_feature(str(store), fid)
            return ds if "time" in ds.dims else ds.expand_dims("time")

        try:
            crs, transform, shape, labels = _zarr_grid(root[fid])
        except (KeyError, ValueError, IndexError):  # not the layout we write: let xarray and rioxarray read it
            ds = load()
            if ds.rio.crs is None:
                raise OutputError(f"feature {fid!r} has no CRS", f"{store}/{fid}") from None
            crs, transform = CRS.from_user_input(ds.rio.crs), ds.rio.transform()
            shape, labels = (ds.sizes["y"], ds.sizes["x"]), _labels(ds)
        out.append(FeatureLayer(fid, crs, transform, shape, labels, load))
    return out


def _zarr_grid(group: Any) -> tuple[CRS, Any, tuple[int, int], list[str]]:
    """(crs, transform, (height, width), bin labels) of a feature group written by ``io.zarr_store``."""
    ref = dict(group["spatial_ref"].attrs)
    crs = CRS.from_wkt(ref["crs_wkt"])
    x, y = group["x"], group["y"]
    if "GeoTransform" in ref:
        transform = Affine.from_gdal(*(float(v) for v in str(ref["GeoTransform"]).split()))
    else:
        x0, x1 = (float(v) for v in x[:2])
        y0, y1 = (float(v) for v in y[:2])
        transform = Affine(x1 - x0, 0, x0 - (x1 - x0) / 2, 0, y1 - y0, y0 - (y1 - y0) / 2)
    coords = {name: (("time",), group[name][:], dict(group[name].attrs)) for name in ("time", "time_end")
              if name in group}
    ds = xr.decode_cf(xr.Dataset(coords))
    return crs, transform, (y.shape[0], x.shape[0]), _labels(ds.set_coords(list(ds.data_vars)))


def _cog_feature(folder: Path) -> FeatureLayer | None:
    """A feature of a COG output (``io.layout``): grid from its first file; its files opened on first use."""
    import rasterio

    names = sorted(p.stem for p in folder.glob("*.tif")
                   if not p.stem.endswith(("_clear_count", "_source_time")))
    if not names:
        return None
    try:
        with rasterio.open(folder / f"{names[0]}.tif") as src:
            crs, transform, shape = src.crs, src.transform, (src.height, src.width)
    except rasterio.errors.RasterioIOError as err:
        raise OutputError(f"cannot open: {err}", str(folder / f"{names[0]}.tif")) from None
    if crs is None:
        raise OutputError("has no CRS", str(folder / f"{names[0]}.tif"))
    return FeatureLayer(folder.name, crs, transform, shape, [label_of(n) for n in names],
                        lambda: _cog_dataset(folder, names))


def _cog_dataset(folder: Path, names: list[str]) -> xr.Dataset:
    """The bins of a COG feature as one lazily read Dataset (bands by their descriptions; ``source_time``
    stays int32 days, see ``_as_times``)."""
    import rioxarray

    steps = []
    for name in names:
        bands = rioxarray.open_rasterio(folder / f"{name}.tif", mask_and_scale=False)
        titles = bands.attrs.get("long_name")
        titles = [titles] if isinstance(titles, str) else list(titles or [])
        if len(titles) != bands.sizes["band"]:
            titles = [f"band_{i + 1}" for i in range(bands.sizes["band"])]
        step = xr.Dataset({t: bands.isel(band=i, drop=True) for i, t in enumerate(titles)})
        for title in titles:
            step[title].attrs = {"nodata": bands.rio.nodata} if bands.rio.nodata is not None else {}
        for layer in _META:
            path = folder / f"{name}_{layer}.tif"
            if path.is_file():
                step[layer] = rioxarray.open_rasterio(path, mask_and_scale=False).isel(band=0, drop=True)
        start, _, end = label_of(name).partition("/")
        step = step.expand_dims(time=[np.datetime64(start, "ns")]).assign_coords(
            time_end=("time", [np.datetime64(end or start, "ns")]))
        steps.append(step)
    return xr.concat(steps, dim="time", join="exact", data_vars="all", coords="minimal", compat="override")


def _as_times(values: np.ndarray) -> np.ndarray:
    """``source_time`` values as datetime64 (NaT where none): Zarr stores them so, COGs as int32 days."""
    if values.dtype.kind == "M":
        return values
    out = values.astype("int64").astype("datetime64[D]")
    out[values == SOURCE_TIME_NODATA] = np.datetime64("NaT")
    return out


def is_zarr(path: Path) -> bool:
    return path.is_dir() and ((path / "zarr.json").is_file() or (path / ".zgroup").is_file())


def is_cog_output(path: Path) -> bool:
    """A COG folder written by a run: its ledger folder and at least one feature folder of COGs."""
    return path.is_dir() and (path / MANIFEST_DIR).is_dir() and not is_zarr(path) and any(
        p.is_dir() and not p.name.startswith(".") and any(p.glob("*.tif")) for p in path.iterdir())


def open_run(path: Path) -> RunOutput | None:
    """The run output at ``path`` (a Zarr store or a COG folder), None when ``path`` is neither."""
    if is_zarr(path):
        return RunOutput(path, "zarr", _zarr_features(path))
    if is_cog_output(path):
        folders = [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")
                   and any(p.glob("*.tif"))]
        features = [f for f in (_cog_feature(p) for p in folders) if f is not None]
        return RunOutput(path, "cog", features)
    return None


def _config_order(ds: xr.Dataset, names: list[str]) -> list[str]:
    """``names`` in the run configuration's band order (a Zarr group lists its arrays in no set order)."""
    import json

    try:
        bands = [str(b) for b in json.loads(ds.attrs.get("config", "{}")).get("bands", [])]
    except (ValueError, AttributeError):
        bands = []
    return [b for b in bands if b in names] + [n for n in names if n not in bands]


def _colormap(name: str, n: int = 256) -> np.ndarray:
    """``n`` RGB uint8 colours of a matplotlib colormap (the quicklooks' colours)."""
    import matplotlib

    return (matplotlib.colormaps[name](np.linspace(0, 1, n))[:, :3] * 255).round().astype(np.uint8)


class RunOutput:
    """The layers of one run output; thread-safe (the server renders tiles in a thread pool)."""

    def __init__(self, path: Path, kind: str, features: list[FeatureLayer]) -> None:
        if not features:
            raise OutputError("the run output holds no features", str(path))
        self.path, self.kind, self.features = path, kind, {f.id: f for f in features}
        self.labels = sorted({label for f in features for label in f.labels})
        first = features[0].ds
        names = [str(v) for v in first.data_vars if v not in _META and {"y", "x"} <= set(first[v].dims)]
        names = _config_order(first, names)
        if not names:
            raise OutputError("the run output has no band variables", str(path))
        self.bands = ["red", "green", "blue"] if {"red", "green", "blue"} <= set(names) else [names[0]]
        self.band_names = names
        self.variables = set(map(str, first.data_vars))  # every feature of a run has the same variables
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, int, str], np.ndarray] = OrderedDict()
        from shapely import STRtree, box

        self._order = list(self.features.values())
        self._tree = STRtree([box(*f.bounds_3857) for f in self._order])
        self._box = box

    # ------------------------------------------------------------------------------------------ summary
    @cached_property
    def stretch(self) -> dict[str, tuple[float, float]]:
        """Per RGB band the run's 2–98 % values (module docstring), shared by every bin and feature."""
        samples = self._samples()
        limits = {}
        for band in self.bands:
            values = np.concatenate([s[band] for s in samples])
            values = values[np.isfinite(values)]
            lo, hi = np.percentile(values, [2, 98]) if values.size else (0.0, 1.0)
            limits[band] = (float(lo), float(hi))
        return limits

    @cached_property
    def max_clear_count(self) -> int:
        samples = [s["clear_count"] for s in self._samples() if "clear_count" in s]
        values = np.concatenate(samples) if samples else np.zeros(1)
        return max(1, int(np.nanmax(values)) if values.size else 1)

    def _samples(self) -> list[dict[str, np.ndarray]]:
        with self._lock:
            if not hasattr(self, "_sampled"):
                features = self._order
                if len(features) > STRETCH_FEATURES:
                    picks = np.linspace(0, len(features) - 1, STRETCH_FEATURES).astype(int)
                    features = [features[i] for i in picks]
                out = []
                for f in features:
                    step = max(1, math.ceil(math.sqrt(f.shape[0] * f.shape[1] / STRETCH_PIXELS)))
                    small = f.ds.isel(y=slice(None, None, step), x=slice(None, None, step))
                    names = self.bands + (["clear_count"] if "clear_count" in small else [])
                    with dask.config.set(scheduler="synchronous"):
                        small = small[names].compute()
                    out.append({n: band_values(small, n).ravel() for n in names})
                self._sampled = out
            return self._sampled

    @cached_property
    def maxzoom(self) -> int:
        res = min((f.bounds_3857[2] - f.bounds_3857[0]) / f.shape[1] for f in self._order)
        return min(24, native_zoom(res, TILE) + ZOOM_ABOVE_NATIVE)

    def describe(self) -> dict[str, Any]:
        """What the page needs: bins, layers, bounds, zooms, the stretch and the features' footprints."""
        lon = [f.bounds_lonlat for f in self._order]
        return {
            "path": self.path.name, "kind": self.kind, "bins": self.labels, "bands": self.band_names,
            "rgb": self.bands, "stretch": self.stretch, "max_clear_count": self.max_clear_count,
            "layers": [layer for layer in LAYERS if layer == "rgb" or layer in self.variables],
            "bounds": [min(b[0] for b in lon), min(b[1] for b in lon), max(b[2] for b in lon),
                       max(b[3] for b in lon)],
            "minzoom": 0, "maxzoom": self.maxzoom,
            "features": [{"id": f.id, "bounds": f.bounds_lonlat, "bins": len(f.labels)} for f in self._order],
        }

    # ------------------------------------------------------------------------------------------- tiles
    def tile(self, layer: str, bin_index: int, z: int, x: int, y: int) -> bytes | None:
        """The PNG of tile (z, x, y) of ``layer`` for bin ``bin_index`` of the run; None when empty."""
        if layer not in LAYERS:
            raise OutputError(f"unknown layer {layer!r}; use one of {', '.join(LAYERS)}", "layer")
        if not 0 <= bin_index < len(self.labels):
            raise OutputError(f"bin {bin_index} is not in 0..{len(self.labels) - 1}", "bin")
        label = self.labels[bin_index]
        bounds = tile_bounds(z, x, y)
        rgba = np.zeros((TILE, TILE, 4), np.uint8)
        for k in self._tree.query(self._box(*bounds)):
            feature = self._order[int(k)]
            if label in feature.labels:
                self._paint(feature, feature.labels.index(label), layer, bounds, rgba)
        found = encode_tile(rgba, "png")
        return None if found is None else found[1]

    def _paint(self, feature: FeatureLayer, k: int, layer: str, bounds: tuple[float, float, float, float],
               rgba: np.ndarray) -> None:
        win = feature.window(bounds)
        if win is None:
            return
        names = self.bands if layer == "rgb" else [layer]
        if any(n not in feature.ds for n in names):
            return
        stack = self._values(feature, k, layer, names, win)
        warped = np.full((len(names), TILE, TILE), np.nan, np.float64)
        src_transform = feature.transform @ Affine.translation(win.col_off, win.row_off)
        reproject(stack.astype(np.float64), warped, src_transform=src_transform, src_crs=feature.crs,
                  src_nodata=np.nan, dst_transform=from_bounds(*bounds, TILE, TILE), dst_crs=WEB_MERCATOR,
                  dst_nodata=np.nan, resampling=Resampling.nearest)
        valid = np.isfinite(warped).all(axis=0) & (rgba[..., 3] == 0)  # the first feature listed wins
        if not valid.any():
            return
        rgba[valid, :3] = self._colour(layer, names, warped[:, valid])
        rgba[valid, 3] = 255

    def _values(self, feature: FeatureLayer, k: int, layer: str, names: list[str], win: Window) -> np.ndarray:
        """(bands, h, w) float64 of ``win`` for bin ``k``: values with nodata as NaN, or for ``source_time``
        the acquisition's place in its bin (0 first day … 1 last day).

        A small feature (at most ``CACHE_PIXELS``) is read whole once per bin and layer and kept (LRU,
        ``CACHE_ENTRIES``): a tile then costs its warp only; a large one is read window by window.
        """
        rows = slice(win.row_off, win.row_off + win.height)
        cols = slice(win.col_off, win.col_off + win.width)
        small = feature.shape[0] * feature.shape[1] <= CACHE_PIXELS
        key = (feature.id, k, layer)
        with self._lock:
            cached = self._cache.get(key) if small else None
            if cached is not None:
                self._cache.move_to_end(key)
                return cached[:, rows, cols]
        part = feature.ds[names].isel(time=[k]) if small else feature.ds[names].isel(time=[k], y=rows, x=cols)
        with dask.config.set(scheduler="synchronous"):
            part = part.compute()
        if layer == "source_time":
            times = _as_times(part["source_time"].values[0])
            first, _, last = feature.labels[k].partition("/")
            start = np.datetime64(first, "D")
            span = max(1.0, float((np.datetime64(last or first, "D") - start) / np.timedelta64(1, "D")))
            days = (times.astype("datetime64[D]") - start).astype(np.float64)
            stack = np.where(np.isnat(times), np.nan, days / span)[None]
        else:
            stack = np.stack([band_values(part, n)[0] for n in names])
        if not small:
            return stack
        with self._lock:
            self._cache[key] = stack.astype(np.float32)  # exact for float32 and 16-bit outputs
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return stack[:, rows, cols]

    def _colour(self, layer: str, names: list[str], values: np.ndarray) -> np.ndarray:
        """(n, 3) uint8 colours of ``values`` (bands × n) for ``layer``."""
        if layer == "rgb":
            channels = []
            for name, v in zip(names, values):
                lo, hi = self.stretch[name]
                channels.append(np.clip((v - lo) / (hi - lo) if hi > lo else v * 0, 0, 1))
            if len(channels) == 1:
                channels *= 3
            return (np.stack(channels, axis=-1) * 255).round().astype(np.uint8)
        if layer == "clear_count":
            colours = np.vstack([[255, 255, 255], _colormap("viridis", self.max_clear_count)])
            return colours[np.clip(values[0], 0, self.max_clear_count).astype(int)]
        return _colormap("viridis")[np.clip(values[0] * 255, 0, 255).round().astype(int)]

    # ------------------------------------------------------------------------------------------- pixel
    def pixel(self, lon: float, lat: float) -> dict[str, Any] | None:
        """Every bin of the pixel under (lon, lat) in the first feature covering it; None outside all."""
        import mercantile
        from pyproj import Transformer

        mx, my = mercantile.xy(lon, max(-85.05, min(85.05, lat)))
        for k in self._tree.query(self._box(mx, my, mx, my)):
            f = self._order[int(k)]
            fx, fy = Transformer.from_crs(WGS84, f.crs, always_xy=True).transform(lon, lat)
            col, row = ~f.transform @ (fx, fy)
            col, row = math.floor(col), math.floor(row)
            if not (0 <= row < f.shape[0] and 0 <= col < f.shape[1]):
                continue
            names = self.band_names + [n for n in _META if n in f.ds]
            with dask.config.set(scheduler="synchronous"):
                px = f.ds[names].isel(y=[row], x=[col]).compute()
            series: dict[str, list] = {}
            for n in names:
                if n == "source_time":
                    times = _as_times(px[n].values[:, 0, 0])
                    series[n] = [None if np.isnat(t) else str(t)[:10] for t in times]
                else:
                    values = band_values(px, n)[:, 0, 0]
                    series[n] = [None if not np.isfinite(v) else float(v) for v in values]
            return {"feature": f.id, "row": row, "col": col, "x": float(f.ds.x.values[col]),
                    "y": float(f.ds.y.values[row]), "crs": f.crs.to_string(), "bins": f.labels,
                    "series": series}
        return None
