"""PXM manifest validation: every rule with its JSON path, the colour-key rule, invalid JSON, fuzzing, CLI."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pixels_xr.errors import ManifestError
from pixels_xr.pxm import Manifest, validate_manifest
from pixels_xr.pxm.cli import pxm_app

SPEC = Path(__file__).resolve().parents[3] / "shared" / "seeds"

VALID: dict[str, Any] = {
    "sources": [
        "s3://my-bucket/20171101/17RLL630825.tif",
        "s3://my-bucket/20171101/17RLL675930.tif",
        "s3://my-bucket/20171101/17RLL675720.tif",
        "s3://my-bucket/20171101/17RLL705780.tif",
    ],
    "info": {
        "tilesets": ["customer1.aerials", "customer1.aerials-2018"],
        "color": {".": "sigmoidal RGB 4 0.5", "7RLL675": "sigmoidal RGB 3 0.4 gamma B 1.1 saturation 1.25"},
        "bidx": "1,2,3",
        "ndv": "[255, 255, 255]",
        "date": "2018-02-20",
        "license": "cc by-sa 4.0",
        "account": "customer1",
        "product": "november_aerial_photos",
        "notes": "Aerial photos from November 2017, Northern California",
        "crs": "EPSG:26910",
    },
}


def with_(path: str, value: Any, base: dict | None = None) -> dict:
    """A deep copy of VALID with ``path`` ("info.tilesets[1]", "sources") set (or deleted for ...)."""
    doc = copy.deepcopy(VALID if base is None else base)
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    node: Any = doc
    for p in parts[:-1]:
        node = node[int(p[1:-1])] if p.startswith("[") else node[p]
    last = parts[-1]
    key: Any = int(last[1:-1]) if last.startswith("[") else last
    if value is ...:
        del node[key]
    else:
        node[key] = value
    return doc


def test_valid_04_and_05() -> None:
    m = validate_manifest(VALID)
    assert isinstance(m, Manifest) and m.version == "0.4" and m.version_string is None
    assert m.info.ndv == (255, 255, 255) and m.info.bidx == (1, 2, 3) and m.info.crs == "EPSG:26910"
    m5 = validate_manifest({**VALID, "version": "0.5.1"})
    assert m5.version == "0.5" and m5.version_string == "0.5.1"
    # 0.5's schema writes ndv and bidx as arrays
    m5b = validate_manifest(with_("info.bidx", [3, 2, 1], with_("info.ndv", [0, 0, 0], {**VALID, "version": "0.5"})))
    assert m5b.info.ndv == (0, 0, 0) and m5b.info.bidx == (3, 2, 1)
    minimal = with_("info.color", ..., with_("info.bidx", ..., with_("info.ndv", ..., with_("info.crs", ...))))
    assert validate_manifest(minimal).info.color == ()


def test_spec_examples_have_trailing_commas(tmp_path: Path) -> None:
    spec = next(SPEC.glob("004_*.txt"), None)
    if spec is None:
        pytest.skip("spec text not found")
    blocks = re.findall(r"\n\n(    \{\n.*?\n    \})\n", spec.read_text(encoding="utf-8", errors="replace"), re.S)
    assert len(blocks) == 2
    for i, block in enumerate(blocks):
        f = tmp_path / f"example{i}.json"
        f.write_text(block)
        with pytest.raises(ManifestError) as err:
            validate_manifest(f)
        assert err.value.where == str(f)
        assert re.search(r"line \d+ column \d+: trailing comma before '\}'", err.value.message)
        fixed = re.sub(r",(\s*[}\]])", r"\1", block)
        assert validate_manifest(fixed).version == "0.4"


def test_invalid_json_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "m.json"
    f.write_text('{\n  "sources": [\n    "s3://b/x.tif",\n  ],\n  "info": {}\n}')
    with pytest.raises(ManifestError, match=r"line 3 column 19: trailing comma before '\]'") as err:
        validate_manifest(f)
    assert err.value.where == str(f) and str(f) in str(err.value)
    f.write_text('{"sources": [} ')
    with pytest.raises(ManifestError, match=r"invalid JSON at line 1 column 14"):
        validate_manifest(f)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"sources": [], "sources": []}', "duplicate key"),
        ('{"sources": [NaN]}', "NaN is not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ("{" * 5000 + "}" * 5000, "nested too deeply|invalid JSON"),
    ],
)
def test_json_level_errors(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "m.json"
    f.write_text(text)
    with pytest.raises(ManifestError, match=message):
        validate_manifest(f)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read") as err:
        validate_manifest(tmp_path / "missing.json")
    assert err.value.where.endswith("missing.json")
    f = tmp_path / "latin1.json"
    f.write_bytes(b'{"notes": "\xe9"}')
    with pytest.raises(ManifestError, match="not UTF-8"):
        validate_manifest(f)


RULES = [
    # (path, value, where, message fragment)
    ("version", "1.0", "version", "unsupported version"),
    ("version", 0.5, "version", "unsupported version"),
    ("extra", 1, "extra", "unknown top-level key"),
    ("sources", ..., "sources", "required key is missing"),
    ("info", ..., "info", "required key is missing"),
    ("sources", [], "sources", "at least one source"),
    ("sources", "s3://my-bucket/a.tif", "sources", "must be an array"),
    ("sources[1]", 7, "sources[1]", "must be a string"),
    ("sources[1]", "/data/x.tif", "sources[1]", "must be an S3 URI"),
    ("sources[1]", "https://my-bucket/x.tif", "sources[1]", "must be an S3 URI"),
    ("sources[1]", "s3://my-bucket/image-1.tif", "sources[1]", "no dashes"),
    ("sources[1]", "s3://my-bucket/image 1.tif", "sources[1]", "basename"),
    ("sources[1]", "s3://my-bucket/imageé.tif", "sources[1]", "basename"),
    ("sources[1]", "s3://my-bucket/image.png", "sources[1]", "extension"),
    ("sources[1]", "s3://my-bucket/image", "sources[1]", "extension"),
    ("sources[1]", "s3://my-bucket/", "sources[1]", "invalid S3 key"),
    ("sources[1]", "s3://my-bucket/a/../b.tif", "sources[1]", "invalid S3 key"),
    ("sources[1]", "s3://my-bucket/a//b.tif", "sources[1]", "invalid S3 key"),
    ("sources[1]", "s3://b/x.tif", "sources[1]", "bucket"),
    ("sources[1]", "s3://My_Bucket/x.tif", "sources[1]", "bucket"),
    ("sources[1]", "s3://my-bucket/20171101/17RLL630825.tif", "sources[1]", "duplicate of sources[0]"),
    ("info", [], "info", "must be an object"),
    ("info.colour", {}, "info.colour", "unknown key"),
    ("info.tilesets", ..., "info.tilesets", "required key is missing"),
    ("info.license", ..., "info.license", "required key is missing"),
    ("info.notes", ..., "info.notes", "required key is missing"),
    ("info.account", ..., "info.account", "required key is missing"),
    ("info.product", ..., "info.product", "required key is missing"),
    ("info.date", ..., "info.date", "required key is missing"),
    ("info.tilesets", [], "info.tilesets", "at least one"),
    ("info.tilesets", "customer1.aerials", "info.tilesets", "non-empty array"),
    ("info.tilesets[1]", "customer1", "info.tilesets[1]", "username.mapname"),
    ("info.tilesets[1]", "customer1.a.b", "info.tilesets[1]", "username.mapname"),
    ("info.tilesets[1]", "customer1." + "m" * 33, "info.tilesets[1]", "username.mapname"),
    ("info.tilesets[1]", "customer2.aerials", "info.tilesets[1]", "must equal info.account"),
    ("info.tilesets[1]", "customer1.aerials", "info.tilesets[1]", "duplicate tileset"),
    ("info.tilesets[0]", None, "info.tilesets[0]", "must be a string"),
    ("info.account", "customer 1", "info.account", "no spaces"),
    ("info.account", "c" * 33, "info.account", "1-32"),
    ("info.account", "", "info.account", "non-empty"),
    ("info.product", "us aerial", "info.product", "without spaces"),
    ("info.product", "../etc", "info.product", "without spaces or '..'"),
    ("info.date", "18", "info.date", "YYYY or YYYY-MM-DD"),
    ("info.date", "2018-2-20", "info.date", "YYYY or YYYY-MM-DD"),
    ("info.date", "2018-02-30", "info.date", "not a real date"),
    ("info.date", "0000", "info.date", "not a real date"),
    ("info.date", 2018, "info.date", "must be a string"),
    ("info.license", "  ", "info.license", "non-empty"),
    ("info.notes", ["a"], "info.notes", "must be a string"),
    ("info.crs", "26910", "info.crs", "EPSG:NNNN"),
    ("info.crs", "epsg:26910", "info.crs", "EPSG:NNNN"),
    ("info.crs", "EPSG:9999", "info.crs", "not a known EPSG code"),
    ("info.ndv", "[255, 255]", "info.ndv", "3 integers 0-255"),
    ("info.ndv", "[255, 255, 256]", "info.ndv", "3 integers 0-255"),
    ("info.ndv", "[255, 255, -1]", "info.ndv", "3 integers 0-255"),
    ("info.ndv", "255,255,255", "info.ndv", "list of 3 integers"),
    ("info.ndv", "[255, 255, 255.0]", "info.ndv", "list of integers"),
    ("info.ndv", 255, "info.ndv", "list of integers"),
    ("info.bidx", "1,2", "info.bidx", "3 band indexes"),
    ("info.bidx", "1,2,3,4,5", "info.bidx", "3 band indexes"),
    ("info.bidx", "0,1,2", "info.bidx", "start at 1"),
    ("info.bidx", "1,1,2", "info.bidx", "distinct"),
    ("info.bidx", "1;2;3", "info.bidx", "comma-separated"),
    ("info.bidx", "r,g,b", "info.bidx", "comma-separated"),
    ("info.color", "sigmoidal RGB 3 0.5", "info.color", "must be an object"),
    ("info.color", {}, "info.color", "must not be empty"),
    ("info.color.7RLL675", "sigmoidal RGB 3", 'info.color["7RLL675"]', "sigmoidal takes 3 argument"),
    ("info.color.7RLL675", "contrast RGB 3", 'info.color["7RLL675"]', "not an operation"),
    ("info.color.7RLL675", "gamma rgba 1.1", 'info.color["7RLL675"]', "BANDS"),
    ("info.color.7RLL675", 3, 'info.color["7RLL675"]', "must be a string"),
    ("info.color.x(", "gamma r 1.1", 'info.color["x("]', "not a valid regex"),
    ("info.color.(a+)+$", "gamma r 1.1", 'info.color["(a+)+$"]', "nested quantifiers"),
    ("info.color.(\\w*)*x", "gamma r 1.1", 'info.color["(\\\\w*)*x"]', "nested quantifiers"),
    ("info.color.(a|aa)+b", "gamma r 1.1", 'info.color["(a|aa)+b"]', "quantified alternation"),
    ("info.color.(x)\\1", "gamma r 1.1", 'info.color["(x)\\\\1"]', "backreference"),
    ("info.color.", "gamma r 1.1", 'info.color[""]', "non-empty regex"),
]


@pytest.mark.parametrize(("path", "value", "where", "message"), RULES, ids=[f"{r[0]}={r[1]!r}" for r in RULES])
def test_every_rule_names_its_path(path: str, value: Any, where: str, message: str) -> None:
    if path.startswith("info.color."):
        doc = copy.deepcopy(VALID)
        doc["info"]["color"][path[len("info.color."):]] = value
    elif path in ("version", "extra"):
        doc = {**copy.deepcopy(VALID), path: value}
    else:
        doc = with_(path, value)
    with pytest.raises(ManifestError) as err:
        validate_manifest(doc)
    assert err.value.where == where
    assert message in err.value.message
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{where}: ")


def test_empty_notes_are_accepted() -> None:
    """The spec's reference tool writes ``"notes": ""`` by default (issue 14.4); it is still a string."""
    for doc in (with_("info.notes", ""), {**with_("info.notes", ""), "version": "0.5.1"}):
        assert validate_manifest(doc).info.notes == ""
    with pytest.raises(ManifestError, match="must be a string"):
        validate_manifest(with_("info.notes", None))


def test_05_account_is_lowercase() -> None:
    doc = with_("info.tilesets", ["Customer1.aerials"], with_("info.account", "Customer1"))
    assert validate_manifest(doc).info.account == "Customer1"  # the 0.4 draft only forbids spaces
    with pytest.raises(ManifestError, match="lowercase") as err:
        validate_manifest({**doc, "version": "0.5.1"})
    assert err.value.where == "info.account"


# ------------------------------------------------------------------------------------------- colour keys


def test_spec_key_selects_by_search() -> None:
    m = validate_manifest(VALID)
    rule = m.color_rule("s3://my-bucket/20171101/17RLL675930.tif")
    assert rule is not None and rule.key == "7RLL675"
    assert [op.name for op in m.color_ops("17RLL675930.tif")] == ["sigmoidal", "gamma", "saturation"]
    assert m.color_rule("17RLL630825.tif").key == "."


def test_longest_match_wins_ties_go_to_later_key() -> None:
    color = {"RLL": "gamma r 1.1", ".": "gamma r 1.2", "17RLL675": "gamma r 1.3", "RLL6": "gamma r 1.4",
             "L67": "gamma r 1.5"}
    m = validate_manifest(with_("info.color", color))
    assert m.color_rule("17RLL675930.tif").key == "17RLL675"  # 8 characters beat 4 and 3
    assert m.color_rule("17RLL630825.tif").key == "RLL6"  # 4 > 3 > 1
    assert m.color_rule("17RLL705780.tif").key == "RLL"
    tie = validate_manifest(with_("info.color", {"RLL": "gamma r 1.1", "LL7": "gamma r 1.2"}))
    assert tie.color_rule("17RLL705780.tif").key == "LL7"  # same length: the later key wins
    order = validate_manifest(with_("info.color", {"7RLL675": "gamma r 1.1", ".": "gamma r 1.2"}))
    assert order.color_rule("17RLL675930.tif").key == "7RLL675"  # manifest order does not beat length
    none = validate_manifest(with_("info.color", {"^X": "gamma r 1.1"}))
    assert none.color_rule("17RLL675930.tif") is None and none.color_ops("17RLL675930.tif") == ()


def test_safe_regexes_accepted() -> None:
    keys = {"^17RLL6[0-9]{2}": "gamma r 1.1", "(west|east)_aerial": "gamma r 1.2", "a?b*c+": "gamma r 1.3",
            "x{2,5}y": "gamma r 1.4", "[A-Z]+[0-9]+\\.tif$": "gamma r 1.5", "(?i)rll": "gamma r 1.6"}
    assert len(validate_manifest(with_("info.color", keys)).info.color) == 6


# --------------------------------------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=20,
)
PATHS = ["sources", "sources[0]", "info", "info.tilesets", "info.tilesets[0]", "info.account", "info.product",
         "info.date", "info.license", "info.notes", "info.crs", "info.ndv", "info.bidx", "info.color",
         "info.color..", "version"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=json_values | st.just(...))
def test_fuzz_mutated_manifests(path: str, value: Any) -> None:
    if path == "info.color..":
        doc = copy.deepcopy(VALID)
        if value is not ...:
            doc["info"]["color"]["."] = value
    elif path == "version":
        doc = {**copy.deepcopy(VALID), "version": value} if value is not ... else copy.deepcopy(VALID)
    else:
        doc = with_(path, value)
    try:
        assert isinstance(validate_manifest(doc), Manifest)
    except ManifestError as err:
        assert err.where and "\n" not in str(err)


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_fuzz_random_documents(value: Any) -> None:
    try:
        validate_manifest(value if isinstance(value, dict) else {"sources": value, "info": value})
    except ManifestError:
        pass


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200) | st.builds(lambda s, i, c: s[:i] + c + s[i:], st.just(json.dumps(VALID)),
                                              st.integers(0, 900), st.sampled_from([",", "}", "]", '"', "\\", "x"])))
def test_fuzz_text(tmp_path_factory, text: str) -> None:
    f = tmp_path_factory.mktemp("fz") / "m.json"
    f.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        validate_manifest(f)
    except ManifestError as err:
        assert "\n" not in str(err)


@settings(max_examples=150, deadline=None)
@given(key=st.text(alphabet="a()|*+?{}[]^$.\\1x,", max_size=14))
def test_fuzz_colour_keys(key: str) -> None:
    doc = copy.deepcopy(VALID)
    doc["info"]["color"] = {key: "gamma r 1.1"}
    doc["sources"] = ["s3://my-bucket/" + "a" * 60 + "_x.tif"]
    try:
        validate_manifest(doc)
    except ManifestError as err:
        assert err.where.startswith("info.color")


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_validate_ok(tmp_path: Path) -> None:
    f = tmp_path / "m.json"
    f.write_text(json.dumps({**VALID, "version": "0.5.1"}))
    res = CliRunner().invoke(pxm_app, ["validate", str(f)])
    assert res.exit_code == 0, res.output
    assert "spec 0.5 (version 0.5.1)" in res.output and "4 source(s)" in res.output
    assert "colour 17RLL675930.tif: sigmoidal RGB 3 0.4 gamma B 1.1 saturation 1.25 (key '7RLL675')" in res.output


def test_cli_validate_error_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "m.json"
    f.write_text(json.dumps(with_("sources[2]", "s3://my-bucket/bad-name.tif")))
    res = CliRunner().invoke(pxm_app, ["validate", str(f)])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: sources[2]: ") and "Traceback" not in res.output
    f.write_text(json.dumps(VALID)[:-1] + ",}")
    res = CliRunner().invoke(pxm_app, ["validate", str(f)])
    assert res.exit_code == 1 and "trailing comma" in res.output and str(f) in res.output


def test_cli_check_sources(s3_server, shared_data: Path, tmp_path: Path) -> None:
    good = s3_server.upload(shared_data / "rgb" / "rasterio_RGBA.byte.tif", "pxm-cli", "a/rgba_byte.tif")
    bad = s3_server.upload(shared_data / "rgb" / "2012_30cm_594_5450_src_ndv.tiny.tif", "pxm-cli", "a/ndv_tiny.tif")
    doc = with_("sources", [good], with_("info.ndv", ..., with_("info.bidx", ..., with_("info.crs", ...))))
    f = tmp_path / "m.json"
    f.write_text(json.dumps(doc))
    res = CliRunner().invoke(pxm_app, ["validate", str(f), "--check-sources"])
    assert res.exit_code == 0, res.output
    assert "1 checked, ok" in res.output
    doc["sources"] = [good, bad]
    f.write_text(json.dumps(doc))
    res = CliRunner().invoke(pxm_app, ["validate", str(f), "--check-sources"])
    assert res.exit_code == 1 and "error: sources[1] s3://pxm-cli/a/ndv_tiny.tif: the edge" in res.output
    assert "Traceback" not in res.output


# ---------------------------------------------------------------------------------- colour key cost (15.6)

#: A legal key (no nested quantifiers) that backtracks polynomially: ~20 ms on a 100-character name here.
SLOW_KEY = "a*a*a*a*a*_2"


def _many(names: list[str]) -> dict:
    doc = copy.deepcopy(VALID)
    doc["sources"] = [f"s3://my-bucket/{folder}/{name}" for folder, name in names]
    doc["info"]["color"] = {SLOW_KEY: "gamma r 1.1", ".": "gamma g 1.2"}
    return doc


def test_colour_keys_share_one_time_budget_per_manifest() -> None:
    """1000 distinct names × a 20 ms key: each search is quick, all of them together are not (issue 15.6)."""
    doc = _many([("f", "a" * 100 + f"_1x{i}_2.tif") for i in range(1000)])
    with pytest.raises(ManifestError, match="colour keys took more than 2 s to match 1000 source file") as err:
        validate_manifest(doc)
    assert err.value.where == f'info.color["{SLOW_KEY}"]' and "\n" not in str(err.value)


@pytest.mark.timeout(30)
def test_colour_keys_are_matched_once_per_distinct_name() -> None:
    """The same file name in 1000 folders is one search per key, and look-ups reuse it (no re-matching)."""
    name = "a" * 100 + "_1x_2.tif"
    m = validate_manifest(_many([(f"f{i}", name) for i in range(1000)]))
    assert list(m.matches) == [name]
    assert all(m.color_rule(uri).key == SLOW_KEY for uri in m.sources)  # 5 characters beat "."
    assert m.unused_color_keys() == []
    fast = validate_manifest(_many([("f", f"x{i}_3.tif") for i in range(1000)]))  # cheap names: no limit hit
    assert len(fast.matches) == 1000 and fast.color_rule(fast.sources[0]).key == "."
    assert validate_manifest(with_("info.color", {"^Z": "gamma r 1.1", ".": "gamma g 1"})).unused_color_keys() == ["^Z"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(["info.ndv", "info.bidx", "info.crs", "info.date", "sources[0]"]),
       depth=st.integers(1, 200_000), opener=st.sampled_from(["[", "{\"a\":", "[1,"]))
def test_fuzz_deeply_nested_strings_and_documents(path: str, depth: int, opener: str) -> None:
    """Hostile nesting inside a string field (ndv is JSON inside a string) or the document itself."""
    closer = {"[": "]", "{\"a\":": "}", "[1,": "]"}[opener]
    nested = opener * depth + closer * depth
    for doc in (with_(path, nested), json.dumps(VALID)[:-1] + ', "x": ' + nested + "}"):
        try:
            validate_manifest(doc)
        except ManifestError as err:
            assert err.where and "\n" not in str(err) and len(str(err)) < 2500
