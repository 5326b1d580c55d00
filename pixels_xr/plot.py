"""Quicklook figures of collected Datasets (matplotlib, the ``plot`` extra): pure functions returning Figures.

- ``quicklook``: RGB (or one grey band) per time bin, one panel each, titled with the bin's dates and flagged
  ``partial``/``empty``; a robust percentile stretch (NaN-aware) shared by every bin, so bins compare.
- ``clear_count_map``: clear observations behind each pixel, discrete colours with an integer colour bar.
- ``source_time_map``: which acquisition each pixel came from (pick modes), one legend of dates per panel.
- ``pixel_series``: one pixel through time: the bin values, the observation each bin used and, with
  ``pixel_observations``, every acquisition (clear or not) behind them.
- ``write_quicklooks``: PNGs of every feature of a run's Zarr store (``pixels-xr quicklook OUT.zarr``).

Nodata (NaN, or the band's ``nodata`` for raw uint16 outputs) is drawn transparent over a grey background.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from pixels_xr.errors import ConfigError, OutputError

if TYPE_CHECKING:  # matplotlib is imported lazily: the plot extra is optional
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from pixels_xr.config import PixelsConfig
    from pixels_xr.features import Feature
    from pixels_xr.items import ParsedItem

__all__ = [
    "band_values",
    "bin_titles",
    "clear_count_map",
    "figures",
    "pixel_observations",
    "pixel_series",
    "quicklook",
    "source_time_map",
    "store_features",
    "stretch_limits",
    "to_rgb",
    "write_quicklooks",
]

NODATA_BACKGROUND = "#d0d0d0"  # axes colour behind transparent nodata pixels
_META_VARS = ("clear_count", "source_time")


def require_matplotlib() -> None:
    """Raise one clear ``ConfigError`` when matplotlib (the ``plot`` extra) is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'pixels-xr[plot]'", "plot") from None


def _figure(**kwargs: Any) -> Figure:
    """A Figure outside pyplot's global state: nothing to close; notebooks show it, ``savefig`` writes it."""
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def _colormap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]


# --------------------------------------------------------------------------------------------- values
def _with_time(ds: xr.Dataset) -> xr.Dataset:
    return ds if "time" in ds.dims else ds.expand_dims("time")


def _check_vars(ds: xr.Dataset, names: Sequence[str], field: str) -> None:
    have = [str(v) for v in ds.data_vars if v not in _META_VARS]
    for name in names:
        if name not in ds.data_vars:
            shown = ", ".join(have) or "none"
            raise ConfigError(f"{name!r} is not a variable of the dataset (bands: {shown})", field)


def band_values(ds: xr.Dataset, band: str) -> np.ndarray:
    """A band as float64 ``(time, y, x)`` with nodata as NaN (NaN floats, or the ``nodata`` attr of ints)."""
    var = _with_time(ds)[band].transpose("time", "y", "x")
    values = np.asarray(var.values, dtype=np.float64)
    nodata = var.attrs.get("nodata", var.encoding.get("_FillValue"))
    if var.dtype.kind in "iu" and nodata is not None:
        values[np.asarray(var.values) == nodata] = np.nan
    return values


def stretch_limits(ds: xr.Dataset, bands: Sequence[str] = ("red", "green", "blue"),
                   percentiles: tuple[float, float] = (2.0, 98.0)) -> dict[str, tuple[float, float]]:
    """Per band the (low, high) values at ``percentiles`` over every time bin and pixel, NaNs ignored.

    A band without any valid value gets (0, 1).
    """
    lo_p, hi_p = percentiles
    if not 0 <= lo_p < hi_p <= 100:
        raise ConfigError(f"need 0 <= low < high <= 100, got {percentiles}", "percentiles")
    _check_vars(ds, bands, "bands")
    limits = {}
    for band in bands:
        values = band_values(ds, band)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            limits[band] = (0.0, 1.0)
        else:
            lo, hi = np.percentile(finite, [lo_p, hi_p])
            limits[band] = (float(lo), float(hi))
    return limits


def to_rgb(ds: xr.Dataset, bands: Sequence[str] = ("red", "green", "blue"), *,
           limits: dict[str, tuple[float, float]] | None = None,
           percentiles: tuple[float, float] = (2.0, 98.0)) -> np.ndarray:
    """Stretched RGBA image stack ``(time, y, x, 4)`` in [0, 1]: ``(v − low) / (high − low)`` clipped.

    ``bands`` are red, green, blue (three names) or one name (grey). ``limits`` default to
    ``stretch_limits`` over all bins. Alpha is 0 where any band is nodata, else 1. A band whose low equals its
    high maps to 0.
    """
    bands = list(bands)
    if len(bands) not in (1, 3):
        raise ConfigError(f"give 3 bands (red, green, blue) or 1 band (grey), got {len(bands)}", "bands")
    _check_vars(ds, bands, "bands")
    limits = limits if limits is not None else stretch_limits(ds, bands, percentiles)
    channels = []
    for band in bands:
        if band not in limits:
            raise ConfigError(f"no stretch limits for band {band!r}", "limits")
        lo, hi = limits[band]
        span = hi - lo if hi > lo else math.inf
        channels.append(np.clip((band_values(ds, band) - lo) / span, 0.0, 1.0))
    if len(channels) == 1:
        channels *= 3
    stack = np.stack(channels, axis=-1)
    valid = np.isfinite(stack).all(axis=-1)
    rgba = np.concatenate([np.where(valid[..., None], stack, 0.0), valid[..., None].astype(float)], axis=-1)
    return rgba.astype(np.float32)


# --------------------------------------------------------------------------------------------- layout
def bin_titles(ds: xr.Dataset) -> list[str]:
    """Panel titles: the bin's first and last day (or the acquisition day), then ``partial``/``empty``."""
    ds = _with_time(ds)
    starts = [str(t)[:10] for t in ds.time.values]
    ends = [str(t)[:10] for t in ds.time_end.values] if "time_end" in ds.coords else [None] * len(starts)
    titles = []
    for k, (start, end) in enumerate(zip(starts, ends)):
        title = start if end is None or end == start else f"{start} – {end}"
        flags = [name for name in ("partial", "empty") if name in ds.coords and bool(ds[name].values[k])]
        titles.append(title + (f"\n({', '.join(flags)})" if flags else ""))
    return titles


def _extent(ds: xr.Dataset) -> tuple[float, float, float, float]:
    """imshow extent (left, right, bottom, top) of pixel edges from the centre coordinates."""
    x, y = ds.x.values.astype(float), ds.y.values.astype(float)
    dx = float(x[1] - x[0]) if x.size > 1 else 1.0
    dy = float(y[1] - y[0]) if y.size > 1 else -1.0
    return (x[0] - dx / 2, x[-1] + dx / 2, y[-1] + dy / 2, y[0] - dy / 2)


def _grid(n: int, ncols: int, panel_size: float, extra_width: float = 0.0) -> tuple[Figure, list[Axes]]:
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = _figure(figsize=(ncols * panel_size + extra_width, nrows * panel_size + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    for ax in flat[:n]:
        ax.set_facecolor(NODATA_BACKGROUND)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, flat[:n]


def _suptitle(fig: Figure, ds: xr.Dataset, what: str) -> None:
    feature = ds.attrs.get("feature")
    mode = ds.attrs.get("mode")
    parts = [what] + ([f"feature {feature}"] if feature else []) + ([f"mode {mode}"] if mode else [])
    fig.suptitle(" · ".join(parts), fontsize="medium")


def quicklook(ds: xr.Dataset, bands: Sequence[str] = ("red", "green", "blue"), *,
              percentiles: tuple[float, float] = (2.0, 98.0),
              limits: dict[str, tuple[float, float]] | None = None, ncols: int = 4,
              panel_size: float = 3.0) -> Figure:
    """One panel per time bin of ``bands`` stretched by ``to_rgb`` (limits shared by every bin).

    Panels are titled by ``bin_titles``; empty bins say so in the panel; nodata shows the grey background.
    """
    require_matplotlib()
    ds = _with_time(ds)
    limits = limits if limits is not None else stretch_limits(ds, bands, percentiles)
    rgba = to_rgb(ds, bands, limits=limits)
    fig, axes = _grid(ds.sizes["time"], ncols, panel_size)
    extent = _extent(ds)
    for k, (ax, title) in enumerate(zip(axes, bin_titles(ds))):
        ax.imshow(rgba[k], extent=extent, interpolation="nearest", origin="upper")
        ax.set_title(title, fontsize="small")
        if not rgba[k, ..., 3].any():
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.3")
    stretch = "; ".join(f"{b} {lo:.3g}–{hi:.3g}" for b, (lo, hi) in limits.items())
    _suptitle(fig, ds, f"{'/'.join(bands)} (stretch {percentiles[0]:g}–{percentiles[1]:g} %: {stretch})")
    return fig


def clear_count_map(ds: xr.Dataset, *, ncols: int = 4, panel_size: float = 3.0,
                    cmap: str = "viridis") -> Figure:
    """``clear_count`` per time bin in discrete colours (0 white, 1 … max), one colour bar of integers."""
    require_matplotlib()
    from matplotlib.colors import BoundaryNorm, ListedColormap

    _check_vars(ds, ["clear_count"], "clear_count")
    ds = _with_time(ds)
    counts = ds.clear_count.transpose("time", "y", "x").values
    top = int(counts.max()) if counts.size else 0
    colours = np.ones((top + 1, 4))  # 0: white, no clear observation
    if top > 0:
        colours[1:] = _colormap(cmap)(np.linspace(0, 1, top))
    listed = ListedColormap(colours)
    norm = BoundaryNorm(np.arange(-0.5, top + 1.5), listed.N)
    fig, axes = _grid(ds.sizes["time"], ncols, panel_size, extra_width=1.0)
    extent = _extent(ds)
    image = None
    for k, (ax, title) in enumerate(zip(axes, bin_titles(ds))):
        image = ax.imshow(counts[k], cmap=listed, norm=norm, extent=extent, interpolation="nearest")
        ax.set_title(title, fontsize="small")
    step = max(1, math.ceil((top + 1) / 12))
    bar = fig.colorbar(image, ax=axes, ticks=list(range(0, top + 1, step)), shrink=0.8)
    bar.set_label("clear observations per pixel (0: none, white)")
    _suptitle(fig, ds, "clear_count")
    return fig


def source_time_map(ds: xr.Dataset, *, ncols: int = 4, panel_size: float = 3.0,
                    max_legend: int = 10) -> Figure:
    """``source_time`` per bin: each acquisition date one colour, listed in the panel's legend.

    Panels with more than ``max_legend`` dates list the first and last ones and say how many are left out.
    """
    require_matplotlib()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if "source_time" not in ds.data_vars:
        raise ConfigError("the dataset has no source_time (mode 'all' and median composites pick no single "
                          "observation per pixel)", "source_time")
    ds = _with_time(ds)
    times = ds.source_time.transpose("time", "y", "x").values.astype("datetime64[D]")
    fig, axes = _grid(ds.sizes["time"], ncols, panel_size)
    extent = _extent(ds)
    for k, (ax, title) in enumerate(zip(axes, bin_titles(ds))):
        panel = times[k]
        ok = ~np.isnat(panel)
        dates = np.unique(panel[ok])
        index = np.full(panel.shape, np.nan)
        index[ok] = np.searchsorted(dates, panel[ok])
        colours = _distinct_colours(max(1, dates.size))
        ax.imshow(index, cmap=ListedColormap(colours), vmin=-0.5, vmax=len(colours) - 0.5, extent=extent,
                  interpolation="nearest")
        ax.set_title(title, fontsize="small")
        handles = [Patch(color=colours[i], label=str(d)) for i, d in enumerate(dates)]
        if len(handles) > max_legend:
            left = len(handles) - max_legend + 1
            handles = handles[: max_legend - 1] + [Patch(color="none", label=f"… {left} more")]
        if handles:
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, -0.02), fontsize="x-small",
                      ncols=2, frameon=False, handlelength=1.0)
    _suptitle(fig, ds, "source_time (acquisition used per pixel)")
    return fig


def _distinct_colours(n: int) -> list[tuple[float, ...]]:
    """``n`` different colours: tab10, tab20, then samples of viridis."""
    if n <= 20:
        return list(_colormap("tab10" if n <= 10 else "tab20").colors[:n])
    return [tuple(c) for c in _colormap("viridis")(np.linspace(0, 1, n))]


# -------------------------------------------------------------------------------------------- one pixel
def _nearest_pixel(ds: xr.Dataset, x: float, y: float) -> dict[str, int]:
    out = {}
    for dim, value in (("x", x), ("y", y)):
        coords = ds[dim].values.astype(float)
        i = int(np.abs(coords - value).argmin())
        step = abs(float(coords[1] - coords[0])) if coords.size > 1 else math.inf
        if abs(coords[i] - value) > step / 2:
            raise ConfigError(f"{value} is outside the dataset's {dim} range "
                              f"{coords.min()}..{coords.max()}", dim)
        out[dim] = i
    return out


def pixel_observations(config: PixelsConfig, feature: Feature, x: float, y: float, *,
                       items: Sequence[ParsedItem | dict] | None = None) -> xr.Dataset:
    """Every acquisition behind one pixel (``x``/``y`` in the output CRS): reflectance per band and ``clear``.

    The same search, grid, mask rule and cleanup as ``compose.collect``; dims ``time``; coords ``id`` and
    ``cloud_cover``. Same-day tiles stay separate acquisitions.
    """
    from pixels_xr.compose import observations
    from pixels_xr.cube import to_reflectance

    obs = observations(config, feature, items=items, check=False)
    cube, clear = obs.cube, obs.clear
    at = _nearest_pixel(cube, x, y)
    refl = to_reflectance(cube).isel(at)
    out = xr.Dataset({str(b): refl.sel(band=b).drop_vars("band") for b in refl.band.values})
    out["clear"] = clear.isel(at)
    keep = {"time", "id", "cloud_cover", "x", "y"}
    out = out.drop_vars([c for c in out.coords if c not in keep]).compute()
    out.attrs.update({"feature": feature.id, "x": float(cube.x.values[at["x"]]),
                      "y": float(cube.y.values[at["y"]])})
    return out


def pixel_series(ds: xr.Dataset, x: float, y: float, band: str = "nir", *,
                 observations: xr.Dataset | None = None, panel_size: float = 3.0) -> Figure:
    """One pixel of ``band`` through time: bin values, the observation each bin used, and every acquisition.

    Binned results draw a segment across each bin (``time`` … ``time_end``); pick modes mark the observation
    each bin used (``source_time``); median composites mark all clear observations of the bin as used.
    ``observations`` (from ``pixel_observations``) adds each acquisition: clear ● or not clear ×.
    """
    require_matplotlib()
    import matplotlib.dates as mdates

    _check_vars(ds, [band], "band")
    ds = _with_time(ds)
    at = _nearest_pixel(ds, x, y)
    px = ds.isel(at)
    values = band_values(px.expand_dims(["y", "x"]), band)[:, 0, 0]
    starts = px.time.values.astype("datetime64[ns]")
    fig = _figure(figsize=(3.2 * panel_size, panel_size + 0.4))
    ax = fig.subplots()
    if "time_end" in px.coords:
        ends = px.time_end.values.astype("datetime64[ns]") + np.timedelta64(1, "D")
        ax.hlines(values, starts, ends, colors="tab:blue", linewidth=2.5, label=f"{band} per bin")
        for start, end, k in zip(starts, ends, range(len(starts))):
            ax.axvspan(start, end, color="0.92" if k % 2 else "1.0", zorder=0)
    else:
        ax.plot(starts, values, "-", color="tab:blue", linewidth=1.5, label=f"{band} per slice")
    used: np.ndarray | None = None
    if "source_time" in px.data_vars:
        chosen = px.source_time.values.astype("datetime64[ns]")
        ok = ~np.isnat(chosen)
        used = chosen[ok]
        ax.plot(chosen[ok], values[ok], "*", color="tab:red", markersize=13, label="observation used",
                zorder=5)
    if observations is not None:
        _plot_observations(ax, observations, band, px, used)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
    ax.set_ylabel(band)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    where = f"x {float(px.x.values):.0f}, y {float(px.y.values):.0f}"
    _suptitle(fig, ds, f"{band} at {where}")
    return fig


def _plot_observations(ax: Axes, obs: xr.Dataset, band: str, px: xr.Dataset, used: np.ndarray | None) -> None:
    """Scatter every acquisition; for median composites the clear ones inside a bin are the ones used."""
    if band not in obs.data_vars or "clear" not in obs.data_vars:
        raise ConfigError(f"observations need variables {band!r} and 'clear' (see pixel_observations)",
                          "observations")
    times = obs.time.values.astype("datetime64[ns]")
    values = obs[band].values.astype(float)
    clear = obs.clear.values.astype(bool) & np.isfinite(values)
    ax.plot(times[clear], values[clear], "o", color="tab:green", markersize=4, label="clear observation")
    cloudy = ~obs.clear.values.astype(bool) & np.isfinite(values)
    ax.plot(times[cloudy], values[cloudy], "x", color="0.45", markersize=5, label="not clear (masked)")
    if used is None and "time_end" in px.coords:  # median: every clear observation inside a bin counts
        ends = px.time_end.values.astype("datetime64[ns]") + np.timedelta64(1, "D")
        starts = px.time.values.astype("datetime64[ns]")
        inside = np.zeros(times.shape, bool)
        for start, end in zip(starts, ends):
            inside |= (times >= start) & (times < end)
        ax.plot(times[clear & inside], values[clear & inside], "o", markerfacecolor="none", color="tab:red",
                markersize=8, label="observation used")


# ----------------------------------------------------------------------------------------- stored runs
def store_features(store: str) -> list[str]:
    """Feature ids (groups) of a run's Zarr store (local path or fsspec URL), sorted."""
    import warnings

    import zarr

    try:
        root = zarr.open_group(store, mode="r")
    except (FileNotFoundError, KeyError, ValueError, TypeError) as exc:
        raise OutputError(f"not a Zarr store ({exc.__class__.__name__}: {exc})", store) from None
    with warnings.catch_warnings():  # a run's store also holds non-Zarr folders (run manifest, STAC)
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        groups = sorted(str(name) for name in root.group_keys())
    if not groups:
        raise OutputError("the store holds no feature groups", store)
    return groups


def figures(ds: xr.Dataset) -> dict[str, Figure]:
    """The standard quicklooks of a Dataset by name: ``rgb`` (or the first band grey), ``clear_count`` and
    ``source_time`` when present."""
    bands = [str(v) for v in ds.data_vars if v not in _META_VARS and {"y", "x"} <= set(ds[v].dims)]
    if not bands:
        raise OutputError("the dataset has no band variables", str(ds.attrs.get("feature", "dataset")))
    rgb = ["red", "green", "blue"]
    out = {"rgb": quicklook(ds, rgb)} if set(rgb) <= set(bands) else {bands[0]: quicklook(ds, [bands[0]])}
    if "clear_count" in ds.data_vars:
        out["clear_count"] = clear_count_map(ds)
    if "source_time" in ds.data_vars:
        out["source_time"] = source_time_map(ds)
    return out


def write_quicklooks(store: str, out_dir: str | Path, feature: str | None = None, *,
                     dpi: int = 100) -> list[Path]:
    """PNG quicklooks of every feature (or one) of a run's Zarr store: ``OUT_DIR/<feature>_<name>.png``."""
    from pixels_xr.features import check_id
    from pixels_xr.io.zarr_store import open_feature

    require_matplotlib()
    ids = store_features(store)
    if feature is not None:
        if feature not in ids:
            shown = ", ".join(ids[:10]) + (" …" if len(ids) > 10 else "")
            raise OutputError(f"no feature {feature!r} in the store (have {shown})", "--feature")
        ids = [feature]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fid in ids:
        check_id(fid, f"{store}/{fid}")
        ds = open_feature(store, fid)
        for name, fig in figures(ds).items():
            path = out / f"{fid}_{name}.png"
            fig.savefig(path, dpi=dpi)
            written.append(path)
    return written
