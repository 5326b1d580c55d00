"""The pixels configuration: every parameter, each error naming its field, dynamic dates, fuzzing."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from shapely.geometry import box

from pixels_xr.config import PixelsConfig, load_config
from pixels_xr.errors import ConfigError
from pixels_xr.features import Feature, load_features
from pixels_xr.plan import plan, plan_feature

BASE: dict[str, Any] = {
    "start": "2021-01-01", "end": "2021-12-31", "mode": "latest_pixel", "interval": "months",
    "interval_step": 1, "platforms": ["SENTINEL_2"], "level": "L2A", "bands": ["B02", "green", "red", "nir"],
    "scale": 10, "maxcloud": 30, "clip": True, "pool_size": 4, "limit": 500,
}


def cfg(**kw: Any) -> PixelsConfig:
    data = {**BASE, **kw}
    return load_config({k: v for k, v in data.items() if v is not None})


def err(**kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        cfg(**kw)
    return info.value


def test_every_parameter_is_read() -> None:
    c = cfg()
    assert (c.start, c.end) == (dt.date(2021, 1, 1), dt.date(2021, 12, 31))
    assert c.mode == "latest_pixel" and c.interval == "months" and c.resolved_interval_step == 1
    assert c.platforms == ("sentinel-2",) and c.resolved_level == "L2A"
    assert c.band_names == ["blue", "green", "red", "nir"]
    assert (c.scale, c.maxcloud, c.clip, c.pool_size, c.limit) == (10, 30, True, 4, 500)
    assert c.catalog == "earth-search" and c.collection_id == "sentinel-2-l2a"
    assert c.mask_spec is not None and c.mask_spec.asset == "scl" and 9 in c.mask_spec.not_clear_values


def test_loads_from_file_string_and_dict(tmp_path: Path) -> None:
    p = tmp_path / "c.json"
    p.write_text(json.dumps(BASE))
    assert load_config(p) == load_config(json.dumps(BASE)) == load_config(str(p)) == load_config(BASE)


@pytest.mark.parametrize("spelling,name", [("SENTINEL_2", "sentinel-2"), ("sentinel-2", "sentinel-2"),
                                           ("LANDSAT_8", "landsat-8"), ("landsat-5", "landsat-5"),
                                           ("LANDSAT_9", "landsat-9"), ("LANDSAT_7", "landsat-7"),
                                           ("LANDSAT_4", "landsat-4")])
def test_platform_spellings(spelling: str, name: str) -> None:
    level = "L2A" if name == "sentinel-2" else "L2"
    c = cfg(platforms=spelling, level=level, bands=["red"], scale=None)
    assert c.platforms == (name,)
    assert c.resolved_scale == (10 if name == "sentinel-2" else 30)


def test_landsat_defaults_and_qa_mask() -> None:
    c = cfg(platforms="LANDSAT_8", level=None, bands=["SR_B4", "nir08"], mode="composite",
            composite_method="qa_pixel")
    assert c.resolved_level == "L2" and c.band_names == ["red", "nir08"]
    assert c.mask_spec is not None and c.mask_spec.not_clear_bits == (0, 1, 2, 3, 4)
    assert c.collection_id == "landsat-c2-l2"


def test_dynamic_dates() -> None:
    c = cfg(start=None, end=None, dynamic_dates_interval="weeks", dynamic_dates_step=3)
    f = Feature("a", box(0, 0, 1, 1), date=dt.date(2021, 6, 30))
    assert c.date_range(f) == (dt.date(2021, 6, 9), dt.date(2021, 6, 30))
    with pytest.raises(ConfigError, match="feature 'b'.*no date"):
        c.date_range(Feature("b", box(0, 0, 1, 1)))


@pytest.mark.parametrize("kw,field,text", [
    ({"end": "2020-12-31"}, "end", "before start"),
    ({"start": None}, "start", "required"),
    ({"start": "2021-01-01", "end": None, "dynamic_dates_interval": None, "dynamic_dates_step": 2},
     "dynamic_dates_interval", "not both"),
    ({"start": None, "end": None, "dynamic_dates_step": 2}, "dynamic_dates_interval", "both"),
    ({"start": None, "end": None, "dynamic_dates_interval": "fortnights", "dynamic_dates_step": 2},
     "dynamic_dates_interval", "days"),
    ({"start": None, "end": None}, "start", "date range"),
    ({"mode": "mosaic"}, "mode", "latest_pixel"),
    ({"mode": "all"}, "interval", "meaningless"),
    ({"mode": "all", "interval": None}, "interval_step", "meaningless"),
    ({"interval": None}, "interval", "required"),
    ({"interval_step": 0}, "interval_step", "greater than or equal to 1"),
    ({"composite_method": "median"}, "composite_method", "only applies"),
    ({"mode": "composite", "composite_method": "qa_pixel"}, "composite_method", "not available"),
    ({"mode": "composite", "composite_method": "quality", "bands": ["red", "green"]}, "bands", "NDVI"),
    ({"mode": "composite", "composite_method": "first_clear", "mask": "none"}, "mask", "needs a cloud mask"),
    ({"mode": "composite", "level": "L1C"}, "mask", "no cloud mask"),
    ({"platforms": "MODIS"}, "platforms", "unknown platform"),
    ({"platforms": ["SENTINEL_2", "LANDSAT_8"]}, "platforms", "mix families"),
    ({"level": "L2"}, "level", "L2A"),
    ({"bands": ["red", "B99"]}, "bands[1]", "unknown band"),
    ({"bands": []}, "bands", "at least 1"),
    ({"bands": ["red", "B04"]}, "bands", "repeat"),
    ({"platforms": "LANDSAT_8", "level": "L2", "bands": ["scl"]}, "bands[0]", "unknown band"),
    ({"scale": -10}, "scale", "greater than 0"),
    ({"scale": 0}, "scale", "greater than 0"),
    ({"maxcloud": 101}, "maxcloud", "less than or equal to 100"),
    ({"maxcloud": -1}, "maxcloud", "greater than or equal to 0"),
    ({"clip": "maybe"}, "clip", "boolean"),
    ({"pool_size": -1}, "pool_size", "greater than or equal to 1"),
    ({"limit": 0}, "limit", "greater than or equal to 1"),
    ({"scael": 10}, "scael", "did you mean 'scale'"),
    ({"maxclouds": 10}, "maxclouds", "did you mean 'maxcloud'"),
    ({"mask": {"asset": "fmask"}}, "mask", "clear_values"),
    ({"mask": {"asset": "fmask", "clear_values": [0], "nodat": 255}}, "mask.nodat", "did you mean 'nodata'"),
    ({"mask": {"asset": "qa", "not_clear_bits": [70]}}, "mask.not_clear_bits", "0..63"),
    ({"crs": "EPSG:4326"}, "crs", "projected"),
    ({"crs": "EPSG:999999"}, "crs", "unknown CRS"),
    ({"start": "2021-02-30"}, "start", "date"),
    ({"resampling": "lanczos9"}, "resampling", "nearest"),
])
def test_errors_name_the_field(kw: dict[str, Any], field: str, text: str) -> None:
    e = err(**kw)
    assert e.where == field, str(e)
    assert text in str(e), str(e)
    assert "\n" not in str(e)


def test_user_mask_rule_for_custom_collection() -> None:
    c = cfg(catalog="/data/fmask/catalog.json", collection="landsat-sr-fmask",
            platforms="LANDSAT_5", level="L2", bands=["red", "nir08"],
            mask={"asset": "fmask", "clear_values": [0, 1], "nodata": 255}, mode="composite")
    spec = c.mask_spec
    assert spec is not None and spec.asset == "fmask" and spec.clear_values == (0, 1) and spec.nodata == 255
    assert c.collection_id == "landsat-sr-fmask"
    assert cfg(mask="none").mask_spec is None


def test_bad_json_reports_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.json"
    p.write_text('{\n "mode": "all",\n}')
    with pytest.raises(ConfigError, match=r"bad.json: not valid JSON.*line 3"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config("[1, 2]")


def test_grid_size_limit_and_force() -> None:
    f = Feature("huge", box(0, 40, 5, 45))  # ~400 km at 10 m
    with pytest.raises(ConfigError, match="feature 'huge'.*max_pixels"):
        plan_feature(cfg(), f)
    assert plan_feature(cfg(force=True), f).pixels > 100_000_000


def test_plan_output_grid_rule(tmp_path: Path) -> None:
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "lisbon", "properties": {"date": "2021-05-01"},
         "geometry": {"type": "Polygon", "coordinates": [[[-9.2, 38.7], [-9.1, 38.7], [-9.1, 38.75],
                                                          [-9.2, 38.75], [-9.2, 38.7]]]}},
        {"type": "Feature", "properties": {"id": "utm", "crs": "EPSG:32629"},
         "geometry": {"type": "Polygon", "coordinates": [[[500003, 4280007], [501000, 4280007],
                                                          [501000, 4281000], [500003, 4280007]]]}}]}
    feats = load_features(fc)
    plans = plan(cfg(), feats)
    assert plans[0].grid.epsg == 32629  # geographic → local UTM zone (29N for Lisbon)
    g = plans[1].grid
    assert g.epsg == 32629 and (g.left, g.bottom, g.right, g.top) == (500000, 4280000, 501000, 4281000)
    assert len(plans[0].bins) == 12


def test_feature_errors(tmp_path: Path) -> None:
    good = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}
    cases = [
        ({"type": "FeatureCollection", "features": []}, "features.features", "no features"),
        ({"type": "FeatureCollection", "features": [{"type": "Feature", "id": "../x", "geometry": good}]},
         "features[0].id", "not safe"),
        ({"type": "FeatureCollection", "features": [{"type": "Feature", "id": "a", "geometry": good},
                                                     {"type": "Feature", "id": "a", "geometry": good}]},
         "features[1].id", "duplicate"),
        ({"type": "FeatureCollection", "features": [{"type": "Feature", "id": "a", "geometry": good,
                                                     "properties": {"date": "yesterday"}}]},
         "features[0].properties.date", "ISO date"),
        ({"type": "FeatureCollection", "features": [{"type": "Feature", "id": "a", "geometry": good,
                                                     "properties": {"crs": "EPSG:0"}}]},
         "features[0].properties.crs", "unknown CRS"),
        ({"type": "Topology"}, "features", "FeatureCollection"),
    ]
    for data, where, text in cases:
        with pytest.raises(ConfigError) as info:
            load_features(data)
        assert info.value.where == where and text in str(info.value), str(info.value)
    with pytest.raises(ConfigError, match="features file not found"):
        load_features(tmp_path / "nope.geojson")


_json = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False)
                     | st.text(max_size=8), lambda c: st.lists(c, max_size=3)
                     | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(list(PixelsConfig.model_fields) + ["junk"]), _json, max_size=8))
@example({"start": None, "bands": [None, ","]})  # a comma among non-strings was an AttributeError (CI)
def test_fuzz_random_configs_raise_only_config_error(data: dict[str, Any]) -> None:
    try:
        load_config(data)
    except ConfigError:
        pass


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(sorted(BASE) + ["mask", "composite_method", "dynamic_dates_step", "crs"]),
       value=_json)
def test_fuzz_mutated_configs_raise_only_config_error(key: str, value: Any) -> None:
    try:
        load_config({**BASE, key: value})
    except ConfigError:
        pass


# ------------------------------------------------------------------------------ the original pixels' configs
def _original_minimal() -> dict[str, Any]:
    """tesselo/pixels tests/test_validators.py ``minimal_valid_config`` (their sample geojson: a parcel)."""
    return {"start": "2018-01-01", "end": "2018-03-31", "platforms": "SENTINEL_2", "level": "L2A",
            "bands": ["B02,B03,B04,B08,B11,B12"],
            "geojson": {"type": "FeatureCollection", "crs": {"init": "EPSG:3857"}, "features": [
                {"type": "Feature", "properties": {},
                 "geometry": {"type": "Polygon", "coordinates": [[[-1028560.0, 4689500.0], [-1028560.0, 4689000.0],
                                                                  [-1028000.0, 4689000.0], [-1028000.0, 4689500.0],
                                                                  [-1028560.0, 4689500.0]]]}}]}}


def test_original_minimal_config_runs_unchanged() -> None:
    c = load_config(_original_minimal())
    assert c.mode == "all" and c.interval is None  # the original: latest_pixel over interval "all"
    assert c.band_names == ["blue", "green", "red", "nir", "swir16", "swir22"]
    assert c.geojson is not None


def test_original_complete_config_runs_unchanged() -> None:
    """``complete_valid_config`` of the original's tests: both fixed and dynamic dates (dynamic wins),
    interval "all", pool_size 0, mode latest_pixel."""
    raw = {**_original_minimal(), "dynamic_dates_step": 2, "end": "2018-01-31", "interval": "all",
           "interval_step": 1, "scale": 10, "clip": True, "maxcloud": 20, "pool_size": 0, "limit": 100,
           "mode": "latest_pixel", "dynamic_dates_interval": "months"}
    c = load_config(raw)
    assert c.mode == "all" and c.start is None and c.dynamic_dates_step == 2
    assert c.pool_size == 8 and c.pool_bands is False
    feature = Feature("f", box(0, 0, 1, 1), date=dt.date(2018, 5, 31))
    assert c.date_range(feature) == (dt.date(2018, 3, 31), dt.date(2018, 5, 31))


@pytest.mark.parametrize("original,ours", [("SCL", "first_clear"), ("FULL", "quality"), ("scl", "first_clear")])
def test_original_composite_methods_are_aliases(original: str, ours: str) -> None:
    c = cfg(mode="composite", composite_method=original)
    assert c.composite_method == ours == c.resolved_composite_method
    landsat = cfg(mode="composite", composite_method="QA_PIXEL", platforms="LANDSAT_8", level="L2",
                  bands=["red", "nir08"], scale=30)
    assert landsat.composite_method == "qa_pixel"


def test_original_defaults_and_pool_options() -> None:
    c = cfg(mode=None)  # mode omitted, interval given: the original's default mode
    assert c.mode == "latest_pixel"
    assert cfg(pool_size=0).pool_size == 8
    assert cfg(pool_size=1, pool_bands=True).pool_bands is True
    e = err(pool_size=4, pool_bands=True)
    assert e.where == "pool_bands"
    assert cfg(dynamic_dates_interval="weeks", start=None, end=None).dynamic_dates_step == 1


def test_original_interval_all_means_mode_all() -> None:
    for mode in ("latest_pixel", "composite", None):
        c = cfg(mode=mode, interval="all", interval_step=1)
        assert c.mode == "all" and c.interval is None and c.interval_step is None


def test_geojson_in_the_config_is_validated() -> None:
    bad = {**_original_minimal(), "geojson": {"type": "FeatureCollection", "features": []}}
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.where.startswith("geojson")


def test_config_identity_of_one_platform_is_unchanged() -> None:
    """Outputs written before several platforms were allowed must not look like another config's."""
    assert '"platforms":"sentinel-2"' in cfg().output_identity
    assert "pool_bands" not in cfg().output_identity and "geojson" not in cfg().output_identity


# ------------------------------------------------------------------------------ hostile numbers and dates
@pytest.mark.parametrize("raw_json,field", [
    ('"scale": Infinity', "scale"), ('"scale": 1e400', "scale"), ('"scale": NaN', "scale"),
    ('"scale": 1e308', "scale"), ('"maxcloud": NaN', "maxcloud"),
    ('"interval_step": 1000000000000', "interval_step"),
])
def test_non_finite_and_huge_numbers_name_their_field(raw_json: str, field: str) -> None:
    text = json.dumps({k: v for k, v in BASE.items() if k not in {"scale", "interval_step", "maxcloud"}})
    e = pytest.raises(ConfigError, load_config, text[:-1] + ", " + raw_json + "}").value
    assert e.where == field, str(e)


def test_dates_outside_the_calendar_are_config_errors() -> None:
    dyn = cfg(start=None, end=None, dynamic_dates_interval="months", dynamic_dates_step=10_000)
    with pytest.raises(ConfigError, match="outside the calendar"):
        dyn.bins(Feature("f", box(0, 0, 1, 1), date=dt.date(5, 1, 1)))
    huge = cfg(start="0001-01-01", end="9999-12-31", interval="days")
    with pytest.raises(ConfigError, match="time bins") as info:
        huge.bins(Feature("f", box(0, 0, 1, 1)))
    assert info.value.where == "interval"
    late = cfg(start="9999-01-01", end="9999-12-31", interval="months", interval_step=10_000)
    assert len(late.bins(Feature("f", box(0, 0, 1, 1)))) == 1  # the bin past the calendar is cut at end


def test_deeply_nested_and_long_inputs_are_one_line(tmp_path: Path) -> None:
    deep = '{"start": "2021-01-01", "mask": ' + "[" * 100_000 + "]" * 100_000 + "}"
    e = pytest.raises(ConfigError, load_config, deep).value
    assert "nested" in str(e) and "\n" not in str(e)
    e = pytest.raises(ConfigError, load_config, {**BASE, "catalog": "x" * 10_000_000, "limit": "y" * 10**6}).value
    assert len(str(e)) < 400
    e = pytest.raises(ConfigError, load_config, tmp_path).value  # a directory
    assert e.where == str(tmp_path)


_hostile = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**20, 10**20),
                     st.sampled_from(["0001-01-01", "9999-12-31", "-1", "", "all", "years", "1e400"]),
                     st.text(max_size=5))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.dictionaries(st.sampled_from(["scale", "interval_step", "dynamic_dates_step", "start", "end",
                                               "maxcloud", "limit", "chunksize", "max_pixels", "interval",
                                               "pool_size"]), _hostile, max_size=4),
       dynamic=st.booleans(), date=st.dates())
def test_fuzz_hostile_numbers_and_dates_reach_only_config_errors(values: dict[str, Any], dynamic: bool,
                                                                 date: dt.date) -> None:
    """Load, then plan bins and a grid: no OverflowError/ValueError from dateutil, grid or datetime."""
    raw = {**BASE, **({"start": None, "end": None, "dynamic_dates_interval": "months",
                       "dynamic_dates_step": 3} if dynamic else {}), **values}
    try:
        c = load_config({k: v for k, v in raw.items() if v is not None})
        plan_feature(c, Feature("f", box(-8.99, 30.44, -8.98, 30.45), date=date))
    except ConfigError:
        pass
