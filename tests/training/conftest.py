"""Real Sentinel-2 reflectance written as COGs with a STAC item at a made-up place, and labels from its mask.

``../shared/data/ml/ukis_csmask_sentinel2_512x512x6.npz`` holds real S2 reflectance (512 × 512 × 6: blue,
green, red, nir, swir16, swir22) and its real cloud/shadow mask, but no georeference. The fixture places it
at a MADE-UP location — UTM zone 29N (EPSG:32629), upper-left corner x = 600000, y = 4100000, 10 m pixels
(over southern Portugal, about 37.0° N 7.9° W; not where the scene was taken) — and a made-up date,
2020-06-01, as uint16 DN = reflectance × 10000 (processing baseline before 04.00: no offset) in one
Earth Search v1 style item (``raster:bands`` scale 1e-4). The item and the COGs say it is placed there
(``pixels_xr:made_up_location``). Labels are drawn from the real mask: value 3 → ``clear``, 4 → ``cloud``,
0 and 1 → ``other`` (as tests/inference reads the same mask).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

BANDS = ["blue", "green", "red", "nir", "swir16", "swir22"]
EPSG = 32629
ORIGIN = (600000.0, 4100000.0)
RES = 10.0
DATE = "2020-06-01"
CLASSES = {"clear": (3,), "cloud": (4,), "other": (0, 1)}


@dataclass(frozen=True)
class MlScene:
    catalog: Path  # a FeatureCollection of the one item (a local catalog)
    labels: Path  # GeoJSON points and small squares, class from the mask
    classes: np.ndarray  # (512, 512) class index per pixel (order of CLASSES)
    img: np.ndarray  # (512, 512, 6) reflectance as the COGs hold it (DN × 1e-4)

    def config(self, **extra) -> dict:
        return {"start": DATE, "end": DATE, "mode": "all", "platforms": "SENTINEL_2", "bands": BANDS,
                "scale": RES, "mask": "none", "catalog": str(self.catalog), **extra}


def write_scene(npz: Path, out: Path, *, points: int = 700, squares: int = 90, seed: int = 3) -> MlScene:
    """The COGs, the item catalog and the labels in ``out``."""
    z = np.load(npz)
    dn = np.clip(np.rint(z["img"] * 10000), 1, 65535).astype(np.uint16)  # (y, x, band); 0 stays nodata
    mask = z["msk"][..., 0]
    classes = np.full(mask.shape, -1, np.int16)
    for k, values in enumerate(CLASSES.values()):
        classes[np.isin(mask, values)] = k
    h, w = mask.shape
    transform = from_origin(*ORIGIN, RES, RES)
    out.mkdir(parents=True, exist_ok=True)
    assets = {}
    for b, name in enumerate(BANDS):
        path = out / f"{name}.tif"
        with rasterio.open(path, "w", driver="COG", width=w, height=h, count=1, dtype="uint16", crs=f"EPSG:{EPSG}",
                           transform=transform, nodata=0, blocksize=256, compress="DEFLATE") as dst:
            dst.write(dn[..., b], 1)
            dst.update_tags(PIXELS_XR_MADE_UP_LOCATION="real ukis-csmask S2 pixels at a made-up place and date")
        assets[name] = {"href": str(path), "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                        "roles": ["data", "reflectance"], "eo:bands": [{"name": name, "common_name": name}],
                        "proj:shape": [h, w], "proj:transform": list(transform)[:6],
                        "raster:bands": [{"nodata": 0, "data_type": "uint16", "scale": 0.0001, "offset": 0}]}
    x0, y0 = ORIGIN
    x1, y1 = x0 + w * RES, y0 - h * RES
    from pyproj import Transformer

    tr = Transformer.from_crs(EPSG, 4326, always_xy=True)
    ring = [list(tr.transform(x, y)) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]
    lons, lats = zip(*ring)
    item = {"type": "Feature", "stac_version": "1.0.0", "id": "S2_ukis_csmask_madeup_20200601",
            "collection": "sentinel-2-l2a", "bbox": [min(lons), min(lats), max(lons), max(lats)],
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"datetime": f"{DATE}T11:00:00Z", "platform": "sentinel-2a", "constellation": "sentinel-2",
                           "eo:cloud_cover": round(100 * float((classes == 1).mean()), 2), "proj:epsg": EPSG,
                           "s2:processing_baseline": "02.14", "earthsearch:boa_offset_applied": False,
                           "pixels_xr:made_up_location": True},
            "links": [], "assets": assets}
    catalog = out / "items.json"
    catalog.write_text(json.dumps({"type": "FeatureCollection", "features": [item]}))
    labels = out / "labels.geojson"
    labels.write_text(json.dumps(draw_labels(classes, transform, points=points, squares=squares, seed=seed)))
    return MlScene(catalog, labels, classes, dn.astype(np.float32) * np.float32(1e-4))


def draw_labels(classes: np.ndarray, transform, *, points: int, squares: int, seed: int) -> dict:
    """Points at random pixels and 4 × 4-pixel squares where the mask is one class, labelled from it."""
    rng = np.random.default_rng(seed)
    names = list(CLASSES)
    h, w = classes.shape
    feats = []
    for k in range(points):
        r, c = rng.integers(0, h), rng.integers(0, w)
        x, y = transform * (c + 0.5, r + 0.5)
        feats.append({"type": "Feature", "id": f"p{k}", "geometry": {"type": "Point", "coordinates": [x, y]},
                      "properties": {"class": names[classes[r, c]]}})
    made = 0
    while made < squares:
        r, c = rng.integers(0, h - 4), rng.integers(0, w - 4)
        window = classes[r:r + 4, c:c + 4]
        if (window != window[0, 0]).any():
            continue
        (x0, y0), (x1, y1) = transform * (c, r), transform * (c + 4, r + 4)
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        feats.append({"type": "Feature", "id": f"s{made}", "geometry": {"type": "Polygon", "coordinates": [ring]},
                      "properties": {"class": names[window[0, 0]], "weight": 2.0}})
        made += 1
    return {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": f"EPSG:{EPSG}"}},
            "features": feats}


@pytest.fixture(scope="session")
def ml_scene(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> MlScene:
    return write_scene(shared_data / "ml" / "ukis_csmask_sentinel2_512x512x6.npz", tmp_path_factory.mktemp("ml"))
