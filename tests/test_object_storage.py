"""Object storage with latency: the latency proxy, the range server, and how many requests a read costs."""

from __future__ import annotations

import http.client
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pixels_xr.testing.latency_proxy import LatencyProxy, ProxyProcess
from pixels_xr.testing.range_server import RangeServer, parse_ranges


@pytest.fixture(scope="module")
def blob(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("blobs")
    (folder / "a.bin").write_bytes(np.random.default_rng(0).bytes(100_000))
    (folder / "sub").mkdir()
    (folder / "sub" / "b.bin").write_bytes(b"0123456789")
    (folder.parent / "outside.txt").write_text("not served")
    return folder


@pytest.fixture(scope="module")
def range_server(blob: Path):
    with RangeServer(blob) as server:
        yield server


def _get(conn: http.client.HTTPConnection, path: str, rng: str | None = None,
         method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn.request(method, path, headers={"Range": rng} if rng else {})
    r = conn.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


# ------------------------------------------------------------------------------------------ range server
def test_range_server_answers_ranges_as_object_storage_does(range_server: RangeServer, blob: Path) -> None:
    data = (blob / "a.bin").read_bytes()
    conn = http.client.HTTPConnection(range_server.host, range_server.port, timeout=10)
    status, headers, body = _get(conn, "/a.bin", "bytes=10-19")
    assert (status, headers["content-range"], body) == (206, "bytes 10-19/100000", data[10:20])
    assert _get(conn, "/a.bin", "bytes=99990-")[2] == data[99990:]
    assert _get(conn, "/a.bin", "bytes=-5")[2] == data[-5:]
    assert _get(conn, "/a.bin", "bytes=99990-200000")[2] == data[99990:]  # clipped to the end
    status, headers, body = _get(conn, "/a.bin", "bytes=100000-")
    assert (status, headers["content-range"], body) == (416, "bytes */100000", b"")
    status, headers, body = _get(conn, "/a.bin", "bytes=0-1,5-6")
    assert status == 206 and headers["content-type"].startswith("multipart/byteranges")
    assert b"Content-Range: bytes 0-1/100000\r\n\r\n" + data[:2] in body and data[5:7] in body
    assert _get(conn, "/a.bin", "items=0-1")[:1] == (200,)  # not a byte range: the whole file
    assert _get(conn, "/a.bin")[2] == data
    status, headers, body = _get(conn, "/a.bin", method="HEAD")
    assert (status, headers["content-length"], body) == (200, "100000", b"")
    assert _get(conn, "/sub/b.bin", "bytes=2-3")[2] == b"23"
    for missing in ("/nope.bin", "/sub", "/", "/../outside.txt", "/%2e%2e/outside.txt",
                    "/sub/../../outside.txt"):
        assert _get(conn, missing)[0] == 404, missing
    conn.close()


def test_parse_ranges_follows_rfc_9110() -> None:
    assert parse_ranges("bytes=0-0", 10) == [(0, 0)]
    assert parse_ranges("bytes=5-", 10) == [(5, 9)]
    assert parse_ranges("bytes=-3", 10) == [(7, 9)]
    assert parse_ranges("bytes=-30", 10) == [(0, 9)]
    assert parse_ranges("bytes=20-30", 10) == []  # unsatisfiable: 416
    assert parse_ranges("bytes=20-30, 1-2", 10) == [(1, 2)]  # satisfiable parts are served
    assert parse_ranges("bytes=5-2", 10) is None  # invalid: ignored, 200
    assert parse_ranges("bytes=x-", 10) is None and parse_ranges("pages=1-2", 10) is None


# ------------------------------------------------------------------------------------------ the proxy
def test_proxy_counts_every_request_of_a_keep_alive_connection(range_server: RangeServer, blob: Path) -> None:
    data = (blob / "a.bin").read_bytes()
    with LatencyProxy(range_server.host_port, delay=0.03) as proxy:
        conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
        t0 = time.perf_counter()
        bodies = [_get(conn, "/a.bin", f"bytes={k * 1000}-{k * 1000 + 999}")[2] for k in range(5)]
        assert _get(conn, "/a.bin", method="HEAD")[0] == 200
        assert _get(conn, "/nope.bin")[0] == 404
        held = time.perf_counter() - t0
        conn.close()
        stats = proxy.stats()
    assert bodies == [data[k * 1000:(k + 1) * 1000] for k in range(5)]  # relayed verbatim
    assert stats.connections == 1 and stats.requests == 7  # per HTTP request, not per connection
    assert stats.by_method == {"GET": 6, "HEAD": 1} and stats.gets == 6
    assert [r.status for r in stats.records] == [206] * 5 + [200, 404]
    assert [r.range for r in stats.records[:2]] == ["bytes=0-999", "bytes=1000-1999"]
    assert stats.response_bytes == 5000 + len(b"not found\n")
    assert held >= 7 * 0.03  # every request was held (a lower bound: sleeps never end early)


def test_proxy_resets_and_serves_concurrent_connections(range_server: RangeServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with LatencyProxy(range_server.host_port, delay=0.01) as proxy:
        def fetch(k: int) -> int:
            conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
            try:
                return sum(len(_get(conn, "/a.bin", f"bytes={j}-{j + 9}")[2]) for j in range(k, k + 4))
            finally:
                conn.close()

        with ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(fetch, range(16))) == 16 * 4 * 10
        stats = proxy.stats()
        assert (stats.requests, stats.connections, stats.response_bytes) == (64, 16, 640)
        proxy.reset()
        assert proxy.stats().requests == 0


def test_proxy_relays_s3_writes_and_reads(s3_server) -> None:
    """boto3 through the proxy: a PUT with a body (and ``Expect: 100-continue``), a listing, a ranged GET."""
    import boto3

    with LatencyProxy(s3_server.host_port) as proxy:
        client = boto3.client("s3", endpoint_url=proxy.url, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.create_bucket(Bucket="proxied")
        payload = bytes(range(256)) * 1000
        client.put_object(Bucket="proxied", Key="k.bin", Body=payload)
        got = client.get_object(Bucket="proxied", Key="k.bin", Range="bytes=1000-1999")["Body"].read()
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="proxied")["Contents"]]
        stats = proxy.stats()
    assert got == payload[1000:2000] and keys == ["k.bin"]
    assert stats.by_method == {"PUT": 2, "GET": 2} and stats.request_bytes >= len(payload)


def test_proxy_process_has_the_same_counters(range_server: RangeServer) -> None:
    with ProxyProcess(range_server.host_port, delay=0.0) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        assert _get(conn, "/a.bin", "bytes=0-99")[0] == 206
        assert _get(conn, "/a.bin", "bytes=100-199")[0] == 206
        stats = proxy.stats()
        assert (stats.requests, stats.connections, stats.response_bytes) == (2, 1, 200)
        proxy.set_delay(0.02)
        proxy.reset()
        assert _get(conn, "/a.bin", "bytes=0-9")[0] == 206
        conn.close()
        assert proxy.stats().requests == 1


def test_gdal_reads_through_the_proxy_over_s3_and_http(tmp_path: Path, s3_server, monkeypatch) -> None:
    """GDAL's /vsis3/ and /vsicurl/ reads through the proxy return the file's pixels, and every request
    they make is seen."""
    from rasterio.transform import from_origin

    values = np.random.default_rng(2).integers(0, 5000, (300, 300)).astype("uint16")
    path = tmp_path / "t.tif"
    with rasterio.open(path, "w", driver="GTiff", width=300, height=300, count=1, dtype="uint16",
                       crs="EPSG:32629", transform=from_origin(500000, 3400000, 10, 10), tiled=True,
                       blockxsize=128, blockysize=128, compress="deflate") as dst:
        dst.write(values, 1)
    s3_server.upload(path, "gdal-proxy", "t.tif")
    from pixels_xr.readers import GDAL_CLOUD_ENV

    with RangeServer(tmp_path) as web, LatencyProxy(s3_server.host_port) as s3_proxy, \
            LatencyProxy(web.host_port) as web_proxy:
        monkeypatch.setenv("AWS_S3_ENDPOINT", s3_proxy.host_port)
        for href, proxy in [("s3://gdal-proxy/t.tif", s3_proxy), (f"{web_proxy.url}/t.tif", web_proxy)]:
            with rasterio.Env(**GDAL_CLOUD_ENV), rasterio.open(href) as ds:
                np.testing.assert_array_equal(ds.read(1), values)
            stats = proxy.stats()
            assert stats.gets >= 2 and stats.response_bytes <= path.stat().st_size + 32768, stats


# ------------------------------------------------------------------------------------------ requests of a read
@pytest.fixture(scope="module")
def remote_sample(tmp_path_factory: pytest.TempPathFactory, s3_server):
    """A small sample (4 items × 5 assets, 2 tiles) on moto_server and behind a range server, with its
    local STAC copied twice: hrefs on ``s3://`` and on ``http://`` (both through latency proxies)."""
    import json

    from pixels_xr.testing.sample import make_sample

    root = tmp_path_factory.mktemp("remote")
    info = make_sample(root / "sample", n_dates=2, width=384, height=256, tiles=2, every_days=5)
    s3_server.upload_dir(info.root, "remote-sample")
    web = RangeServer(info.root).start()
    s3_proxy, web_proxy = LatencyProxy(s3_server.host_port).start(), LatencyProxy(web.host_port).start()
    catalogs = {}
    for kind, prefix in (("s3", "s3://remote-sample/"), ("http", f"{web_proxy.url}/")):
        for path in info.root.rglob("*.json"):
            doc = json.loads(path.read_text())
            for asset in doc.get("assets", {}).values():
                target = (path.parent / asset["href"]).resolve()
                if target.suffix == ".tif":
                    asset["href"] = prefix + target.relative_to(info.root).as_posix()
            dest = root / kind / path.relative_to(info.root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(json.dumps(doc))
        catalogs[kind] = root / kind / "catalog.json"
    try:
        yield {"info": info, "catalogs": catalogs, "proxies": {"s3": s3_proxy, "http": web_proxy}}
    finally:
        s3_proxy.stop()
        web_proxy.stop()
        web.stop()


def _remote_config(catalog: Path, **kw):
    from pixels_xr.config import load_config

    return load_config({"start": "2021-11-01", "end": "2021-11-30", "mode": "composite",
                        "composite_method": "median", "interval": "months", "platforms": "SENTINEL_2",
                        "bands": ["red", "nir"], "catalog": str(catalog), "chunksize": 256, **kw})


def _path(target: str) -> str:
    """A request's path without its query (tile reads go to GDAL's pre-signed URL of the object)."""
    return target.split("?", 1)[0]


def _clear_gdal_caches() -> None:
    """Empty GDAL's HTTP caches (file sizes, existence, blocks): what a fresh worker process starts with."""
    import ctypes
    import re

    maps = Path("/proc/self/maps").read_text()
    for lib in sorted(set(re.findall(r"(/\S*libgdal[^/\s]*\.so[^/\s]*)", maps))):
        ctypes.CDLL(lib).VSICurlClearCache()


@pytest.fixture
def via_proxy(remote_sample, monkeypatch):
    """GDAL's S3 endpoint set to the S3 proxy; every GDAL cache emptied, proxy counters reset."""
    monkeypatch.setenv("AWS_S3_ENDPOINT", remote_sample["proxies"]["s3"].host_port)
    _clear_gdal_caches()
    for proxy in remote_sample["proxies"].values():
        proxy.reset()
    return remote_sample


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_a_small_read_costs_its_minimum_of_requests_and_equals_the_local_read(via_proxy, kind) -> None:
    """Regression guard on the request count: a whole-area read costs one header read per file (the asset
    check's, reused by the read) plus one request per run of adjacent tiles, and gives the local pixels.
    GDAL's caches are emptied between the check and the read, as a worker process starts: its reads must
    not probe the files again."""
    import dask
    from shapely.geometry import box

    from pixels_xr.compose import collect
    from pixels_xr.features import Feature
    from pixels_xr.readers import HEADER_BYTES
    from pixels_xr.testing.latency_proxy import minimum_requests

    info = via_proxy["info"]
    feature = Feature("area", box(*info.bounds), crs=info.crs)
    cfg, local = _remote_config(via_proxy["catalogs"][kind]), _remote_config(info.catalog)
    with dask.config.set(scheduler="threads"):
        lazy = collect(cfg, feature)
        _clear_gdal_caches()
        ds = lazy.compute()
        ref = collect(local, feature).compute()
    for name in ("red", "nir", "clear_count"):
        np.testing.assert_array_equal(ds[name].values, ref[name].values)
    stats = via_proxy["proxies"][kind].stats()
    read = sorted({_path(r.target).lstrip("/").removeprefix("remote-sample/") for r in stats.records})
    files = [info.root / p for p in read]
    assert len(files) == 2 * 2 * 3  # 2 dates × 2 tiles × (red, nir, scl)
    minimum, _ = minimum_requests(files, ds.rio.bounds(), header_bytes=HEADER_BYTES)
    assert stats.gets == minimum, [(r.target, r.range) for r in stats.records]
    assert stats.by_method.get("HEAD", 0) <= (len(files) if kind == "http" else 0)  # /vsicurl/ sizes a file


def test_headers_are_read_once_per_run_across_features(via_proxy) -> None:
    """Two features over the same items in one run: every header is fetched once, by the first check."""
    import dask
    from shapely.geometry import box

    from pixels_xr.compose import collect
    from pixels_xr.features import Feature
    from pixels_xr.run_cache import run_cache

    info = via_proxy["info"]
    minx, miny, maxx, maxy = info.bounds
    halves = [Feature("west", box(minx, miny, (minx + maxx) / 2, maxy), crs=info.crs),
              Feature("east", box((minx + maxx) / 2, miny, maxx, maxy), crs=info.crs)]
    cfg = _remote_config(via_proxy["catalogs"]["s3"])
    with run_cache(), dask.config.set(scheduler="threads"):
        for feature in halves:
            collect(cfg, feature).compute()
    records = via_proxy["proxies"]["s3"].stats().records
    headers = [_path(r.target) for r in records if r.range.startswith("bytes=0-")]
    assert headers and len(headers) == len(set(headers))  # one header read per file for both features
    assert len(headers) == len({_path(r.target) for r in records})  # every file read had its header read once


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_problem_assets_over_s3_and_http_are_recorded_as_for_local_files(via_proxy, tmp_path, s3_server,
                                                                        kind) -> None:
    """A missing asset and one cut inside its header are left out per item and asset, as the same files are
    locally; one cut after its first tiles passes the check both ways (its reads fail later, as today)."""
    import json
    import shutil

    from shapely.geometry import box

    from pixels_xr.catalog import search
    from pixels_xr.cube import check_assets
    from pixels_xr.features import Feature

    info = via_proxy["info"]
    feature = Feature("area", box(*info.bounds), crs=info.crs)
    local_root = tmp_path / "local"
    shutil.copytree(info.root, local_root)
    local_items = search(_remote_config(local_root / "catalog.json"), feature)
    remote_items = search(_remote_config(via_proxy["catalogs"][kind]), feature)
    assert [i.id for i in local_items] == [i.id for i in remote_items]
    first, second, third = sorted(local_items, key=lambda i: i.id)[:3]
    missing, cut, late = first.sources["red"].href, second.sources["nir"].href, third.sources["scl"].href
    damaged = {missing: None, cut: Path(cut).read_bytes()[:300],
               late: Path(late).read_bytes()[:int(Path(late).stat().st_size * 0.8)]}
    bucket_key = {h: "broken/" + Path(h).relative_to(local_root).as_posix() for h in damaged}
    for href, data in damaged.items():  # the same damage locally, on S3 and on the web server's folder
        if data is None:
            Path(href).unlink()
        else:
            Path(href).write_bytes(data)
            s3_server.client.put_object(Bucket="remote-sample", Key=bucket_key[href], Body=data)
            (info.root / bucket_key[href]).parent.mkdir(parents=True, exist_ok=True)
            (info.root / bucket_key[href]).write_bytes(data)
    web = via_proxy["proxies"]["http"].url
    prefix = "s3://remote-sample/" if kind == "s3" else f"{web}/"
    docs = [i.to_stac() for i in remote_items]
    for doc in docs:
        for asset in doc["assets"].values():
            local = str(local_root / asset["href"].removeprefix(prefix))
            if local in bucket_key:
                asset["href"] = prefix + bucket_key[local]
    kept_local, problems_local = check_assets(local_items, _remote_config(local_root / "catalog.json"))
    kept, problems = check_assets(docs, _remote_config(via_proxy["catalogs"][kind]))
    assert [i.id for i in kept] == [i.id for i in kept_local] and len(kept) == len(local_items) - 2
    assert {(p["item"], p["asset"]) for p in problems} == {(p["item"], p["asset"]) for p in problems_local} \
        == {(first.id, "red"), (second.id, "nir")}
    assert all(p["href"].startswith(prefix) and p["error"] for p in problems)
    json.dumps(problems)  # recorded as plain JSON, as today


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_a_file_cut_after_the_check_fails_its_tile_read_without_the_signed_url(via_proxy, kind, s3_server,
                                                                               tmp_path) -> None:
    """Tiles are fetched by plain ranged GETs after the check: an object cut short meanwhile (the check's
    header still valid) fails the read with ``on_asset_error: fail``, and the error names no signature."""
    import dask
    from shapely.geometry import box

    from pixels_xr.compose import collect
    from pixels_xr.features import Feature

    info = via_proxy["info"]
    feature = Feature("area", box(*info.bounds), crs=info.crs)
    lazy = collect(_remote_config(via_proxy["catalogs"][kind], on_asset_error="fail"), feature)
    victim = sorted(info.root.rglob("red.tif"))[0]
    original = victim.read_bytes()
    assert len(original) > 40000  # the tiles lie past the header read
    cut = tmp_path / "cut.tif"
    cut.write_bytes(original[:40000])
    key = victim.relative_to(info.root).as_posix()
    try:
        if kind == "s3":
            s3_server.upload(cut, "remote-sample", key)
        else:
            victim.write_bytes(cut.read_bytes())
        _clear_gdal_caches()
        with dask.config.set(scheduler="threads"), pytest.raises(Exception) as caught:
            lazy.compute()
        assert "Signature" not in str(caught.value) and "X-Amz" not in str(caught.value)
    finally:
        victim.write_bytes(original)
        if kind == "s3":
            s3_server.upload(victim, "remote-sample", key)


def test_the_asset_check_makes_one_credentials_session_per_thread(via_proxy, monkeypatch) -> None:
    """With AWS keys in the environment a new ``rasterio.Env`` builds a boto3 session (tens of ms of CPU):
    the check of every asset uses one per thread (``readers.cloud_env``), not one per asset, and a changed
    key makes a new one."""
    from rasterio.session import AWSSession
    from shapely.geometry import box

    from pixels_xr.catalog import search
    from pixels_xr.features import Feature
    from pixels_xr.readers import check_assets, read_pool
    from pixels_xr.run_cache import run_cache

    info = via_proxy["info"]
    cfg = _remote_config(via_proxy["catalogs"]["s3"], pool_size=2)
    items = search(cfg, Feature("area", box(*info.bounds), crs=info.crs))
    made = []
    original = AWSSession.__init__
    monkeypatch.setattr(AWSSession, "__init__", lambda self, *a, **k: (made.append(1), original(self, *a, **k))[1])
    threads = read_pool(cfg.pool_size)._max_workers
    for round_ in range(2):
        if round_:
            monkeypatch.setenv("AWS_SESSION_TOKEN", "a-new-token-name")
        made.clear()
        with run_cache():
            kept, problems = check_assets(items, cfg)
        assert not problems and len(kept) == len(items)
        assert 0 < len(made) <= threads < len(items) * 3  # 3 assets per item
