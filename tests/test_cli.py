"""The CLI: complete help, plans, one-line errors with non-zero exit, and every file in configs/ validates."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
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
    without_pxm = [sys.executable, "-c", "import sys; sys.modules['regex'] = None; sys.argv[0] = 'pixels-xr'; "
                   "from pixels_xr.cli import main; main()"]
    out = help_text(argv_prefix=without_pxm)
    assert "pip install 'pixels-xr[pxm]'" in " ".join(out.replace("│", " ").split()), out
    proc = subprocess.run([*without_pxm, "pxm", "validate", "m.json"], capture_output=True, text=True,
                          timeout=120, env=WIDE)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: pxm:") and "pixels-xr[pxm]" in proc.stderr, proc.stderr
