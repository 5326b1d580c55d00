"""Zonal statistics and spectral indices against independent references on real data: exactextract itself on
GeoTIFFs of the same rasters (exact coverage), brute-force numpy per pixel centre, spyndex's own
``computeIndex`` on the same reflectance; errors, no-item features, resume and the file formats."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import shapely
from shapely.geometry import Point, Polygon, box, mapping

from pixels_xr.compose import collect
from pixels_xr.config import load_config
from pixels_xr.errors import ConfigError
from pixels_xr.features import Feature
from pixels_xr.stats import stats
from pixels_xr.timeslices import time_bins
from landsat_series import SERIES, scene_date

SCENE = "s2-l2a-S2A_29RKH_20200219"
STATS = ["count", "mean", "stdev", "min", "max", "median", "quantile(q=0.1)", "quantile(q=0.9)"]
OURS = ["count", "mean", "std", "min", "max", "median", "p10", "p90"]


@pytest.fixture(scope="module")
def series(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The 2009 scenes of the real Landsat series as a local catalog, and their arrays for references."""
    root = shared_data / SERIES
    items, arrays = [], {"red": [], "nir08": [], "swir16": [], "fmask": [], "date": []}
    for scene in sorted(p.name for p in root.iterdir() if p.is_dir()):
        day = scene_date(scene)
        if day.year != 2009:
            continue
        files = {"red": f"{scene}_b3.tif", "nir08": f"{scene}_b4.tif", "swir16": f"{scene}_b5.tif",
                 "fmask": f"{scene}_fmask.tif"}
        with rasterio.open(root / scene / files["red"]) as ds:
            transform, shape, bounds = list(ds.transform)[:6], list(ds.shape), ds.bounds
        assets = {}
        for key, fname in files.items():
            kind = {"data_type": "uint8", "nodata": 255} if key == "fmask" else \
                {"data_type": "int16", "nodata": -9999, "scale": 1e-4, "offset": 0.0}
            assets[key] = {"href": str(root / scene / fname), "type": "image/tiff", "roles": ["data"],
                           "proj:shape": shape, "proj:transform": transform, "raster:bands": [kind]}
            with rasterio.open(root / scene / fname) as ds:
                arrays[key].append(ds.read(1))
        lonlat = rasterio.warp.transform_bounds("EPSG:32613", "EPSG:4326", *bounds)
        items.append({"type": "Feature", "stac_version": "1.0.0", "id": scene, "collection": "landsat-sr-fmask",
                      "geometry": mapping(box(*lonlat)), "bbox": list(lonlat), "links": [], "assets": assets,
                      "properties": {"datetime": f"{day}T17:00:00Z", "proj:epsg": 32613}})
        arrays["date"].append(day)
    path = tmp_path_factory.mktemp("stats-series") / "items.ndjson"
    path.write_text("\n".join(json.dumps(i) for i in items))
    order = np.argsort(np.array(arrays["date"]), kind="stable")
    stack = {k: (np.stack(v) if k != "date" else np.array(v))[order] for k, v in arrays.items()}
    return {"catalog": path, "bounds": tuple(bounds), "transform": rasterio.Affine(*transform), **stack}


def _series_config(catalog: Path, **kw: Any):
    base = {"start": "2009-01-01", "end": "2009-12-31", "platforms": "LANDSAT_5", "level": "L2",
            "bands": ["red", "nir08", "swir16"], "scale": 30, "catalog": str(catalog),
            "collection": "landsat-sr-fmask", "mask": {"asset": "fmask", "clear_values": [0, 1], "nodata": 255},
            "mode": "composite", "composite_method": "median", "interval": "months", "interval_step": 3,
            "indices": ["NDVI", "NDMI"]}
    return load_config({**base, **kw})


def _parcels(bounds: tuple[float, ...]) -> list[Feature]:
    """Irregular polygons over the series (pixel edges cut at odd fractions; one with a hole)."""
    left, _, _, top = bounds
    out = []
    for k in range(4):
        x0, y0 = left + 95 + k * 410, top - 130 - (k % 2) * 500
        poly = Polygon([(x0, y0), (x0 + 377, y0 - 41), (x0 + 331, y0 - 403), (x0 - 13, y0 - 355)])
        if k == 2:
            poly = poly.difference(Point(x0 + 170, y0 - 200).buffer(70))
        out.append(Feature(f"p{k}", poly, crs="EPSG:32613"))
    return out


def _geotiff(path: Path, values: np.ndarray, transform: Any, crs: str) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=values.shape[1], height=values.shape[0], count=1,
                       dtype="float32", crs=crs, transform=transform, nodata=np.nan) as dst:
        dst.write(values.astype(np.float32), 1)
    return path


def _exactextract(path: Path, features: list[Feature]) -> list[dict[str, float]]:
    from exactextract import exact_extract

    vec = [{"type": "Feature", "properties": {"id": f.id}, "geometry": mapping(f.geometry)} for f in features]
    rows = exact_extract(str(path), vec, STATS, output="geojson")
    return [r["properties"] for r in rows]


def _assert_row(row: Any, var: str, ref: dict[str, float]) -> None:
    for ours, theirs in zip(OURS, STATS):
        expected = ref[theirs.replace("quantile(q=0.", "quantile_").rstrip(")").replace("_1", "_10")
                       .replace("_9", "_90")]
        got = row[f"{var}_{ours}"]
        if expected is None or (isinstance(expected, float) and np.isnan(expected)):
            assert np.isnan(got) or (ours == "count" and got == 0), (var, ours, got)
        else:
            assert got == pytest.approx(expected, rel=2e-6, abs=2e-7), (var, ours, got, expected)


def test_exact_statistics_equal_exactextract_on_the_landsat_series(series: dict[str, Any], tmp_path: Path) -> None:
    import spyndex

    cfg = _series_config(series["catalog"])
    parcels = _parcels(series["bounds"])
    far = Feature("nowhere", box(100000, 4000000, 100300, 4000300), crs="EPSG:32613")
    import pixels_xr

    table = pixels_xr.stats(cfg, [*parcels, far], percentiles=[10, 90], cluster=None)  # module imported first
    whole = collect(cfg, Feature("all", box(*series["bounds"]), crs="EPSG:32613")).compute()
    bins = time_bins(dt.date(2009, 1, 1), dt.date(2009, 12, 31), "months", 3)
    assert len(table) == 5 * len(bins)
    # indices per observation before the median: brute force from the raw rasters with spyndex's own formula
    clear = np.isin(series["fmask"], [0, 1]) & (series["red"] != -9999) & (series["nir08"] != -9999)
    refl = {k: np.where(series[k] != -9999, series[k].astype(np.float32) * np.float32(1e-4), np.nan)
            for k in ("red", "nir08", "swir16")}
    per_obs = {"NDVI": spyndex.computeIndex("NDVI", params={"N": refl["nir08"], "R": refl["red"]}),
               "NDMI": spyndex.computeIndex("NDMI", params={"N": refl["nir08"], "S1": refl["swir16"]})}
    checked = 0
    for t, b in enumerate(bins):
        sel = np.array([b.start <= d <= b.end for d in series["date"]])
        rasters = {v: whole[v].isel(time=t).values for v in ("red", "nir08")}
        for name, values in per_obs.items():
            masked = np.where(clear[sel], values[sel], np.nan).astype(np.float64)
            with np.errstate(all="ignore"), pytest.warns(RuntimeWarning) if not clear[sel].any(0).all() \
                    else _Null():
                rasters[name] = np.nanmedian(masked, axis=0).astype(np.float32)
        for var, values in rasters.items():
            tif = _geotiff(tmp_path / f"{var}-{t}.tif", values, series["transform"], "EPSG:32613")
            for parcel, ref in zip(parcels, _exactextract(tif, parcels)):
                row = table[(table.id == parcel.id) & (table.time == np.datetime64(b.start))].iloc[0]
                _assert_row(row, var, ref)
                checked += int(ref["count"] > 0)
    assert checked > 40  # most parcel × bin × variable combinations hold data
    empty = table[table.id == "nowhere"]
    assert len(empty) == len(bins) and (empty["items"] == 0).all() and (empty["red_count"] == 0).all()
    assert empty["NDVI_mean"].isna().all() and np.allclose(empty["pixels"], 100.0)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def _scene_catalog(shared_data: Path, tmp_path: Path) -> Path:
    folder = shared_data / SCENE
    item = json.loads((folder / "S2A_29RKH_20200219_0_L2A.json").read_text())
    item["links"] = []
    keep = {"red": "B04", "nir": "B08", "scl": "SCL"}
    item["assets"] = {k: {**item["assets"][k], "href": str(folder / f"{v}.tif")} for k, v in keep.items()}
    for a in item["assets"].values():
        a.pop("proj:shape", None), a.pop("proj:transform", None)
    cat = tmp_path / "items.json"
    cat.write_text(json.dumps({"type": "FeatureCollection", "features": [item]}))
    return cat


def test_centre_rule_and_picked_index_on_the_real_s2_scene(shared_data: Path, tmp_path: Path) -> None:
    import spyndex

    cfg = load_config({"start": "2020-02-19", "end": "2020-02-19", "mode": "all", "platforms": "SENTINEL_2",
                       "bands": ["red", "nir"], "scale": 200, "catalog": str(_scene_catalog(shared_data, tmp_path)),
                       "indices": ["NDVI"]})
    x0, y0 = 230000.0, 2760000.0
    fields = [Feature("a", Polygon([(x0, y0), (x0 + 2930, y0 + 410), (x0 + 2510, y0 - 2370), (x0 + 140, y0 - 1990)]),
                      crs="EPSG:32629"),
              Feature("b", box(x0 + 5050, y0 - 3950, x0 + 7990, y0 - 1010), crs="EPSG:32629"),
              Feature("c", Point(x0 + 20000, y0 - 20000).buffer(1900), crs="EPSG:32629")]
    table = stats(cfg, fields, percentiles=[25], coverage="centre", cluster=None)
    assert len(table) == 3 and (table["items"] == 1).all()
    whole = collect(cfg, Feature("scene", box(199980, 2690220, 309780, 2800020), crs="EPSG:32629")).compute()
    left, top = float(whole.x[0]) - 100, float(whole.y[0]) + 100
    red, nir = whole.red.isel(time=0).values, whole.nir.isel(time=0).values
    ndvi = spyndex.computeIndex("NDVI", params={"N": nir, "R": red})  # the picked observation's index
    for field in fields:
        picked: dict[str, list[float]] = {"red": [], "nir": [], "NDVI": []}
        minx, miny, maxx, maxy = field.geometry.bounds  # every pixel whose centre can be inside, one by one
        for r in range(max(int((top - maxy) // 200) - 1, 0), min(int((top - miny) // 200) + 2, red.shape[0])):
            for c in range(max(int((minx - left) // 200) - 1, 0), min(int((maxx - left) // 200) + 2, red.shape[1])):
                if field.geometry.contains(Point(left + (c + 0.5) * 200, top - (r + 0.5) * 200)):
                    for name, arr in (("red", red), ("nir", nir), ("NDVI", ndvi)):
                        if np.isfinite(arr[r, c]):
                            picked[name].append(float(arr[r, c]))
        row = table[table.id == field.id].iloc[0]
        assert len(picked["red"]) > 20
        for name, values in picked.items():
            v = np.array(values)
            expected = {"count": v.size, "mean": v.mean(), "std": v.std(), "min": v.min(), "max": v.max(),
                        "median": np.median(v), "p25": np.percentile(v, 25)}
            for key, value in expected.items():
                assert row[f"{name}_{key}"] == pytest.approx(value, rel=2e-6, abs=2e-7), (field.id, name, key)


def test_bad_index_and_missing_band_are_one_line_errors(series: dict[str, Any], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pixels_xr.cli import app

    with pytest.raises(ConfigError, match=r"indices\[1\]: unknown spectral index 'NDVX'.*did you mean 'NDVI'"):
        _series_config(series["catalog"], indices=["NDVI", "NDVX"])
    with pytest.raises(ConfigError, match=r"indices\[0\]: index 'NBR' needs band 'swir22'.*add 'swir22' to bands"):
        _series_config(series["catalog"], indices=["NBR"])
    with pytest.raises(ConfigError, match=r"index 'NDREI' needs band 'RE1'.*landsat-5 L2 does not have"):
        _series_config(series["catalog"], indices=["NDREI"])
    cfg = json.loads(_series_config(series["catalog"]).model_dump_json(exclude_none=True))
    cfg["indices"] = ["EVI"]
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    (tmp_path / "f.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    result = CliRunner().invoke(app, ["stats", str(path), "--features", str(tmp_path / "f.geojson"),
                                      "--out", str(tmp_path / "o.parquet")])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "index 'EVI' needs band 'blue'" in lines[0] and "Traceback" not in result.output


def test_resume_skips_done_groups_and_files_read_back(series: dict[str, Any], tmp_path: Path,
                                                       dask_scheduler: Any) -> None:
    import duckdb
    import geopandas as gpd

    cfg = _series_config(series["catalog"], interval_step=6)
    _, bottom, right, _ = series["bounds"]
    parcels = _parcels(series["bounds"])
    # a second group: a parcel far enough from the others to fall in another grouping cell
    far = Feature("edge", box(right - 400, bottom + 100, right - 100, bottom + 400), crs="EPSG:32613")
    from pixels_xr.groups import group_features

    features = [*parcels, far]
    groups = group_features(cfg, features, cell=40)  # small grouping cells: several groups
    assert len(groups) >= 2 and any(len(g.features) > 1 for g in groups)
    out = tmp_path / "fields.parquet"
    first = stats(cfg, features, str(out), cluster=None, cell=40)
    parts = sorted(p for p in Path(f"{out}.parts").iterdir() if p.suffix == ".parquet")
    assert len(parts) == len(groups) and json.loads(Path(f"{out}.parts/manifest.json").read_text())["rows"] == len(first)
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}
    parts[0].unlink()  # as if the run had stopped before that group
    again = stats(cfg, features, str(out), cluster=None, cell=40)
    now = {p.name: p.stat().st_mtime_ns for p in parts}
    assert now[parts[0].name] != stamps[parts[0].name]  # recomputed
    assert {k: v for k, v in now.items() if k != parts[0].name} == \
        {k: v for k, v in stamps.items() if k != parts[0].name}  # skipped: not rewritten
    assert again.drop(columns="geometry").equals(first.drop(columns="geometry"))
    assert (first.groupby("id").size() == 2).all()  # two 6-month bins per feature
    read = gpd.read_parquet(out)
    assert read.crs.to_epsg() == 4326 and len(read) == len(first) and read.geometry.is_valid.all()
    con = duckdb.connect()
    n, ids = con.execute(f"select count(*), count(distinct id) from '{out}'").fetchone()
    assert (n, ids) == (len(first), 5)
    # the command line, on the scheduler, into CSV (geometry as WKT)
    from typer.testing import CliRunner

    from pixels_xr.cli import app

    (tmp_path / "cfg.json").write_text(cfg.model_dump_json(exclude_none=True))
    (tmp_path / "fields.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": f.id, "properties": {"crs": "EPSG:32613"}, "geometry": mapping(f.geometry)}
        for f in features]}))
    result = CliRunner().invoke(app, ["stats", str(tmp_path / "cfg.json"), "--features",
                                      str(tmp_path / "fields.geojson"), "--out", str(tmp_path / "fields.csv"),
                                      "--cluster", dask_scheduler.address, "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"{len(first)} rows (5 features)" in result.output
    text = (tmp_path / "fields.csv").read_text().splitlines()
    assert len(text) == len(first) + 1 and "POLYGON" in text[1]
    with pytest.raises(ConfigError, match="out: the output must end in .parquet"):
        stats(cfg, parcels, str(tmp_path / "x.txt"), cluster=None)
    assert shapely.equals(read.geometry.iloc[0], parcels[0].lonlat_geometry())
