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
