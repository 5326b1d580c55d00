"""The README's main job runs as written (offline, in a fresh folder) and its output is a complete store."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from pixels_xr.io.zarr_store import open_feature

REPO = Path(__file__).resolve().parents[1]


def main_job_commands() -> list[list[str]]:
    """The first bash block of the README, split on ``&&``, minus the venv creation and install steps."""
    block = re.search(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)
    assert block, "README has no bash block"
    steps = [shlex.split(s) for s in block.group(1).split("&&")]
    steps = [s for s in steps if s[0] not in {"python3"} and "install" not in s]
    return [[str(Path(sys.executable).parent / Path(s[0]).name) if s[0].startswith(".venv/") else s[0], *s[1:]]
            for s in steps]


def test_readme_main_job_runs_offline_and_is_idempotent(tmp_path: Path) -> None:
    (tmp_path / "configs").symlink_to(REPO / "configs")
    commands = main_job_commands()
    assert [c[1] for c in commands] == ["sample", "collect"]
    for cmd in commands:
        result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
    out = commands[-1][commands[-1].index("--out") + 1]
    assert str(tmp_path / out) in result.stdout and "6 features: 6 written" in result.stdout
    ds = open_feature(str(tmp_path / out), "field-3")
    assert ds.sizes["time"] == 12 and ds.rio.crs is not None
    assert int(ds.clear_count.max()) > 0 and float(ds.red.mean()) > 0
    again = subprocess.run(commands[-1], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "0 units written, 72 skipped" in again.stdout, again.stdout + again.stderr
