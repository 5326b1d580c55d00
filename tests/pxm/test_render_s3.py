"""Tilesets written to object storage (a real moto_server): MBTiles, PMTiles and XYZ equal to a local
render, fingerprints in object metadata (re-runs are no-ops), interrupted renders and uploads resume, and
nothing incomplete is ever visible under a tileset's key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from render_helpers import BUCKET, manifest, mbtiles, s3_key

from pixels_xr.errors import OutputError
from pixels_xr.pxm import render

pytestmark = pytest.mark.timeout(600)
OUT = "pxm-out"
IMAGE = "rasterio_RGB.byte.tif"


@pytest.fixture(scope="module")
def uri(s3_server, shared_data: Path) -> str:
    s3_server.make_bucket(OUT)
    return s3_server.upload(shared_data / "rgb" / IMAGE, BUCKET, s3_key(IMAGE))


@pytest.fixture(scope="module")
def client(uri):
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as c:
        yield c


@pytest.fixture(scope="module")
def local(client, uri, tmp_path_factory) -> dict[tuple[int, int, int], bytes]:
    out = tmp_path_factory.mktemp("local")
    render(manifest(uri), out, minzoom=7, client=client)
    return mbtiles(out / "acme.test.mbtiles")


def keys(s3_server, prefix: str) -> dict[str, bytes]:
    pages = s3_server.client.get_paginator("list_objects_v2").paginate(Bucket=OUT, Prefix=prefix)
    names = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k: s3_server.client.get_object(Bucket=OUT, Key=k)["Body"].read() for k in names}


def test_archives_and_xyz_on_s3_equal_the_local_render(client, uri, local, s3_server, tmp_path: Path) -> None:
    from pmtiles.reader import MemorySource, Reader, all_tiles

    m = manifest(uri)
    for fmt in ("mbtiles", "pmtiles", "xyz"):
        report = render(m, f"s3://{OUT}/equal/{fmt}/", format=fmt, minzoom=7, client=client)
        assert report.outputs == {"acme.test": f"s3://{OUT}/equal/{fmt}/acme.test" + ("" if fmt == "xyz"
                                                                                      else f".{fmt}")}
        assert render(m, f"s3://{OUT}/equal/{fmt}", format=fmt, minzoom=7, client=client).skipped
    objects = keys(s3_server, "equal/")
    archive = tmp_path / "got.mbtiles"
    archive.write_bytes(objects["equal/mbtiles/acme.test.mbtiles"])
    assert mbtiles(archive) == local
    head = s3_server.client.head_object(Bucket=OUT, Key="equal/mbtiles/acme.test.mbtiles")
    assert len(head["Metadata"]["pixels-xr-fingerprint"]) == 64
    pm = Reader(MemorySource(objects["equal/pmtiles/acme.test.pmtiles"]))
    assert {zxy: bytes(d) for zxy, d in all_tiles(pm.get_bytes)} == local
    xyz = {}
    for key, data in objects.items():
        if key.startswith("equal/xyz/acme.test/") and not key.endswith(".json"):
            z, x, y = key.split("/")[-3:]
            xyz[(int(z), int(x), int(y.split(".")[0]))] = data
    assert xyz == local
    doc = json.loads(objects["equal/xyz/acme.test/metadata.json"])
    assert doc["scheme"] == "xyz" and doc["minzoom"] == 7
    assert not [k for k in objects if ".pxm-upload" in k]
    with pytest.raises(OutputError, match="another manifest or other options"):
        render(m, f"s3://{OUT}/equal/xyz", format="xyz", minzoom=8, client=client)


def test_interrupted_render_and_upload_resume(client, uri, local, s3_server, monkeypatch) -> None:
    from pixels_xr.pxm import archives

    m = manifest(uri)
    real_add, real_put = archives.TileStore.add, archives._put_batch
    calls = {"add": 0, "pipe": 0}

    def crash_after_one(self, *args, **kwargs):
        if calls["add"] == 1:
            raise KeyboardInterrupt("simulated interruption")
        calls["add"] += 1
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(archives.TileStore, "add", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        render(m, f"s3://{OUT}/resume/arch", minzoom=7, client=client)
    assert keys(s3_server, "resume/arch") == {}  # no archive before it is complete
    monkeypatch.setattr(archives.TileStore, "add", real_add)
    resumed = render(m, f"s3://{OUT}/resume/arch", minzoom=7, client=client)
    assert resumed.resumed_tasks == 1
    assert list(keys(s3_server, "resume/arch")) == ["resume/arch/acme.test.mbtiles"]

    sent: list[str] = []

    def put_then_crash(fs, batch):
        if calls["pipe"] == 1:
            raise KeyboardInterrupt("simulated interruption")
        calls["pipe"] += 1
        sent.extend(batch)
        real_put(fs, batch)

    monkeypatch.setattr(archives, "_UPLOAD_BATCH", 5)
    monkeypatch.setattr(archives, "_put_batch", put_then_crash)
    with pytest.raises(KeyboardInterrupt):
        render(m, f"s3://{OUT}/resume/xyz", format="xyz", minzoom=7, client=client)
    partial = keys(s3_server, "resume/xyz/")
    assert "resume/xyz/acme.test/metadata.json" not in partial
    assert "resume/xyz/acme.test/.pxm-upload.json" in partial
    assert len(sent) == 5
    monkeypatch.setattr(archives, "_put_batch", lambda fs, batch: (sent.extend(batch), real_put(fs, batch)))
    render(m, f"s3://{OUT}/resume/xyz", format="xyz", minzoom=7, client=client)
    assert len(sent) == len(local)  # the five tiles already up were not sent again
    final = keys(s3_server, "resume/xyz/")
    assert "resume/xyz/acme.test/metadata.json" in final and ".pxm-upload" not in "".join(final)
    assert len([k for k in final if not k.endswith(".json")]) == len(local)


@pytest.mark.parametrize(("out", "message"), [
    ("s3://pxm-out/a/../b", "'.' or '..' segments"),
    ("file:///tmp/x", "plain path"),
])
def test_bad_object_storage_urls_are_one_line_errors(uri, out: str, message: str) -> None:
    with pytest.raises(OutputError, match=message):
        render(manifest(uri), out, minzoom=7, cluster=None)
