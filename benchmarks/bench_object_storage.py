"""Object storage with latency: the synthetic sample on moto_server behind a latency proxy, read by pixels_xr,
naive stackstac and naive odc-stac; wall time and GET requests at each latency, against the minimum.

Run:  .venv/bin/python benchmarks/bench_object_storage.py [--size 1024] [--dates 24] [--latencies 0,20]
                                                          [--knobs] [--repeat 1] [--no-write]

Sample: ``make_sample(n_dates=24, width=1024, height=1024, tiles=2, every_days=5)`` (48 items × 5 assets:
blue, green, red, nir, scl), uploaded to a ``moto_server`` on 127.0.0.1; GDAL reaches it through
``pixels_xr.testing.latency_proxy`` (its own process), which holds every HTTP request the set latency and
counts them. Items: the sample's STAC with hrefs rewritten to ``s3://``, searched by ``catalog.search`` (not
timed). One feature over the whole area, monthly median composite Nov 2021 – Feb 2022, clear = SCL not in
the configuration's not-clear classes. Everyone computes on the same ``open_client("local")`` cluster (the
default a user gets here), with GDAL's caches emptied in every process before each run, on the same grid:

- ours: ``compose.collect(config, feature, items=items).compute()`` (the asset check included);
- stackstac (naive): ``stackstac.stack(items, assets, epsg, resolution, bounds, chunksize=1024)``
  ``.where(clear).resample(time="1MS").median()``;
- odc-stac (naive): ``odc.stac.load(items, bands, geobox, chunks={"x": 1024, "y": 1024})``, the same
  where/resample/median.

The minimum request count is what the tiles the area needs cost (``latency_proxy.minimum_requests``): per
file one header read (GDAL's default 16 KiB) plus one request per run of adjacent full-resolution tiles
inside the grid (byte ranges from the GTiff ``BLOCK_OFFSET``/``BLOCK_SIZE`` metadata; tiles 8 bytes apart —
leader and trailer — are adjacent). ``--knobs`` re-runs ours at the highest latency with GDAL's HTTP
settings changed one at a time. Results go to the ``<!-- object-storage -->`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import machine_state, process_cpu, publish, table, worker_pids

BANDS = ["blue", "green", "red", "nir"]
ASSETS = BANDS + ["scl"]
BUCKET = "bench-cogs"

#: GDAL settings tried one at a time on top of ours (``--knobs``): name → (setting, value).
KNOBS: dict[str, dict[str, str]] = {
    "GDAL_HTTP_MULTIPLEX=NO": {"GDAL_HTTP_MULTIPLEX": "NO"},
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES=NO": {"GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "NO"},
    "GDAL_HTTP_MULTIRANGE=SERIAL": {"GDAL_HTTP_MULTIRANGE": "SERIAL"},
    "GDAL_INGESTED_BYTES_AT_OPEN=16384 (GDAL's default)": {"GDAL_INGESTED_BYTES_AT_OPEN": "16384"},
    "GDAL_INGESTED_BYTES_AT_OPEN=131072": {"GDAL_INGESTED_BYTES_AT_OPEN": "131072"},
    "CPL_VSIL_CURL_CHUNK_SIZE=65536": {"CPL_VSIL_CURL_CHUNK_SIZE": "65536"},
    "CPL_VSIL_CURL_CHUNK_SIZE=1048576": {"CPL_VSIL_CURL_CHUNK_SIZE": "1048576"},
    "GDAL_DISABLE_READDIR_ON_OPEN=FALSE": {"GDAL_DISABLE_READDIR_ON_OPEN": "FALSE"},
    "VSI_CACHE=FALSE": {"VSI_CACHE": "FALSE"},
    "VSI_CACHE_SIZE=67108864": {"VSI_CACHE_SIZE": "67108864"},
}


# ----------------------------------------------------------------------------------------------- the sample
def sample(size: int, dates: int) -> Path:
    """The sample's folder, generated once per parameter set (the generator is deterministic)."""
    from pixels_xr.testing.sample import make_sample

    root = Path(tempfile.gettempdir()) / f"pixels_xr_bench_os_{size}_{dates}"
    marker = root / "bench_info.json"
    if not marker.exists():
        info = make_sample(root, n_dates=dates, width=size, height=size, tiles=2, every_days=5)
        marker.write_text(json.dumps({"crs": info.crs, "bounds": info.bounds}))
    return root


def s3_catalog(root: Path, out: Path) -> Path:
    """A copy of the sample's STAC JSON under ``out`` with every asset href an ``s3://`` URL of the uploaded
    file (the COGs stay where they are)."""
    shutil.rmtree(out, ignore_errors=True)
    for path in root.rglob("*.json"):
        if path.name == "bench_info.json":
            continue
        doc = json.loads(path.read_text())
        for asset in doc.get("assets", {}).values():
            target = (path.parent / asset["href"]).resolve()
            if target.suffix == ".tif":
                asset["href"] = f"s3://{BUCKET}/{target.relative_to(root).as_posix()}"
        dest = out / path.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(doc))
    return out / "catalog.json"


def item_documents(catalog: Path) -> list[dict]:
    """Every item JSON of a catalog copy, as a naive user hands them to stackstac (plain dicts)."""
    return [d for p in sorted(catalog.parent.rglob("*.json"))
            if (d := json.loads(p.read_text())).get("type") == "Feature"]


@contextlib.contextmanager
def served_sample(size: int, dates: int, prefix: str, delay: float = 0.0) -> Iterator[SimpleNamespace]:
    """The sample on a moto_server behind a latency proxy of ``delay`` seconds, GDAL pointed at the proxy
    (this process and the workers it starts), and an ``s3://`` copy of its STAC in a work folder: a
    namespace of ``root``, ``meta`` (crs, bounds), ``work``, ``catalog``, ``files``, ``moto``, ``proxy``;
    all stopped and removed afterwards."""
    from servers import S3Server, s3_env, start_moto

    from pixels_xr.testing.latency_proxy import ProxyProcess

    root = sample(size, dates)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    files = sorted(p for p in root.rglob("*.tif") if p.stem in ASSETS)
    moto = S3Server(start_moto())
    try:
        for path in files:
            moto.upload(path, BUCKET, path.relative_to(root).as_posix())
        proxy = ProxyProcess(moto.host_port, delay=delay)
        os.environ.update(s3_env(proxy.host_port))  # GDAL in this process and in the workers
        try:
            yield SimpleNamespace(root=root, meta=json.loads((root / "bench_info.json").read_text()), work=work,
                                  catalog=s3_catalog(root, work / "stac"), files=files, moto=moto, proxy=proxy)
        finally:
            proxy.stop()
    finally:
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- the runs
def clear_gdal_caches() -> None:
    """Empty GDAL's /vsicurl/ caches (file sizes, downloaded regions) in this process, so a run cannot reuse
    what the previous one fetched."""
    import rasterio  # noqa: F401  (loads libgdal)

    maps = Path("/proc/self/maps").read_text()
    for lib in sorted(set(re.findall(r"(/\S*libgdal\S*\.so\S*)", maps))):
        ctypes.CDLL(lib).VSICurlClearCache()


def median_of(arr: Any, not_clear: list[int]) -> Any:
    scl = arr.sel(band="scl")
    clear = scl.notnull() & (scl != 0) & ~scl.isin(not_clear)
    return arr.sel(band=BANDS).where(clear).resample(time="1MS").median()


def run_stackstac(docs: list[dict], bounds: tuple[float, ...], epsg: int, not_clear: list[int]) -> Any:
    import stackstac

    arr = stackstac.stack(docs, assets=ASSETS, epsg=epsg, resolution=10, bounds=bounds, snap_bounds=False,
                          chunksize=1024)
    return median_of(arr, not_clear).compute()


def run_odc(docs: list[dict], geobox: Any, not_clear: list[int]) -> Any:
    import odc.stac
    import pystac

    ds = odc.stac.load([pystac.Item.from_dict(d) for d in docs], bands=ASSETS, geobox=geobox,
                       chunks={"x": 1024, "y": 1024}, groupby="id")
    arr = ds.to_array("band").transpose("time", "band", "y", "x").sortby("time")
    return median_of(arr.where(arr != 0), not_clear).compute()


@contextlib.contextmanager
def gdal_settings(extra: dict[str, str]) -> Iterator[None]:
    """Our GDAL settings with ``extra`` on top (the dict is read when a cube is built and pickled with it)."""
    from pixels_xr import readers

    saved = dict(readers.GDAL_CLOUD_ENV)
    readers.GDAL_CLOUD_ENV.update(extra)
    try:
        yield
    finally:
        readers.GDAL_CLOUD_ENV.clear()
        readers.GDAL_CLOUD_ENV.update(saved)


def timed_run(client: Any, proxy: Any, fn: Callable[[], Any], servers: dict[str, list[int]]) -> dict[str, Any]:
    """One measured run: wall seconds, requests, bytes, and the CPU seconds of this process, the workers
    and each of ``servers`` (name → pids) during it."""
    client.run(clear_gdal_caches)
    clear_gdal_caches()
    proxy.reset()
    parts = {"workers": worker_pids(client), **servers}
    c0, p0 = {k: process_cpu(v) for k, v in parts.items()}, time.process_time()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    cpu = {"client": time.process_time() - p0, **{k: process_cpu(v) - c0[k] for k, v in parts.items()}}
    stats = proxy.stats()
    return {"seconds": seconds, "gets": stats.gets, "heads": stats.by_method.get("HEAD", 0),
            "requests": stats.requests, "mb": stats.response_bytes / 1e6, "result": result, "cpu": cpu,
            "records": [(r.method, r.target, r.range) for r in stats.records]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--dates", type=int, default=24)
    ap.add_argument("--latencies", default="0,20", help="milliseconds per request, comma-separated")
    ap.add_argument("--only", default="ours,stackstac,odc", help="which readers to run")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds over all latencies and readers; each keeps its fastest run (all are listed)")
    ap.add_argument("--knobs", action="store_true", help="also measure GDAL's HTTP settings (ours, last latency)")
    ap.add_argument("--dump-requests", type=Path, default=None, help="write every run's requests (JSON)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    import dask
    import odc.stac
    import stackstac
    from odc.geo.geobox import GeoBox
    from shapely.geometry import box

    from pixels_xr.catalog import search
    from pixels_xr.cluster import open_client
    from pixels_xr.compose import collect
    from pixels_xr.config import load_config
    from pixels_xr.features import Feature
    from pixels_xr.testing.latency_proxy import minimum_requests

    with served_sample(args.size, args.dates, "pxr-bench-os-") as served:
        root, meta, catalog, files = served.root, served.meta, served.catalog, served.files
        moto, proxy = served.moto, served.proxy
        latencies = list(dict.fromkeys(float(v) for v in args.latencies.split(",")))
        only = set(args.only.split(","))
        base = {"start": "2021-11-01", "end": "2022-02-28", "mode": "composite", "composite_method": "median",
                "interval": "months", "platforms": "SENTINEL_2", "bands": BANDS}
        cfg = load_config({**base, "catalog": str(catalog)})
        local_cfg = load_config({**base, "catalog": str(root / "catalog.json")})
        feature = Feature("area", box(*meta["bounds"]), crs=meta["crs"])
        not_clear = [int(v) for v in cfg.mask_spec.not_clear_values]
        before = machine_state()
        items = search(cfg, feature)
        local_items = search(local_cfg, feature)
        ids = {i["id"] if isinstance(i, dict) else i.id for i in items}
        docs = [d for d in item_documents(catalog) if d["id"] in ids]
        lazy = collect(cfg, feature, items=items, check=False)
        bounds, shape, epsg = lazy.rio.bounds(), lazy.rio.shape, lazy.rio.crs.to_epsg()
        geobox = GeoBox(shape, lazy.rio.transform(), f"EPSG:{epsg}")
        minimum, tiles = minimum_requests(files, bounds)  # GDAL's 16 KiB first read, as the peers use
        servers = {"moto_server": [moto.server.pid], "proxy": [proxy.proc.pid]}
        with open_client("local", quiet=True) as client:
            client.run(lambda: __import__("pixels_xr.compose") and __import__("odc.stac"))
            with dask.config.set(scheduler="threads"):
                reference = collect(local_cfg, feature, items=local_items).compute()  # local files
            # warm-up (not measured): imports, numba compilation and GDAL start in every process
            collect(cfg, feature, items=items[:2]).compute()
            run_stackstac(docs[:2], bounds, epsg, not_clear)
            run_odc(docs[:2], geobox, not_clear)
            runs: dict[tuple[str, float], dict[str, Any]] = {}  # the fastest run of each
            seconds: dict[tuple[str, float], list[float]] = {}
            readers_ = {"ours": lambda: collect(cfg, feature, items=items).compute(),
                        "stackstac": lambda: run_stackstac(docs, bounds, epsg, not_clear),
                        "odc": lambda: run_odc(docs, geobox, not_clear)}
            for _ in range(args.repeat):  # rounds alternate the latencies, so drift meets each alike
                for ms in latencies:
                    proxy.set_delay(ms / 1000)
                    for name, fn in readers_.items():
                        if name in only:
                            r = timed_run(client, proxy, fn, servers)
                            seconds.setdefault((name, ms), []).append(r["seconds"])
                            if (name, ms) not in runs or r["seconds"] < runs[name, ms]["seconds"]:
                                runs[name, ms] = r
                            print(f"{name} @ {ms:g} ms: {r['seconds']:.2f} s, {r['gets']} GET, "
                                  f"{r['heads']} HEAD, {r['mb']:.1f} MB", flush=True)
            knobs: dict[str, dict[str, Any]] = {}
            if args.knobs:
                proxy.set_delay(latencies[-1] / 1000)
                for label, extra in {"ours (as shipped)": {}, **KNOBS}.items():
                    with gdal_settings(extra):
                        knobs[label] = timed_run(client, proxy,
                                                 lambda: collect(cfg, feature, items=items).compute(),
                                                 servers)
                    print(f"knob {label}: {knobs[label]['seconds']:.2f} s, {knobs[label]['gets']} GET",
                          flush=True)
    after = machine_state()
    if args.dump_requests:
        args.dump_requests.write_text(json.dumps({f"{n}@{ms:g}": r["records"] for (n, ms), r in
                                                  {**runs, **{(k, -1): v for k, v in knobs.items()}}.items()}))

    checks = []
    for (name, ms), r in runs.items():
        if name == "ours":
            same = all(np.array_equal(r["result"][b].values, reference[b].values, equal_nan=True) for b in BANDS)
            checks.append(f"ours over S3 at {ms:g} ms == ours on local files, bit for bit: {same}")
    lines = [
        "## Object storage with latency: moto_server behind a latency proxy",
        "",
        (f"Sample: `make_sample(n_dates={args.dates}, width={args.size}, height={args.size}, tiles=2, "
        f"every_days=5)`: {len(items)} items in the months read, {len(files)} COGs on moto_server (all "
        f"dates), area {shape[1]} × {shape[0]} px at 10 m, bands {', '.join(BANDS)} + scl, monthly median "
        "Nov 2021 – Feb 2022. GDAL reads `s3://` through `pixels_xr.testing.latency_proxy` (own process), "
        "which holds every request the latency shown. All on one `open_client(\"local\")` cluster (the "
        "default here), GDAL caches emptied in every process before each run, "
        f"{'one run each' if args.repeat == 1 else f'the fastest of {args.repeat} rounds'}. "
        f"dask {dask.__version__}, stackstac {stackstac.__version__}, odc-stac {odc.stac.__version__}."),
        f"Machine (shared, timings noisy): before {before}; after {after}.",
        f"Command: `.venv/bin/python benchmarks/bench_object_storage.py{''.join(' ' + a for a in sys.argv[1:])}`",
        "",
    ]
    names = [n for n in ("ours", "stackstac", "odc") if n in only]
    label = {"ours": "pixels_xr", "stackstac": "stackstac (naive)", "odc": "odc-stac (naive)"}
    header = ["latency per request"] + [f"{label[n]} s" for n in names] + \
        [f"GET {label[n]}" for n in names] + ["minimum requests"]
    rows = []
    for ms in latencies:
        rows.append([f"{ms:g} ms"] + [f"{runs[n, ms]['seconds']:.1f}" for n in names] +
                    [f"{runs[n, ms]['gets']:,}" for n in names] + [f"{minimum:,}"])
    lines += table(header, rows)
    if args.repeat > 1:
        lines += ["", "Every run, in order (s): " + "; ".join(
            f"{label[n]} at {ms:g} ms: " + ", ".join(f"{v:.2f}" for v in seconds[n, ms])
            for n in names for ms in latencies) + "."]
    lines += ["", f"Minimum: {len(files)} header reads + the {tiles:,} full-resolution tiles of the area after "
              "merging adjacent ranges; HEAD requests: " +
              ", ".join(f"{n} {runs[n, latencies[-1]]['heads']}" for n in names) +
              "; MB fetched at the last latency: " +
              ", ".join(f"{n} {runs[n, latencies[-1]]['mb']:.1f}" for n in names) + "."]
    goals = []
    if "ours" in only and len(latencies) > 1:
        hi, lo = latencies[-1], latencies[0]
        ours = runs["ours", hi]
        overhead = (ours["seconds"] - runs["ours", lo]["seconds"]) / runs["ours", lo]["seconds"]
        peers = [n for n in names if n != "ours"]
        if peers:
            fastest = min(runs[n, hi]["seconds"] for n in peers)
            fewest = min(runs[n, hi]["gets"] for n in peers)
            goals += [(f"at {hi:g} ms ≥ 3× the fastest peer: {fastest / ours['seconds']:.2f}× "
                      f"({'met' if fastest / ours['seconds'] >= 3 else 'NOT met'})"),
                      (f"GETs ≤ the fewest peer's ({fewest:,}): {ours['gets']:,} "
                      f"({'met' if ours['gets'] <= fewest else 'NOT met'})")]
        goals += [(f"GETs ≤ 1.1× the minimum ({minimum:,}): {ours['gets'] / minimum:.2f}× "
                  f"({'met' if ours['gets'] <= 1.1 * minimum else 'NOT met'})"),
                  (f"latency overhead (t{hi:g} − t{lo:g}) / t{lo:g} ≤ 15 %: {overhead:.0%} "
                  f"({'met' if overhead <= 0.15 else 'NOT met'})")]
    parts = list(runs[names[0], latencies[-1]]["cpu"])
    lines += ["", f"CPU seconds of each process during the runs at {latencies[-1]:g} ms (all: on "
              f"{os.cpu_count()} cores, at least all / {os.cpu_count()} seconds of wall time):", ""]
    lines += table(["reader", *parts, "all", "wall s"],
                   [[label[n], *[f"{runs[n, latencies[-1]]['cpu'][p]:.1f}" for p in parts],
                     f"{sum(runs[n, latencies[-1]]['cpu'].values()):.1f}", f"{runs[n, latencies[-1]]['seconds']:.1f}"]
                    for n in names])
    lines += ["", *[f"- {c}" for c in checks + goals]]
    if knobs:
        shipped = knobs["ours (as shipped)"]
        lines += ["", f"GDAL's HTTP settings, one at a time on top of ours, at {latencies[-1]:g} ms:", ""]
        lines += table(["setting", "s", "GET", "HEAD", "MB", "s / as shipped"],
                       [[k, f"{r['seconds']:.1f}", f"{r['gets']:,}", f"{r['heads']}", f"{r['mb']:.1f}",
                         f"{r['seconds'] / shipped['seconds']:.2f}"] for k, r in knobs.items()])
    publish("object-storage", lines, not args.no_write)


if __name__ == "__main__":
    main()
