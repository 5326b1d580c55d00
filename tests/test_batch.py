"""Batch runs on real clusters and real object storage: resumable, fault tolerant, identical outputs.

The sample catalog (real COGs written by ``make_sample``) is collected into Zarr or COGs by ``run_batch``
on a real scheduler with two worker processes (``dask_scheduler``), on a LocalCluster, and on a real
dask-gateway-server; outputs are compared with the engine's in-memory result and with each other.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from distributed import Client
from ledger_files import drop_units, recorded_units, recorded_whole, unit_count
from rio_cogeo.cogeo import cog_validate

from pixels_xr.batch import run_batch, unit_labels
from pixels_xr.compose import collect
from pixels_xr.config import PixelsConfig, load_config
from pixels_xr.errors import OutputError
from pixels_xr.features import Feature, load_features
from pixels_xr.io.layout import MANIFEST_DIR
from pixels_xr.io.zarr_store import open_feature

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory):
    from pixels_xr.testing.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("batch") / "sample", n_dates=12, width=96, height=96,
                       every_days=5)


def make_config(catalog: Path | str, **overrides) -> PixelsConfig:
    base = {"start": "2021-11-01", "end": "2021-12-31", "mode": "latest_pixel", "interval": "months",
            "platforms": "SENTINEL_2", "bands": ["blue", "red", "nir"], "catalog": str(catalog),
            "chunksize": 64}
    return load_config({**base, **overrides})


@pytest.fixture(scope="module")
def config(sample) -> PixelsConfig:
    return make_config(sample.catalog)


@pytest.fixture(scope="module")
def features(sample) -> list[Feature]:
    return load_features(sample.features)


@pytest.fixture
def client(dask_scheduler):
    with Client(dask_scheduler.address, set_as_default=False) as c:
        yield c


def store_arrays(out: str, feature_ids: list[str]) -> dict[tuple[str, str], np.ndarray]:
    """Every variable of every feature group, as numpy arrays (NaN-aware comparisons by the caller)."""
    arrays = {}
    for fid in feature_ids:
        ds = open_feature(out, fid).load()
        for name, var in ds.data_vars.items():
            arrays[(fid, name)] = var.values
    return arrays


def assert_same_arrays(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, sample, config, features, dask_scheduler) -> str:
    """A reference run on the real scheduler, nothing interrupted."""
    out = str(tmp_path_factory.mktemp("clean") / "run.zarr")
    with Client(dask_scheduler.address, set_as_default=False) as c:
        report = run_batch(config, features, out, client=c, progress=False)
    assert report.ok, report.to_dict()
    return out


def test_zarr_output_equals_engine_result_and_is_georeferenced(clean_run, config, features) -> None:
    for feature in features:
        ref = collect(config, feature).compute()
        back = open_feature(clean_run, feature.id)
        assert back.rio.crs == ref.rio.crs
        assert back.rio.transform() == ref.rio.transform()
        assert list(back["time"].values) == list(ref["time"].values)
        for name in ref.data_vars:
            assert back[name].dtype == ref[name].dtype, name
            np.testing.assert_array_equal(back[name].values, ref[name].values, err_msg=f"{feature.id} {name}")
        assert json.loads(back.attrs["config"])["mode"] == "latest_pixel"
        assert back.attrs["software"].startswith("pixels_xr ")
        assert json.loads(back.attrs["item_ids"]) == json.loads(ref.attrs["item_ids"])
        # one bin per Zarr chunk (regions never overlap), or a group's small member written whole: every
        # step in one chunk, rewritten by one task (``zarr_store.write_feature``)
        assert back["blue"].encoding["chunks"][0] in (1, back.sizes["time"])


def test_run_report_and_manifest(clean_run, features) -> None:
    report = json.loads((Path(clean_run) / MANIFEST_DIR / "report.json").read_text())
    assert report["ok"] is True
    assert report["units_written"] == 2 * len(features) and report["units_skipped"] == 0
    assert {f["id"] for f in report["features"]} == {f.id for f in features}
    assert recorded_units(clean_run) == sorted((f.id, label) for f in features for label in
                                               unit_labels(open_feature(clean_run, f.id)))
    assert all(recorded_whole(clean_run).values())  # one document per feature, whichever path wrote it
    run = json.loads((Path(clean_run) / MANIFEST_DIR / "run.json").read_text())
    assert run["format"] == "zarr3" and run["config"]["mode"] == "latest_pixel"


def test_stac_catalog_of_outputs(clean_run, features) -> None:
    import pystac
    from pystac.validation import validate_dict

    catalog = pystac.Catalog.from_file(str(Path(clean_run) / "stac" / "catalog.json"))
    items = {item.id: item for item in catalog.get_items(recursive=True)}
    assert set(items) == {f.id for f in features}
    for fid, item in items.items():
        ds = open_feature(clean_run, fid)
        assert item.properties["proj:code"] == ds.rio.crs.to_string()
        assert item.properties["proj:shape"] == [ds.sizes["y"], ds.sizes["x"]]
        assert Path(item.assets["data"].get_absolute_href()).resolve() == (Path(clean_run) / fid).resolve()
        sources = [link for link in item.links if link.rel == "derived_from"]
        used = {i for ids in json.loads(ds.attrs["item_ids"]).values() for i in ids}
        assert {link.title for link in sources} == used and all(Path(link.href).exists() for link in sources)
        core = item.to_dict()
        core["stac_extensions"] = []  # extension schemas are remote; the core schema ships with pystac
        validate_dict(core)
        west, south, east, north = item.bbox
        assert -10 < west < east < -8 and 29 < south < north < 32


def test_items_made_during_the_run_equal_items_read_back(tmp_path, clean_run, config, features) -> None:
    """The run makes each Zarr item from the Dataset it wrote; reading the groups back gives the same."""
    import shutil

    from pixels_xr.io.stac_out import write_output_catalog

    copy = tmp_path / "run.zarr"
    shutil.copytree(clean_run, copy)
    from pixels_xr.ledger import RunManifest

    ledger = RunManifest(str(copy), config.output_identity, "zarr3")
    write_output_catalog(str(copy), f"pixels_xr {config.mode} output", "zarr", [f.id for f in features],
                         sources=ledger.sources)  # no items: groups re-read
    for feature in features:
        made = json.loads((Path(clean_run) / "stac" / feature.id / f"{feature.id}.json").read_text())
        read = json.loads((copy / "stac" / feature.id / f"{feature.id}.json").read_text())
        for item in (made, read):  # a store lists its arrays in no particular order
            item["properties"]["pixels_xr:variables"].sort()
        assert made == read


def test_a_rerun_makes_missing_items_from_the_ledger(tmp_path, clean_run, config, features, client,
                                                      monkeypatch) -> None:
    """A killed run never writes the output catalog; its re-run finds every unit done and makes the items
    of the features it finished from their job records (grid and time axis), opening no store."""
    import shutil

    import pixels_xr.io.zarr_store

    copy = tmp_path / "run.zarr"
    shutil.copytree(clean_run, copy)
    shutil.rmtree(copy / "stac")  # as a killed run leaves it

    def refuse(*args, **kwargs):
        raise AssertionError("a store was opened to make its item")

    monkeypatch.setattr(pixels_xr.io.zarr_store, "open_feature", refuse)
    again = run_batch(config, features, str(copy), client=client, progress=False)
    assert again.ok and again.units_written == 0
    for feature in features:
        made = json.loads((copy / "stac" / feature.id / f"{feature.id}.json").read_text())
        want = json.loads((Path(clean_run) / "stac" / feature.id / f"{feature.id}.json").read_text())
        assert made == want, feature.id


def test_rerun_is_a_no_op_and_resumes_missing_units(tmp_path, clean_run, config, features, client) -> None:
    out = str(tmp_path / "run.zarr")
    first = run_batch(config, features, out, client=client, progress=False)
    assert first.units_written == 2 * len(features)
    assert all(recorded_whole(out).values()) and len(recorded_whole(out)) == len(features)
    again = run_batch(config, features, out, client=client, progress=False)
    assert again.units_written == 0 and again.units_skipped == 2 * len(features)
    assert all(f.status == "skipped" for f in again.features)
    lost = recorded_units(out)[::4]  # as if the run had died before recording these units
    drop_units(out, lost)
    written: list[tuple[str, str]] = []
    resumed = run_batch(config, features, out, client=client, progress=False,
                        on_unit=lambda fid, label: written.append((fid, label)))
    assert resumed.units_written == len(lost) == len(written)
    assert sorted(written) == lost
    assert_same_arrays(store_arrays(out, [f.id for f in features]),
                       store_arrays(clean_run, [f.id for f in features]))
    assert all(recorded_whole(out).values())  # the resumed features' templates hold every record again


def test_other_config_needs_overwrite(tmp_path, sample, config, features, client) -> None:
    out = str(tmp_path / "run.zarr")
    run_batch(config, features[:1], out, client=client, progress=False)
    other = make_config(sample.catalog, mode="composite", composite_method="median")
    with pytest.raises(OutputError, match="another config"):
        run_batch(other, features[:1], out, client=client, progress=False)
    report = run_batch(other, features[:1], out, client=client, progress=False, overwrite=True)
    assert report.ok and report.units_written == 2
    assert "source_time" not in open_feature(out, features[0].id)


def test_failing_feature_is_reported_and_others_complete(tmp_path, sample, features, client) -> None:
    tight = make_config(sample.catalog, max_pixels=1000)  # the big fields exceed it, the small ones do not
    out = str(tmp_path / "run.zarr")
    report = run_batch(tight, features, out, client=client, progress=False)
    failed = {f.id: f for f in report.failed}
    assert failed and len(failed) < len(features) and not report.ok
    for f in failed.values():
        assert f.stage == "build" and "max_pixels" in f.error and "\n" not in f.error
    for f in report.features:
        if f.id not in failed:
            assert f.status == "done" and open_feature(out, f.id).sizes["time"] == 2
    saved = json.loads((Path(out) / MANIFEST_DIR / "report.json").read_text())
    assert {f["id"] for f in saved["features"] if f["status"] == "failed"} == set(failed)


def test_worker_killed_mid_run_output_identical(tmp_path, clean_run, config, features, s3_server) -> None:
    # A cluster of its own: losing a worker mid-graph has tripped distributed's scheduler state before
    # ("Error transitioning … priority None"), and a shared scheduler would carry that into later tests.
    from servers import DaskCluster

    out = str(tmp_path / "run.zarr")
    killed = []
    with DaskCluster(n_workers=2, nthreads=1, memory_limit="2GiB") as cluster:
        cluster.start()

        def kill_once(fid: str, label: str) -> None:
            if not killed:
                cluster.kill_worker(0)
                killed.append(fid)

        with Client(cluster.address, set_as_default=False) as client:
            report = run_batch(config, features, out, client=client, progress=False, window=2,
                               on_unit=kill_once)
    assert killed and report.ok, report.to_dict()
    assert_same_arrays(store_arrays(out, [f.id for f in features]),
                       store_arrays(clean_run, [f.id for f in features]))


def test_s3_inputs_and_outputs(tmp_path, s3_server, sample, clean_run, features, client) -> None:
    bucket = s3_server.make_bucket("pixels-batch")
    s3_server.upload_dir(Path(sample.catalog).parent, bucket, "sample")
    root = str(Path(sample.catalog).parent)
    collection = tmp_path / "items.json"  # the same items, their assets read from S3
    items = []
    for path in Path(root).rglob("*.json"):
        data = json.loads(path.read_text())
        if data.get("type") == "Feature":
            for asset in data["assets"].values():
                href = asset["href"]
                absolute = (path.parent / href).resolve() if not href.startswith("/") else Path(href)
                asset["href"] = f"s3://{bucket}/sample/{absolute.relative_to(root).as_posix()}"
            items.append(data)
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    config = make_config(collection)
    out = f"s3://{bucket}/runs/run.zarr"
    report = run_batch(config, features, out, client=client, progress=False)
    assert report.ok, report.to_dict()
    assert_same_arrays(store_arrays(out, [f.id for f in features]),
                       store_arrays(clean_run, [f.id for f in features]))
    keys = {o["Key"] for o in s3_server.client.list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"]}
    assert "runs/run.zarr/.pixels_xr/report.json" in keys and "runs/run.zarr/stac/catalog.json" in keys


@pytest.mark.parametrize("output_format", ["cog", "zarr"])
def test_back_to_back_runs_on_one_cluster_never_hang(tmp_path, config, features, client,
                                                       output_format) -> None:
    """Regression: unit threads of one feature once had computations with common keys in flight together;
    distributed then failed ``assert all(dts.who_has ...)`` or hung within a few runs like these."""
    from servers import cluster_snapshot

    for k in range(6):
        runs: list = []
        thread = threading.Thread(target=lambda: runs.append(run_batch(
            config, features[:2], str(tmp_path / f"run{k}"), client=client, progress=False,
            output_format=output_format)), daemon=True)
        thread.start()
        thread.join(120)  # a run takes seconds: a hang fails with what the cluster was doing, not a dump
        assert not thread.is_alive(), f"run {k} hung: {cluster_snapshot(client)}"
        assert runs, f"run {k} raised (see the thread's traceback above)"
        report = runs[0]
        assert report.ok and report.units_written == 4, (k, report.to_dict())


def test_cog_outputs(tmp_path, sample, config, features, client) -> None:
    out = str(tmp_path / "cogs")
    report = run_batch(config, features[:2], out, client=client, progress=False, output_format="cog")
    assert report.ok and report.units_written == 4, report.to_dict()
    for feature in features[:2]:
        ref = collect(config, feature).compute()
        for k, label in enumerate(unit_labels(ref)):
            base = Path(out) / feature.id / label.replace("/", "_")
            for suffix in ("", "_clear_count", "_source_time"):
                valid, errors, _ = cog_validate(f"{base}{suffix}.tif", quiet=True)
                assert valid, errors
            with rasterio.open(f"{base}.tif") as src:
                assert src.descriptions == tuple(config.band_names)
                assert src.tags()["datetime"].startswith(str(ref.time.values[k])[:10])
                assert src.crs == ref.rio.crs and src.transform == ref.rio.transform()
                np.testing.assert_array_equal(src.read(), np.stack([ref[b].values[k] for b in config.band_names]))
            with rasterio.open(f"{base}_clear_count.tif") as src:
                np.testing.assert_array_equal(src.read(1), ref.clear_count.values[k])
            with rasterio.open(f"{base}_source_time.tif") as src:
                days = ref.source_time.values[k].astype("datetime64[D]").astype(np.int64)
                expected = np.where(np.isnat(ref.source_time.values[k]), src.nodata, days)
                np.testing.assert_array_equal(src.read(1), expected)
    import pystac

    items = list(pystac.Catalog.from_file(f"{out}/stac/catalog.json").get_items(recursive=True))
    assert len(items) == 4 and all(set(i.assets) == {"data", "clear_count", "source_time"} for i in items)
    assert all(Path(i.assets["data"].get_absolute_href()).exists() for i in items)


def test_gateway_run_equals_scheduler_run(tmp_path, gateway_server, clean_run, config, features) -> None:
    options = {"workers": 2, "gateway_address": gateway_server.address,
               "gateway_proxy_address": gateway_server.proxy_address, "gateway_auth": "basic",
               "gateway_username": gateway_server.username, "gateway_password": gateway_server.password}
    out = str(tmp_path / "run.zarr")
    report = run_batch(config, features, out, cluster="gateway", cluster_options=options, progress=False)
    assert report.ok, report.to_dict()
    assert_same_arrays(store_arrays(out, [f.id for f in features]),
                       store_arrays(clean_run, [f.id for f in features]))


def test_cli_collect_interrupted_then_resumed(tmp_path, sample, clean_run, features, dask_scheduler) -> None:
    config_path = tmp_path / "config.json"
    config_path.write_text(make_config(sample.catalog).model_dump_json(exclude_none=True))
    out = tmp_path / "run.zarr"
    cmd = [sys.executable, "-m", "pixels_xr.cli", "collect", str(config_path), "--features",
           str(sample.features), "--out", str(out), "--cluster", dask_scheduler.address, "--window", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    # killed at its first recorded units: the client records a job's units as they arrive, and once it is
    # warm the last jobs can land within a few ms of each other, so a later or slower poll saw them all
    while unit_count(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # a crash: no clean-up code runs
    proc.wait()
    done_before = unit_count(out)
    total = 2 * len(features)
    assert 1 <= done_before < total, "the run finished before it could be interrupted"
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / MANIFEST_DIR / "report.json").read_text())
    assert report["units_written"] == total - done_before and report["units_skipped"] == done_before
    assert_same_arrays(store_arrays(str(out), [f.id for f in features]),
                       store_arrays(clean_run, [f.id for f in features]))
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 units written" in again.stdout + again.stderr


def test_cli_collect_bad_input_is_one_line(tmp_path, sample) -> None:
    config_path = tmp_path / "config.json"
    config_path.write_text(make_config(sample.catalog).model_dump_json(exclude_none=True))
    base = [sys.executable, "-m", "pixels_xr.cli", "collect", str(config_path), "--features",
            str(sample.features), "--out", str(tmp_path / "o.zarr")]
    for extra, needle in ((["--format", "tiff"], "format"), (["--cluster", "nowhere"], "cluster")):
        result = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert not (tmp_path / "o.zarr" / MANIFEST_DIR / "units").exists()


def test_misaligned_chunks_are_refused() -> None:
    from pixels_xr.io.zarr_store import check_alignment

    ds = xr.Dataset({"red": (("time", "y", "x"), np.zeros((2, 100, 100), np.float32))}).chunk(
        {"time": 1, "y": 30, "x": 64})
    ds["red"].encoding["chunks"] = (1, 64, 64)
    with pytest.raises(OutputError, match="do not match the Zarr chunk"):
        check_alignment(ds)


def test_zarr_v2_on_request(tmp_path, clean_run, config, features, client) -> None:
    import zarr

    out = str(tmp_path / "run_v2.zarr")
    report = run_batch(config, features[:2], out, client=client, progress=False, zarr_format=2)
    assert report.ok
    assert zarr.open_group(out, mode="r", path=features[0].id).metadata.zarr_format == 2
    assert_same_arrays(store_arrays(out, [f.id for f in features[:2]]),
                       store_arrays(clean_run, [f.id for f in features[:2]]))


# ------------------------------------------------------------------------------ features no scene covers
FAR = Feature("far-away", __import__("shapely").geometry.box(-8.0, 31.5, -7.99, 31.51))


@pytest.mark.parametrize("fmt", ["zarr", "cog"])
@pytest.mark.parametrize("mode", ["latest_pixel", "all"])
def test_feature_no_scene_covers_is_empty_not_failed(tmp_path, sample, features, client, fmt, mode) -> None:
    """A parcel outside every tile used to fail its batch feature (AttributeError in compose)."""
    config = make_config(sample.catalog, mode=mode, **({"interval": None} if mode == "all" else {}))
    out = str(tmp_path / f"out.{fmt}")
    report = run_batch(config, [features[0], FAR], out, client=client, progress=False, output_format=fmt)
    assert report.ok, report.to_dict()
    far = next(f for f in report.features if f.id == FAR.id)
    assert far.status == "done" and far.items == 0 and far.empty_reason == "no items matched the search"
    assert json.loads(Path(out, MANIFEST_DIR, "report.json").read_text())["features"][1]["empty_reason"]
    if mode == "all":  # no acquisition, no time slice: nothing written for it
        assert far.units_written == 0
        return
    assert far.units_written == 2
    if fmt == "zarr":
        ds = open_feature(out, FAR.id)
        assert ds.empty.values.all() and int(ds.clear_count.max()) == 0
        assert all(np.isnan(ds[b].values).all() for b in config.band_names)
        ref = collect(config, FAR)
        assert ds.rio.transform() == ref.rio.transform() and ds.sizes == ref.sizes
    else:
        tifs = sorted((Path(out) / FAR.id).glob("*.tif"))
        assert len(tifs) == 6
        with rasterio.open(tifs[0]) as src:
            assert np.isnan(src.read()).all()
    again = run_batch(config, [features[0], FAR], out, client=client, progress=False, output_format=fmt)
    assert again.units_written == 0


def test_preview_names_an_empty_feature(tmp_path, sample) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"start": "2021-11-01", "end": "2021-12-31", "interval": "months",
                               "platforms": "SENTINEL_2", "bands": ["red"], "catalog": str(sample.catalog)}))
    feats = tmp_path / "f.geojson"
    feats.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": FAR.id, "properties": {},
         "geometry": __import__("shapely").geometry.mapping(FAR.geometry)}]}))
    run = subprocess.run([sys.executable, "-m", "pixels_xr.cli", "preview", str(cfg), "--features", str(feats)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "empty: no items matched the search" in run.stdout and run.stdout.count("(empty bin)") == 2


def test_job_results_never_wait_on_each_other_or_hang_on_cancel(client) -> None:
    """``_when_done``: a slow result handler does not hold up another job's (distributed runs every
    done-callback of a process on one thread), and a cancelled task settles as an ``OutputError``."""
    import threading

    from pixels_xr.batch import _when_done

    release, seen = threading.Event(), {}
    slow, quick = client.submit(sum, [1, 2], pure=False), client.submit(sum, [3, 4], pure=False)
    _when_done(slow, lambda outcome: (release.wait(60), seen.setdefault("slow", outcome.result())))
    got_quick = threading.Event()
    _when_done(quick, lambda outcome: (seen.setdefault("quick", outcome.result()), got_quick.set()))
    assert got_quick.wait(30) and seen == {"quick": 7}  # while the first handler still waits
    release.set()
    deadline = time.monotonic() + 30
    while "slow" not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen == {"quick": 7, "slow": 3}

    cancelled, outcomes = threading.Event(), []
    never = client.submit(time.sleep, 30, pure=False)
    _when_done(never, lambda outcome: (outcomes.append(outcome), cancelled.set()))
    never.cancel()
    assert cancelled.wait(30)
    with pytest.raises(OutputError, match="cancelled"):
        outcomes[0].result()
