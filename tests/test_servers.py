"""The shared real-server fixtures (tests/servers.py, conftest.py) work end to end, quickly."""

from __future__ import annotations

import os

import numpy as np
import pytest


# ---------------------------------------------------------------------------------------------- S3
def test_servers_module_importable_from_tests():
    import servers

    assert servers.free_port() > 0


def test_s3_env_is_set(s3_server):
    assert s3_server.endpoint_url == f"http://{s3_server.host_port}"
    assert os.environ["AWS_S3_ENDPOINT"] == s3_server.host_port
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    assert os.environ["AWS_HTTPS"] == "NO"
    assert os.environ["AWS_VIRTUAL_HOSTING"] == "FALSE"
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"


def test_s3_rasterio_roundtrip_and_s3fs(s3_server, tmp_path):
    import rasterio
    import s3fs
    from rasterio.transform import from_origin

    bucket = s3_server.make_bucket("pxr-test-io")
    data = np.arange(64 * 64, dtype="uint16").reshape(1, 64, 64)
    profile = dict(driver="GTiff", width=64, height=64, count=1, dtype="uint16", crs="EPSG:32613",
                   transform=from_origin(500000, 4500000, 10, 10), tiled=True, blockxsize=32, blockysize=32)

    # GDAL writes straight to /vsis3/ ...
    with rasterio.open(f"/vsis3/{bucket}/written.tif", "w", **profile) as dst:
        dst.write(data)
    # ... and a file uploaded with boto3 is readable through /vsis3/ too.
    local = tmp_path / "local.tif"
    with rasterio.open(local, "w", **profile) as dst:
        dst.write(data + 1)
    assert s3_server.upload(local, bucket, "dir/uploaded.tif") == f"s3://{bucket}/dir/uploaded.tif"
    keys = s3_server.upload_dir(tmp_path, bucket, "tree")
    assert keys == ["tree/local.tif"]

    with rasterio.open(f"/vsis3/{bucket}/written.tif") as src:
        np.testing.assert_array_equal(src.read(), data)
        assert src.crs.to_epsg() == 32613
    with rasterio.open(f"s3://{bucket}/dir/uploaded.tif") as src:
        np.testing.assert_array_equal(src.read(), data + 1)

    fs = s3fs.S3FileSystem(anon=False)  # endpoint and keys from the environment
    listing = sorted(fs.find(bucket))
    assert listing == [f"{bucket}/dir/uploaded.tif", f"{bucket}/tree/local.tif", f"{bucket}/written.tif"]
    assert fs.size(f"{bucket}/written.tif") > 0
    objs = s3_server.client.list_objects_v2(Bucket=bucket)["Contents"]
    assert len(objs) == 3


# ---------------------------------------------------------------------------------------------- STAC
def _dt(s):
    from datetime import datetime

    return datetime.fromisoformat(s.replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def real_items(shared_data):
    """All items of the .json/.geojson files in shared/data/stac (the .parquet files duplicate some)."""
    from servers import load_stac_items

    items = []
    for p in sorted((shared_data / "stac").iterdir()):
        if p.suffix in (".json", ".geojson") and not p.name.endswith(".collection.json"):
            items += load_stac_items(p)
    return items


def _expected(items, geom=None, start=None, end=None, collections=None):
    import shapely.geometry

    out = set()
    for it in items:
        if collections and it.get("collection") not in collections:
            continue
        if geom is not None and not shapely.geometry.shape(it["geometry"]).intersects(geom):
            continue
        t = _dt(it["properties"]["datetime"])
        if (start and t < start) or (end and t > end):
            continue
        out.add(it["id"])
    return out


def test_stac_api_real_items_search(stac_api, real_items):
    import pystac_client
    import shapely.geometry
    from datetime import datetime, timezone

    ids = [i["id"] for i in real_items]
    assert len(ids) == len(set(ids))
    no_bbox = {i["id"] for i in real_items if "bbox" not in i}
    assert len(no_bbox) == 5  # pc_landsat-8-c2-l2_legacy: accepted by rustac, searched by geometry

    url = stac_api(real_items)
    client = pystac_client.Client.open(url)
    assert {c.id for c in client.get_collections()} == {i["collection"] for i in real_items}

    # Everything, in pages of 50 (GET and POST).
    for method in ("GET", "POST"):
        search = client.search(limit=50, method=method)
        pages = list(search.pages_as_dicts())
        assert len(pages) >= len(real_items) // 50
        assert sorted(f["id"] for p in pages for f in p["features"]) == sorted(ids)

    # bbox over the landsat-8 legacy footprint (includes the bbox-less items) and one far away.
    bbox = (-122.5, 37.0, -122.0, 37.5)
    want = _expected(real_items, geom=shapely.geometry.box(*bbox))
    assert no_bbox <= want
    got = {i.id for i in client.search(bbox=bbox, limit=40).items()}
    assert got == want
    assert list(client.search(bbox=(0.1, 0.1, 0.2, 0.2)).items()) == []

    # intersects (a point in Colorado, the T13TDE tile) + collections.
    pt = shapely.geometry.Point(-105.0, 40.0)
    got = {i.id for i in client.search(intersects=pt.__geo_interface__, limit=30).items()}
    assert got == _expected(real_items, geom=pt) and got
    got = {i.id for i in client.search(intersects=pt.__geo_interface__, collections=["sentinel-2-l2a"]).items()}
    assert got == _expected(real_items, geom=pt, collections={"sentinel-2-l2a"}) and got

    # datetime range.
    start, end = datetime(2021, 1, 1, tzinfo=timezone.utc), datetime(2022, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
    got = {i.id for i in client.search(datetime="2021-01-01/2022-12-31", limit=25).items()}
    assert got == _expected(real_items, start=start, end=end) and got


def _post_search(url, body):
    import json
    import urllib.request

    req = urllib.request.Request(f"{url}/search", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def test_stac_api_query_and_filter_return_nothing(stac_api, real_items):
    """rustac's memory backend does not ignore `query`/`filter`: any of them yields zero items."""
    url = stac_api(real_items)
    assert len(_post_search(url, {"limit": 500})["features"]) == min(500, len(real_items))
    assert _post_search(url, {"limit": 500, "query": {"eo:cloud_cover": {"gte": 0}}})["features"] == []
    assert _post_search(url, {"limit": 500, "filter-lang": "cql2-json",
                              "filter": {"op": ">=", "args": [{"property": "eo:cloud_cover"}, 0]}})["features"] == []


def test_stac_api_parquet_and_explicit_collection(stac_api, shared_data):
    import json

    import pystac_client
    from servers import load_stac_items

    items = load_stac_items(shared_data / "stac" / "pc_sentinel-2-l2a_T13TDE_100items.stac-geoparquet.parquet")
    assert len(items) == 100
    collection = json.loads((shared_data / "stac" / "pc_sentinel-2-l2a.collection.json").read_text())
    url = stac_api(items, collections=[collection])
    client = pystac_client.Client.open(url)
    assert client.get_collection("sentinel-2-l2a").title == collection["title"]
    assert len(list(client.search(collections=["sentinel-2-l2a"], limit=30).items())) == 100


def test_stac_api_stops(stac_api, real_items):
    from servers import http_ok

    url = stac_api(real_items[:3])
    assert http_ok(url + "/")
    srv = stac_api.servers[0]
    srv.stop()
    assert not srv.alive() and not http_ok(url + "/")


# ---------------------------------------------------------------------------------------------- Dask
def _where_am_i(x):
    import os

    return x * 2, os.environ.get("AWS_S3_ENDPOINT")


def test_dask_scheduler_computes_and_survives_worker_kill(dask_scheduler, s3_server):
    import dask.array as da
    from distributed import Client

    with Client(dask_scheduler.address, timeout=30, set_as_default=False) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        x = da.ones((400, 400), chunks=100)
        assert client.compute(x.sum()).result(timeout=30) == 160000
        # A function from this test module runs on the workers, which see the S3 environment.
        assert client.submit(_where_am_i, 21, pure=False).result(timeout=30) == (42, s3_server.host_port)

        dask_scheduler.kill_worker(0)
        assert not dask_scheduler.workers[0].alive()
        # The survivor still computes.
        assert client.compute((x + 1).sum()).result(timeout=60) == 320000
        dask_scheduler.restart_worker(0)
        client.wait_for_workers(2, timeout=30)
        assert {w["name"] for w in client.scheduler_info()["workers"].values()} == {"w0", "w1"}


# ---------------------------------------------------------------------------------------------- Gateway
def test_gateway_cluster_scale_compute_shutdown(gateway_server, s3_server):
    import time

    import dask.array as da
    from dask_gateway import Gateway

    t0 = time.monotonic()
    with Gateway(gateway_server.address, proxy_address=gateway_server.proxy_address,
                 auth=gateway_server.auth) as gateway:
        cluster = gateway.new_cluster()
        try:
            cluster.scale(1)
            with cluster.get_client(set_as_default=False) as client:
                client.wait_for_workers(1, timeout=120)
                assert client.compute(da.ones((200, 200), chunks=100).sum()).result(timeout=60) == 40000
                assert client.submit(_where_am_i, 1, pure=False).result(timeout=60) == (2, s3_server.host_port)
        finally:
            cluster.shutdown()
        assert gateway.list_clusters() == []
    assert time.monotonic() - t0 < 180


# ---------------------------------------------------------------------------------------------- helpers
def test_server_start_failure_reports_captured_stderr():
    import sys

    from servers import Server, ServerStartError

    srv = Server("crasher", [sys.executable, "-c", "import sys; sys.stderr.write('boom on stderr'); sys.exit(3)"])
    with pytest.raises(ServerStartError, match=r"(?s)exited with code 3.*boom on stderr"):
        srv.start(lambda: False, timeout=10)
    assert not srv.alive()

    sleeper = Server("sleeper", [sys.executable, "-c", "import time; print('still starting', flush=True); time.sleep(60)"])
    with pytest.raises(ServerStartError, match=r"(?s)not ready after 1 s.*still starting"):
        sleeper.start(lambda: False, timeout=1)
    assert not sleeper.alive()


def test_server_stop_kills_grandchildren():
    import sys

    import psutil
    from servers import Server

    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            " print('up', flush=True); time.sleep(60)")
    srv = Server("parent", [sys.executable, "-c", code])
    srv.start(lambda: "up" in srv.log(), timeout=20)
    kids = psutil.Process(srv.pid).children(recursive=True)
    assert len(kids) == 1
    srv.stop()
    assert not srv.alive()
    assert not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids)
