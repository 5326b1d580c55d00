"""Planetary Computer signing against a real HTTP server on 127.0.0.1 speaking the SAS token API and serving
blobs (COGs of the synthetic sample) only to requests carrying a valid, unexpired token."""

from __future__ import annotations

import datetime as dt
import functools
import json
import pickle
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from rasterio.enums import Resampling
from shapely.geometry import box

from pixels_xr import catalog
from pixels_xr.compose import collect
from pixels_xr.config import load_config
from pixels_xr.cube import build_cube
from pixels_xr.errors import AssetReadError
from pixels_xr.features import Feature
from pixels_xr.readers import PixelsReader
from pixels_xr.signing import PlanetaryComputerSigner, SignedHref, blob_container, redact

ACCOUNT, CONTAINER = "devstoreaccount1", "sentinel2-l2"


class PCServer:
    """Token API at ``/api/sas/v1/token/{account}/{container}``; blobs at ``/{account}/{container}/{path}``
    (files under ``root``) with Range support, 403 without a known unexpired ``sig``."""

    def __init__(self) -> None:
        self.root: Path | None = None
        self.ttl = 3600.0
        self.fail_status: int | None = None
        self.tokens: dict[str, float] = {}
        self.token_requests: list[tuple[str, str]] = []
        self.blob_requests: list[tuple[str, str, int]] = []  # (path, sig, status)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                server.handle(self, body=False)

            def do_GET(self) -> None:
                server.handle(self, body=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.token_url = f"{self.url}/api/sas/v1/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def blob_url(self, relative: str) -> str:
        return f"{self.url}/{ACCOUNT}/{CONTAINER}/{relative}"

    def handle(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        parts = urllib.parse.urlsplit(req.path)
        path = [urllib.parse.unquote(p) for p in parts.path.split("/") if p]
        if path[:4] == ["api", "sas", "v1", "token"] and len(path) == 6:
            return self._token(req, path[4], path[5])
        sig = urllib.parse.parse_qs(parts.query).get("sig", [""])[0]
        with self._lock:
            valid = sig in self.tokens and time.time() < self.tokens[sig]
        file = self.root.joinpath(*path[2:]) if self.root and len(path) > 2 else None
        status = 403 if not valid else (404 if file is None or not file.is_file() else 200)
        if status != 200:
            self.blob_requests.append((parts.path, sig, status))
            return self._send(req, status, b"", "text/plain", body)
        data = file.read_bytes()
        rng = req.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start_s, end_s = rng[6:].split(",")[0].split("-")
            start, end = int(start_s), min(int(end_s) if end_s else len(data) - 1, len(data) - 1)
            self.blob_requests.append((parts.path, sig, 206))
            return self._send(req, 206, data[start:end + 1], "image/tiff", body,
                              {"Content-Range": f"bytes {start}-{end}/{len(data)}"})
        self.blob_requests.append((parts.path, sig, 200))
        return self._send(req, 200, data, "image/tiff", body)

    def _token(self, req: BaseHTTPRequestHandler, account: str, container: str) -> None:
        self.token_requests.append((account, container))
        if self.fail_status:
            return self._send(req, self.fail_status, b"{}", "application/json", True)
        with self._lock:
            sig = f"tok{len(self.tokens) + 1}"
            expiry = float(int(time.time() + self.ttl))  # whole seconds, as the real API returns
            self.tokens[sig] = expiry
        iso = dt.datetime.fromtimestamp(expiry, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        token = f"sv=2021-06-08&se={urllib.parse.quote(iso)}&sr=c&sp=rl&sig={sig}"
        payload = {"msft:expiry": iso, "token": token}
        self._send(req, 200, json.dumps(payload).encode(), "application/json", True)

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: int, data: bytes, ctype: str, body: bool,
              headers: dict[str, str] | None = None) -> None:
        req.send_response(status)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(data)))
        req.send_header("Accept-Ranges", "bytes")
        for k, v in (headers or {}).items():
            req.send_header(k, v)
        req.end_headers()
        if body:
            req.wfile.write(data)

    def reset(self, ttl: float = 3600.0) -> None:
        self.ttl, self.fail_status = ttl, None
        self.token_requests.clear()
        self.blob_requests.clear()


@pytest.fixture(scope="module")
def server() -> Iterator[PCServer]:
    srv = PCServer()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()


@pytest.fixture
def pc(server: PCServer, monkeypatch: pytest.MonkeyPatch) -> PCServer:
    """The server, reset, with the token API endpoint overridden through the environment variable and its
    blobs allowed for the planetary-computer catalog (a loopback host is outside its default allow-list)."""
    from pixels_xr import catalog

    server.reset()
    monkeypatch.setenv("PIXELS_XR_PC_SAS_URL", server.token_url)
    monkeypatch.setitem(catalog.ALLOWED_HREFS, "planetary-computer", (f"{server.url}/",))
    return server


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from pixels_xr.testing.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("pc-sample"), n_dates=3, width=256, height=256, tiles=1,
                       every_days=5)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _query(href: str) -> dict[str, str]:
    return {k: v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(href).query).items()}


def test_signer_appends_token_caches_per_container_and_refetches_after_expiry(pc: PCServer) -> None:
    clock = Clock()
    signer = PlanetaryComputerSigner(margin=60, clock=clock)  # endpoint from PIXELS_XR_PC_SAS_URL
    base = "https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2/01/C/CV/2021/B04.tif"
    a = signer(base)
    assert isinstance(a, SignedHref) and a.href.startswith(base + "?sv=2021-06-08&")
    assert _query(a.href)["sig"] == "tok1" and _query(a.href)["sp"] == "rl"
    assert a.expires == pytest.approx(pc.tokens["tok1"] - 60)
    b = signer(base.replace("B04", "B08"))
    assert _query(b.href)["sig"] == "tok1"  # same container: cached, no second request
    assert pc.token_requests == [("sentinel2l2a01", "sentinel2-l2")]
    c = signer("https://landsateuwest.blob.core.windows.net/landsat-c2/LC08/x.TIF?version=2")
    assert isinstance(c, SignedHref) and "?version=2&sv=" in c.href and _query(c.href)["sig"] == "tok2"
    assert pc.token_requests[-1] == ("landsateuwest", "landsat-c2")
    for other in ("https://earth-search.aws.element84.com/v1/x.tif", "/data/x.tif", "s3://bucket/x.tif",
                  a.href):  # not a blob, or already signed: unchanged
        assert signer(other) == other
    clock.now = pc.tokens["tok1"] - 61  # still fresh (margin 60 s)
    assert _query(signer(base).href)["sig"] == "tok1" and len(pc.token_requests) == 2
    clock.now = pc.tokens["tok1"] - 59  # within the margin: fetch a new token
    assert _query(signer(base).href)["sig"] == "tok3" and len(pc.token_requests) == 3
    clone = pickle.loads(pickle.dumps(signer))  # no tokens travel with a pickled signer
    assert isinstance(clone, PlanetaryComputerSigner) and clone._tokens == {} and clone.margin == 60


def test_token_api_errors_are_one_line_naming_the_endpoint(pc: PCServer) -> None:
    pc.fail_status = 503
    signer = PlanetaryComputerSigner(retries=1)
    with pytest.raises(AssetReadError) as err:
        signer(pc.blob_url("x.tif"))
    assert len(pc.token_requests) == 2  # 5xx retried once, then given up
    assert str(err.value) == f"{pc.token_url}/{ACCOUNT}/{CONTAINER}: SAS token request failed: HTTP 503"
    assert err.value.__cause__ is None and err.value.__suppress_context__
    pc.fail_status = 404
    with pytest.raises(AssetReadError, match="HTTP 404"):
        PlanetaryComputerSigner(retries=3)(pc.blob_url("x.tif"))
    assert len(pc.token_requests) == 3  # 404 is not retried
    with pytest.raises(AssetReadError, match="127.0.0.1:9/.*token request failed"):
        PlanetaryComputerSigner("http://127.0.0.1:9", retries=0)(pc.blob_url("x.tif"))


def test_blob_container_and_redact() -> None:
    assert blob_container("https://acct.blob.core.windows.net/cont/a/b.tif") == ("acct", "cont")
    assert blob_container("http://127.0.0.1:10000/acct/cont/a.tif") == ("acct", "cont")
    assert blob_container("https://example.com/acct/cont/a.tif") is None
    assert blob_container("/vsis3/bucket/a.tif") is None
    text = "Error reading '/vsicurl/https://a.blob.core.windows.net/c/x.tif?se=1&sig=SECRET': HTTP 403"
    assert redact(text) == "Error reading '/vsicurl/https://a.blob.core.windows.net/c/x.tif': HTTP 403"


def _pc_items(sample: Any, pc: PCServer, tmp_path: Path) -> tuple[Any, list[dict], list[dict]]:
    """Items of the sample as the local catalog gives them and the same items with hrefs on the server."""
    from pixels_xr.catalog import search

    pc.root = sample.root
    cfg = load_config({"start": "2021-11-01", "end": "2021-11-30", "mode": "latest_pixel",
                       "interval": "months", "platforms": "SENTINEL_2", "bands": ["red", "nir"],
                       "catalog": str(sample.catalog), "output": "raw"})
    feature = Feature("area", box(*sample.bounds), crs=sample.crs)
    local = search(cfg, feature)
    remote = json.loads(json.dumps([i.to_stac() for i in local]))
    for item in remote:
        for asset in item["assets"].values():
            asset["href"] = pc.blob_url(Path(asset["href"]).relative_to(sample.root).as_posix())
    pc_cfg = cfg.model_copy(update={"catalog": "planetary-computer"})
    return (cfg, pc_cfg, feature), local, remote


def test_cubes_read_through_signed_urls(sample: Any, pc: PCServer, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (cfg, pc_cfg, feature), local, remote = _pc_items(sample, pc, tmp_path)
    signer = PlanetaryComputerSigner()
    monkeypatch.setitem(catalog.SIGNERS, "planetary-computer", signer)  # the hook, with a fresh cache
    expected = build_cube(local, feature, cfg).values
    with dask.config.set(scheduler="threads", num_workers=4):
        for loader in ("stackstac", "odc"):
            got = build_cube(remote, feature, pc_cfg, loader=loader).values
            np.testing.assert_array_equal(got, expected)
        ds = collect(pc_cfg, feature, items=remote).compute()  # asset checks sign too
    ref = collect(cfg, feature, items=local).compute()
    np.testing.assert_array_equal(ds.red.values, ref.red.values)
    assert json.loads(ds.attrs["asset_problems"]) == []
    assert pc.token_requests == [(ACCOUNT, CONTAINER)]  # one token for every read of every loader
    assert pc.blob_requests and {s for _, _, s in pc.blob_requests} <= {200, 206}
    with pytest.raises(urllib.error.HTTPError, match="403"):  # the server does refuse unsigned reads
        urllib.request.urlopen(remote[0]["assets"]["red"]["href"], timeout=5)


def test_a_long_read_is_resigned_after_expiry(pc: PCServer, tmp_path: Path) -> None:
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window
    from stackstac.raster_spec import RasterSpec

    # 2048² of noise in 256-px tiles (8 MiB, incompressible): a far window needs new HTTP ranges
    truth = np.random.default_rng(0).integers(1, 65535, (2048, 2048), dtype=np.uint16)
    profile = {"driver": "GTiff", "width": 2048, "height": 2048, "count": 1, "dtype": "uint16", "nodata": 0,
               "crs": "EPSG:32629", "transform": from_origin(500000, 3400000, 10, 10), "tiled": True,
               "blockxsize": 256, "blockysize": 256}
    with rasterio.open(tmp_path / "noise.tif", "w", **profile) as dst:
        dst.write(truth, 1)
    pc.root, pc.ttl = tmp_path, 2.0
    href = pc.blob_url("noise.tif")
    spec = RasterSpec(epsg=32629, bounds=(500000, 3400000 - 20480, 500000 + 20480, 3400000),
                      resolutions_xy=(10, 10))
    reader = PixelsReader(url=href, spec=spec, resampling=Resampling.nearest, dtype=np.dtype("uint16"),
                          fill_value=np.uint16(0), scale_offset=(1.0, 0.0),
                          signer=PlanetaryComputerSigner(margin=0.5))
    np.testing.assert_array_equal(reader.read(Window(0, 0, 64, 64)), truth[:64, :64])
    tok1 = pc.blob_requests[-1][1]
    time.sleep(max(0.0, pc.tokens[tok1] - time.time()) + 0.3)  # the first token is now refused
    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(f"{href}?sig={tok1}", timeout=5)
    n = len(pc.blob_requests)
    np.testing.assert_array_equal(reader.read(Window(1984, 1984, 64, 64)), truth[1984:, 1984:])
    assert len(pc.token_requests) == 2
    later = pc.blob_requests[n:]
    assert later and all(status in (200, 206) and sig != tok1 and sig in pc.tokens
                         for _, sig, status in later)


def test_read_errors_never_carry_the_token(sample: Any, pc: PCServer, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from stackstac.raster_spec import RasterSpec
    from rasterio.errors import RasterioIOError
    from rasterio.windows import Window

    from pixels_xr.cube import check_assets

    (_, pc_cfg, _), _, remote = _pc_items(sample, pc, tmp_path)
    spec = RasterSpec(epsg=32629, bounds=sample.bounds, resolutions_xy=(10.0, 10.0))
    make = functools.partial(PixelsReader, url=pc.blob_url("missing/red.tif"), spec=spec,
                             resampling=Resampling.nearest, dtype=np.dtype("uint16"), fill_value=np.uint16(0),
                             scale_offset=(1.0, 0.0), signer=PlanetaryComputerSigner())
    with pytest.raises(AssetReadError) as err:
        make().read(Window(0, 0, 8, 8))
    message = str(err.value)
    assert "missing/red.tif" in message and "sig=" not in message and "tok" not in message
    assert "\n" not in message and err.value.__cause__ is None
    with pytest.warns(UserWarning) as warned:  # skipped as nodata: the warning is redacted too
        skip = (RasterioIOError(".*"), RuntimeError("Error opening"))
        out = make(errors_as_nodata=skip).read(Window(0, 0, 8, 8))
    assert (out == 0).all() and all("sig=" not in str(w.message) for w in warned)
    monkeypatch.setitem(catalog.SIGNERS, "planetary-computer", PlanetaryComputerSigner())
    broken = json.loads(json.dumps(remote[:1]))
    broken[0]["assets"]["red"]["href"] = pc.blob_url("missing/red.tif")
    kept, problems = check_assets(broken, pc_cfg)
    assert kept == [] and problems[0]["asset"] == "red"
    assert "sig=" not in json.dumps(problems) and problems[0]["href"] == pc.blob_url("missing/red.tif")
