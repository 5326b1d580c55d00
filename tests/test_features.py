"""Feature loading: every CRS form the original pixels and GeoJSON writers use, coordinates checked against
their CRS (through the loader and for Features built in Python), one-line CLI errors, and a fuzzed loader."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapely.geometry import Point, box

from pixels_xr.config import load_config
from pixels_xr.errors import ConfigError
from pixels_xr.features import Feature, load_features
from pixels_xr.grid import make_grid
from pixels_xr.plan import plan_feature

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "pixels-xr")
CONFIG = REPO / "configs" / "sample_monthly_composite.json"

#: A 1 km square near Lisbon in Web Mercator metres, and the same place in degrees.
MERCATOR_RING = [[-1001875.0, 4721671.0], [-1000875.0, 4721671.0], [-1000875.0, 4722671.0],
                 [-1001875.0, 4722671.0], [-1001875.0, 4721671.0]]
LONLAT_RING = [[-9.0, 38.7], [-8.99, 38.7], [-8.99, 38.71], [-9.0, 38.71], [-9.0, 38.7]]
UTM_RING = [[488000.0, 4283000.0], [489000.0, 4283000.0], [489000.0, 4284000.0], [488000.0, 4284000.0],
            [488000.0, 4283000.0]]


def collection(ring, crs=None, props=None) -> dict:
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "field-a", "properties": props or {},
         "geometry": {"type": "Polygon", "coordinates": [ring]}}]}
    if crs is not None:
        fc["crs"] = crs
    return fc


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------- CRS forms

MERCATOR_FORMS = [
    pytest.param({"init": "EPSG:3857"}, id="init"),  # what the original pixels read with rasterio
    pytest.param({"init": "epsg:3857"}, id="init-lower"),
    pytest.param({"type": "name", "properties": {"name": "EPSG:3857"}}, id="geojson2008-name"),
    pytest.param({"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::3857"}}, id="geojson2008-urn"),
    pytest.param({"type": "EPSG", "properties": {"code": 3857}}, id="epsg-code"),
    pytest.param("urn:ogc:def:crs:EPSG::3857", id="urn-string"),
    pytest.param("EPSG:3857", id="string"),
    pytest.param({"proj": "merc", "a": 6378137, "b": 6378137, "lat_ts": 0, "lon_0": 0, "x_0": 0, "y_0": 0,
                  "k": 1, "units": "m", "nadgrids": "@null", "wktext": True, "no_defs": True}, id="proj-dict"),
]


@pytest.mark.parametrize("crs", MERCATOR_FORMS)
def test_collection_crs_forms_mean_web_mercator(crs) -> None:
    [feature] = load_features(collection(MERCATOR_RING, crs))
    assert feature.crs == "EPSG:3857"
    assert feature.output_crs.to_epsg() == 3857
    lon0, lat0, lon1, lat1 = feature.lonlat_geometry().bounds
    assert -9.01 < lon0 < lon1 < -8.98 and 38.99 < lat0 < lat1 < 39.02  # metres, not degrees


@pytest.mark.parametrize("crs", MERCATOR_FORMS)
def test_per_feature_crs_forms_override_the_collection(crs) -> None:
    fc = collection(MERCATOR_RING, {"type": "name", "properties": {"name": "urn:ogc:def:crs:OGC:1.3:CRS84"}},
                    props={"crs": crs})
    fc["features"].append({"type": "Feature", "id": "field-b", "properties": {},
                           "geometry": {"type": "Polygon", "coordinates": [LONLAT_RING]}})
    a, b = load_features(fc)
    assert a.crs == "EPSG:3857" and a.output_crs.to_epsg() == 3857
    assert b.crs == "OGC:CRS84" and b.output_crs.to_epsg() == 32629  # degrees → the local UTM zone


def test_crs_member_on_the_feature_and_on_a_bare_geometry() -> None:
    fc = collection(UTM_RING)
    fc["features"][0]["crs"] = {"type": "name", "properties": {"name": "EPSG:32629"}}
    assert load_features(fc)[0].output_crs.to_epsg() == 32629
    geometry = {"type": "Polygon", "coordinates": [UTM_RING], "crs": {"type": "EPSG", "properties": {"code": 32629}}}
    assert load_features(geometry)[0].crs == "EPSG:32629"


@pytest.mark.parametrize("crs, where, needle", [
    ({"type": "link", "properties": {"href": "http://example.com/crs", "type": "proj4"}}, "crs", "linked"),
    ({"say": "haha!"}, "crs", "named CRS"),  # the original pixels' own invalid-crs test case
    ({"type": "name", "properties": {"name": "EPSG:99999"}}, "crs", "unknown CRS"),
    ({"type": "name", "properties": {}}, "crs.properties.name", "properties.name"),
    ({"type": "name"}, "crs.properties", "properties"),
    ({"type": "EPSG", "properties": {"code": "x"}}, "crs.properties.code", "integer"),
    ({"type": 7, "properties": {}}, "crs.type", "string"),
    ({"type": "ogcwkt", "properties": {}}, "crs.type", "unknown crs type"),
    ({"init": 3857}, "crs.init", "string"),
    ({"proj": "utm +zone=29"}, "crs", "PROJ parameters"),
    ([3857], "crs", "crs must be"),
    (-1, "crs", "not an EPSG code"),
    ("", "crs", "empty"),
])
def test_bad_crs_members_name_the_field(crs, where, needle) -> None:
    with pytest.raises(ConfigError) as err:
        load_features(collection(MERCATOR_RING, crs))
    assert err.value.where == f"features.{where}" and needle in str(err.value), str(err.value)
    with pytest.raises(ConfigError) as err:
        load_features(collection(MERCATOR_RING, props={"crs": crs}))
    assert err.value.where == f"features[0].properties.{where}", str(err.value)


def test_cli_reads_a_crs_init_file_as_metres(tmp_path) -> None:
    path = tmp_path / "mercator.geojson"
    path.write_text(json.dumps(collection(MERCATOR_RING, {"init": "EPSG:3857"})))
    proc = run_cli("validate", str(CONFIG), "--features", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "feature field-a:" in proc.stdout and "grid 101×101 @ 10.0 in EPSG:3857" in proc.stdout, proc.stdout


# ------------------------------------------------------------------------------------ coordinates vs CRS


@pytest.mark.parametrize("ring, crs, needle", [
    pytest.param(UTM_RING, None, "look like metres", id="utm-metres-as-degrees"),
    pytest.param(UTM_RING, "EPSG:4326", "declare the CRS", id="utm-metres-declared-4326"),
    pytest.param([[0, 95], [1, 95], [1, 96], [0, 95]], None, "latitude beyond ±90", id="lat-95"),
    pytest.param([[38.7, 100], [38.8, 100], [38.8, 101], [38.7, 100]], None, "latitude, longitude order",
                 id="lat-lon-swapped"),
    pytest.param([[200, 10], [201, 10], [201, 11], [200, 10]], None, "longitude −180..180", id="lon-200"),
    pytest.param([[1e300, 1e300], [2e300, 1e300], [2e300, 2e300], [1e300, 1e300]], None, "far too large",
                 id="1e300-degrees"),
    pytest.param([[1e300, 1e300], [2e300, 1e300], [2e300, 2e300], [1e300, 1e300]], "EPSG:32629",
                 "far outside the area of use of EPSG:32629", id="1e300-utm"),
    pytest.param([[5e5, 4e7], [5.001e5, 4e7], [5.001e5, 4.0001e7], [5e5, 4e7]], "EPSG:32629",
                 "far outside the area of use", id="utm-northing-4e7"),
    pytest.param([[0, 0], [math.nan, 0], [1, 1], [0, 0]], None, "finite", id="nan"),
    pytest.param([[0, 0], [math.inf, 0], [1, 1], [0, 0]], None, "finite", id="inf"),
    pytest.param(LONLAT_RING, "EPSG:32629", "look like degrees", id="degrees-as-utm"),
    pytest.param(LONLAT_RING, "EPSG:3857", "look like degrees", id="degrees-as-mercator"),
])
def test_nonsense_coordinates_for_their_crs_are_refused(ring, crs, needle) -> None:
    fc = collection(ring, {"type": "name", "properties": {"name": crs}} if crs else None)
    with pytest.raises(ConfigError) as err:
        load_features(fc)
    assert err.value.where == "features[0].geometry (feature 'field-a')", str(err.value)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_sensible_coordinates_stay_accepted() -> None:
    # a field a little past its UTM zone's western edge, the antimeridian, the poles, a point
    fc = collection([[150000, 4283000], [151000, 4283000], [151000, 4284000], [150000, 4283000]], "EPSG:32629")
    assert load_features(fc)[0].output_crs.to_epsg() == 32629
    for ring in ([[179.9, 10], [180, 10], [180, 10.1], [179.9, 10]], [[-180, -90], [180, -90], [0, -89], [-180, -90]]):
        assert load_features(collection(ring))
    assert load_features({"type": "Point", "coordinates": [-9.0, 38.7]})[0].output_crs.to_epsg() == 32629


@pytest.mark.parametrize("feature, needle", [
    (Feature("metres", box(488000, 4283000, 489000, 4284000)), "look like metres"),
    (Feature("huge", box(1e300, 1e300, 2e300, 2e300), crs="EPSG:32629"), "area of use"),
    (Feature("nan", Point(math.nan, 0.0)), "finite"),
    (Feature("degrees", box(-9.0, 38.7, -8.99, 38.71), crs="EPSG:3857"), "look like degrees"),
    (Feature("pole", box(0, 95, 1, 96)), "latitude"),
])
def test_features_built_in_python_are_checked_where_their_grid_is_made(feature, needle) -> None:
    cfg = load_config(CONFIG)
    for use in (lambda: feature.output_crs, lambda: plan_feature(cfg, feature),
                lambda: feature.lonlat_geometry(),
                lambda: plan_feature(cfg.model_copy(update={"crs": "EPSG:32629"}), feature)):
        with pytest.raises(ConfigError) as err:
            use()
        assert err.value.where == f"feature {feature.id!r}" and needle in str(err.value), str(err.value)


def test_a_geometry_outside_the_config_crs_domain_is_one_error() -> None:
    feature = Feature("nz", box(170.0, -45.0, 170.1, -44.9))  # New Zealand, seen from above the North Pole
    north = "+proj=ortho +lat_0=90 +lon_0=0 +type=crs"
    with pytest.raises(ConfigError, match=r"feature 'nz': the geometry cannot be expressed in \+proj=ortho"):
        feature.geometry_in(north)
    with pytest.raises(ConfigError, match="cannot be expressed"):
        plan_feature(load_config(CONFIG).model_copy(update={"crs": north}), feature)


@pytest.mark.parametrize("content, needles", [
    pytest.param(json.dumps(collection(UTM_RING)), ("field-a", "look like metres"), id="utm-as-degrees"),
    pytest.param(json.dumps(collection([[1e300, 1e300], [2e300, 1e300], [2e300, 2e300], [1e300, 1e300]])),
                 ("far too large",), id="1e300"),
    pytest.param(json.dumps(collection([[0, 0], [1e400, 0], [1, 1], [0, 0]])).replace("Infinity", "1e400"),
                 ("finite",), id="1e400"),
    pytest.param(json.dumps(collection([[0, 0], [float("nan"), 0], [1, 1], [0, 0]])), ("finite",), id="NaN"),
    pytest.param(json.dumps(collection(LONLAT_RING, "EPSG:3857")), ("look like degrees",), id="degrees-3857"),
    pytest.param("[" * 5000, ("nested deeper than 64",), id="deep"),
    pytest.param("{\"type\": ", ("not valid JSON",), id="truncated"),
])
def test_cli_bad_features_are_one_line(tmp_path, content, needles) -> None:
    path = tmp_path / "f.geojson"
    path.write_text(content)
    line = assert_one_line_error(run_cli("validate", str(CONFIG), "--features", str(path)), str(path), *needles)
    assert "OverflowError" not in line and "ValueError" not in line


def test_cli_features_path_that_is_a_directory(tmp_path) -> None:
    assert_one_line_error(run_cli("validate", str(CONFIG), "--features", str(tmp_path)), str(tmp_path),
                          "is a directory")
    with pytest.raises(ConfigError, match="is a directory"):
        load_features(tmp_path)


# ------------------------------------------------------------------------------------------------ fuzzing

_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e300, -1e300, 1e-300, 5e5, 4.3e6, 91.0]),
    st.text(max_size=12), st.sampled_from(["EPSG:4326", "EPSG:3857", "urn:ogc:def:crs:EPSG::3857", "init",
                                           "name", "EPSG", "link", "Polygon", "Feature", "+proj=utm", "EPSG:0"]))
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.sampled_from(["type", "properties", "name", "code", "init", "crs",
                                                           "id", "geometry", "coordinates", "features", "date",
                                                           "proj", "zone", "href"]) | st.text(max_size=6),
                                          inner, max_size=5)),
    max_leaves=25)
_crs_values = st.one_of(
    _json_values,
    st.builds(lambda n: {"type": "name", "properties": {"name": n}}, _json_scalars),
    st.builds(lambda c: {"type": "EPSG", "properties": {"code": c}}, _json_scalars),
    st.builds(lambda i: {"init": i}, _json_scalars),
    st.sampled_from([{"init": "EPSG:3857"}, {"type": "link", "properties": {"href": "x"}},
                     {"proj": "utm", "zone": 29}, {"proj": "longlat"}, {}]))
_BASE = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "EPSG:32629"}}, "features": [
    {"type": "Feature", "id": "a", "properties": {"date": "2022-05-01", "crs": "EPSG:32629"},
     "geometry": {"type": "Polygon", "coordinates": [UTM_RING]}},
    {"type": "Feature", "properties": {"id": "b"}, "geometry": {"type": "Point", "coordinates": [488000, 4283000]}}]}


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _replace(doc, path, new):
    if not path:
        return new
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return doc


def _assert_features_or_config_error(source) -> None:
    try:
        features = load_features(source)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert features and all(isinstance(f, Feature) for f in features)
    for f in features:  # what a run does next with a feature never fails with another exception either
        try:
            crs = f.output_crs
            bounds = f.geometry_in(crs).bounds
            make_grid(bounds, crs, 10.0)
            f.lonlat_geometry()
        except ConfigError:
            pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_geojson_gives_features_or_config_error(data) -> None:
    paths = list(_paths(_BASE))
    path = data.draw(st.sampled_from(paths))
    last = path[-1] if path else None
    new = data.draw(_crs_values if last == "crs" or "crs" in path else _json_values)
    doc = _replace(_BASE, path, new)
    _assert_features_or_config_error(doc)
    _assert_features_or_config_error(json.dumps(doc))  # NaN/Infinity literals and huge numbers as text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_json_values, depth=st.integers(0, 200), text=st.text(max_size=40))
def test_random_geojson_and_text_give_features_or_config_error(value, depth, text) -> None:
    _assert_features_or_config_error(value if isinstance(value, dict) else {"type": "Polygon", "coordinates": value})
    _assert_features_or_config_error(json.dumps({"type": "Polygon", "coordinates": value}))
    _assert_features_or_config_error("[" * depth + "]" * depth)
    _assert_features_or_config_error("{" + text)
