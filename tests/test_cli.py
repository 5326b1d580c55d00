"""The CLI: complete help, plans, one-line errors with non-zero exit, and every file in configs/ validates."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ledger_files import unit_count
from typer.testing import CliRunner

from pixels_xr.cli import app
from pixels_xr.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "pixels-xr")
runner = CliRunner()
WIDE = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}


def help_text(*args: str, argv_prefix: list[str] | None = None) -> str:
    proc = subprocess.run([*(argv_prefix or [CLI]), *args, "--help"], capture_output=True, text=True, timeout=120,
                          env=WIDE)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_lists_every_command() -> None:
    out = runner.invoke(app, ["--help"]).output
    for cmd in ("validate", "sample", "preview", "pxm"):
        assert cmd in out
    for cmd in ("validate", "sample", "preview"):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.json")), ids=lambda p: p.name)
def test_every_pixels_config_in_configs_validates(path: Path) -> None:
    data = json.loads(path.read_text())
    if "sources" in data:  # PXM manifests are validated by the pxm tests
        pytest.skip("PXM manifest")
    cfg = load_config(path)
    assert cfg.bands


def test_validate_prints_plan_and_errors_are_one_line(tmp_path: Path) -> None:
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "a", "properties": {"date": "2022-05-01"},
         "geometry": {"type": "Polygon", "coordinates": [[[-9, 38.7], [-8.99, 38.7], [-8.99, 38.71], [-9, 38.7]]]}}]}
    features = tmp_path / "f.geojson"
    features.write_text(json.dumps(fc))
    res = runner.invoke(app, ["validate", str(REPO / "configs/sample_dynamic_three_weeks_all.json"),
                              "--features", str(features)])
    assert res.exit_code == 0, res.output
    assert "feature a: 2022-04-10..2022-05-01" in res.output and "EPSG:32629" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mode": "all", "platforms": "S2", "bands": ["red"], "start": "2020-01-01",
                               "end": "2020-02-01", "scael": 10}))
    proc = subprocess.run([sys.executable, "-m", "pixels_xr.cli", "validate", str(bad)], capture_output=True,
                          text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: scael: unknown key 'scael'; did you mean 'scale'?"
    assert "Traceback" not in proc.stderr


def test_preview_runs_offline_on_the_sample(tmp_path: Path) -> None:
    res = runner.invoke(app, ["sample", str(tmp_path / "s"), "--n-dates", "6", "--size", "64"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((REPO / "configs/sample_monthly_latest_pixel.json").read_text())
    cfg["catalog"] = str(tmp_path / "s" / "catalog.json")
    cfg["end"] = "2021-12-31"
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    res = runner.invoke(app, ["preview", str(tmp_path / "c.json"), "--features", str(tmp_path / "s/features.geojson"),
                              "--limit", "1"])
    assert res.exit_code == 0, res.output
    assert "feature field-1" in res.output and "2021-11-01" in res.output and "filled" in res.output


def test_help_shows_flags_as_flags_in_the_real_cli() -> None:
    for command in ((), ("pxm", "validate")):
        out = help_text(*command)
        assert "<bool>" not in out, out
        assert re.search(r"--help\s+Show this message", out), out
    out = help_text("collect")
    assert "<bool>" not in out, out
    assert re.search(r"--overwrite\s+--no-overwrite\s+Redo every unit", out), out
    assert re.search(r"--quiet\s+--no-quiet\s+No progress bar", out), out
    assert re.search(r"--workers\s+<int>\s+Workers", out), out  # options with a value keep their type


def test_help_without_the_pxm_extra_shows_the_install_hint_whole() -> None:
    # the state of an environment without the pxm extra: its `regex` dependency cannot be imported
    # (a None entry in sys.modules is how Python marks a module as not importable)
    without_pxm = [sys.executable, "-c", ("import sys; sys.modules['regex'] = None; sys.argv[0] = 'pixels-xr'; "
                                          "from pixels_xr.cli import main; main()")]
    out = help_text(argv_prefix=without_pxm)
    assert "pip install 'pixels-xr[pxm]'" in " ".join(out.replace("│", " ").split()), out
    proc = subprocess.run([*without_pxm, "pxm", "validate", "m.json"], capture_output=True, text=True,
                          timeout=120, env=WIDE)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: pxm:") and "pixels-xr[pxm]" in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------ collect: options, Ctrl-C


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    """``pixels-xr sample sample --size 256 --n-dates 12`` in a folder of its own, the README's main job."""
    root = tmp_path_factory.mktemp("collect")
    proc = subprocess.run([CLI, "sample", "sample", "--size", "256", "--n-dates", "12"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return root


def collect_cmd(out: Path, *extra: str, config: Path = REPO / "configs/sample_monthly_composite.json") -> list[str]:
    return [CLI, "collect", str(config), "--features", "sample/features.geojson", "--out", str(out), *extra]


@pytest.mark.parametrize("extra, where, needle", [
    (["--workers", "-1"], "--workers", "at least 1"),
    (["--workers", "0"], "--workers", "at least 1"),  # was ignored
    (["--workers", "100000"], "--workers", "at most"),  # hung
    (["--window", "-5"], "--window", "at least 1"),  # traceback
    (["--window", "0"], "--window", "at least 1"),
])
def test_collect_refuses_bad_cluster_sizes_before_anything_starts(sample_dir, extra, where, needle) -> None:
    out = sample_dir / "refused.zarr"
    proc = subprocess.run(collect_cmd(out, *extra), cwd=sample_dir, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {where}: ") and needle in lines[0], proc.stderr
    assert not out.exists()


def test_collect_refuses_a_memory_limit_dask_cannot_read(sample_dir) -> None:
    config = json.loads((REPO / "configs/sample_monthly_composite.json").read_text())
    config["cluster"] = {"memory_limit": "lots"}
    path = sample_dir / "lots.json"
    path.write_text(json.dumps(config))
    out = sample_dir / "lots.zarr"
    proc = subprocess.run(collect_cmd(out, config=path), cwd=sample_dir, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cluster.memory_limit: 'lots' is not a memory size"), \
        proc.stderr
    assert not out.exists()


def _session_processes(sid: int) -> list[str]:
    import psutil

    alive = []
    for p in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}")
        except (OSError, psutil.Error):
            continue
    return alive


def _store_arrays(out: Path) -> dict:
    from pixels_xr.io.zarr_store import open_feature

    features = json.loads((out.parent / "sample" / "features.geojson").read_text())["features"]
    arrays = {}
    for f in features:
        ds = open_feature(str(out), f["id"]).load()
        for name, var in ds.data_vars.items():
            arrays[(f["id"], name)] = var.values
    return arrays


def test_ctrl_c_stops_collect_within_seconds_and_the_rerun_completes_it(sample_dir) -> None:
    import signal
    import time

    out = sample_dir / "interrupted.zarr"
    cmd = collect_cmd(out, "--workers", "1")
    proc = subprocess.Popen(cmd, cwd=sample_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while unit_count(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:  # the bug: a hung close; clean up before failing
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Nanny" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: the units finished so far are kept"), stderr
    deadline = time.monotonic() + 15
    while _session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _session_processes(proc.pid), _session_processes(proc.pid)
    done = unit_count(out)
    total = 6 * 12
    assert 1 <= done < total
    rerun = subprocess.run(cmd, cwd=sample_dir, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    report = json.loads((out / ".pixels_xr" / "report.json").read_text())
    assert report["units_skipped"] == done and report["units_written"] == total - done, report
    reference = sample_dir / "uninterrupted.zarr"
    ref = subprocess.run(collect_cmd(reference, "--workers", "1"), cwd=sample_dir, capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr
    a, b = _store_arrays(out), _store_arrays(reference)
    assert a.keys() == b.keys() and len(a) >= 6
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


# ------------------------------------------------------------------------------ the original pixels' configs
def test_original_style_config_with_its_geojson_runs_without_features(sample_dir, tmp_path) -> None:
    """A config written for the original pixels: geojson inside (CRS the GeoJSON 2008 way), SCL method,
    pool_size 0, bands as one comma string; validate and collect take the features from it."""
    config = tmp_path / "original.json"
    config.write_text(json.dumps({
        "start": "2021-11-01", "end": "2021-12-31", "platforms": "SENTINEL_2", "level": "L2A",
        "interval": "months", "mode": "composite", "composite_method": "SCL", "pool_size": 0,
        "bands": ["B02,B04,B08"], "catalog": str(sample_dir / "sample" / "catalog.json"),
        "geojson": {"type": "FeatureCollection",
                    "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::3857"}},
                    "features": [{"type": "Feature", "properties": {"id": "p1"}, "geometry": {
                        "type": "Polygon", "coordinates": [[[-1000400, 3561300], [-1000000, 3561300],
                                                            [-1000000, 3561700], [-1000400, 3561700],
                                                            [-1000400, 3561300]]]}}]}}))
    shown = subprocess.run([CLI, "validate", str(config)], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "(first_clear)" in shown.stdout and "feature p1:" in shown.stdout and "EPSG:3857" in shown.stdout
    out = tmp_path / "o.zarr"
    run = subprocess.run([CLI, "collect", str(config), "--out", str(out), "--quiet"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 units written" in run.stdout
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "geojson"}))
    refused = subprocess.run([CLI, "collect", str(bare), "--out", str(tmp_path / "x")], capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 1 and refused.stderr.strip().startswith("error: --features:"), refused.stderr


def test_skipped_assets_are_surfaced_in_the_exit_status(sample_dir, tmp_path) -> None:
    """A flaky asset left out under on_asset_error skip: the run completes, says so, and exits 3."""
    import shutil

    root = tmp_path / "sample"
    shutil.copytree(sample_dir / "sample", root)
    victim = sorted(root.rglob("red.tif"))[0]
    victim.write_bytes(b"II*\x00 not a tiff any more")
    config = tmp_path / "c.json"
    raw = json.loads((REPO / "configs/sample_monthly_composite.json").read_text())
    config.write_text(json.dumps({**raw, "catalog": str(root / "catalog.json"), "end": "2021-12-31"}))
    run = subprocess.run([CLI, "collect", str(config), "--features", str(root / "features.geojson"), "--out",
                          str(tmp_path / "o.zarr"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 3, run.stdout + run.stderr
    assert "unreadable assets were left out" in run.stderr and "unreadable assets skipped" in run.stdout
    report = json.loads((tmp_path / "o.zarr" / ".pixels_xr" / "report.json").read_text())
    assert any(p["href"].endswith(victim.name) for f in report["features"] for p in f["asset_problems"])
