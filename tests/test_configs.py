"""Every file in configs/ is valid for its kind, documented in configs/README.md, and the sample ones run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from pixels_xr.config import PixelsConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
FILES = sorted(p for p in CONFIGS.iterdir() if p.is_file())


def kind(path: Path) -> str:
    """What a file in configs/ is: readme, pxm manifest or pixels configuration; else unknown."""
    if path.name == "README.md":
        return "readme"
    if path.suffix != ".json":
        return "unknown"
    return "pxm" if path.name.startswith("pxm_") else "pixels"


def documented() -> list[str]:
    """File names linked in the first column of configs/README.md's tables."""
    text = (CONFIGS / "README.md").read_text()
    return re.findall(r"^\| \[`([^`]+)`\]\(\1\) \|", text, flags=re.MULTILINE)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_file_is_a_known_kind_and_valid(path: Path, sample_features: list) -> None:
    k = kind(path)
    if k == "unknown":
        pytest.fail(f"{path.name}: unknown file type in configs/ (expected README.md, pxm_*.json or a pixels "
                    "configuration *.json)")
    if k == "readme":
        return
    data = json.loads(path.read_text())
    if k == "pxm":
        pytest.importorskip("regex")
        from pixels_xr.pxm.manifest import validate_manifest

        manifest = validate_manifest(path)
        assert manifest.sources and manifest.info.tilesets
        assert ("version" in data) == (manifest.version == "0.5")
    else:
        assert "sources" not in data, f"{path.name}: a PXM manifest must be named pxm_*.json"
        cfg = load_config(path)
        assert cfg.cluster.gateway_password is None, "passwords never go in files"
        from pixels_xr.plan import plan

        plans = plan(cfg, sample_features)  # dynamic dates resolve per feature; grids fit the size limit
        assert len(plans) == len(sample_features)
        if cfg.mode != "all":
            assert all(p.bins for p in plans)


def test_readme_documents_exactly_the_files() -> None:
    listed = documented()
    assert len(listed) == len(set(listed)), "a file is listed twice"
    names = {p.name for p in FILES if p.name != "README.md"}
    assert set(listed) == names, (f"undocumented: {sorted(names - set(listed))}; "
                                  f"listed but missing: {sorted(set(listed) - names)}")


def test_examples_cover_every_mode_and_method_for_both_platforms() -> None:
    configs = [load_config(p) for p in FILES if kind(p) == "pixels"]
    family = {"sentinel-2": "sentinel-2", **{f"landsat-{n}": "landsat" for n in (4, 5, 7, 8, 9)}}
    seen = {(family[c.platform.name], c.mode if c.mode != "composite" else c.resolved_composite_method,
             c.start is None) for c in configs}
    for platform in ("sentinel-2", "landsat"):
        for what in ("all", "latest_pixel", "cloud_sorted_pixel", "median", "first_clear"):
            assert any((platform, what, d) in seen for d in (True, False)), (platform, what)
        for dynamic in (True, False):
            assert any(p == platform and d == dynamic for p, _, d in seen), (platform, dynamic)
    assert any(w == "quality" for _, w, _ in seen) and ("landsat", "qa_pixel", False) in seen
    assert [kind(p) for p in FILES].count("pxm") >= 2
    clusters = [c.cluster for c in configs if c.cluster.model_dump(exclude_defaults=True)]
    assert any(c.gateway_address for c in clusters)
    assert any(c.workers and not c.gateway_address for c in clusters)


def test_unknown_file_kinds_are_refused() -> None:
    assert kind(Path("configs/notes.txt")) == "unknown"
    assert kind(Path("configs/run.yaml")) == "unknown"
    assert kind(Path("configs/pxm_a.json")) == "pxm"


# ------------------------------------------------------------------------------ sample configs run
@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory):
    from pixels_xr.testing.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("configs") / "sample", n_dates=36, width=48, height=48)


@pytest.fixture(scope="module")
def sample_features(sample) -> list:
    from pixels_xr.features import load_features

    return load_features(sample.features)


@pytest.mark.parametrize("path", [p for p in FILES if p.name.startswith("sample_")], ids=lambda p: p.name)
def test_sample_configs_run_offline(path: Path, sample, sample_features: list) -> None:
    from pixels_xr.compose import collect

    data = json.loads(path.read_text())
    assert data["catalog"] == "sample/catalog.json", "sample configs read the README's sample folder"
    cfg: PixelsConfig = load_config({**data, "catalog": str(sample.catalog)})
    feature = next(f for f in sample_features if f.id == "field-3")  # dated 2022-02-11
    ds = collect(cfg, feature).compute()
    assert set(cfg.band_names) <= set(ds.data_vars) and "clear_count" in ds
    picks = cfg.mode in {"latest_pixel", "cloud_sorted_pixel"} or (
        cfg.mode == "composite" and cfg.resolved_composite_method != "median")
    assert ("source_time" in ds) == picks
    band = ds[cfg.band_names[0]].values
    filled = np.isfinite(band) if band.dtype.kind == "f" else band != 0
    assert filled.any(), f"{path.name}: no pixel filled on the sample"
    if cfg.mode != "all":
        assert ds.sizes["time"] == len(cfg.bins(feature))
