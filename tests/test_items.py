"""The typed item models: parsed once, frozen, round-trip to STAC, tokenised by content."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pystac
import pytest
from dask.base import tokenize
from shapely.geometry import box

from pixels_xr import build_cube, load_config
from pixels_xr.catalog import as_items, normalize_item, parse_item, read_local, search
from pixels_xr.errors import CatalogError
from pixels_xr.features import Feature
from pixels_xr.items import ParsedItem, RasterSource
from pixels_xr.testing.sample import make_sample

ES_MIXED = "stac/earthsearch_v1_sentinel-2-l2a_7items_mixed_tiles.json"


def _cfg(**kw):
    base = {"start": "2020-01-01", "end": "2024-12-31", "mode": "latest_pixel", "interval": "months",
            "platforms": "SENTINEL_2", "bands": ["red", "nir"]}
    return load_config({**base, **kw})


def _raw(shared_data: Path) -> list[dict]:
    data = json.loads((shared_data / ES_MIXED).read_text())
    return data["features"] if "features" in data else data


def test_parse_once_typed_sources(shared_data: Path) -> None:
    raw = _raw(shared_data)[0]
    item = parse_item(raw, _cfg())
    assert list(item.sources) == ["red", "nir", "scl"]  # configured bands, mask last
    red = item.sources["red"]
    assert red.key in raw["assets"] and red.href == raw["assets"][red.key]["href"]
    assert red.reflectance and not item.sources["scl"].reflectance
    assert isinstance(red.epsg, int) and item.epsg == red.epsg
    assert item.datetime.tzinfo is not None and item.id == raw["id"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        item.id = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        red.href = "/elsewhere.tif"  # type: ignore[misc]


def test_to_stac_round_trips_and_matches_normalize(shared_data: Path) -> None:
    cfg = _cfg()
    for raw in _raw(shared_data):
        item = parse_item(raw, cfg)
        stac = item.to_stac()
        assert stac == normalize_item(raw, cfg)
        # the normalised form as documented: raw asset fields kept (less the band lists and proj:code),
        # one raster:bands entry, the original key; properties with an integer proj:epsg
        for name, source in item.sources.items():
            kept = {k: v for k, v in raw["assets"][source.key].items()
                    if k not in {"raster:bands", "bands", "proj:code"}}
            assert stac["assets"][name] == {**kept, "proj:epsg": source.epsg, "raster:bands": [
                {"scale": source.scale, "offset": source.offset, "nodata": source.nodata,
                 "data_type": source.data_type}], "pixels_xr:key": source.key,
                "pixels_xr:reflectance": source.reflectance}
        props = {k: v for k, v in raw["properties"].items() if k != "proj:code"}
        assert stac["properties"] == {**props, "proj:epsg": item.epsg}
        assert stac["id"] == raw["id"] and stac["geometry"] == raw["geometry"]
        assert ParsedItem.is_normalised(stac) and not ParsedItem.is_normalised(raw)
        assert ParsedItem.from_stac(json.loads(json.dumps(stac))) == item  # also through JSON
        pystac.Item.from_dict(stac)  # valid enough for pystac (odc-stac's loader path)


def test_pickle_hash_and_dask_token_follow_content(shared_data: Path) -> None:
    item = parse_item(_raw(shared_data)[0], _cfg())
    again = pickle.loads(pickle.dumps(item))
    assert again == item and hash(again) == hash(item) and tokenize(again) == tokenize(item)
    moved = dataclasses.replace(item, sources={**item.sources, "red": dataclasses.replace(
        item.sources["red"], href="/other/red.tif")})
    assert tokenize(moved) != tokenize(item)
    reprocessed = dataclasses.replace(item, properties={**item.properties, "updated": "2099-01-01T00:00:00Z"})
    assert reprocessed.version != item.version and tokenize(reprocessed) != tokenize(item)


def test_from_stac_names_the_item_when_not_normalised() -> None:
    with pytest.raises(CatalogError, match="item 'x'.*not a normalised item"):
        ParsedItem.from_stac({"id": "x", "properties": {"datetime": "2020-01-01T00:00:00Z"},
                              "assets": {"red": {"href": "a.tif"}}})


def test_build_cube_takes_parsed_normalised_raw_and_pystac_items(tmp_path: Path) -> None:
    sample = make_sample(tmp_path / "sample", n_dates=4, width=64, height=64, tiles=1)
    cfg = load_config({"start": "2021-11-01", "end": "2022-01-31", "mode": "latest_pixel", "interval": "months",
                       "platforms": "SENTINEL_2", "bands": ["red", "nir"], "catalog": str(sample.catalog)})
    feature = Feature("area", box(*sample.bounds), crs=sample.crs)
    parsed = search(cfg, feature)
    assert parsed and all(isinstance(i, ParsedItem) for i in parsed)
    wanted = {i.id for i in parsed}
    raw = [r for r in read_local(sample.catalog) if r["id"] in wanted]
    forms = {"normalised": [i.to_stac() for i in parsed], "raw": raw,
             "pystac": [pystac.Item.from_dict(r) for r in raw]}
    reference = build_cube(parsed, feature, cfg).compute()
    for name, items in forms.items():
        assert all(isinstance(i, ParsedItem) for i in as_items(items, cfg)), name
        cube = build_cube(items, feature, cfg).compute()
        np.testing.assert_array_equal(cube.values, reference.values, err_msg=name)
        assert list(cube.id.values) == list(reference.id.values), name
    assert isinstance(next(iter(parsed[0].sources.values())), RasterSource)
