"""Tests of the synthetic Sentinel-2 L2A sample generator (pixels_xr.testing.sample)."""

from __future__ import annotations

import hashlib
import json
import re
import urllib.request
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pystac
import pystac.validation
import pytest
import rasterio
import shapely
from shapely.geometry import shape

from pixels_xr.errors import PixelsError
from pixels_xr.testing.sample import BASELINE_04_DATE, EPSG, ORIGIN, SCL_CLOUDY, SampleInfo, main, make_sample

ID_RE = re.compile(r"^S2[AB]_29R[M-R]P_\d{8}_0_L2A$")


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleInfo:
    """The default sample (36 dates × 2 tiles), generated once for this module."""
    return make_sample(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="module")
def items(sample: SampleInfo) -> list[dict]:
    """Raw item JSON (as written: no pystac migration), with the item directory under ``_dir``."""
    out = []
    col = json.loads(sample.collection.read_text())
    for link in col["links"]:
        if link["rel"] == "item":
            path = (sample.collection.parent / link["href"]).resolve()
            d = json.loads(path.read_text())
            d["_dir"] = path.parent
            out.append(d)
    return out


def _read(item: dict, key: str) -> np.ndarray:
    with rasterio.open(item["_dir"] / item["assets"][key]["href"]) as src:
        return src.read(1)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_bytes_and_cli(tmp_path: Path) -> None:
    kw = dict(seed=3, n_dates=5, width=96, height=80, start="2022-01-05")
    a = make_sample(tmp_path / "a", **kw)  # type: ignore[arg-type]
    assert main([str(tmp_path / "b"), "--seed", "3", "--n-dates", "5", "--width", "96", "--height", "80",
                 "--start", "2022-01-05"]) == 0
    da, db = _tree_digest(a.root), _tree_digest(tmp_path / "b")
    assert len(da) == 1 + 1 + 1 + 1 + a.items * 6  # catalog, collection, features, README, items × (json + 5 tif)
    assert da == db
    c = make_sample(tmp_path / "c", **{**kw, "seed": 4})  # type: ignore[arg-type]
    dc = _tree_digest(c.root)
    tifs = [k for k in da if k.endswith(".tif")]
    assert all(da[k] != dc[k] for k in tifs if k.endswith("red.tif"))


def test_info_and_layout(sample: SampleInfo, items: list[dict]) -> None:
    assert sample.crs == f"EPSG:{EPSG}"
    assert sample.items == len(items) == 72
    assert sample.tiles == ("29RMP", "29RNP")
    assert sample.catalog.name == "catalog.json" and sample.catalog.is_file()
    assert sample.features.is_file()
    assert "SYNTHETIC" in (sample.root / "README.txt").read_text()
    minx, miny, maxx, maxy = sample.bounds
    assert (minx, maxy) == ORIGIN
    # Grid phase: on 10 m but deliberately not on a 20 m / 60 m lattice.
    assert minx % 10 == 0 and minx % 20 != 0 and minx % 60 != 0 and maxy % 20 != 0
    for it in items:
        assert ID_RE.match(it["id"]), it["id"]
        tile = it["id"].split("_")[1]
        assert it["_dir"] == sample.root / tile / it["id"]
        assert sorted(it["assets"]) == ["blue", "green", "nir", "red", "scl"]
        for a in it["assets"].values():
            assert not a["href"].startswith("/") and (it["_dir"] / a["href"]).is_file()


def test_catalog_reads_with_pystac_and_validates(sample: SampleInfo) -> None:
    cat = pystac.Catalog.from_file(str(sample.catalog))
    assert "SYNTHETIC" in cat.description
    cols = list(cat.get_children())
    assert [c.id for c in cols] == ["sentinel-2-l2a"] and isinstance(cols[0], pystac.Collection)
    col = cols[0]
    assert "SYNTHETIC" in col.description
    got = list(col.get_items())
    assert len(got) == sample.items
    ext = col.extent
    assert ext.temporal.intervals[0][0] == min(i.datetime for i in got)
    assert ext.temporal.intervals[0][1] == max(i.datetime for i in got)
    box_ = shapely.box(*ext.spatial.bboxes[0])
    for it in got:
        assert it.properties["pixels_xr:synthetic"] is True
        assert box_.buffer(1e-7).contains(shape(it.geometry))
        assert it.get_collection() is col
    # JSON-schema validation of the STAC core (pystac ships the core schemas: works offline).
    pystac.validation.validate_dict(cat.to_dict(include_self_link=False))
    pystac.validation.validate_dict({**col.to_dict(include_self_link=False), "stac_extensions": []})
    for it in got[:8]:
        d = it.to_dict(include_self_link=False)
        d["stac_extensions"] = []
        pystac.validation.validate_dict(d)


def _schemas_reachable() -> bool:
    try:
        urllib.request.urlopen("https://stac-extensions.github.io/eo/v1.1.0/schema.json", timeout=3)
        return True
    except Exception:
        return False


def test_validate_all_with_extension_schemas(sample: SampleInfo) -> None:
    if not _schemas_reachable():
        pytest.skip("STAC extension schemas are not reachable offline; core schemas are checked elsewhere")
    pystac.Catalog.from_file(str(sample.catalog)).validate_all()


def test_item_properties_look_like_earth_search_v1(items: list[dict]) -> None:
    for it in items:
        p = it["properties"]
        d = datetime.fromisoformat(p["datetime"].replace("Z", "+00:00")).date()
        assert p["platform"] == ("sentinel-2a" if it["id"].startswith("S2A") else "sentinel-2b")
        assert p["constellation"] == "sentinel-2" and p["instruments"] == ["msi"]
        assert p["proj:epsg"] == EPSG and "proj:code" not in p
        assert p["mgrs:utm_zone"] == 29 and p["mgrs:latitude_band"] == "R"
        assert p["mgrs:grid_square"] == it["id"].split("_")[1][3:]
        post = d >= BASELINE_04_DATE
        assert p["s2:processing_baseline"] == ("04.00" if post else "03.01")
        assert p["earthsearch:boa_offset_applied"] is post
        assert 0 <= p["eo:cloud_cover"] <= 100
        assert len(it["bbox"]) == 4 and it["geometry"]["type"] == "Polygon"
        for key in ("blue", "green", "red", "nir"):
            a = it["assets"][key]
            rb = a["raster:bands"][0]
            assert rb["nodata"] == 0 and rb["data_type"] == "uint16" and rb["scale"] == 0.0001
            assert rb["offset"] == (-0.1 if post else 0)
            assert a["eo:bands"][0]["common_name"] == key
            assert a["proj:shape"] == [256, 256] and a["proj:transform"][0] == 10
            assert "data" in a["roles"]
        assert it["assets"]["scl"]["raster:bands"][0] == {"nodata": 0, "data_type": "uint8",
                                                           "spatial_resolution": 10}
    # Same-day multi-tile; platforms alternate by date; baseline switch inside the default range.
    by_day: dict[str, set[str]] = {}
    for it in items:
        by_day.setdefault(it["properties"]["datetime"][:10], set()).add(it["id"].split("_")[1])
    assert len(by_day) == 36 and all(v == {"29RMP", "29RNP"} for v in by_day.values())
    days = sorted(by_day)
    plats = {it["properties"]["datetime"][:10]: it["properties"]["platform"] for it in items}
    assert [plats[d] for d in days[:4]] == ["sentinel-2a", "sentinel-2b"] * 2
    assert days[0] < BASELINE_04_DATE.isoformat() <= days[-1]


def test_cloud_cover_is_computed_from_scl(items: list[dict]) -> None:
    covers = []
    for it in items:
        scl = _read(it, "scl")
        valid = scl != 0
        expect = 100.0 * np.isin(scl[valid], SCL_CLOUDY).sum() / valid.sum()
        assert it["properties"]["eo:cloud_cover"] == pytest.approx(expect, abs=1e-5)
        assert it["properties"]["s2:nodata_pixel_percentage"] == pytest.approx(100 * (~valid).mean(), abs=1e-5)
        covers.append(expect)
    covers = np.array(covers)
    assert (covers < 5).sum() >= 4, "some dates must be nearly clear"
    assert (covers > 90).sum() >= 1, "some dates must be nearly overcast"
    assert ((covers > 10) & (covers < 80)).sum() >= 4, "and some partly cloudy"


def test_baseline_offset_in_dn(items: list[dict]) -> None:
    pre, post = [], []
    for it in items:
        if it["properties"]["eo:cloud_cover"] > 20:
            continue
        scl, red, nir = _read(it, "scl"), _read(it, "red"), _read(it, "nir")
        off = 1000 if it["properties"]["s2:processing_baseline"] >= "04.00" else 0
        r, n = red.astype(float) - off, nir.astype(float) - off
        veg = (scl == 4) & ((n - r) > 0.75 * (n + r))  # dense vegetation: NDVI > 0.75
        if veg.sum() < 500:
            continue
        (post if off else pre).append((np.median(red[veg]), np.median(nir[veg])))
        assert np.median(nir[scl == 6]) - off < 400  # water: dark in NIR
    assert pre and post
    pre_red = np.median([r for r, _ in pre])
    post_red = np.median([r for r, _ in post])
    assert 250 <= pre_red <= 500  # clear dense vegetation: red ρ ≈ 0.03–0.04
    assert 1250 <= post_red <= 1500  # the same + 1000 from baseline 04.00 on
    assert 850 <= post_red - pre_red <= 1150
    assert all(n - r > 1500 for r, n in pre + post)  # vegetation: NIR ≫ red


def test_assets_are_valid_cogs(items: list[dict]) -> None:
    from rio_cogeo.cogeo import cog_validate

    for it in items[:6] + items[-2:]:
        for key, a in it["assets"].items():
            path = it["_dir"] / a["href"]
            ok, errors, _warnings = cog_validate(str(path), quiet=True)
            assert ok, (path, errors)
            with rasterio.open(path) as src:
                assert src.crs.to_epsg() == EPSG and src.nodata == 0
                assert src.dtypes[0] == ("uint8" if key == "scl" else "uint16")
                assert list(src.transform)[:6] == a["proj:transform"]
                assert [src.height, src.width] == a["proj:shape"]
                assert src.overviews(1), "COG has overviews"
                assert src.profile["compress"].lower() == "deflate"
                assert src.tags()["PIXELS_XR_SYNTHETIC"].startswith("true")


def test_features_inside_the_data(sample: SampleInfo, items: list[dict]) -> None:
    fc = json.loads(sample.features.read_text())
    feats = {f["properties"]["id"]: f for f in fc["features"]}
    assert len(feats) >= 6 and all(re.match(r"^field-\d+$", k) for k in feats)
    union = shapely.union_all([shape(it["geometry"]) for it in items])
    first, last = sample.dates[0], sample.dates[-1]
    for fid, f in feats.items():
        g = shape(f["geometry"])
        assert g.is_valid and g.geom_type == "Polygon"
        assert first <= f["properties"]["date"] <= last
        date.fromisoformat(f["properties"]["date"])
        if fid == "field-4":
            assert g.intersects(union) and not union.contains(g), "field-4 is partly outside the data"
        else:
            assert union.contains(g), fid
    # field-3 crosses the tile overlap: it reaches columns only the west tile and only the east tile has.
    west = shape(next(it for it in items if "29RMP" in it["id"] and it["properties"]["s2:nodata_pixel_percentage"] == 0)["geometry"])
    east = shape(next(it for it in items if "29RNP" in it["id"] and it["properties"]["s2:nodata_pixel_percentage"] == 0)["geometry"])
    g3 = shape(feats["field-3"]["geometry"])
    assert g3.difference(east).area > 0 and g3.difference(west).area > 0 and g3.intersects(west & east)
    areas = {k: shape(f["geometry"]).area for k, f in feats.items()}
    assert min(areas, key=areas.get) == "field-5"  # type: ignore[arg-type]
    assert max(areas, key=areas.get) == "field-2"  # type: ignore[arg-type]


def test_clouds_move_pixels_cloudy_on_some_dates_clear_on_others(items: list[dict]) -> None:
    west = sorted((it for it in items if "29RMP" in it["id"]), key=lambda i: i["properties"]["datetime"])
    scl = np.stack([_read(it, "scl") for it in west])
    cloudy = np.isin(scl, (8, 9, 10)).sum(0)
    clear = np.isin(scl, (4, 5, 6)).sum(0)
    both = (cloudy > 0) & (clear > 0)
    assert both.mean() > 0.95
    assert (np.isin(scl, (3,)).sum(0) > 0).mean() > 0.5  # shadows are common too
    # Clouds move: the cloud masks of consecutive partly cloudy dates differ.
    partly = [i for i, it in enumerate(west) if 20 < it["properties"]["eo:cloud_cover"] < 80]
    masks = [np.isin(scl[i], (8, 9)) for i in partly]
    iou = [(a & b).sum() / max(1, (a | b).sum()) for a, b in zip(masks, masks[1:])]
    assert len(iou) >= 3 and max(iou) < 0.7, iou
    # SCL holds the realistic class set.
    assert {0, 2, 3, 4, 5, 6, 7, 8, 9, 10} <= set(np.unique(scl).tolist())


def test_shadows_darken_and_clouds_brighten(items: list[dict]) -> None:
    for it in items:
        if not 20 < it["properties"]["eo:cloud_cover"] < 80:
            continue
        scl, red = _read(it, "scl"), _read(it, "red").astype(float)
        off = 1000 if it["properties"]["earthsearch:boa_offset_applied"] else 0
        rho = (red - off) / 10000
        if (scl == 9).sum() > 100:
            assert np.median(rho[scl == 9]) > 0.35
        if (scl == 3).sum() > 200 and (scl == 5).sum() > 200:
            assert np.median(rho[scl == 3]) < 0.5 * np.median(rho[scl == 5])


def test_tiles_overlap_on_one_grid_and_nodata_edges(sample: SampleInfo, items: list[dict]) -> None:
    by_id = {it["id"]: it for it in items}
    n_edge = {"29RMP": 0, "29RNP": 0}
    for it in items:
        if "29RMP" not in it["id"]:
            continue
        other = by_id[it["id"].replace("29RMP", "29RNP")]
        tw, te = it["assets"]["red"]["proj:transform"], other["assets"]["red"]["proj:transform"]
        shift = (te[2] - tw[2]) / 10
        assert shift == 192 and te[5] == tw[5]  # 25 % shared columns, same rows, same grid
        a, b = _read(it, "red"), _read(other, "red")
        both = (a[:, 192:] != 0) & (b[:, :64] != 0)
        assert np.array_equal(a[:, 192:][both], b[:, :64][both])  # same datatake: same values
        for t in (it, other):
            scl = _read(t, "scl")
            red = _read(t, "red")
            assert np.array_equal(scl == 0, red == 0)  # nodata agrees across assets
            if (scl == 0).any():
                n_edge[t["id"].split("_")[1]] += 1
                assert 0.4 * scl.size < (scl != 0).sum() < 0.95 * scl.size  # a diagonal edge, not a void
    assert n_edge["29RMP"] >= 5 and n_edge["29RNP"] >= 5


def test_footprint_matches_valid_pixels(items: list[dict]) -> None:
    from pyproj import Transformer

    to_utm = Transformer.from_crs(4326, EPSG, always_xy=True)
    for it in [i for i in items if i["properties"]["s2:nodata_pixel_percentage"] > 0][:4]:
        scl = _read(it, "scl")
        tr = rasterio.Affine(*it["assets"]["scl"]["proj:transform"])
        ring = np.asarray(it["geometry"]["coordinates"][0])
        x, y = to_utm.transform(ring[:, 0], ring[:, 1])
        foot = shapely.Polygon(np.column_stack([x, y]))
        rr, cc = np.mgrid[0 : scl.shape[0] : 7, 0 : scl.shape[1] : 7]
        px, py = rasterio.transform.xy(tr, rr.ravel(), cc.ravel())
        inside = shapely.contains_xy(foot.buffer(-10), px, py)
        outside = ~shapely.contains_xy(foot.buffer(10), px, py)
        vals = scl[rr.ravel(), cc.ravel()]
        assert (vals[inside] != 0).all() and (vals[outside] == 0).all()
        assert inside.sum() > 100 and outside.sum() > 10


def test_scales_to_other_sizes(tmp_path: Path) -> None:
    info = make_sample(tmp_path / "s", n_dates=3, width=40, height=30, tiles=3, resolution=20.0,
                       start="2023-06-01", every_days=5)
    assert info.items == 9 and info.tiles == ("29RMP", "29RNP", "29RPP")
    assert info.bounds[2] - info.bounds[0] == (40 + 2 * 30) * 20.0
    it = json.loads(next((tmp_path / "s" / "29RPP").rglob("*.json")).read_text())
    assert it["properties"]["s2:processing_baseline"] == "05.09"
    assert it["assets"]["red"]["proj:shape"] == [30, 40]
    assert it["assets"]["red"]["raster:bands"][0]["spatial_resolution"] == 20
    assert it["assets"]["red"]["proj:transform"][2] % 20 == 10  # grid phase kept at 20 m


@pytest.mark.parametrize("kw, where", [
    ({"n_dates": 0}, "sample.n_dates"),
    ({"width": 4}, "sample.width"),
    ({"height": 100_000}, "sample.height"),
    ({"tiles": 9}, "sample.tiles"),
    ({"resolution": -10}, "sample.resolution"),
    ({"start": "2021-13-01"}, "sample.start"),
])
def test_bad_arguments_are_pixels_errors(tmp_path: Path, kw: dict, where: str) -> None:
    with pytest.raises(PixelsError) as err:
        make_sample(tmp_path, **kw)
    assert err.value.where == where
