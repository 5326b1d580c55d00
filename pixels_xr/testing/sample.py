"""Generator of a small, realistic, clearly labelled SYNTHETIC Sentinel-2 L2A catalog (COGs + static STAC).

The README's offline main job, most tests and the benchmarks run on it. Nothing here is real Copernicus
data: every pixel is computed from a seeded random generator, and every item says so
(``pixels_xr:synthetic: true``; the collection's title and description; a GDAL metadata tag in every
COG; a ``README.txt`` in the output directory).

What it writes (``make_sample(out_dir)``)::

    out_dir/
      catalog.json                           root Catalog (SELF_CONTAINED, relative hrefs)
      sentinel-2-l2a/collection.json         Collection "sentinel-2-l2a" with spatial/temporal extent
      <tile>/<item_id>/<item_id>.json        one Item per tile and date, Earth Search v1 style
      <tile>/<item_id>/{blue,green,red,nir,scl}.tif   COGs (DEFLATE, 128/256 blocks, overviews)
      features.geojson                       ~6 polygons (EPSG:4326) with ``id`` and ``date``
      README.txt                             what this is, with the parameters used

The scene
---------
* One area in UTM zone 29N (EPSG:32629) in the Souss plain near Agadir (lon ≈ −9.0, lat ≈ 30.5). The
  area's upper-left corner is x = 500010, y = 3369990: a multiple of 10 m but *not* of 20 m or 60 m, so an
  engine that snaps grids to multiples of its output scale shows the shift.
* ``tiles`` tiles side by side, west to east, named after the real neighbouring MGRS squares
  29RMP, 29RNP, 29RPP, … (names are nominal: the windows are small). Neighbouring tiles share 25 % of their
  columns (``width // 4``) and all rows, on one common 10 m grid, like real same-zone MGRS tiles; their
  pixel values in the overlap are identical (same datatake).
* All assets of an item (blue, green, red, nir: uint16; scl: uint8; nodata 0) are on **one grid** at
  ``resolution`` — unlike real L2A, where SCL is 20 m. This keeps the sample simple; engines must still
  resample SCL with nearest.
* Dates: ``n_dates`` acquisitions every ``every_days`` days from ``start``; on each date every tile is
  acquired (same-day multi-tile). Platforms alternate sentinel-2a / sentinel-2b by date.
* Processing baseline: "03.01" before 2022-01-25, "04.00" from it (then "05.09" from 2022-12-13, "05.10"
  from 2023-12-13, "05.11" from 2024-07-23, approximate real switch dates). From 04.00 on DN =
  reflectance × 10000 + 1000 and ``raster:bands`` carry scale 1e-4 / offset −0.1 with
  ``earthsearch:boa_offset_applied: true``; before it DN = reflectance × 10000, offset 0 and the flag
  false — exactly as real Earth Search v1 items do.
* Swath edges: the dates cycle over three relative orbits; on the first the eastern part of the area lies
  outside the swath, on the third the western part (a tilted, diagonal edge); there DN and SCL are 0.
  Each item's geometry is its valid-data footprint (tile ∩ swath) in EPSG:4326.
* Land cover (static map, seasonal spectra): grid parcels of winter cereal (green-up in January, peak in
  March, senescence in late April, harvest in June), irrigated summer crop (May–September), bare/fallow
  soil (darker when wet in winter), orchards; an evergreen forest on the north-western hills (with a
  north-facing slope that is a "dark area", SCL 2, in the low-sun months); a reservoir and a river (SCL 6);
  farm tracks between parcels; multiplicative within-field texture and additive sensor noise.
* Clouds: a periodic smooth random field drifting with a fixed wind between dates, thresholded per date at
  a drawn cloudiness (some dates clear, some nearly overcast): SCL 9 (high probability, core), 8 (medium),
  10 (thin cirrus at the edges and, on some dates, a cirrus sheet), with bright reflectance (≈0.4–0.7).
  Shadows (SCL 3, surface × 0.35) are the cloud field displaced by one fixed sun-geometry vector
  (``SHADOW_OFFSET_M``), so clouds outside a tile cast shadows into it. A few pixels around cloud edges
  and scattered elsewhere are SCL 7 (unclassified).
* ``eo:cloud_cover`` is computed from the item's own SCL: the percentage of valid (SCL ≠ 0) pixels in
  classes {3, 8, 9, 10} — shadows included, unlike ESA's CLOUDY_PIXEL_PERCENTAGE; the ``s2:*_percentage``
  properties are the per-class shares.

Output is deterministic: the same arguments and seed give byte-identical files (fixed GDAL creation
options, no timestamps; ``created``/``updated`` are derived from the acquisition date).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import rasterio
import rasterio.shutil
import shapely
from pyproj import Transformer
from pystac.layout import CustomLayoutStrategy
from rasterio.enums import Resampling
from rasterio.transform import Affine
from shapely.geometry import box, mapping
from shapely.geometry.polygon import orient

from pixels_xr.errors import PixelsError

__all__ = ["SampleInfo", "make_sample", "main", "SCL_CLOUDY", "BASELINE_04_DATE", "EPSG", "ORIGIN"]

EPSG = 32629
ORIGIN = (500010.0, 3369990.0)  # upper-left corner of the area; multiple of 10, not of 20 or 60
UTM_ZONE = 29
LATITUDE_BAND = "R"
# MGRS 100 km columns of zone 29 (set 5: J..R) from 400 km east on; rows: northing 3.3–3.4 Mm is "P".
_TILE_COLUMNS = "MNPQR"
_ROW_LETTER = "P"
COLLECTION_ID = "sentinel-2-l2a"
BASELINE_04_DATE = date(2022, 1, 25)
_BASELINES = (  # (first date, baseline); before the first entry: "03.01"
    (date(2022, 1, 25), "04.00"),
    (date(2022, 12, 13), "05.09"),
    (date(2023, 12, 13), "05.10"),
    (date(2024, 7, 23), "05.11"),
)
SCL_CLOUDY = (3, 8, 9, 10)  # classes counted in eo:cloud_cover
BANDS = ("blue", "green", "red", "nir")
ASSETS = (*BANDS, "scl")
# Sun south-south-east, clouds ≈1.2 km high: shadows fall north-north-west of their clouds.
SHADOW_OFFSET_M = (-600.0, 1040.0)  # (dx east, dy north) from a cloud to its shadow, metres
WIND_M_PER_DAY = (170.0, 60.0)  # cloud field drift (east, north) per day
_CLOUD_CELL_M = 80.0  # cell size of the periodic cloud texture
_CLOUD_TEX = 256  # texture size in cells (periodic: 20.48 km)

_EO_BANDS = {
    "blue": ("B02", "Blue (band 2)", 0.49, 0.098),
    "green": ("B03", "Green (band 3)", 0.56, 0.045),
    "red": ("B04", "Red (band 4)", 0.665, 0.038),
    "nir": ("B08", "NIR 1 (band 8)", 0.842, 0.145),
}
_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
_STAC_EXTENSIONS = [
    "https://stac-extensions.github.io/processing/v1.1.0/schema.json",
    "https://stac-extensions.github.io/grid/v1.0.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
    "https://stac-extensions.github.io/mgrs/v1.0.0/schema.json",
    "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
]
_SYNTHETIC_NOTE = (
    "SYNTHETIC data generated by pixels_xr.testing.sample: not real Copernicus Sentinel-2 data. Items imitate "
    "Earth Search v1 sentinel-2-l2a metadata; pixels come from a seeded model of land cover, clouds and shadows."
)

# Surface reflectance end-members (blue, green, red, nir).
_VEG = np.array([0.030, 0.065, 0.040, 0.360], np.float32)
_SOIL = np.array([0.100, 0.150, 0.200, 0.280], np.float32)
_DRY = np.array([0.080, 0.120, 0.160, 0.260], np.float32)
_STUBBLE = np.array([0.110, 0.160, 0.210, 0.270], np.float32)
_FOREST = np.array([0.025, 0.045, 0.030, 0.290], np.float32)
_WATER = np.array([0.060, 0.050, 0.030, 0.015], np.float32)
_CLOUD = np.array([0.50, 0.48, 0.47, 0.52], np.float32)
_NOISE_SIGMA = np.array([0.004, 0.004, 0.004, 0.006], np.float32)

# Land-cover classes of the static map.
_WCROP, _SCROP, _BARE, _ORCHARD, _FORESTC, _WATERC, _TRACK = range(7)


@dataclass(frozen=True)
class SampleInfo:
    """Where a generated sample lives and what it covers."""

    root: Path
    catalog: Path  # root catalog.json
    features: Path  # features.geojson
    bounds: tuple[float, float, float, float]  # area (all tiles) in ``crs``: minx, miny, maxx, maxy
    crs: str  # "EPSG:32629"
    items: int
    bounds_wgs84: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    tiles: tuple[str, ...] = ()
    dates: tuple[str, ...] = ()  # ISO acquisition dates
    resolution: float = 10.0
    collection: Path | None = None
    seed: int = 0
    item_ids: tuple[str, ...] = field(default=(), repr=False)


# --------------------------------------------------------------------------------------------- helpers


def _baseline(d: date) -> str:
    b = "03.01"
    for first, name in _BASELINES:
        if d >= first:
            b = name
    return b


def _smooth_periodic(rng: np.random.Generator, shape: tuple[int, int], scale_cells: float,
                     aniso: float = 1.0) -> np.ndarray:
    """Zero-mean, unit-std periodic random field with features ≈ ``scale_cells`` cells (FFT-filtered noise)."""
    noise = rng.standard_normal(shape)
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.rfftfreq(shape[1])[None, :]
    k2 = (kx * aniso) ** 2 + (ky / aniso) ** 2
    # Gaussian low-pass plus a fractal tail so edges are not too smooth.
    kc = 1.0 / scale_cells
    filt = np.exp(-k2 / (2 * kc**2)) + 0.12 * (k2 + kc**2) ** -0.9 * kc**1.8
    filt[0, 0] = 0.0
    field_ = np.fft.irfft2(np.fft.rfft2(noise) * filt, s=shape)
    field_ -= field_.mean()
    field_ /= field_.std()
    return field_.astype(np.float32)


def _sample_periodic(tex: np.ndarray, cell: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bilinear sample of a periodic texture at world offsets ``xs`` (columns) × ``ys`` (rows), metres."""
    th, tw = tex.shape
    u = xs / cell
    v = ys / cell
    u0 = np.floor(u)
    v0 = np.floor(v)
    wu = (u - u0).astype(np.float32)
    wv = (v - v0).astype(np.float32)[:, None]
    iu0 = u0.astype(np.int64) % tw
    iv0 = v0.astype(np.int64) % th
    rows = tex[iv0] * (1 - wv) + tex[(iv0 + 1) % th] * wv
    # np.take keeps C order (``rows[:, idx]`` would not, and F-ordered fields slow every later operation).
    out = np.take(rows, iu0, axis=1)
    out *= 1 - wu
    out += np.take(rows, (iu0 + 1) % tw, axis=1) * wu
    return out


def _logistic(x: np.ndarray | float, width: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64) / width))


@dataclass
class _Scene:
    """Static scene: land-cover ids and per-id parameters over the whole area grid."""

    pid: np.ndarray  # (H, W) int32 index into the per-id tables
    cls: np.ndarray  # (n_ids,) land-cover class per id
    bright: np.ndarray  # (n_ids,) soil brightness factor
    rise: np.ndarray  # (n_ids,) green-up day (agricultural year, 0 = Oct 1)
    fall: np.ndarray  # (n_ids,) senescence day
    harvest: np.ndarray  # (n_ids,) harvest day
    gmax: np.ndarray  # (n_ids,) peak green cover
    texture: np.ndarray  # (H, W) float32 multiplicative texture (≈1)
    dark: np.ndarray  # (H, W) bool: north-facing slope (dark area in low-sun months)
    water: np.ndarray  # (H, W) bool
    noise: np.ndarray  # 1-D float32 standard-normal bank, windows of which are each date's sensor noise


def _build_scene(rng: np.random.Generator, h: int, w: int, res: float) -> _Scene:
    ys = (np.arange(h) + 0.5) * res  # metres from the top
    xs = (np.arange(w) + 0.5) * res  # metres from the left
    hm, wm = h * res, w * res
    # Parcels: horizontal bands of random height, each cut into parcels of random width (metres).
    band_edges = [0.0]
    while band_edges[-1] < hm:
        band_edges.append(band_edges[-1] + rng.uniform(180, 480))
    band_edges = np.array(band_edges)
    band_of_row = np.searchsorted(band_edges, ys, side="right") - 1
    pid = np.empty((h, w), np.int32)
    n = 0
    for b in range(len(band_edges) - 1):
        cuts = [0.0]
        while cuts[-1] < wm:
            cuts.append(cuts[-1] + rng.uniform(150, 450))
        cols = np.searchsorted(np.array(cuts), xs, side="right") - 1
        rows = band_of_row == b
        pid[rows] = (n + cols)[None, :]
        n += len(cuts) - 1
    n_parcels = n
    pcls = rng.choice([_WCROP, _SCROP, _BARE, _ORCHARD], size=n_parcels, p=[0.45, 0.22, 0.18, 0.15])

    # Tracks between parcels (1 px) when pixels are fine enough to see them.
    if res <= 20:
        edge = np.zeros((h, w), bool)
        edge[:, 1:] |= pid[:, 1:] != pid[:, :-1]
        edge[1:, :] |= pid[1:, :] != pid[:-1, :]
    else:
        edge = np.zeros((h, w), bool)

    # Forest on the north-western hills: smooth field + a gradient towards the NW corner.
    hills = _sample_periodic(_smooth_periodic(rng, (128, 128), 5.0), 120.0, xs, ys)
    nw = np.hypot(xs[None, :] / max(wm, 1), ys[:, None] / max(hm, 1))  # 0 at the NW corner
    forest = 0.35 * hills + 1.0 - 2.0 * nw > 0.3
    # A north-facing slope inside the forest: dark area (SCL 2) in the low-sun months.
    slope = _sample_periodic(_smooth_periodic(rng, (128, 128), 3.0), 40.0, xs + 777, ys + 333)
    dark = forest & (slope > 1.0)

    # Water: a reservoir (noisy ellipse) in the east and a river meandering west–east in the south.
    shore = _sample_periodic(_smooth_periodic(rng, (64, 64), 4.0), 30.0, xs + 1234, ys + 99)
    cx, cy = 0.72 * wm, 0.32 * hm
    rx, ry = max(0.11 * wm, 3 * res), max(0.14 * hm, 3 * res)
    ell = ((xs[None, :] - cx) / rx) ** 2 + ((ys[:, None] - cy) / ry) ** 2
    lake = ell + 0.18 * shore < 1.0
    river_y = 0.8 * hm + 0.05 * hm * np.sin(2 * np.pi * xs / max(0.9 * wm, 1) + rng.uniform(0, 6.28))
    river_half = max(22.0, 0.75 * res)
    river = np.abs(ys[:, None] - river_y[None, :]) < river_half
    water = lake | river

    forest_id, water_id, track_id = n_parcels, n_parcels + 1, n_parcels + 2
    pid[edge] = track_id
    pid[forest] = forest_id
    pid[water] = water_id
    cls = np.concatenate([pcls, [_FORESTC, _WATERC, _TRACK]]).astype(np.int8)
    n_ids = len(cls)
    bright = rng.uniform(0.85, 1.15, n_ids).astype(np.float32)
    bright[track_id] = 1.08
    rise = np.where(cls == _SCROP, 231.0, 110.0) + rng.uniform(-15, 15, n_ids)
    fall = np.where(cls == _SCROP, 335.0, 205.0) + rng.uniform(-10, 10, n_ids)
    harvest = np.where(cls == _SCROP, 352.0, 255.0) + rng.uniform(-12, 8, n_ids)
    gmax = rng.uniform(0.85, 1.0, n_ids)
    tex = _sample_periodic(_smooth_periodic(rng, (64, 64), 1.5), 20.0, xs + 55, ys + 11)
    texture = (1.0 + 0.035 * tex + 0.015 * rng.standard_normal((h, w), dtype=np.float32)).astype(np.float32)
    noise = rng.standard_normal(4 * h * w + 65536, dtype=np.float32)
    return _Scene(pid, cls, bright, rise, fall, harvest, gmax, texture, dark & ~water, water, noise)


def _surface_table(scene: _Scene, d: date) -> np.ndarray:
    """Per-id surface reflectance (4, n_ids) on date ``d``."""
    agri = float((d - date(d.year if d.month >= 10 else d.year - 1, 10, 1)).days)  # 0 = Oct 1
    cls = scene.cls
    wet = 1.0 - 0.12 * math.exp(-(((agri - 105.0) / 45.0) ** 2))  # wet winter soil is darker
    soil = _SOIL[:, None] * scene.bright[None, :] * wet
    # Crops: green cover between green-up and senescence; dry canopy until harvest, then stubble.
    g = scene.gmax * (_logistic(agri - scene.rise, 8.0) - _logistic(agri - scene.fall, 8.0))
    g = np.clip(g, 0.0, 1.0).astype(np.float32)
    dry_phase = (agri >= scene.fall - 10) & (agri < scene.harvest)
    after = agri >= scene.harvest
    bg = np.where(dry_phase[None, :], _DRY[:, None] * scene.bright[None, :],
                  np.where(after[None, :], _STUBBLE[:, None] * scene.bright[None, :], soil))
    crop = g[None, :] * _VEG[:, None] + (1 - g[None, :]) * bg
    orchard = 0.55 * _VEG[:, None] + 0.45 * soil
    season = 1.0 + 0.04 * math.sin(2 * math.pi * (agri - 120) / 365.0)
    forest = _FOREST[:, None] * np.array([1, 1, 1, season], np.float32)[:, None]
    table = np.where(np.isin(cls, (_WCROP, _SCROP))[None, :], crop, soil)
    table = np.where((cls == _ORCHARD)[None, :], orchard, table)
    table = np.where((cls == _FORESTC)[None, :], forest, table)
    table = np.where((cls == _WATERC)[None, :], _WATER[:, None], table)
    return table.astype(np.float32)


@dataclass(frozen=True)
class _Params:
    seed: int
    dates: tuple[date, ...]
    width: int
    height: int
    tiles: int
    res: float

    @property
    def step(self) -> int:  # column offset between neighbouring tiles
        return self.width - self.width // 4

    @property
    def area_width(self) -> int:
        return self.width + (self.tiles - 1) * self.step


def _swath_edges(p: _Params) -> list[tuple[str, float, float] | None]:
    """Per orbit (3): None (full coverage) or (side, x at the area's mid-height, dx/dy slope) of the edge."""
    x0, y0 = ORIGIN
    wa = p.area_width * p.res
    tw = p.width * p.res
    return [
        ("east", x0 + wa - 0.3 * tw, 0.22),  # valid west of the edge
        None,
        ("west", x0 + 0.3 * tw, 0.22),  # valid east of the edge
    ]


def _swath_polygon(edge: tuple[str, float, float] | None, p: _Params) -> shapely.Polygon | None:
    if edge is None:
        return None
    side, xe, s = edge
    x0, y0 = ORIGIN
    yc = y0 - p.height * p.res / 2
    big = 1e5
    ya, yb = yc - big, yc + big
    xa, xb = xe + s * (ya - yc), xe + s * (yb - yc)
    if side == "east":
        return shapely.Polygon([(xa - 3 * big, ya), (xa, ya), (xb, yb), (xb - 3 * big, yb)])
    return shapely.Polygon([(xa, ya), (xa + 3 * big, ya), (xb + 3 * big, yb), (xb, yb)])


def _swath_mask(edge: tuple[str, float, float] | None, p: _Params) -> np.ndarray | None:
    if edge is None:
        return None
    side, xe, s = edge
    x0, y0 = ORIGIN
    xc = x0 + (np.arange(p.area_width) + 0.5) * p.res
    yc_ = y0 - (np.arange(p.height) + 0.5) * p.res
    ymid = y0 - p.height * p.res / 2
    edge_x = xe + s * (yc_ - ymid)
    if side == "east":
        return xc[None, :] < edge_x[:, None]
    return xc[None, :] > edge_x[:, None]


def _cloudiness(rng: np.random.Generator, n: int) -> np.ndarray:
    u = rng.random(n)
    c = np.where(u < 0.35, rng.uniform(0.0, 0.02, n),
                 np.where(u < 0.5, rng.uniform(0.85, 1.0, n), rng.uniform(0.03, 0.35, n)))
    if n >= 4:  # make sure the series has both a clear and a nearly overcast date
        if not (c < 0.03).any():
            c[rng.integers(n)] = 0.005
        if not (c > 0.85).any():
            i = int(rng.integers(n))
            while c[i] < 0.03 and (c < 0.03).sum() == 1:
                i = (i + 1) % n
            c[i] = 0.93
    c[0] = min(c[0], 0.01)  # the first date is clear: handy for "latest pixel" demos
    return c


def _render_date(p: _Params, scene: _Scene, i: int, d: date, cloudiness: float, cloud_tex: np.ndarray,
                 cirrus_tex: np.ndarray, cirrus_sheet: bool,
                 swath: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Render one date over the whole area: DN (4, H, W) uint16 and SCL (H, W) uint8."""
    rng = np.random.default_rng([p.seed, 1, i])
    h, w, res = p.height, p.area_width, p.res
    refl = np.take(_surface_table(scene, d), scene.pid, axis=1)  # (4, H, W)
    refl *= scene.texture[None]
    # Sensor noise: a window of the scene's noise bank at a random offset (a view; cheap and independent
    # enough between dates).
    off = int(rng.integers(0, scene.noise.size - refl.size + 1))
    refl += scene.noise[off:off + refl.size].reshape(refl.shape) * _NOISE_SIGMA[:, None, None]
    agri = (d - date(d.year if d.month >= 10 else d.year - 1, 10, 1)).days
    low_sun = 45 <= agri <= 125  # mid-November to early February
    if low_sun:
        refl *= np.where(scene.dark, np.float32(0.55), np.float32(1.0))[None]
    red, nir = refl[2], refl[3]
    scl = np.where(nir - red >= 0.4 * (nir + red), np.uint8(4), np.uint8(5))  # NDVI ≥ 0.4: vegetation
    scl[scene.water] = 6
    if low_sun:
        scl[scene.dark] = 2
    u = rng.random((h, w), dtype=np.float32)
    scl[u < 0.0008] = 7

    # Clouds and shadows: the drifting periodic field, thresholded at this date's cloudiness.
    days = (d - date(2000, 1, 1)).days
    ox = days * WIND_M_PER_DAY[0]
    oy = -days * WIND_M_PER_DAY[1]  # texture rows grow southwards
    xs = (np.arange(w) + 0.5) * res
    ys = (np.arange(h) + 0.5) * res
    f = _sample_periodic(cloud_tex, _CLOUD_CELL_M, xs - ox, ys - oy)
    if cloudiness <= 0.0:
        thr = np.inf
    elif cloudiness >= 1.0:
        thr = -np.inf
    else:
        sub = f[::4, ::4].ravel()
        k = min(sub.size - 1, int((1.0 - cloudiness) * sub.size))
        thr = float(np.partition(sub, k)[k])
    z = f - np.float32(thr) if np.isfinite(thr) else np.full_like(f, -np.float32(thr))
    sdx, sdy = SHADOW_OFFSET_M
    if np.isfinite(thr):
        shadow = _sample_periodic(cloud_tex, _CLOUD_CELL_M, xs - sdx - ox, ys + sdy - oy) > thr
    else:
        shadow = np.full((h, w), thr < 0)
    refl *= np.where(shadow, np.float32(0.35), np.float32(1.0))[None]
    if (z > -0.25).any():
        alpha = np.where(z > -0.25, np.clip(0.4 + z, 0.1, 1.0), 0.0).astype(np.float32)
        bright = (0.85 + 0.3 * np.clip(z, 0.0, 1.0)).astype(np.float32)
        refl *= (1 - alpha)[None]
        refl += _CLOUD[:, None, None] * (alpha * bright)[None]
    scl[shadow] = 3
    scl[(z > -0.35) & (z <= -0.25) & (u > 0.6)] = 7  # Sen2Cor leaves some cloud fringes unclassified
    scl[(z > -0.25) & (z <= 0)] = 10
    scl[(z > 0) & (z <= 0.6)] = 8
    scl[z > 0.6] = 9
    if cirrus_sheet:
        c = _sample_periodic(cirrus_tex, _CLOUD_CELL_M, xs - 2 * ox, ys - oy)
        a = np.where((c > 0.6) & (z <= -0.25), np.clip(0.12 + 0.15 * (c - 0.6), 0.12, 0.3), 0.0)
        a = a.astype(np.float32)
        refl *= (1 - a)[None]
        refl += _CLOUD[:, None, None] * a[None]
        scl[a > 0] = 10

    refl *= np.float32(10000.0)
    refl += np.float32((1000.0 if d >= BASELINE_04_DATE else 0.0) + 0.5)  # +0.5: round on truncation
    np.clip(refl, 1, 65535, out=refl)
    dn = refl.astype(np.uint16)
    if swath is not None:
        dn *= swath[None]
        scl *= swath
    return dn, scl


def _write_cog(path: Path, arr: np.ndarray, transform: Affine, resampling: str) -> None:
    """Write a single-band COG: MEM dataset + overviews, then a GTiff copy with COPY_SRC_OVERVIEWS.

    This is the classic COG recipe (what rio-cogeo does), about twice as fast here as GDAL's COG driver.
    Fixed options, no timestamps: identical input gives identical bytes. DEFLATE level 1: the sensor noise
    makes higher levels slower for almost no gain.
    """
    h, w = arr.shape
    block = 128 if max(h, w) <= 512 else 256
    factors = []
    f = 2
    while max(h, w) / f >= block and f <= 1024:  # like the COG driver's OVERVIEWS=AUTO
        factors.append(f)
        f *= 2
    with rasterio.open(
        f"{path.name}.mem", "w", driver="MEM", width=w, height=h, count=1, dtype=arr.dtype.name,
        crs=f"EPSG:{EPSG}", transform=transform, nodata=0,
    ) as mem:
        mem.write(arr, 1)
        mem.update_tags(PIXELS_XR_SYNTHETIC="true: not real Copernicus data (pixels_xr.testing.sample)")
        if factors:
            mem.build_overviews(factors, Resampling[resampling])
        rasterio.shutil.copy(
            mem, str(path), driver="GTiff", tiled=True, blockxsize=block, blockysize=block, compress="DEFLATE",
            predictor=2, zlevel=1, copy_src_overviews=True, interleave="band", bigtiff="NO", num_threads=1,
        )


def _footprint_wgs84(poly: shapely.Polygon, res: float, tr: Transformer) -> shapely.Polygon:
    dense = shapely.segmentize(poly, max_segment_length=64 * res)
    xs, ys = np.asarray(dense.exterior.coords).T
    lon, lat = tr.transform(xs, ys)
    return orient(shapely.Polygon(np.round(np.column_stack([lon, lat]), 8)), 1.0)


def _percent(n: int, d: int) -> float:
    return round(100.0 * n / d, 6) if d else 0.0


def _item(p: _Params, tile: str, d: date, i: int, k: int, scl: np.ndarray, footprint: shapely.Polygon,
          transform: Affine, asset_dir: Path) -> pystac.Item:
    plat = "sentinel-2a" if i % 2 == 0 else "sentinel-2b"
    sat = plat[-1].upper()
    ymd = d.strftime("%Y%m%d")
    item_id = f"S2{sat}_{tile}_{ymd}_0_L2A"
    baseline = _baseline(d)
    acq = datetime(d.year, d.month, d.day, 11, 23, 10, tzinfo=UTC) + timedelta(seconds=4.123 * k + 0.5 * (i % 7))
    made = datetime(d.year, d.month, d.day, 14, 5, 21, tzinfo=UTC)
    stamp = (made + timedelta(hours=12)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    counts = np.bincount(scl.ravel(), minlength=12)
    total = int(scl.size)
    valid = total - int(counts[0])
    cloudy = int(sum(counts[c] for c in SCL_CLOUDY))
    orbit = ("R037", "R080", "R123")[i % 3]
    n_base = "N" + baseline.replace(".", "")
    gen = made.strftime("%Y%m%dT%H%M%S")
    props: dict[str, Any] = {
        "created": stamp,
        "platform": plat,
        "constellation": "sentinel-2",
        "instruments": ["msi"],
        "eo:cloud_cover": _percent(cloudy, valid),
        "proj:epsg": EPSG,
        "mgrs:utm_zone": UTM_ZONE,
        "mgrs:latitude_band": LATITUDE_BAND,
        "mgrs:grid_square": tile[3:],
        "grid:code": f"MGRS-{tile}",
        "s2:degraded_msi_data_percentage": 0,
        "s2:nodata_pixel_percentage": _percent(int(counts[0]), total),
        "s2:saturated_defective_pixel_percentage": _percent(int(counts[1]), valid),
        "s2:dark_features_percentage": _percent(int(counts[2]), valid),
        "s2:cloud_shadow_percentage": _percent(int(counts[3]), valid),
        "s2:vegetation_percentage": _percent(int(counts[4]), valid),
        "s2:not_vegetated_percentage": _percent(int(counts[5]), valid),
        "s2:water_percentage": _percent(int(counts[6]), valid),
        "s2:unclassified_percentage": _percent(int(counts[7]), valid),
        "s2:medium_proba_clouds_percentage": _percent(int(counts[8]), valid),
        "s2:high_proba_clouds_percentage": _percent(int(counts[9]), valid),
        "s2:thin_cirrus_percentage": _percent(int(counts[10]), valid),
        "s2:snow_ice_percentage": _percent(int(counts[11]), valid),
        "s2:product_type": "S2MSI2A",
        "s2:processing_baseline": baseline,
        "s2:product_uri": f"S2{sat}_MSIL2A_{ymd}T112121_{n_base}_{orbit}_T{tile}_{gen}.SAFE",
        "s2:generation_time": made.strftime("%Y-%m-%dT%H:%M:%S.000000Z"),
        "s2:datatake_id": f"GS2{sat}_{ymd}T112121_{30000 + i:06d}_{n_base[0]}{baseline}",
        "s2:datatake_type": "INS-NOBS",
        "s2:sequence": "0",
        "earthsearch:boa_offset_applied": d >= BASELINE_04_DATE,
        "processing:software": {"pixels_xr.testing.sample": "1"},
        "pixels_xr:synthetic": True,
        "pixels_xr:sample_seed": p.seed,
        "updated": stamp,
    }
    geom = mapping(footprint)
    item = pystac.Item(
        id=item_id, geometry=json.loads(json.dumps(geom)), bbox=[round(v, 8) for v in footprint.bounds],
        datetime=acq, properties=props, stac_extensions=list(_STAC_EXTENSIONS), collection=COLLECTION_ID,
    )
    offset = -0.1 if d >= BASELINE_04_DATE else 0
    shape = [p.height, p.width]
    tr = [transform.a, transform.b, transform.c, transform.d, transform.e, transform.f]
    res = int(p.res) if float(p.res).is_integer() else p.res
    for key in BANDS:
        name, desc, cw, fwhm = _EO_BANDS[key]
        item.add_asset(key, pystac.Asset(
            href=str(asset_dir / f"{key}.tif"), media_type=_MEDIA_TYPE,
            title=f"{desc} - {res}m", roles=["data", "reflectance"],
            extra_fields={
                "eo:bands": [{"name": key, "common_name": key, "description": desc,
                              "center_wavelength": cw, "full_width_half_max": fwhm}],
                "gsd": res, "proj:shape": shape, "proj:transform": tr,
                "raster:bands": [{"nodata": 0, "data_type": "uint16", "bits_per_sample": 15,
                                  "spatial_resolution": res, "scale": 0.0001, "offset": offset}],
            }))
    item.add_asset("scl", pystac.Asset(
        href=str(asset_dir / "scl.tif"), media_type=_MEDIA_TYPE, title="Scene classification map (SCL)",
        roles=["data", "reflectance"],
        extra_fields={"proj:shape": shape, "proj:transform": tr,
                      "raster:bands": [{"nodata": 0, "data_type": "uint8", "spatial_resolution": res}]}))
    return item


def _features(p: _Params, scene: _Scene, dates: Sequence[date], tr: Transformer) -> dict[str, Any]:
    """~6 test polygons in EPSG:4326 (see the module docstring) with ``id`` and ``date``."""
    x0, y0 = ORIGIN
    res, h, wa, w = p.res, p.height, p.area_width, p.width

    def px(c: float, r: float) -> tuple[float, float]:  # area pixel (col, row) → UTM
        return (x0 + c * res, y0 - r * res)

    def date_at(frac: float) -> str:
        return dates[min(len(dates) - 1, int(frac * (len(dates) - 1)))].isoformat()

    polys: list[tuple[str, shapely.Polygon, str, float]] = []
    # field-1: a winter-crop parcel of the west tile, inset by one pixel.
    best = None
    for pid_ in np.unique(scene.pid[:, : max(1, p.step if p.tiles > 1 else w)]):
        if scene.cls[pid_] != _WCROP:
            continue
        rr, cc = np.nonzero(scene.pid == pid_)
        if rr.min() < 2 or cc.min() < 2 or rr.max() > h - 3 or cc.max() >= (p.step if p.tiles > 1 else w) - 2:
            continue
        size = (rr.max() - rr.min()) * (cc.max() - cc.min())
        if best is None or size > best[0]:
            best = (size, rr.min(), rr.max(), cc.min(), cc.max())
    if best is not None:
        _, r0, r1, c0, c1 = best
        poly = box(*px(c0 + 1, r1), *px(c1, r0 + 1))
    else:
        poly = box(*px(0.1 * w, 0.3 * h), *px(0.25 * w, 0.15 * h))
    polys.append(("field-1", poly, "a winter-cereal parcel in the west tile", 0.45))
    # field-2: large irregular polygon in the west part (forest, parcels).
    polys.append(("field-2", shapely.Polygon([px(0.08 * w, 0.08 * h), px(0.55 * w, 0.05 * h),
                                              px(0.62 * w, 0.45 * h), px(0.3 * w, 0.6 * h),
                                              px(0.05 * w, 0.42 * h)]), "large, mixed land cover", 0.7))
    # field-3: crosses the tile overlap (from west-only through shared to east-only columns).
    ca, cb = (p.step - 0.12 * w, w + 0.12 * w) if p.tiles > 1 else (0.35 * w, 0.7 * w)
    polys.append(("field-3", shapely.Polygon([px(ca, 0.52 * h), px(cb, 0.5 * h), px(cb + 0.03 * w, 0.68 * h),
                                              px(ca + 0.02 * w, 0.7 * h)]), "crosses the tile overlap", 0.3))
    # field-4: partly outside the data (beyond the area's north-east corner).
    polys.append(("field-4", box(*px(wa - 0.15 * w, 0.15 * h), *px(wa + 0.1 * w, -0.1 * h)),
                  "partly outside the data", 0.85))
    # field-5: small (a few pixels), not aligned to the grid.
    cx, cy = px(0.4 * w + 0.37, 0.3 * h + 0.61)
    polys.append(("field-5", shapely.Polygon([(cx, cy), (cx + 2.6 * res, cy + 0.4 * res),
                                              (cx + 2.2 * res, cy - 2.5 * res), (cx - 0.3 * res, cy - 2.2 * res)]),
                  "small: a few pixels", 0.55))
    # field-6: the reservoir shore (water and land).
    polys.append(("field-6", box(*px(0.72 * wa - 0.02 * w, 0.32 * h + 0.08 * h),
                                 *px(0.72 * wa + 0.25 * w, 0.32 * h - 0.12 * h)), "reservoir shore", 0.2))
    feats = []
    for fid, poly, note, frac in polys:
        geo = _footprint_wgs84(orient(poly, 1.0), res, tr)
        feats.append({"type": "Feature", "id": fid,
                      "properties": {"id": fid, "date": date_at(frac), "description": note},
                      "geometry": mapping(geo)})
    return {"type": "FeatureCollection", "name": "pixels_xr synthetic sample features", "features": feats}


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise PixelsError(msg, where=f"sample.{where}")


# ------------------------------------------------------------------------------------------------- API


def make_sample(out_dir: str | Path, *, seed: int = 0, n_dates: int = 36, start: str = "2021-11-03",
                every_days: int = 10, width: int = 256, height: int = 256, tiles: int = 2,
                resolution: float = 10.0, workers: int = 2) -> SampleInfo:
    """Write a synthetic Sentinel-2 L2A catalog (COGs + static STAC + features) into ``out_dir``.

    Deterministic: the same arguments give byte-identical files. Existing files of an earlier sample in
    ``out_dir`` are overwritten; files of items the new sample does not have are left alone (unlinked).
    ``workers`` threads write COGs while the next date renders (no effect on the output).
    """
    _check(n_dates >= 1, "n_dates", f"must be ≥ 1, got {n_dates}")
    _check(every_days >= 1, "every_days", f"must be ≥ 1, got {every_days}")
    _check(16 <= width <= 20000, "width", f"must be within 16..20000 pixels, got {width}")
    _check(16 <= height <= 20000, "height", f"must be within 16..20000 pixels, got {height}")
    _check(1 <= tiles <= len(_TILE_COLUMNS), "tiles", f"must be within 1..{len(_TILE_COLUMNS)}, got {tiles}")
    _check(resolution > 0 and math.isfinite(resolution), "resolution", f"must be > 0, got {resolution}")
    try:
        d0 = date.fromisoformat(str(start))
    except ValueError:
        raise PixelsError(f"not an ISO date (YYYY-MM-DD): {start!r}", where="sample.start") from None
    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    dates = tuple(d0 + timedelta(days=every_days * i) for i in range(n_dates))
    p = _Params(seed=int(seed), dates=dates, width=int(width), height=int(height), tiles=int(tiles),
                res=float(resolution))
    rng = np.random.default_rng([p.seed, 0])
    scene = _build_scene(rng, p.height, p.area_width, p.res)
    cloud_tex = _smooth_periodic(rng, (_CLOUD_TEX, _CLOUD_TEX), 10.0)
    cirrus_tex = _smooth_periodic(rng, (_CLOUD_TEX, _CLOUD_TEX), 10.0, aniso=2.5)
    cloudiness = _cloudiness(rng, n_dates)
    cirrus_dates = rng.random(n_dates) < 0.15
    edges = _swath_edges(p)
    masks = [_swath_mask(e, p) for e in edges]
    swaths = [_swath_polygon(e, p) for e in edges]
    to_wgs84 = Transformer.from_crs(EPSG, 4326, always_xy=True)

    x0, y0 = ORIGIN
    tile_names = [f"{UTM_ZONE}{LATITUDE_BAND}{_TILE_COLUMNS[k]}{_ROW_LETTER}" for k in range(p.tiles)]
    tile_cols = [k * p.step for k in range(p.tiles)]
    tile_tr = [Affine(p.res, 0, x0 + c * p.res, 0, -p.res, y0) for c in tile_cols]
    tile_box = [box(x0 + c * p.res, y0 - p.height * p.res, x0 + (c + p.width) * p.res, y0) for c in tile_cols]

    items: list[pystac.Item] = []
    pending = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, d in enumerate(dates):
            orbit = i % 3
            dn, scl = _render_date(p, scene, i, d, float(cloudiness[i]), cloud_tex, cirrus_tex,
                                   bool(cirrus_dates[i]), masks[orbit])
            for k, tile in enumerate(tile_names):
                c = tile_cols[k]
                tscl = np.ascontiguousarray(scl[:, c:c + p.width])
                foot = tile_box[k] if swaths[orbit] is None else tile_box[k].intersection(swaths[orbit])
                item_id_dir = root / tile / f"S2{'A' if i % 2 == 0 else 'B'}_{tile}_{d:%Y%m%d}_0_L2A"
                item_id_dir.mkdir(parents=True, exist_ok=True)
                for b, key in enumerate(BANDS):
                    arr = np.ascontiguousarray(dn[b, :, c:c + p.width])
                    pending.append(pool.submit(_write_cog, item_id_dir / f"{key}.tif", arr, tile_tr[k], "average"))
                pending.append(pool.submit(_write_cog, item_id_dir / "scl.tif", tscl, tile_tr[k], "nearest"))
                items.append(_item(p, tile, d, i, k, tscl, _footprint_wgs84(foot, p.res, to_wgs84),
                                   tile_tr[k], item_id_dir))
            # Bound memory: wait for the previous date's writes before rendering further ahead.
            while len(pending) > 2 * 5 * p.tiles:
                pending.pop(0).result()
        for fut in pending:
            fut.result()

    area = box(x0, y0 - p.height * p.res, x0 + p.area_width * p.res, y0)
    area_wgs84 = _footprint_wgs84(area, p.res, to_wgs84)
    t_first = min(it.datetime for it in items)  # type: ignore[type-var]
    t_last = max(it.datetime for it in items)  # type: ignore[type-var]
    catalog = pystac.Catalog(
        id="pixels-xr-sample", title="pixels_xr synthetic Sentinel-2 L2A sample (SYNTHETIC)",
        description=_SYNTHETIC_NOTE + f" seed={p.seed}.",
    )
    collection = pystac.Collection(
        id=COLLECTION_ID, title="Sentinel-2 Level-2A (SYNTHETIC sample, pixels_xr)",
        description=_SYNTHETIC_NOTE + " Same collection id, asset keys and item properties as Earth Search "
        "v1 sentinel-2-l2a; all assets on one grid at the sample's resolution.",
        extent=pystac.Extent(pystac.SpatialExtent([[round(float(v), 8) for v in area_wgs84.bounds]]),
                             pystac.TemporalExtent([[t_first, t_last]])),
        license="CC0-1.0", keywords=["sentinel-2", "l2a", "synthetic", "pixels_xr"],
        providers=[pystac.Provider(name="pixels_xr.testing.sample (synthetic)", roles=[pystac.ProviderRole.PRODUCER])],
        summaries=pystac.Summaries({"platform": ["sentinel-2a", "sentinel-2b"], "constellation": ["sentinel-2"],
                                    "instruments": ["msi"], "gsd": [p.res], "proj:epsg": [EPSG]}),
        extra_fields={"pixels_xr:synthetic": True},
    )
    catalog.add_child(collection)
    collection.add_items(items)

    def item_href(item: pystac.Item, parent_dir: str) -> str:
        tile = item.properties["grid:code"].split("-")[1]
        return str(root / tile / item.id / f"{item.id}.json")

    strategy = CustomLayoutStrategy(
        catalog_func=lambda cat, parent_dir, is_root: str(root / "catalog.json"),
        collection_func=lambda col, parent_dir, is_root: str(root / COLLECTION_ID / "collection.json"),
        item_func=item_href,
    )
    catalog.normalize_hrefs(str(root), strategy=strategy)
    catalog.make_all_asset_hrefs_relative()
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)

    fc = _features(p, scene, dates, to_wgs84)
    features_path = root / "features.geojson"
    features_path.write_text(json.dumps(fc, indent=1) + "\n")
    (root / "README.txt").write_text(
        _SYNTHETIC_NOTE + "\n\n"
        f"Generated by pixels_xr.testing.sample.make_sample(seed={p.seed}, n_dates={n_dates}, start={d0.isoformat()!r}, "
        f"every_days={every_days}, width={p.width}, height={p.height}, tiles={p.tiles}, resolution={p.res}).\n"
        f"Area: EPSG:{EPSG} {area.bounds}; tiles {', '.join(tile_names)}; {len(items)} items.\n"
        "Layout: catalog.json, sentinel-2-l2a/collection.json, <tile>/<item_id>/<item_id>.json and "
        "<asset>.tif (blue, green, red, nir, scl), features.geojson.\n"
    )
    return SampleInfo(
        root=root, catalog=root / "catalog.json", features=features_path,
        bounds=tuple(float(v) for v in area.bounds),  # type: ignore[arg-type]
        crs=f"EPSG:{EPSG}", items=len(items),
        bounds_wgs84=tuple(float(v) for v in np.round(area_wgs84.bounds, 8)),  # type: ignore[arg-type]
        tiles=tuple(tile_names), dates=tuple(x.isoformat() for x in dates), resolution=p.res,
        collection=root / COLLECTION_ID / "collection.json", seed=p.seed,
        item_ids=tuple(it.id for it in items),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pixels_xr.testing.sample DIR [options]``: write a synthetic sample and print a summary."""
    ap = argparse.ArgumentParser(prog="python -m pixels_xr.testing.sample", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", help="output directory (created)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-dates", type=int, default=36)
    ap.add_argument("--start", default="2021-11-03", help="first acquisition date (ISO)")
    ap.add_argument("--every-days", type=int, default=10)
    ap.add_argument("--width", type=int, default=256, help="tile width in pixels")
    ap.add_argument("--height", type=int, default=256, help="tile height in pixels")
    ap.add_argument("--tiles", type=int, default=2, help="tiles side by side, west to east (1..5)")
    ap.add_argument("--resolution", type=float, default=10.0, help="pixel size in metres")
    a = ap.parse_args(argv)
    try:
        info = make_sample(a.out_dir, seed=a.seed, n_dates=a.n_dates, start=a.start, every_days=a.every_days,
                           width=a.width, height=a.height, tiles=a.tiles, resolution=a.resolution)
    except PixelsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {info.items} items ({len(info.tiles)} tiles × {len(info.dates)} dates, "
          f"{info.dates[0]}..{info.dates[-1]}) to {info.root}")
    print(f"catalog: {info.catalog}\nfeatures: {info.features}\nbounds ({info.crs}): {info.bounds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
