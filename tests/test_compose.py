"""Modes on real data against brute-force numpy: the 105-date Landsat Fmask series, the real S2 scene, the sample."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from shapely.geometry import box, mapping

from pixels_xr.compose import collect
from pixels_xr.config import load_config
from pixels_xr.features import Feature, load_features
from pixels_xr.timeslices import time_bins
from landsat_series import SERIES, scene_date



@pytest.fixture(scope="module")
def fmask_series(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An ndjson catalog of the real series (custom collection: red/nir08/swir16 int16 ×1e4 + Fmask)."""
    root = shared_data / SERIES
    items, arrays = [], {"red": [], "nir08": [], "fmask": [], "date": []}
    for scene in sorted(p.name for p in root.iterdir() if p.is_dir()):
        files = {"red": f"{scene}_b3.tif", "nir08": f"{scene}_b4.tif", "swir16": f"{scene}_b5.tif",
                 "fmask": f"{scene}_fmask.tif"}
        with rasterio.open(root / scene / files["red"]) as ds:
            transform, shape, bounds = list(ds.transform)[:6], list(ds.shape), ds.bounds
        day = scene_date(scene)
        assets = {}
        for key, fname in files.items():
            kind = {"data_type": "uint8", "nodata": 255} if key == "fmask" else \
                {"data_type": "int16", "nodata": -9999, "scale": 1e-4, "offset": 0.0}
            assets[key] = {"href": str(root / scene / fname), "type": "image/tiff", "roles": ["data"],
                           "proj:shape": shape, "proj:transform": transform, "raster:bands": [kind]}
        lonlat = rasterio.warp.transform_bounds("EPSG:32613", "EPSG:4326", *bounds)
        items.append({"type": "Feature", "stac_version": "1.0.0", "id": scene, "collection": "landsat-sr-fmask",
                      "geometry": mapping(box(*lonlat)), "bbox": list(lonlat), "links": [], "assets": assets,
                      "properties": {"datetime": f"{day}T17:00:00Z", "proj:epsg": 32613}})
        for key in ("red", "nir08", "fmask"):
            with rasterio.open(root / scene / files[key]) as ds:
                arrays[key].append(ds.read(1))
        arrays["date"].append(day)
    path = tmp_path_factory.mktemp("fmask") / "items.ndjson"
    path.write_text("\n".join(json.dumps(i) for i in items))
    order = np.argsort(np.array(arrays["date"]), kind="stable")  # scene folders sort by sensor, not date
    stack = {k: (np.stack(v) if k != "date" else np.array(v))[order] for k, v in arrays.items()}
    return {"catalog": path, "bounds": tuple(bounds), **stack}


def _fmask_config(catalog: Path, **kw: Any):
    base = {"start": "2008-01-01", "end": "2011-12-31", "platforms": "LANDSAT_5", "level": "L2",
            "bands": ["red", "nir08"], "scale": 30, "catalog": str(catalog), "collection": "landsat-sr-fmask",
            "mask": {"asset": "fmask", "clear_values": [0, 1], "nodata": 255}}
    return load_config({**base, **kw})


def _reference(series: dict[str, Any], bins, how: str) -> dict[str, np.ndarray]:
    """Brute force in plain numpy: per bin, latest clear value or median of clear values, as float32."""
    clear = np.isin(series["fmask"], [0, 1]) & (series["red"] != -9999) & (series["nir08"] != -9999)
    out: dict[str, list] = {"red": [], "nir08": [], "count": []}
    for b in bins:
        sel = np.array([b.start <= d <= b.end for d in series["date"]])
        c = clear[sel]
        out["count"].append(c.sum(0))
        for band in ("red", "nir08"):
            refl = series[band][sel].astype(np.float32) * np.float32(1e-4) + np.float32(0)
            if how == "latest":
                res = np.full(c.shape[1:], np.nan, np.float32)
                for t in range(c.shape[0]):  # later clear observations overwrite earlier ones
                    res = np.where(c[t], refl[t], res)
            else:
                with np.errstate(all="ignore"), pytest.warns(RuntimeWarning) if not c.any(0).all() else _null():
                    res = np.nanmedian(np.where(c, refl, np.nan).astype(np.float64), axis=0).astype(np.float32)
            out[band].append(res)
    return {k: np.stack(v) for k, v in out.items()}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


@pytest.mark.parametrize("months", [12, 3])
@pytest.mark.parametrize("mode,how", [("latest_pixel", "latest"), ("composite", "median")])
def test_fmask_series_matches_brute_force(fmask_series: dict[str, Any], months: int, mode: str, how: str) -> None:
    extra = {"composite_method": "median"} if mode == "composite" else {}
    cfg = _fmask_config(fmask_series["catalog"], mode=mode, interval="months", interval_step=months, **extra)
    feature = Feature("series", box(*fmask_series["bounds"]), crs="EPSG:32613")
    ds = collect(cfg, feature).compute()
    bins = time_bins(dt.date(2008, 1, 1), dt.date(2011, 12, 31), "months", months)
    ref = _reference(fmask_series, bins, how)
    assert ds.sizes["time"] == len(bins) and (ds.sizes["y"], ds.sizes["x"]) == (61, 61)
    assert ds.rio.bounds() == pytest.approx(fmask_series["bounds"])
    for band in ("red", "nir08"):
        np.testing.assert_array_equal(ds[band].values, ref[band])  # zero mismatched pixels (NaN == NaN)
    np.testing.assert_array_equal(ds.clear_count.values, ref["count"])
    if mode == "latest_pixel":  # provenance: the source date of every picked pixel is in its bin
        st = ds.source_time.values
        picked = ~np.isnat(st)
        assert picked.sum() == np.isfinite(ref["red"]).sum()
        starts = ds.time.values[:, None, None]
        ends = ds.time_end.values[:, None, None]
        assert ((st >= starts) & (st <= ends + np.timedelta64(1, "D")))[picked].all()
    if months == 3:
        assert ds.empty.values.any()  # winter quarters without scenes are present and flagged
        assert np.isnan(ds.red.values[ds.empty.values]).all()


def test_all_mode_masks_clouds_on_real_s2_scene(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "s2-l2a-S2A_29RKH_20200219"
    item = json.loads((folder / "S2A_29RKH_20200219_0_L2A.json").read_text())
    item["links"] = []
    keep = {"red": "B04", "scl": "SCL"}
    item["assets"] = {k: {**item["assets"][k], "href": str(folder / f"{v}.tif")} for k, v in keep.items()}
    for a in item["assets"].values():
        a.pop("proj:shape", None), a.pop("proj:transform", None)
    cat = tmp_path / "items.json"
    cat.write_text(json.dumps({"type": "FeatureCollection", "features": [item]}))
    cfg = load_config({"start": "2020-02-19", "end": "2020-02-19", "mode": "all", "platforms": "SENTINEL_2",
                       "bands": ["red"], "scale": 200, "catalog": str(cat)})
    feature = Feature("scene", box(199980, 2690220, 309780, 2800020), crs="EPSG:32629")
    ds = collect(cfg, feature).compute()
    with rasterio.open(folder / "SCL.tif") as src:
        scl = src.read(1, window=rasterio.windows.from_bounds(*ds.rio.bounds(), transform=src.transform))
    red = ds.red.isel(time=0).values
    cloudy = np.isin(scl, [0, 1, 3, 8, 9, 10])
    assert cloudy.sum() > 100 and (~cloudy).sum() > 1000
    assert np.isnan(red[cloudy]).all()  # every cloud / shadow / cirrus pixel is nodata
    assert np.isfinite(red[~cloudy]).all()
    np.testing.assert_array_equal(ds.clear_count.isel(time=0).values, (~cloudy).astype(np.uint16))


def test_sample_monthly_latest_pixel_leaves_no_cloud(tmp_path: Path) -> None:
    from pixels_xr.testing.sample import make_sample

    info = make_sample(tmp_path / "sample", n_dates=12, width=96, height=96, every_days=5)
    features = load_features(info.features)
    cfg = load_config({"start": "2021-11-01", "end": "2021-12-31", "mode": "latest_pixel", "interval": "months",
                       "platforms": "SENTINEL_2", "bands": ["red", "nir", "scl"], "catalog": str(info.catalog),
                       "output": "raw"})
    for feature in features[:3]:
        ds = collect(cfg, feature).compute()
        scl = ds.scl.values
        count = ds.clear_count.values
        assert not np.isin(scl[count > 0], [3, 8, 9, 10]).any()  # no cloud where any clear observation existed
        assert (ds.red.values[count == 0] == 0).all() and (ds.red.values[count > 0] > 0).all()
        assert ds.red.dtype == np.uint16


@pytest.mark.parametrize("mode", ["latest_pixel", "composite"])
def test_odc_loader_gives_the_same_modes(fmask_series: dict[str, Any], mode: str) -> None:
    """odc-stac cubes come in one chunk per item: their bins are joined per block before the kernels, and
    give the stackstac loader's bin-chunked results exactly."""
    extra = {"composite_method": "median"} if mode == "composite" else {}
    cfg = _fmask_config(fmask_series["catalog"], mode=mode, interval="months", interval_step=6, **extra)
    feature = Feature("series", box(*fmask_series["bounds"]), crs="EPSG:32613")
    a = collect(cfg, feature).compute()
    b = collect(cfg, feature, loader="odc").compute()
    assert a.sizes["time"] == 8 and set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values)


def test_graphs_of_two_features_share_no_key(fmask_series: dict[str, Any]) -> None:
    """Concurrent computations must not share dask keys (distributed mixes up shared keys' state): even two
    features with the same geometry and items, and with empty bins, get keys of their own."""
    cfg = _fmask_config(fmask_series["catalog"], mode="composite", composite_method="median",
                        interval="months", interval_step=3)
    graphs = []
    for fid in ("a", "b"):
        ds = collect(cfg, Feature(fid, box(*fmask_series["bounds"]), crs="EPSG:32613"))
        assert ds.empty.values.any()
        graphs.append(set(ds.__dask_graph__().keys()))
    assert graphs[0] and not graphs[0] & graphs[1]


# ------------------------------------------------------------------------------ fields no scene covers
@pytest.fixture(scope="module")
def small_sample(tmp_path_factory: pytest.TempPathFactory):
    from pixels_xr.testing.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("empty") / "sample", n_dates=6, width=64, height=64,
                       every_days=10)


@pytest.mark.parametrize("mode,method", [("all", None), ("latest_pixel", None), ("cloud_sorted_pixel", None),
                                         ("composite", "median"), ("composite", "first_clear"),
                                         ("composite", "quality")])
@pytest.mark.parametrize("where", ["outside every footprint", "inside a bbox, off every grid"])
def test_feature_no_scene_covers_gives_the_empty_result(small_sample, mode: str, method: str | None,
                                                        where: str) -> None:
    """Every mode and method: the feature's grid, every bin present and flagged, all nodata, the reason."""
    raw = {"start": "2021-11-01", "end": "2022-01-31", "mode": mode, "platforms": "SENTINEL_2",
           "bands": ["red", "nir"], "catalog": str(small_sample.catalog), "scale": 10}
    if mode != "all":
        raw["interval"] = "months"
    if method:
        raw["composite_method"] = method
    cfg = load_config(raw)
    if where == "outside every footprint":
        feature = Feature("far", box(-8.0, 31.5, -7.99, 31.51))
        items = None
    else:  # the search found items (say from a coarse bbox) but none of their rasters touches the grid
        from pixels_xr.catalog import search

        items = search(cfg, load_features(small_sample.features)[0])
        feature = Feature("off-grid", box(-8.0, 31.5, -7.99, 31.51))
    ds = collect(cfg, feature, items=items).compute()
    assert ds.attrs["empty_reason"] in {"no items matched the search", "no item overlaps the output grid"}
    assert ds.sizes["y"] > 50 and ds.sizes["x"] > 50 and ds.rio.crs is not None
    assert int(ds.clear_count.max()) == 0 if ds.sizes["time"] else True
    if mode == "all":
        assert ds.sizes["time"] == 0
        return
    assert ds.sizes["time"] == 3 and ds.empty.values.all()
    for band in cfg.band_names:
        assert np.isnan(ds[band].values).all()
    if "source_time" in ds:
        assert np.isnat(ds.source_time.values).all()


# ------------------------------------------------------------------------------ several Landsat platforms
@pytest.fixture(scope="module")
def platform_series(fmask_series: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real series with each item's STAC ``platform`` from its scene id (LT5… Landsat 5, LE7… 7)."""
    items = [json.loads(line) for line in Path(fmask_series["catalog"]).read_text().splitlines()]
    for item in items:
        item["properties"]["platform"] = {"LT5": "landsat-5", "LE7": "landsat-7"}[item["id"][:3]]
    path = tmp_path_factory.mktemp("platforms") / "items.ndjson"
    path.write_text("\n".join(json.dumps(i) for i in items))
    return path


def test_several_landsat_platforms_share_one_config(platform_series: Path, fmask_series: dict[str, Any]) -> None:
    from pixels_xr.catalog import search

    feature = Feature("series", box(*fmask_series["bounds"]), crs="EPSG:32613")
    items = [json.loads(line) for line in platform_series.read_text().splitlines()]
    in_range = [i for i in items if "2008-01-01" <= i["properties"]["datetime"][:10] <= "2011-12-31"]
    n5 = sum(i["properties"]["platform"] == "landsat-5" for i in in_range)
    n7 = len(in_range) - n5
    assert n5 and n7
    only5 = _fmask_config(platform_series, mode="all")
    found = search(only5, feature)
    assert len(found) == n5 and found.filtered == {"platform landsat-7": n7}  # counted, not silent
    both = _fmask_config(platform_series, mode="composite", interval="months", interval_step=6,
                         platforms=["LANDSAT_5", "LANDSAT_7"])
    assert both.platforms == ("landsat-5", "landsat-7")
    ds = collect(both, feature).compute()
    assert json.loads(ds.attrs["items_filtered"]) == {}
    assert sum(len(v) for v in json.loads(ds.attrs["item_ids"]).values()) == n5 + n7
    ref = collect(_fmask_config(fmask_series["catalog"], mode="composite", interval="months",
                                interval_step=6), feature).compute()  # no platform property at all
    for band in ("red", "nir08", "clear_count"):
        np.testing.assert_array_equal(ds[band].values, ref[band].values)


def test_platform_filter_is_counted_in_the_run_report(platform_series: Path, fmask_series: dict[str, Any],
                                                      tmp_path: Path) -> None:
    from pixels_xr.batch import run_batch

    feature = Feature("series", box(*fmask_series["bounds"]), crs="EPSG:32613")
    cfg = _fmask_config(platform_series, mode="latest_pixel", interval="months", interval_step=12)
    report = run_batch(cfg, [feature], str(tmp_path / "o.zarr"), cluster=None, progress=False)
    assert report.ok and list(report.features[0].items_filtered) == ["platform landsat-7"]
    assert "items left out by filters: platform landsat-7" in report.summary()


@pytest.mark.parametrize("platforms,bands,text", [
    (["LANDSAT_5", "SENTINEL_2"], ["red"], "mix families"),
    (["LANDSAT_7", "LANDSAT_8"], ["B4", "red"], "means different bands"),
    (["LANDSAT_7", "LANDSAT_8"], ["coastal"], "unknown band"),
])
def test_platforms_that_cannot_share_a_config_are_refused(platforms, bands, text) -> None:
    from pixels_xr.errors import ConfigError

    with pytest.raises(ConfigError, match=text):
        load_config({"start": "2021-01-01", "end": "2021-02-01", "mode": "all", "platforms": platforms,
                     "level": "L2", "bands": bands})


def test_preview_counts_what_the_platform_filter_left_out(platform_series: Path, fmask_series: dict[str, Any],
                                                          tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "c.json"
    config.write_text(_fmask_config(platform_series, mode="latest_pixel", interval="months",
                                    interval_step=12).model_dump_json(exclude_none=True))
    features = tmp_path / "f.geojson"
    features.write_text(json.dumps({"type": "FeatureCollection", "crs": {"init": "EPSG:32613"}, "features": [
        {"type": "Feature", "id": "series", "properties": {}, "geometry": mapping(box(*fmask_series["bounds"]))}]}))
    run = subprocess.run([sys.executable, "-m", "pixels_xr.cli", "preview", str(config), "--features",
                          str(features)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "items left out by filters: platform landsat-7 " in run.stdout, run.stdout
