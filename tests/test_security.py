"""Security of what a catalog can make us open and what we write: against real servers on 127.0.0.1.

- Asset hrefs are checked against the catalog's allow-list before anything is opened (SSRF): a STAC API
  (rustac) whose items point at another port on this machine, at ``/vsicurl/…`` or at local files gets
  those assets reported as problems, and a canary HTTP server proves nothing was fetched.
- Tokens in the catalog URL (query and userinfo), in item self links and in asset hrefs reach no output
  file of a run (Zarr attrs, STAC catalog, ledger, report) and no log record.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shapely.geometry import box

from pixels_xr import catalog
from pixels_xr.catalog import read_local, search
from pixels_xr.compose import collect
from pixels_xr.config import load_config
from pixels_xr.cube import build_cube
from pixels_xr.errors import AssetReadError, CatalogError
from pixels_xr.features import Feature
from pixels_xr.ledger import RunManifest
from pixels_xr.signing import ALLOWED_HREFS_ENV, HrefPolicy, HrefRefused, redact, redact_json

SECRET = "SECRET123"


class FileServer:
    """Files under ``root`` over HTTP with Range (206) support, every request recorded; with ``token`` set,
    a request without ``?token=<token>`` is refused (403), like a pre-signed object store."""

    def __init__(self, root: Path, token: str | None = None) -> None:
        self.root, self.token = root, token
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                server.handle(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                server.handle(self, body=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def handle(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        parts = urllib.parse.urlsplit(req.path)
        self.requests.append(parts.path)
        query = urllib.parse.parse_qs(parts.query)
        path = self.root / urllib.parse.unquote(parts.path).lstrip("/")
        if self.token is not None and query.get("token") != [self.token]:
            return self._send(req, 403, b"", body)
        if not path.is_file() or self.root not in path.resolve().parents:
            return self._send(req, 404, b"", body)
        data = path.read_bytes()
        rng = req.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
            return self._send(req, 206, data[start:end + 1], body,
                              {"Content-Range": f"bytes {start}-{end}/{len(data)}"})
        return self._send(req, 200, data, body)

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: int, data: bytes, body: bool,
              headers: dict[str, str] | None = None) -> None:
        req.send_response(status)
        req.send_header("Content-Type", "image/tiff")
        req.send_header("Accept-Ranges", "bytes")
        req.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            req.send_header(k, v)
        req.end_headers()
        if body:
            req.wfile.write(data)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from pixels_xr.testing.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("security") / "sample", n_dates=4, width=48, height=48, tiles=1,
                       every_days=10)


@pytest.fixture
def canary(sample: Any) -> Iterator[FileServer]:
    """An HTTP server on another port of this machine, serving the sample's COGs: what SSRF would reach."""
    srv = FileServer(sample.root)
    try:
        yield srv
    finally:
        srv.stop()


def _config(catalog_location: str, **kw: Any) -> Any:
    base = {"start": "2021-11-01", "end": "2021-12-31", "mode": "all", "platforms": "SENTINEL_2",
            "bands": ["red"], "mask": "none", "catalog": catalog_location}
    return load_config({**base, **kw})


def _feature(sample: Any) -> Feature:
    return Feature("area", box(*sample.bounds), crs=sample.crs)


def _hostile(sample: Any, canary: FileServer) -> tuple[list[dict], dict[str, str]]:
    """The sample's items (raw STAC), their red asset pointing at what a hostile catalog would name."""
    items = sorted(read_local(sample.catalog), key=lambda i: i["id"])
    assert len(items) == 4
    local = items[2]["assets"]["red"]["href"]
    rel = Path(local).relative_to(sample.root).as_posix()
    hrefs = {items[0]["id"]: f"{canary.url}/{rel}",                 # another port on this machine
             items[1]["id"]: f"/vsicurl/{canary.url}/{rel}",        # GDAL virtual file system
             items[2]["id"]: local,                                  # a local file (a real, readable COG)
             items[3]["id"]: f"file://{local}"}                      # the same as a file:// URL
    for item in items:
        item["assets"]["red"]["href"] = hrefs[item["id"]]
        item["links"] = []
    return items, hrefs


def test_a_stac_api_cannot_make_us_open_other_ports_vsi_paths_or_local_files(sample, canary, stac_api,
                                                                             monkeypatch) -> None:
    monkeypatch.delenv(ALLOWED_HREFS_ENV, raising=False)
    items, hrefs = _hostile(sample, canary)
    url = stac_api(items)
    cfg, feature = _config(url), _feature(sample)
    found = search(cfg, feature)
    assert len(found) == 4
    ds = collect(cfg, feature, items=found).compute()
    problems = json.loads(ds.attrs["asset_problems"])
    assert {p["item"]: p["href"] for p in problems} == hrefs  # every one reported, as unreadable ones are
    assert all("refused by the href allow-list" in p["error"] for p in problems)
    assert ds.sizes["time"] == 0 and "no items" in ds.attrs["empty_reason"]
    # the readers refuse too, also without the asset check, with the stackstac and the odc loaders and for
    # header reads (no proj:transform: the grid's phase is read from the first asset's header)
    found = [i.to_stac() for i in found]  # normalised STAC dicts, edited, are read back by build_cube
    for item in found:
        item["assets"]["red"].pop("proj:transform", None)
    with pytest.raises(HrefRefused, match="refused by the href allow-list"):
        build_cube(found, feature, cfg).compute()
    try:
        build_cube(found, feature, cfg, loader="odc").compute()  # odc may turn a failed read into nodata
    except AssetReadError as exc:
        assert "refused" in str(exc)
    assert canary.requests == []  # nothing was fetched from the other port


def test_allowed_hrefs_setting_opens_what_it_names(sample, canary, stac_api, monkeypatch) -> None:
    items, hrefs = _hostile(sample, canary)
    url = stac_api(items)
    monkeypatch.setenv(ALLOWED_HREFS_ENV, f"{canary.url}/")
    cfg, feature = _config(url), _feature(sample)
    ds = collect(cfg, feature).compute()
    problems = {p["item"] for p in json.loads(ds.attrs["asset_problems"])}
    first = sorted(hrefs)[0]
    assert problems == set(hrefs) - {first}  # /vsicurl/ to the same server is still refused
    assert ds.sizes["time"] == 1 and int(ds.clear_count.max()) == 1
    assert canary.requests  # read through HTTP
    monkeypatch.delenv(ALLOWED_HREFS_ENV)
    monkeypatch.setitem(catalog.ALLOWED_HREFS, url, (f"{canary.url}/",))  # the per-catalog registry
    again = collect(cfg, feature).compute()
    np.testing.assert_array_equal(again.red.values, ds.red.values)


def test_a_local_catalog_opens_local_and_remote_files_but_never_vsi_or_connection_strings(
        sample, canary, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(ALLOWED_HREFS_ENV, raising=False)
    items, hrefs = _hostile(sample, canary)
    path = tmp_path / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    cfg, feature = _config(str(path)), _feature(sample)
    found = sorted((i.to_stac() for i in search(cfg, feature)), key=lambda i: i["id"])
    # a relative href is made absolute against the catalog's folder; a GDAL connection string can only come
    # from items handed over directly
    found[3]["assets"]["red"]["href"] = f"GTIFF_DIR:1:{hrefs[items[2]['id']]}"
    ds = collect(cfg, feature, items=found).compute()
    problems = {p["item"]: p["error"] for p in json.loads(ds.attrs["asset_problems"])}
    assert set(problems) == {items[1]["id"], items[3]["id"]}
    assert all("refused" in e for e in problems.values())
    assert ds.sizes["time"] == 2 and canary.requests  # the local path and the http server were read


@pytest.mark.parametrize("href,why", [
    ("https://sentinel-cogs.s3.us-west-2.amazonaws.com/a/B04.tif", None),  # Earth Search's assets
    ("https://sentinel2l2a01.blob.core.windows.net/c/B04.tif", None),
    ("s3://usgs-landsat/collection02/a.TIF", None), ("gs://bucket/a.tif", None), ("az://c/a.tif", None),
    ("http://api.example.com:8080/assets/a.tif", None),  # the API's own origin, even on a private host
    ("http://api.example.com/assets/a.tif", None),
    ("http://127.0.0.1:9999/a.tif", "not a public address"),
    ("http://169.254.169.254/latest/meta-data/", "not a public address"),  # cloud metadata service
    ("http://2130706433/a.tif", "not a public address"), ("http://0x7f.1/a.tif", "not a public address"),
    ("http://127.1/a.tif", "not a public address"), ("http://[::1]/a.tif", "not a public address"),
    ("http://[::ffff:127.0.0.1]/a.tif", "not a public address"), ("http://0.0.0.0/a.tif", "not a public"),
    ("http://localhost./a.tif", "not a public address"), ("http://x.localhost/a.tif", "not a public"),
    ("http://10.1.2.3/a.tif", "not a public address"), ("http://192.168.1.1/a.tif", "not a public"),
    ("http://public.example.com@127.0.0.1/a.tif", "not a public address"),
    ("/vsicurl/https://public.example.com/a.tif", "/vsi"), ("/VSIZIP//etc/x.zip", "/vsi"),
    ("/etc/shadow", "local paths"), ("relative/a.tif", "local paths"), ("file:///etc/shadow", "scheme 'file'"),
    ("ftp://example.com/a.tif", "scheme 'ftp'"), ("zip+https://example.com/a.zip", "scheme 'zip+https'"),
    ("vrt:///etc/x.vrt?bands=1", "scheme 'vrt'"), ("https://example.com/a.tif\n", "control characters"),
    ("", "empty"),
])
def test_remote_policy(href: str, why: str | None) -> None:
    policy = HrefPolicy.remote("http://api.example.com:8080/v1?token=X")
    refusal = policy.refusal(href)
    assert (refusal is None) if why is None else (refusal is not None and why in refusal), refusal
    if why is not None:
        with pytest.raises(HrefRefused) as err:
            policy.check(href)
        assert "token=X" not in str(err.value) and "\n" not in str(err.value)


def test_local_policy_and_overrides() -> None:
    policy = HrefPolicy.local("/data/catalog.json")
    for ok in ("/data/a.tif", "relative/a.tif", "file:///data/a.tif", "http://127.0.0.1:9000/a.tif",
               "s3://b/a.tif"):
        assert policy.refusal(ok) is None, ok
    for bad in ("/vsicurl/http://x/a.tif", "file:///vsimem/a.tif", "file://otherhost/a.tif",
                "HDF5:\"/data/a.h5\"://x", "NETCDF:/data/a.nc:var"):
        assert policy.refusal(bad) is not None, bad
    remote = HrefPolicy.remote("https://stac.example.com", ["http://10.0.0.7:9000/", "/vsis3/bucket/"])
    assert remote.refusal("http://10.0.0.7:9000/a.tif") is None and remote.refusal("/vsis3/bucket/a") is None
    assert remote.refusal("http://10.0.0.7:9001/a.tif") is not None
    assert HrefPolicy.remote("https://stac.example.com", ["*"]).refusal("/etc/shadow") is None


def test_policy_of_providers_and_registry(monkeypatch) -> None:
    monkeypatch.delenv(ALLOWED_HREFS_ENV, raising=False)
    es = catalog.href_policy("earth-search")
    assert es.refusal("https://sentinel-cogs.s3.us-west-2.amazonaws.com/x/B04.tif") is None
    assert es.refusal("/etc/shadow") is not None
    url = catalog.PROVIDERS["planetary-computer"]
    monkeypatch.setitem(catalog.ALLOWED_HREFS, "planetary-computer", ("http://127.0.0.1:10000/",))
    for name in ("planetary-computer", url):  # a provider named by its URL gets the same allow-list
        assert catalog.href_policy(name).refusal("http://127.0.0.1:10000/acct/c/a.tif") is None
    assert catalog.href_policy("/some/catalog.json").refusal("/some/a.tif") is None


# ----------------------------------------------------------------------------------------------- secrets
class _Always503(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_catalog_errors_and_request_logs_carry_no_secret(monkeypatch, caplog) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Always503)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(catalog, "RETRY_TOTAL", 1)
        port = server.server_address[1]
        caplog.set_level(logging.DEBUG)
        cfg = _config(f"http://pixels:{SECRET}@127.0.0.1:{port}/v1?token={SECRET}&sig={SECRET}")
        with pytest.raises(CatalogError) as err:
            search(cfg, Feature("f", box(0, 0, 1, 1)))
        assert str(err.value).startswith(f"http://127.0.0.1:{port}/v1: STAC search failed")
        assert SECRET not in str(err.value) and "\n" not in str(err.value)
        assert "127.0.0.1" in caplog.text and SECRET not in caplog.text  # urllib3/pystac-client debug logs
    finally:
        server.shutdown()
        server.server_close()


def test_redact() -> None:
    assert redact(f"http://user:{SECRET}@h.example.com:8/p/x.json?token={SECRET}") == "http://h.example.com:8/p/x.json"
    assert redact(f"url: /search?limit=5&token={SECRET}&X-Amz-Signature={SECRET}") == \
        "url: /search?limit=5&token=***&X-Amz-Signature=***"
    assert redact(f"{{'Authorization': 'Basic {SECRET}', 'Accept': '*/*'}}") == \
        "{'Authorization': '***', 'Accept': '*/*'}"
    for name in ("sig", "se", "sp", "X-Amz-Credential", "X-Amz-Security-Token", "access_token", "key",
                 "password"):
        assert SECRET not in redact(f"x {name}={SECRET}&y=1"), name
    assert redact("s3://bucket/a@b.tif and /data/x.tif") == "s3://bucket/a@b.tif and /data/x.tif"
    config = json.dumps({"catalog": f"https://u:{SECRET}@stac.example.com/v1?token={SECRET}", "bands": ["red"]},
                        separators=(",", ":"))
    assert json.loads(redact_json(config)) == {"catalog": "https://stac.example.com/v1", "bands": ["red"]}
    assert redact_json('{"a":"plain"}') == '{"a":"plain"}'


def test_tokens_in_catalog_url_self_links_and_hrefs_reach_no_output(sample, stac_api, tmp_path, monkeypatch,
                                                                     caplog) -> None:
    """A run over a token-protected STAC API (token in the URL's query and userinfo) whose items carry
    tokens in their self links and asset hrefs (a pre-signed store that refuses reads without the token):
    no file of the output — Zarr attrs, STAC catalog, ledger, report — and no log record holds a secret."""
    from distributed import Client

    from pixels_xr.batch import run_batch
    from pixels_xr.features import load_features
    from pixels_xr.io.zarr_store import open_feature

    signature = f"SIG{SECRET[::-1]}"
    store = FileServer(sample.root, token=SECRET)
    try:
        items = sorted(read_local(sample.catalog), key=lambda i: i["id"])
        for item in items:
            item["links"] = [{"rel": "self", "href": f"https://stac.example.com/items/{item['id']}?token={SECRET}"
                                                     f"&X-Amz-Signature={signature}"}]
            for asset in item["assets"].values():
                rel = Path(asset["href"]).relative_to(sample.root).as_posix()
                asset["href"] = f"{store.url}/{rel}?token={SECRET}"
        broken = items[1]["id"]
        items[1]["assets"]["red"]["href"] = f"{store.url}/missing/red.tif?token={SECRET}"  # a recorded problem
        port = urllib.parse.urlsplit(stac_api(items)).port
        monkeypatch.setenv(ALLOWED_HREFS_ENV, f"{store.url}/")
        cfg = load_config({"start": "2021-11-01", "end": "2021-12-31", "mode": "latest_pixel",
                           "interval": "months", "platforms": "SENTINEL_2", "bands": ["red", "nir"],
                           "catalog": f"http://pixels:{SECRET}@127.0.0.1:{port}/?token={SECRET}",
                           "collection": "sentinel-2-l2a", "chunksize": 64})
        features = load_features(sample.features)[:2]
        out = tmp_path / "run.zarr"
        caplog.set_level(logging.DEBUG)
        with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as client:
            report = run_batch(cfg, features, str(out), client=client, progress=False)
        assert report.ok and all(f.status == "done" for f in report.features), report.to_dict()
        assert any(path.endswith(".tif") for path in store.requests)  # read with the token
        # every file of the output, whatever it is
        files = [p for p in out.rglob("*") if p.is_file()]
        assert any(p.name == "report.json" for p in files) and any(p.name == "run.json" for p in files)
        leaked = [str(p.relative_to(out)) for p in files if SECRET.encode() in p.read_bytes()
                  or signature.encode() in p.read_bytes()]
        assert leaked == []
        assert SECRET not in json.dumps(report.to_dict(), default=str)
        assert SECRET not in caplog.text and signature not in caplog.text
        # what is kept instead: the redacted URL and hrefs
        run = json.loads((out / ".pixels_xr" / "run.json").read_text())
        assert run["config"]["catalog"] == f"http://127.0.0.1:{port}/"
        problems = []
        for feature in features:
            attrs = open_feature(str(out), feature.id).attrs
            assert json.loads(attrs["config"])["catalog"] == f"http://127.0.0.1:{port}/"
            problems += [(p["item"], p["href"]) for p in json.loads(attrs["asset_problems"])]
        assert problems == [(broken, f"{store.url}/missing/red.tif")]  # recorded, without the token
        stac_item = json.loads((out / "stac" / features[0].id / f"{features[0].id}.json").read_text())
        derived = sorted(link["href"] for link in stac_item["links"] if link["rel"] == "derived_from")
        assert derived and all(h.startswith("https://stac.example.com/items/S2") and "?" not in h for h in derived)
        sources = RunManifest(str(out), "{}", "zarr3").sources(features[0].id)
        assert sorted(sources.values()) == derived  # the ledger's copy of the sources holds no token either
    finally:
        store.stop()
