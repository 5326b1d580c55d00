"""Catalog search and item normalisation against a real STAC API (rustac on loopback) and local files."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import shapely
from shapely.geometry import box, mapping, shape

from pixels_xr import catalog as catalog_mod
from pixels_xr.catalog import deduplicate, item_datetime, normalize_item, read_local, search
from pixels_xr.config import load_config
from pixels_xr.errors import CatalogError
from pixels_xr.features import Feature

PC_S2 = "stac/pc_sentinel-2-l2a_T13TDE_100items.json"


def _items(shared: Path, name: str) -> list[dict]:
    data = json.loads((shared / name).read_text())
    return data["features"] if "features" in data else [data]


def _cfg(**kw: Any):
    base = {"start": "2024-01-01", "end": "2024-12-31", "mode": "all", "platforms": "SENTINEL_2",
            "bands": ["B04", "B08"], "scale": 10}
    base.update(kw)
    return load_config(base)


def _expected(items: list[dict], geom: shapely.Geometry, start: dt.date, end: dt.date, maxcloud: float) -> set:
    """Brute-force reference: filters, then one item per (tile, day) — the latest generated reprocessing."""
    kept: dict[tuple, dict] = {}
    for i in items:
        p = i["properties"]
        if start <= item_datetime(i).date() <= end and p["eo:cloud_cover"] <= maxcloud and shape(
                i["geometry"]).intersects(geom):
            key = (p.get("s2:mgrs_tile") or (p.get("landsat:wrs_path"), p.get("landsat:wrs_row")),
                   item_datetime(i).date())
            if key not in kept or str(p.get("s2:generation_time", "")) > str(
                    kept[key]["properties"].get("s2:generation_time", "")):
                kept[key] = i
    return {i["id"] for i in kept.values()}


def test_stac_api_search_paging_cloud_dates_geometry(shared_data: Path, stac_api, monkeypatch) -> None:
    items = _items(shared_data, PC_S2)
    url = stac_api(items)
    days = sorted({item_datetime(i).date() for i in items})
    start, end = days[10], days[60]  # the end day itself must be included
    geom = shape(items[0]["geometry"]).centroid.buffer(0.01)
    feature = Feature("f1", geom)
    cfg = _cfg(catalog=url, collection="sentinel-2-l2a", start=str(start), end=str(end), maxcloud=35)
    pages: list[int] = []
    real = catalog_mod.search_api

    def spy(*a: Any, **k: Any) -> list[dict]:
        k["page_size"] = 7  # force many pages
        out = real(*a, **k)
        pages.append(len(out))
        return out

    monkeypatch.setattr(catalog_mod, "search_api", spy)
    found = search(cfg, feature)
    want = _expected(items, geom, start, end, 35)
    assert {i.id for i in found} == want and len(want) > 7
    assert any(item_datetime(i).date() == end for i in found) or not any(
        item_datetime(i).date() == end for i in items if i["id"] in want)
    assert pages and pages[0] > 7  # more than one page was followed
    assert all(i.properties["eo:cloud_cover"] <= 35 for i in found)  # client filter, server ignores it
    assert [item_datetime(i) for i in found] == sorted(item_datetime(i) for i in found)
    red = found[0].sources["red"]
    assert red.key == "B04" and red.epsg == 32613
    # PC publishes no scale/offset: taken from s2:processing_baseline (≥ 04.00 → −0.1)
    assert red.scale == pytest.approx(1e-4)
    assert red.offset == pytest.approx(-0.1)
    # limit caps the result
    assert len(search(cfg.model_copy(update={"limit": 3}), feature)) == 3


def test_end_day_inclusive_and_far_geometry(shared_data: Path, stac_api) -> None:
    items = _items(shared_data, PC_S2)
    url = stac_api(items)
    day = item_datetime(items[5]).date()
    geom = shape(items[5]["geometry"]).centroid.buffer(0.01)
    cfg = _cfg(catalog=url, collection="sentinel-2-l2a", start=str(day), end=str(day))
    assert items[5]["id"] in {i.id for i in search(cfg, Feature("f", geom))}
    assert search(cfg, Feature("far", box(10, 10, 10.1, 10.1))) == []


def test_landsat_items_without_bbox_and_platform_filter(shared_data: Path, stac_api) -> None:
    items = _items(shared_data, "stac/pc_landsat-8-c2-l2_legacy_p044r034_2016-2022_126items.json")
    assert any("bbox" not in i for i in items)
    url = stac_api(items)
    geom = shape(items[0]["geometry"]).centroid.buffer(0.02)
    cfg = load_config({"start": "2016-01-01", "end": "2022-12-31", "mode": "all", "platforms": "LANDSAT_8",
                       "bands": ["red", "nir08"], "catalog": url, "collection": "landsat-8-c2-l2"})
    found = search(cfg, Feature("f", geom))
    want = _expected(items, geom, dt.date(2016, 1, 1), dt.date(2022, 12, 31), 100)
    assert {i.id for i in found} == want
    assert all(len(i.bbox) == 4 for i in found)
    b = found[0].sources["red"]
    assert (b.scale, b.offset) == (pytest.approx(2.75e-5), pytest.approx(-0.2))
    assert found[0].sources["nir08"].key == "SR_B5"
    assert "qa_pixel" in found[0].sources  # default mask asset travels with the bands
    cfg9 = cfg.model_copy(update={"platforms": "landsat-9"})
    assert search(cfg9, Feature("f", geom)) == []  # platform filter on the client


def test_local_formats_agree(shared_data: Path, tmp_path: Path) -> None:
    items = _items(shared_data, PC_S2)
    nd = tmp_path / "items.ndjson"
    nd.write_text("\n".join(json.dumps(i) for i in items))
    geom = shape(items[0]["geometry"]).centroid.buffer(0.01)
    results = []
    for path in (shared_data / PC_S2, shared_data / "stac/pc_sentinel-2-l2a_T13TDE_100items.stac-geoparquet.parquet",
                 nd):
        cfg = _cfg(catalog=str(path), maxcloud=50)
        results.append([i.id for i in search(cfg, Feature("f", geom))])
    assert results[0] == results[1] == results[2]
    assert set(results[0]) == _expected(items, geom, dt.date(2024, 1, 1), dt.date(2024, 12, 31), 50)


def test_reflectance_rules_agree_across_providers(shared_data: Path) -> None:
    """Same DN semantics → same physical reflectance: Earth Search v1 metadata vs PC baseline rule."""
    cfg = _cfg(bands=["red"])
    es = normalize_item(_items(shared_data, "stac/earthsearch_v1_sentinel-2-l2a_7items_mixed_tiles.json")[0], cfg)
    pc_items = _items(shared_data, PC_S2)
    pc = normalize_item(pc_items[0], cfg)
    assert float(es["properties"]["s2:processing_baseline"]) >= 4 and float(
        pc["properties"]["s2:processing_baseline"]) >= 4
    dn = 1400
    refl = lambda it: dn * it["assets"]["red"]["raster:bands"][0]["scale"] + it["assets"]["red"]["raster:bands"][0][
        "offset"]  # noqa: E731
    assert refl(es) == pytest.approx(refl(pc)) == pytest.approx(0.04)
    # before baseline 04.00 there is no +1000: the Earth Search v0 item (2020) and a PC item from 2020
    v0 = normalize_item(_items(shared_data, "stac/earthsearch_v0_sentinel-s2-l2a-cogs_S2A_28QCH_20200714_0_L2A.json")[0],
                        cfg)
    assert v0["assets"]["red"]["pixels_xr:key"] == "B04"
    assert v0["assets"]["red"]["raster:bands"][0]["offset"] == 0.0
    old_pc = normalize_item(_items(shared_data, "stac/pc_sentinel-2-l2a_T35MNM_2020-06-07_13items.geojson")[0], cfg)
    assert old_pc["assets"]["red"]["raster:bands"][0]["offset"] == 0.0
    assert 1400 * 1e-4 == pytest.approx(1400 * old_pc["assets"]["red"]["raster:bands"][0]["scale"])


def test_proj_code_and_stac11_bands_normalise_like_proj_epsg(shared_data: Path) -> None:
    cfg = _cfg(bands=["red"])
    item = _items(shared_data, "stac/earthsearch_v1_sentinel-2-l2a_7items_mixed_tiles.json")[0]
    a = normalize_item(item, cfg)
    migrated = json.loads(json.dumps(item))
    epsg = migrated["properties"].pop("proj:epsg")
    migrated["properties"]["proj:code"] = f"EPSG:{epsg}"
    red = migrated["assets"]["red"]
    rb = red.pop("raster:bands")[0]
    red["bands"] = [{"name": "red", "eo:common_name": "red", "nodata": rb["nodata"], "data_type": rb["data_type"],
                     "raster:scale": rb["scale"], "raster:offset": rb["offset"]}]
    b = normalize_item(migrated, cfg)
    assert a["properties"]["proj:epsg"] == b["properties"]["proj:epsg"] == epsg
    assert a["assets"]["red"]["raster:bands"] == b["assets"]["red"]["raster:bands"]
    import pystac  # pystac migrates proj:epsg → proj:code on from_dict; normalising its output must agree

    via_pystac = normalize_item(pystac.Item.from_dict({**json.loads(json.dumps(item)), "links": []}).to_dict(), cfg)
    assert via_pystac["properties"]["proj:epsg"] == epsg
    assert via_pystac["assets"]["red"]["proj:epsg"] == epsg


def test_same_day_reprocessing_keeps_freshest(shared_data: Path) -> None:
    item = _items(shared_data, "stac/earthsearch_v1_sentinel-2-l2a_7items_mixed_tiles.json")[0]
    newer = json.loads(json.dumps(item))
    newer["id"] = item["id"].replace("_0_", "_1_")
    newer["properties"]["s2:processing_baseline"] = "05.10"
    newer["properties"]["updated"] = "2099-01-01T00:00:00Z"
    kept = deduplicate([item, newer])
    assert [i["id"] for i in kept] == [newer["id"]]


def test_missing_band_and_bad_catalog(shared_data: Path, tmp_path: Path) -> None:
    cfg = _cfg(bands=["rededge1"])
    item = _items(shared_data, PC_S2)[0]
    del item["assets"]["B05"]
    with pytest.raises(CatalogError, match=r"item '.*': item has no asset for band 'rededge1'"):
        normalize_item(item, cfg)
    with pytest.raises(CatalogError, match="local catalog not found"):
        list(read_local(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(CatalogError, match="bad.json: not valid JSON"):
        list(read_local(tmp_path / "bad.json"))


class _Always503(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(503)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


def test_retry_budget_exhaustion_names_url(monkeypatch) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Always503)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(catalog_mod, "RETRY_TOTAL", 2)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(CatalogError) as info:
            search(_cfg(catalog=url, collection="x"), Feature("f", box(0, 0, 1, 1)))
        assert url in str(info.value) and "\n" not in str(info.value)
    finally:
        server.shutdown()


# ----------------------------------------------------------------------------------------------- timeouts
class BlackHole:
    """A TCP server on 127.0.0.1 that accepts every connection and never answers (nor closes)."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[Any] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def _search_within(cfg: Any, seconds: float) -> tuple[BaseException | None, float]:
    """Run ``search`` in a thread; (its exception, seconds taken). Fails the test when it is still running
    after ``seconds`` (a stalled search) instead of hanging the run."""
    import time

    out: dict[str, Any] = {}

    def run() -> None:
        try:
            search(cfg, Feature("f", box(0, 0, 1, 1)))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the search was still waiting after {seconds} s"
    return out.get("error"), time.monotonic() - start


def test_an_api_that_never_answers_fails_promptly_naming_the_url(monkeypatch) -> None:
    hole = BlackHole()
    try:
        monkeypatch.setenv(catalog_mod.STAC_TIMEOUT_ENV, "0.5")
        monkeypatch.setattr(catalog_mod, "RETRY_TOTAL", 1)
        error, took = _search_within(_cfg(catalog=hole.url, collection="x"), 60)
        assert isinstance(error, CatalogError), error
        assert str(error).startswith(f"{hole.url}: STAC API did not answer in time") and "\n" not in str(error)
        assert hole.accepted  # it did connect: the read timed out
        assert took < 20  # 2 tries × 0.5 s, no backoff before the first retry
    finally:
        hole.close()


class _PagedThenSilent(http.server.BaseHTTPRequestHandler):
    """A STAC API whose landing page and first search page answer; the next page never does."""

    release = threading.Event()
    served: list[str] = []

    def _json(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.served.append(f"GET {self.path}")
        if self.path.startswith("/search/page2"):
            self.release.wait(120)  # never answers while the test runs
            return
        self._json({"type": "Catalog", "id": "t", "stac_version": "1.0.0", "description": "paged",
                    "conformsTo": ["https://api.stacspec.org/v1.0.0/core",
                                   "https://api.stacspec.org/v1.0.0/item-search"],
                    "links": [{"rel": "self", "href": f"{base}/"}, {"rel": "root", "href": f"{base}/"},
                              {"rel": "search", "href": f"{base}/search", "method": "POST",
                               "type": "application/geo+json"}]})

    def do_POST(self) -> None:  # noqa: N802
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.served.append(f"POST {self.path}")
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        item = {"type": "Feature", "stac_version": "1.0.0", "id": "a", "bbox": [0, 0, 1, 1],
                "geometry": mapping(box(0, 0, 1, 1)), "properties": {"datetime": "2024-06-01T00:00:00Z"},
                "links": [], "assets": {}}
        self._json({"type": "FeatureCollection", "features": [item],
                    "links": [{"rel": "next", "href": f"{base}/search/page2", "method": "GET"}]})

    def log_message(self, *args: Any) -> None:
        pass


def test_every_search_page_has_the_timeout(monkeypatch) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PagedThenSilent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _PagedThenSilent.served.clear()
    try:
        monkeypatch.setenv(catalog_mod.STAC_TIMEOUT_ENV, "5,0.5")
        monkeypatch.setattr(catalog_mod, "RETRY_TOTAL", 1)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        error, took = _search_within(_cfg(catalog=url, collection="x"), 60)
        assert isinstance(error, CatalogError) and "did not answer in time" in str(error), error
        assert "read timeout 0.5 s" in str(error) and str(error).startswith(url)
        served = _PagedThenSilent.served
        assert served[0] == "GET /" and "POST /search" in served  # landing page and page 1 answered
        assert _PagedThenSilent.served.count("GET /search/page2") == 2  # page 2 timed out, retried once
        assert took < 20
    finally:
        _PagedThenSilent.release.set()
        server.shutdown()
        server.server_close()


class _RetryAfterForever(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(503)
        self.send_header("Retry-After", "86400")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_retry_after_is_capped(monkeypatch) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RetryAfterForever)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(catalog_mod, "RETRY_TOTAL", 2)
        monkeypatch.setattr(catalog_mod, "RETRY_AFTER_MAX", 0.2)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        error, took = _search_within(_cfg(catalog=url, collection="x"), 60)
        assert isinstance(error, CatalogError) and str(error).startswith(url), error
        assert took < 20
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("value", ["soon", "0", "-1", "1,2,3", "nan", "inf"])
def test_bad_timeout_setting_is_a_config_error(monkeypatch, value: str) -> None:
    from pixels_xr.errors import ConfigError

    monkeypatch.setenv(catalog_mod.STAC_TIMEOUT_ENV, value)
    with pytest.raises(ConfigError, match=rf"^{catalog_mod.STAC_TIMEOUT_ENV}: must be SECONDS or CONNECT,READ"):
        search(_cfg(catalog="http://127.0.0.1:9", collection="x"), Feature("f", box(0, 0, 1, 1)))


def test_timeout_settings(monkeypatch) -> None:
    monkeypatch.delenv(catalog_mod.STAC_TIMEOUT_ENV, raising=False)
    assert catalog_mod.stac_timeouts() == (catalog_mod.STAC_CONNECT_TIMEOUT, catalog_mod.STAC_READ_TIMEOUT)
    monkeypatch.setenv(catalog_mod.STAC_TIMEOUT_ENV, "3")
    assert catalog_mod.stac_timeouts() == (3.0, 3.0)
    monkeypatch.setenv(catalog_mod.STAC_TIMEOUT_ENV, "2, 7.5")
    assert catalog_mod.stac_timeouts() == (2.0, 7.5)
