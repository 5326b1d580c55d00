"""Samples from real S2 reflectance (COGs + STAC item at a made-up place): split, stratification, rejection.

Cubes come from ``collect`` over the fixture's local catalog (tests/training/conftest.py); labels are drawn
from the scene's real cloud mask. Every count is checked against the labels and the cube directly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import shapely
from scipy.spatial import cKDTree
from typer.testing import CliRunner

from pixels_xr import collect, load_config
from pixels_xr.errors import ConfigError, OutputError
from pixels_xr.features import Feature
from pixels_xr.training import block_split, build_samples, load_labels, open_samples, read_manifest

from .conftest import EPSG, ORIGIN, RES, MlScene

SCENE = Feature("scene", shapely.box(ORIGIN[0], ORIGIN[1] - 512 * RES, ORIGIN[0] + 512 * RES, ORIGIN[1]),
                f"EPSG:{EPSG}")


@pytest.fixture(scope="module")
def cube(ml_scene: MlScene):
    return collect(load_config(ml_scene.config()), SCENE).compute()


def test_no_sample_of_a_test_block_lies_within_the_block_size_of_a_train_sample(ml_scene: MlScene, cube,
                                                                                 tmp_path: Path) -> None:
    labels = load_labels(ml_scene.labels)
    for kind, size in (("pixels", 1), ("chips", 7)):
        m = build_samples(labels, tmp_path / kind, datasets={"scene": cube},
                          spec={"kind": kind, "size": size, "time": 0, "block_size": 400})
        store = open_samples(tmp_path / kind)
        xy = {s: np.column_stack([store.column("x", s), store.column("y", s)]) for s in ("train", "validation",
                                                                                         "test")}
        assert all(len(v) > 20 for v in xy.values()), {s: len(v) for s, v in xy.items()}
        for a, b in (("test", "train"), ("test", "validation"), ("validation", "train")):
            # pixels: centres; chips: their footprints (squares of 7 pixels) stay the block size apart
            gap = cKDTree(xy[a]).query(xy[b])[0] if kind == "pixels" else _square_gaps(xy[a], xy[b], size * RES)
            assert gap.min() >= 400 - 1e-6, (kind, a, b, gap.min())
        # every sample's split is its block's split; the buffer dropped samples and says how many
        split = np.array(["train", "validation", "test"], object)[
            block_split(store.column("x") // 400, store.column("y") // 400, EPSG, 0, (0.7, 0.15, 0.15))]
        assert (split == store.column("split")).all()
        assert m["rejected"]["buffer"] > 0 and m["split"]["buffer"] == 400
        total = sum(sum(c.values()) for c in m["counts"].values())
        assert total == len(store.column("x"))


def _square_gaps(a: np.ndarray, b: np.ndarray, side: float) -> np.ndarray:
    """Euclidean gaps between axis-aligned squares of ``side`` centred on each b and its nearest a's."""
    dx = np.maximum(np.abs(b[:, None, 0] - a[None, :, 0]) - side, 0)
    dy = np.maximum(np.abs(b[:, None, 1] - a[None, :, 1]) - side, 0)
    return np.hypot(dx, dy).min(axis=1)


def test_stratification_caps_polygons_and_classes_seeded(ml_scene: MlScene, cube, tmp_path: Path) -> None:
    labels = load_labels(ml_scene.labels)
    import pyarrow.parquet as pq

    spec = {"kind": "pixels", "time": 0, "block_size": 400, "buffer": 0, "per_polygon": 5}
    build_samples(labels, tmp_path / "a", datasets={"scene": cube}, spec=spec)
    table = pq.read_table(tmp_path / "a" / "samples.parquet").to_pandas()
    per_label = table.groupby("label_id").size()
    squares = [f.id for f in labels.features if f.id.startswith("s")]
    assert (per_label.reindex(squares) == 5).all()  # 4 × 4 squares: 16 valid pixels, 5 drawn from each
    assert per_label.drop(squares).max() == 1  # a point is one pixel
    assert (table["weight"][table["label_id"].str.startswith("s")] == 2.0).all()  # the labels' weights
    uncapped = table.groupby("class_name").size().to_dict()
    spec["max_per_class"] = 60
    m = build_samples(labels, tmp_path / "b", datasets={"scene": cube}, spec=spec)
    capped = pq.read_table(tmp_path / "b" / "samples.parquet").to_pandas()
    assert capped.groupby("class_name").size().to_dict() == {c: min(n, 60) for c, n in uncapped.items()}
    assert m["rejected"]["max_per_class"] == sum(max(0, n - 60) for n in uncapped.values()) > 0
    # seeded: the same seed draws the same samples, another seed other ones
    build_samples(labels, tmp_path / "c", datasets={"scene": cube}, spec=spec)
    assert pq.read_table(tmp_path / "c" / "samples.parquet").to_pandas().equals(capped)
    build_samples(labels, tmp_path / "d", datasets={"scene": cube}, spec={**spec, "seed": 1})
    other = pq.read_table(tmp_path / "d" / "samples.parquet").to_pandas()
    assert not np.array_equal(other[["x", "y"]].values, capped[["x", "y"]].values)
    store = open_samples(tmp_path / "b")
    # balanced class weights: N / (K n_c) over train
    train = m["counts"]["train"]
    n, k = sum(train.values()), sum(1 for v in train.values() if v)
    assert m["class_weights"] == pytest.approx({c: n / (k * v) for c, v in train.items() if v})
    _, _, w = store.arrays("train")
    assert w.max() > w.min()


def test_rejection_by_nodata_and_clear_count(ml_scene: MlScene, cube, tmp_path: Path) -> None:
    labels = load_labels(ml_scene.labels)
    holed = cube.copy(deep=True)
    holed["red"][0, :100, :] = np.nan  # a strip of missing data: rows 0–99
    holed["clear_count"][0, :, :100] = 0  # no clear observation in columns 0–99
    spec = {"kind": "chips", "size": 6, "time": 0, "block_size": 400, "buffer": 0, "min_clear": 1}
    m = build_samples(labels, tmp_path / "r", datasets={"scene": holed}, spec=spec)
    store = open_samples(tmp_path / "r")
    x, y = store.column("x"), store.column("y")
    col = (x - ORIGIN[0]) / RES - 0.5
    row = (ORIGIN[1] - y) / RES - 0.5
    assert len(x) > 100
    assert (col >= 100).all()  # the centre's clear_count decides
    assert (row - 3 >= 100).all()  # a chip (rows r-3 … r+2) touching the strip has nodata: rejected
    assert m["rejected"]["nodata"] > 0 and m["rejected"]["clear_count"] > 0
    assert not np.isnan(np.asarray(store._values[:])).any()
    # allowing some nodata keeps the chips that reach into the strip, and the loader fills it as predict does
    m2 = build_samples(labels, tmp_path / "r2", datasets={"scene": holed}, spec={**spec, "max_nodata": 0.5})
    assert m2["rejected"]["nodata"] < m["rejected"]["nodata"]
    s2 = open_samples(tmp_path / "r2")
    raw = np.asarray(s2._values[:])
    assert np.isnan(raw).any()
    x2, _, _ = s2._batch(np.arange(len(raw)))
    assert (x2[np.isnan(raw)] == 0.0).all() and np.isfinite(x2).all()


def test_collected_per_label_resumes_and_refuses_other_specs(ml_scene: MlScene, tmp_path: Path) -> None:
    """Without features each label is its own feature, collected on the fly; a re-run redoes only what is
    missing and gives the same store."""
    data = json.loads(ml_scene.labels.read_text())
    data["features"] = [f for f in data["features"] if f["id"] in {"p0", "p1", "p2", "s0", "s1", "s2"}]
    labels = load_labels(data)
    cfg = load_config(ml_scene.config())
    spec = {"kind": "chips", "size": 4, "block_size": 400}
    out = tmp_path / "s"
    m = build_samples(labels, out, config=cfg, spec=spec)
    assert [f["id"] for f in m["features"]] == [f.id for f in labels.features]
    assert m["input"] == "reflectance" and m["config"]["mask"] == "none" and m["sample_shape"] == [1, 4, 4, 6]
    first = open_samples(out).arrays("train")[0] if m["counts"]["train"] else None
    parts = out / "parts"
    stamps = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.npz")}
    (parts / "s1.npz").unlink()
    m2 = build_samples(labels, out, config=cfg, spec=spec)
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("*.npz") if p.name != "s1.npz"} == {
        k: v for k, v in stamps.items() if k != "s1.npz"}
    assert (parts / "s1.npz").exists()
    assert m2["counts"] == m["counts"]
    if first is not None:
        np.testing.assert_array_equal(open_samples(out).arrays("train")[0], first)
    with pytest.raises(OutputError, match="overwrite"):
        build_samples(labels, out, config=cfg, spec={**spec, "size": 6})
    assert read_manifest(out)["spec"]["size"] == 4


def test_bad_labels_and_specs_are_one_line_errors(ml_scene: MlScene, tmp_path: Path) -> None:
    data = json.loads(ml_scene.labels.read_text())
    del data["features"][3]["properties"]["class"]
    with pytest.raises(ConfigError, match=r"labels\[3\].properties.class"):
        load_labels(data)
    with pytest.raises(ConfigError, match="samples.kind"):
        build_samples(load_labels(ml_scene.labels), tmp_path, config=load_config(ml_scene.config()),
                      spec={"kind": "cubes"})
    with pytest.raises(ConfigError, match="not one of"):
        load_labels(ml_scene.labels, classes=["clear", "cloud"])


def test_cli_samples(ml_scene: MlScene, tmp_path: Path) -> None:
    from pixels_xr.cli import app

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(ml_scene.config()))
    features = tmp_path / "features.geojson"
    features.write_text(json.dumps({"type": "FeatureCollection", "crs": {"type": "name", "properties": {
        "name": f"EPSG:{EPSG}"}}, "features": [{"type": "Feature", "id": "scene", "properties": {},
                                                "geometry": shapely.geometry.mapping(SCENE.geometry)}]}))
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["samples", str(cfg), str(ml_scene.labels), str(out), "--features", str(features),
                                 "--time", "0", "--block-size", "400", "--cluster", "none"])
    assert result.exit_code == 0, result.output
    assert "samples" in result.output and (out / "manifest.json").exists()
    bad = runner.invoke(app, ["samples", str(cfg), str(ml_scene.labels), str(out), "--kind", "cubes"])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1 and "samples.kind" in bad.output
    assert os.path.exists(out / "samples.parquet")


def test_real_s2_scene_labels_from_its_scl_in_lon_lat(shared_data: Path, tmp_path: Path) -> None:
    """The real S2 L2A scene (EPSG:32629) with labels drawn from its real SCL, given in lon/lat: each label
    is collected on the fly as its own feature, and every sample holds its label's SCL class."""
    import rasterio
    from pyproj import Transformer

    folder = shared_data / "s2-l2a-S2A_29RKH_20200219"
    item = json.loads((folder / "S2A_29RKH_20200219_0_L2A.json").read_text())
    item["links"] = []
    item["assets"] = {k: {**item["assets"][k], "href": str(folder / f"{v}.tif")}
                      for k, v in {"red": "B04", "scl": "SCL"}.items()}
    for a in item["assets"].values():
        a.pop("proj:shape", None), a.pop("proj:transform", None)
    (tmp_path / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": [item]}))
    cfg = load_config({"start": "2020-02-19", "end": "2020-02-19", "mode": "all", "platforms": "SENTINEL_2",
                       "bands": ["red", "scl"], "scale": 200, "mask": "none", "catalog": str(tmp_path / "items.json")})
    classes = {"bare": 5, "cloud": 9, "cirrus": 10}  # of the classes present: {2, 5, 7, 8, 9, 10}
    with rasterio.open(folder / "SCL.tif") as src:
        scl, t = src.read(1), src.transform
    to_lonlat = Transformer.from_crs(32629, 4326, always_xy=True)
    rng = np.random.default_rng(1)
    feats = []
    for name, value in classes.items():
        rows, cols = np.nonzero(scl[5:-5, 5:-5] == value)
        for k in rng.choice(len(rows), 4, replace=False):
            x, y = t * (cols[k] + 5.5, rows[k] + 5.5)
            feats.append({"type": "Feature", "id": f"{name}{k}", "properties": {"class": name},
                          "geometry": {"type": "Point", "coordinates": list(to_lonlat.transform(x, y))}})
    labels = load_labels({"type": "FeatureCollection", "features": feats})
    m = build_samples(labels, tmp_path / "s", config=cfg, spec={"kind": "pixels", "time": 0, "block_size": 2000,
                                                                 "buffer": 0})
    assert [f["samples"] for f in m["features"]] == [1] * len(feats)  # each point: one pixel of its own cube
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "s" / "samples.parquet").to_pandas()
    assert (table["scl"] == table["class_name"].map(classes)).all()
    with rasterio.open(folder / "SCL.tif") as src:
        at = np.array([v[0] for v in src.sample(zip(table["x"], table["y"]))])
    assert (at == table["scl"]).all()
    assert m["bands"] == ["red", "scl"] and m["epsg"] == [32629]


def _halves() -> list[Feature]:
    x0, y1 = ORIGIN
    return [Feature(name, shapely.box(x0 + k * 2560, y1 - 5120, x0 + (k + 1) * 2560, y1), f"EPSG:{EPSG}")
            for k, name in enumerate(("west", "east"))]


HALVES_SPEC = {"kind": "chips", "size": 3, "time": 0, "block_size": 400, "buffer": 0}


def _same_samples(a: Path, b: Path) -> None:
    """The same samples in each split (in place order: stores list their features in their own orders)."""
    x, y = open_samples(a), open_samples(b)
    for split in ("train", "validation", "test"):
        ox = np.lexsort((x.column("y", split), x.column("x", split)))
        oy = np.lexsort((y.column("y", split), y.column("x", split)))
        for u, v in zip(x.arrays(split), y.arrays(split)):
            np.testing.assert_array_equal(u[ox], v[oy])


def test_a_cluster_draws_the_same_samples(ml_scene: MlScene, dask_scheduler, tmp_path: Path) -> None:
    """Features sampled on a real scheduler with two worker processes = sampled in this process."""
    from distributed import Client

    labels, cfg = load_labels(ml_scene.labels), load_config(ml_scene.config())
    here = build_samples(labels, tmp_path / "here", config=cfg, features=_halves(), spec=HALVES_SPEC)
    with Client(dask_scheduler.address) as client:
        there = build_samples(labels, tmp_path / "there", config=cfg, features=_halves(), spec=HALVES_SPEC,
                              client=client)
    assert here["counts"] == there["counts"] and sum(sum(c.values()) for c in here["counts"].values()) > 10
    _same_samples(tmp_path / "here", tmp_path / "there")


@pytest.mark.slow
def test_samples_from_a_run_batch_store_equal_samples_collected_on_the_fly(ml_scene: MlScene, dask_scheduler,
                                                                           tmp_path: Path) -> None:
    """The same cubes written by run_batch, then sampled from the store (its groups are the features)."""
    from distributed import Client

    from pixels_xr import run_batch

    labels, cfg = load_labels(ml_scene.labels), load_config(ml_scene.config())
    here = build_samples(labels, tmp_path / "here", config=cfg, features=_halves(), spec=HALVES_SPEC)
    with Client(dask_scheduler.address) as client:
        report = run_batch(cfg, _halves(), str(tmp_path / "run.zarr"), client=client, progress=False)
    assert report.ok, report.summary()
    stored = build_samples(labels, tmp_path / "stored", source=str(tmp_path / "run.zarr"), spec=HALVES_SPEC)
    assert [f["id"] for f in stored["features"]] == ["east", "west"] and stored["counts"] == here["counts"]
    _same_samples(tmp_path / "here", tmp_path / "stored")
