"""Inference: tiny real Keras models, trained here on real Sentinel-2 reflectance, run on a real cluster.

Every prediction is compared with the model called directly on the whole numpy array (normalised and
nodata-filled by the test itself); image models are checked for chunked == single block, non-square tiles
and inputs smaller than the model; nodata, dtypes, sidecar errors and the CLI (Zarr and COG) round trip.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

os.environ.setdefault("PIXELS_XR_TF_THREADS", "1")  # two cores: one TF thread per process
pytest.importorskip("tensorflow", reason="TensorFlow is not installed: pip install -e '.[tf]' (CI has it)")

import cloudpickle  # noqa: E402
from distributed import Client  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from pixels_xr import inference  # noqa: E402
from pixels_xr.errors import ModelError  # noqa: E402
from pixels_xr.inference import predict  # noqa: E402

pytestmark = [pytest.mark.tf, pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")]  # inside Keras

inference._tensorflow()  # thread settings before the runtime starts
import keras  # noqa: E402

BANDS = ["blue", "green", "red", "nir", "swir16", "swir22"]
SCALE = [4.0, 4.0, 4.0, 2.0, 2.0, 3.0]
OFFSET = [-0.5, -0.5, -0.5, -0.6, -0.6, -0.6]
FILL = -1.0
ATOL = 2e-5  # float32 convolutions on differently sized tiles round differently in the last bits


# ------------------------------------------------------------------------------------------------
# Data and models
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Real S2 reflectance (512, 512, 6) and labels 0 clear / 1 cloud / 2 shadow-or-dark from its mask."""
    npz = np.load(shared_data / "ml" / "ukis_csmask_sentinel2_512x512x6.npz")
    labels = np.select([npz["msk"][..., 0] == 3, npz["msk"][..., 0] == 4], [0, 1], 2).astype(np.int32)
    return npz["img"].astype(np.float32), labels


def cube(img: np.ndarray, dates: list[tuple[slice, slice]], chunks: dict | None = None) -> xr.Dataset:
    """A (time, y, x) reflectance Dataset of crops of the real image, with nodata in realistic shapes."""
    stack = np.stack([img[ys, xs] for ys, xs in dates]).copy()  # (time, y, x, band)
    t, h, w, _ = stack.shape
    yy, xx = np.mgrid[:h, :w]
    stack[0][xx + 2 * yy < w // 3] = np.nan  # swath edge: every band
    if t > 1:
        stack[1, h // 3:h // 2, w // 4:w // 2] = np.nan  # a missing block
        stack[1, 5:9, :, 3] = np.nan  # one band missing only
    ds = xr.Dataset(
        {b: (("time", "y", "x"), stack[..., k]) for k, b in enumerate(BANDS)},
        coords={"time": np.array([f"2020-0{k + 1}-01" for k in range(t)], "datetime64[ns]"),
                "y": 4_000_000 - 10.0 * np.arange(h) - 5, "x": 500_000 + 10.0 * np.arange(w) + 5},
        attrs={"output": "reflectance", "feature": "f1"},
    ).rio.write_crs(32629)
    return ds.chunk(chunks) if chunks else ds


def model_input(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(time, y, x, band) normalised with the sidecar, nodata filled; and the 'any band' nodata mask."""
    x = np.stack([ds[b].values for b in BANDS], axis=-1)
    bad = np.isnan(x)
    x = x * np.float32(SCALE) + np.float32(OFFSET)
    x[bad] = FILL
    return x.astype(np.float32), bad.any(-1)


def save(model: keras.Model, path: Path, **sidecar) -> str:
    """Save a Keras file (or SavedModel folder when the path has no suffix) and its sidecar."""
    if path.suffix == ".keras":
        model.save(path)
    else:
        model.export(str(path), format="tf_saved_model", verbose=False)
    spec = {"bands": BANDS, "scale": SCALE, "offset": OFFSET, "input": "reflectance",
            "nodata": {"fill": FILL}, "classes": ["clear", "cloud", "shadow"],
            "colors": {"clear": [0, 150, 0], "cloud": [255, 255, 255, 200]}, **sidecar}
    Path(str(path).removesuffix(".keras") + ".json").write_text(json.dumps(spec))
    return str(path)


def cnn(shape: tuple, time_steps: int | None = None) -> keras.Model:
    """Two 3×3 convolutions (receptive-field margin 2); with time, a Conv3D stack averaged over dates."""
    if time_steps is None:
        return keras.Sequential([keras.Input(shape),
                                 keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                                 keras.layers.Conv2D(3, 3, padding="same", activation="softmax")])
    inp = keras.Input((time_steps, *shape))
    h = keras.layers.Conv3D(6, (time_steps, 3, 3), padding="same", activation="relu")(inp)
    h = keras.layers.Conv3D(3, (1, 3, 3), padding="same")(h)
    h = keras.layers.AveragePooling3D((time_steps, 1, 1))(h)
    h = keras.layers.Reshape(shape[:2] + (3,))(h) if shape[0] else keras.layers.Lambda(lambda t: t[:, 0])(h)
    return keras.Model(inp, keras.layers.Softmax()(h))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, ml) -> dict:
    """Tiny real models trained for a few steps on the real image, saved with their sidecars."""
    img, labels = ml
    d = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(7)
    x = (img * np.float32(SCALE) + np.float32(OFFSET)).astype(np.float32)
    rng = np.random.default_rng(0)
    pick = rng.choice(512 * 512, 20_000, replace=False)
    dense = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    dense.compile("adam", "sparse_categorical_crossentropy")
    history = dense.fit(x.reshape(-1, 6)[pick], labels.reshape(-1)[pick], epochs=3, batch_size=512, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]  # it really trained
    fcn = cnn((None, None, 6))
    fcn.compile("adam", "sparse_categorical_crossentropy")
    patches = np.stack([x[i:i + 64, j:j + 64] for i in range(0, 448, 64) for j in range(0, 448, 64)])
    plabels = np.stack([labels[i:i + 64, j:j + 64] for i in range(0, 448, 64) for j in range(0, 448, 64)])
    fcn.fit(patches, plabels, epochs=2, batch_size=8, verbose=0)
    fixed = cnn((16, 24, 6))  # non-square fixed input, same weights
    fixed.set_weights(fcn.get_weights())
    dense4 = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                               keras.layers.Dense(3, activation="softmax")])  # the sample has 4 bands
    dense4.compile("adam", "sparse_categorical_crossentropy")
    dense4.fit(x.reshape(-1, 6)[pick, :4], labels.reshape(-1)[pick], epochs=2, batch_size=512, verbose=0)
    pixel_time = keras.Sequential([keras.Input((2, 6)), keras.layers.Flatten(),
                                   keras.layers.Dense(3, activation="softmax")])
    image_time_fcn = cnn((None, None, 6), time_steps=2)
    image_time = cnn((16, 24, 6), time_steps=2)
    image_time.set_weights(image_time_fcn.get_weights())
    return {
        "dense": (dense, save(dense, d / "dense.keras")),
        "dense4": (dense4, save(dense4, d / "dense4.keras")),
        "fcn": (fcn, save(fcn, d / "fcn.keras", margin=2)),
        "fcn_patched": (fcn, save(fcn, d / "fcn_patched.keras", margin=2, patch=[20, 12])),
        "fixed": (fcn, save(fixed, d / "fixed.keras", margin=2)),
        "saved_model": (fcn, save(fcn, d / "fcn_savedmodel", margin=2, patch=[24, 16])),
        "pixel_time": (pixel_time, save(pixel_time, d / "pixel_time.keras")),
        "image_time": (image_time_fcn, save(image_time, d / "image_time.keras", margin=2)),
    }


@pytest.fixture(scope="module")
def client(dask_scheduler):
    """A client of the real two-worker cluster; workers run TensorFlow with one thread."""
    from pixels_xr.cluster import EnvironmentPlugin

    with Client(dask_scheduler.address) as c:
        c.register_plugin(EnvironmentPlugin({"PIXELS_XR_TF_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}))
        workers = list(c.scheduler_info(n_workers=-1)["workers"])
        # import TensorFlow on the workers while this process trains the models (no test waits on it)
        warm = [c.submit(_import_tensorflow, workers=[w], allow_other_workers=False, pure=False)
                for w in workers]
        yield c
        del warm


def _import_tensorflow() -> str:
    return inference._tensorflow().__version__


def direct(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(x, batch_size=4096, verbose=0), np.float32)


# ------------------------------------------------------------------------------------------------
# Per-pixel models
# ------------------------------------------------------------------------------------------------


def test_pixel_model_on_cluster_equals_model_predict(client, ml, models) -> None:
    img, _ = ml
    ds = cube(img, [(slice(0, 150), slice(0, 190)), (slice(300, 450), slice(280, 470))], {"y": 64, "x": 80})
    model, path = models["dense"]
    x, bad = model_input(ds)
    ref = direct(model, x.reshape(-1, 6)).reshape(*x.shape[:3], 3)  # (time, y, x, class)

    prob = predict(ds, path).compute()
    assert prob.probability.dims == ("time", "class", "y", "x") and prob.probability.dtype == np.float32
    assert list(prob["class"].values) == ["clear", "cloud", "shadow"]
    assert prob.rio.crs.to_epsg() == 32629
    got = np.moveaxis(prob.probability.values, 1, -1)
    assert np.isnan(got[bad]).all() and np.isfinite(got[~bad]).all()
    np.testing.assert_allclose(got[~bad], ref[~bad], atol=ATOL)
    assert bad[1, 5:9].all()  # one band missing makes the pixel nodata ("any")

    classes = predict(ds, path, output="classes").classes
    assert classes.dtype == np.uint8 and classes.dims == ("time", "y", "x")
    expected = np.where(bad, 255, ref.argmax(-1)).astype(np.uint8)
    agree = (classes.values == expected)
    assert agree[bad].all() and agree.mean() > 0.999  # argmax ties may flip on last-bit differences
    assert json.loads(classes.attrs["colormap"])["1"] == [255, 255, 255, 200]

    scaled = predict(ds, path, probability_dtype="uint8").probability.values
    assert scaled.dtype == np.uint8 and (np.moveaxis(scaled, 1, -1)[bad] == 255).all()
    assert np.abs(np.moveaxis(scaled, 1, -1)[~bad].astype(int) - np.round(ref[~bad] * 254)).max() <= 1

    # once per worker, never as bytes in the graph
    loads = client.run(lambda: dict(inference.LOAD_COUNT))
    assert all(counts.get(path, 0) <= 1 for counts in loads.values())
    assert sum(counts.get(path, 0) for counts in loads.values()) >= 1
    graph = cloudpickle.dumps(dict(predict(ds, path).probability.data.__dask_graph__()))
    assert model.get_weights()[0].tobytes() not in graph and Path(path).read_bytes()[-4096:] not in graph


def test_time_models_read_dates_in_order(client, ml, models) -> None:
    img, _ = ml
    ds = cube(img, [(slice(0, 70), slice(0, 90)), (slice(100, 170), slice(200, 290)),
                    (slice(300, 370), slice(50, 140))], {"y": 32, "x": 40})
    sub = ds.isel(time=[0, 2])
    x, bad = model_input(sub)

    model, path = models["pixel_time"]
    out = predict(ds, path, time=[0, 2]).compute()
    assert out.probability.dims == ("class", "y", "x")
    assert json.loads(out.attrs["dates"]) == ["2020-01-01T00:00:00", "2020-03-01T00:00:00"]
    samples = np.moveaxis(x, 0, 2).reshape(-1, 2, 6)  # (pixel, time, band)
    ref = direct(model, samples).reshape(70, 90, 3)
    invalid = bad.any(0)
    got = np.moveaxis(out.probability.values, 0, -1)
    assert np.isnan(got[invalid]).all()
    np.testing.assert_allclose(got[~invalid], ref[~invalid], atol=ATOL)

    fcn, path = models["image_time"]
    ref = direct(fcn, x[None])[0]  # (y, x, class) from the whole array
    got = np.moveaxis(predict(ds, path, time=["2020-01-01", "2020-03-01"]).probability.values, 0, -1)
    np.testing.assert_allclose(got[~invalid], ref[~invalid], atol=ATOL)

    with pytest.raises(ModelError, match="reads 2 dates, the dataset has 3") as err:
        predict(ds, path)
    assert "\n" not in str(err.value) and str(err.value).startswith("time:")


def test_engine_cube_raw_uint16_nodata_zero(tmp_path: Path, client, models) -> None:
    """A real engine Dataset (synthetic sample, output raw): nodata 0 stays nodata, the rest is predicted."""
    from pixels_xr.compose import collect
    from pixels_xr.config import load_config
    from pixels_xr.features import load_features
    from pixels_xr.testing.sample import make_sample

    info = make_sample(tmp_path / "sample", n_dates=6, width=64, height=64, every_days=7)
    cfg = load_config({"start": "2021-11-01", "end": "2021-12-31", "mode": "latest_pixel",
                       "interval": "months", "platforms": "SENTINEL_2", "bands": BANDS[:4],
                       "catalog": str(info.catalog), "output": "raw"})
    ds = collect(cfg, load_features(info.features)[0]).compute()
    assert ds.red.dtype == np.uint16 and (ds.red.values == 0).any()
    model, path = models["dense4"]
    with pytest.raises(ModelError, match="expects reflectance values but the dataset holds raw"):
        predict(ds, path, bands=BANDS[:4])
    raw_spec = {"bands": BANDS[:4], "scale": [s * 1e-4 for s in SCALE[:4]], "offset": OFFSET[:4],
                "input": "raw", "nodata": {"fill": FILL, "when": "all"}}
    out = predict(ds.chunk({"y": 40, "x": 40}), path, sidecar=raw_spec).probability
    assert out.dims == ("time", "class", "y", "x") and out.sizes["time"] == ds.sizes["time"]
    values = np.stack([ds[b].values for b in BANDS[:4]], -1)
    x = values * (np.float32(SCALE[:4]) * np.float32(1e-4)) + np.float32(OFFSET[:4])
    x[values == 0] = FILL
    ref = direct(model, x.reshape(-1, 4).astype(np.float32)).reshape(*x.shape[:3], 3)
    empty = (values == 0).all(-1)
    got = np.moveaxis(out.values, 1, -1)
    assert np.isnan(got[empty]).all() and np.isfinite(got[~empty]).all()
    np.testing.assert_allclose(got[~empty], ref[~empty], atol=ATOL)
    assert out.rio.crs == ds.rio.crs and (out.x.values == ds.x.values).all()


def test_sigmoid_model_on_a_dataset_without_time(tmp_path: Path, ml) -> None:
    """One sigmoid output means two classes (p ≥ 0.5 is the second); a 2-D dataset gives 2-D outputs."""
    img, _ = ml
    ds = cube(img, [(slice(0, 40), slice(0, 50))]).isel(time=0)
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1, activation="sigmoid")])
    path = save(model, tmp_path / "binary.keras", classes=["land", "cloud"], colors={})
    x, bad = model_input(ds.expand_dims("time"))
    p = direct(model, x.reshape(-1, 6)).reshape(40, 50)
    prob = predict(ds, path).probability
    assert prob.dims == ("class", "y", "x") and list(prob["class"].values) == ["land", "cloud"]
    np.testing.assert_allclose(prob.values[1][~bad[0]], p[~bad[0]], atol=ATOL)
    np.testing.assert_allclose(prob.values.sum(0)[~bad[0]], 1.0, atol=ATOL)
    classes = predict(ds, path, output="classes").classes.values
    assert 0 < (classes == 1).mean() < 1
    np.testing.assert_array_equal(classes, np.where(bad[0], 255, p >= 0.5))


# ------------------------------------------------------------------------------------------------
# Image models
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fcn", "fixed", "fcn_patched", "saved_model"])
def test_image_model_chunked_equals_whole_array(client, ml, models, name: str) -> None:
    img, _ = ml
    ds = cube(img, [(slice(40, 110), slice(0, 130)), (slice(200, 270), slice(300, 430))])
    fcn, path = models[name]
    x, bad = model_input(ds)
    ref = np.moveaxis(direct(fcn, x), -1, 1)  # (time, class, y, x): the FCN on each whole date
    single = predict(ds, path).probability.values
    # irregular chunks, one smaller than the fixed 16×24 input, another smaller than the margin
    chunked = predict(ds.chunk({"y": (30, 30, 10), "x": (50, 1, 41, 38)}), path).probability
    assert chunked.data.chunks[2:] == ((30, 30, 10), (50, 1, 41, 38))  # the input's chunks are kept
    chunked = chunked.values
    ok = ~np.broadcast_to(bad[:, None], ref.shape)
    assert np.isnan(single[~ok]).all() and np.isnan(chunked[~ok]).all()
    np.testing.assert_allclose(single[ok], ref[ok], atol=ATOL)
    np.testing.assert_allclose(chunked[ok], single[ok], atol=ATOL)


def test_overlap_is_what_makes_chunks_seamless(ml, models) -> None:
    img, _ = ml
    ds = cube(img, [(slice(0, 64), slice(0, 96))], {"y": 32, "x": 48})
    fcn, path = models["fcn"]
    x, bad = model_input(ds)
    ref = np.moveaxis(direct(fcn, x), -1, 1)[:, :, ~bad[0]]
    seamed = predict(ds, path, overlap=0).probability.values[:, :, ~bad[0]]
    assert np.abs(seamed - ref).max() > 1e-3  # block edges see zero padding without overlap
    np.testing.assert_allclose(predict(ds, path, overlap=3).probability.values[:, :, ~bad[0]], ref, atol=ATOL)


def test_input_smaller_than_fixed_model_is_padded_with_fill(ml, models) -> None:
    img, _ = ml
    ds = cube(img, [(slice(0, 10), slice(0, 13))])
    _, path = models["fixed"]
    fixed = keras.saving.load_model(path)
    x, bad = model_input(ds)
    padded = np.full((1, 16, 24, 6), FILL, np.float32)
    padded[0, :10, :13] = x[0]
    ref = np.moveaxis(direct(fixed, padded)[0, :10, :13], -1, 0)
    got = predict(ds, path).probability.values[0]
    assert np.isnan(got[:, bad[0]]).all()
    np.testing.assert_allclose(got[:, ~bad[0]], ref[:, ~bad[0]], atol=ATOL)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    text = str(exc.value)
    assert "\n" not in text and all(f in text for f in fragments), text


def test_bad_models_and_sidecars_are_one_line_errors(tmp_path: Path, ml, models) -> None:
    img, _ = ml
    ds = cube(img, [(slice(0, 20), slice(0, 20))])
    _, good = models["dense"]
    with pytest.raises(ModelError) as err:
        predict(ds, tmp_path / "missing.keras")
    one_line(err, "missing.json", "sidecar JSON not found")
    (tmp_path / "missing.json").write_text(json.dumps({"bands": BANDS}))
    with pytest.raises(ModelError) as err:
        predict(ds, tmp_path / "missing.keras")
    one_line(err, "missing.keras", "model not found")

    cases = {
        "{not json": "invalid JSON",
        json.dumps({"bands": BANDS, "scael": 1}): "scael: unknown key",
        json.dumps({"bands": BANDS, "scale": [1, 2]}): "scale: 2 values for 6 bands",
        json.dumps({"bands": []}): "bands:",
        json.dumps({"bands": BANDS, "nodata": {"when": "some"}}): "nodata.when:",
        json.dumps({"bands": BANDS, "margin": 8, "patch": [16, 16]}): "must exceed twice the margin",
        json.dumps({"bands": BANDS, "colors": {"snow": [1, 2, 3]}, "classes": ["a", "b", "c"]}): "'snow'",
        json.dumps({"bands": BANDS, "colors": {"clear": [1, 2, 300]}}): "colors.clear.2:",
        json.dumps({"bands": BANDS, "scale": "big"}): "scale:",
    }
    shutil.copy(good, tmp_path / "m.keras")
    for text, fragment in cases.items():
        (tmp_path / "m.json").write_text(text)
        with pytest.raises(ModelError) as err:
            predict(ds, tmp_path / "m.keras")
        one_line(err, "m.json", fragment)

    (tmp_path / "m.json").write_text(json.dumps({"bands": BANDS, "classes": ["a", "b"]}))
    with pytest.raises(ModelError) as err:
        predict(ds, tmp_path / "m.keras")
    one_line(err, "m.json: classes: 2 classes for a model with 3 output channels")
    (tmp_path / "m.json").write_text(json.dumps({"bands": BANDS}))
    for kwargs, fragment in [({"bands": ["red", "nir"]}, "2 bands ['red', 'nir'] for a model with 6 input"),
                             ({"bands": [*BANDS[:5], "B99"]}, "bands: band 'B99' is not in the dataset"),
                             ({"time": "1999-01-01"}, "time: cannot select"),
                             ({"output": "logits"}, "output: unknown output")]:
        with pytest.raises(ModelError) as err:
            predict(ds, tmp_path / "m.keras", **kwargs)  # type: ignore[arg-type]
        one_line(err, fragment)

    (tmp_path / "junk.keras").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "junk.json").write_text(json.dumps({"bands": BANDS}))
    (tmp_path / "model.onnx").write_bytes(b"\0")
    (tmp_path / "model.onnx.json").write_text(json.dumps({"bands": BANDS}))  # unknown suffix: a folder name
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder.json").write_text(json.dumps({"bands": BANDS}))
    for name, fragment in [("junk.keras", "cannot load the Keras model"), ("model.onnx", "not a model"),
                           ("folder", "no saved_model.pb")]:
        with pytest.raises(ModelError) as err:
            predict(ds, tmp_path / name)
        one_line(err, name, fragment)


# ------------------------------------------------------------------------------------------------
# Remote model and CLI
# ------------------------------------------------------------------------------------------------


def test_model_on_s3_is_downloaded_once_per_worker(client, s3_server, ml, models) -> None:
    img, _ = ml
    model, path = models["dense"]
    s3_server.make_bucket("models-bucket")
    s3_server.upload(path, "models-bucket", "m/dense.keras")
    s3_server.upload(path.replace(".keras", ".json"), "models-bucket", "m/dense.json")
    ds = cube(img, [(slice(0, 60), slice(0, 80))], {"y": 30, "x": 40})
    got = predict(ds, "s3://models-bucket/m/dense.keras").probability.values
    x, bad = model_input(ds)
    ref = np.moveaxis(direct(model, x.reshape(-1, 6)).reshape(1, 60, 80, 3), -1, 1)
    np.testing.assert_allclose(got[:, :, ~bad[0]], ref[:, :, ~bad[0]], atol=ATOL)
    loads = client.run(lambda: dict(inference.LOAD_COUNT))
    assert all(c.get("s3://models-bucket/m/dense.keras", 0) <= 1 for c in loads.values())


def test_cli_round_trip_zarr_and_cog(tmp_path: Path, client, dask_scheduler, ml, models) -> None:
    import rasterio

    from pixels_xr.cli import app

    img, _ = ml
    ds = cube(img, [(slice(0, 80), slice(0, 100)), (slice(100, 180), slice(100, 200))], {"y": 40, "x": 50})
    store = str(tmp_path / "run.zarr")
    ds.to_zarr(store, group="f1", consolidated=False)
    _, path = models["fcn"]
    runner = CliRunner()

    res = runner.invoke(app, ["predict", path, f"{store}/f1", "--out", str(tmp_path / "p.zarr"),
                              "--cluster", dask_scheduler.address])
    assert res.exit_code == 0, res.output
    back = inference.open_input(str(tmp_path / "p.zarr"))
    expected = predict(ds, path).compute()
    np.testing.assert_allclose(back.probability.values, expected.probability.values, atol=ATOL)
    assert back.rio.crs.to_epsg() == 32629 and list(back["class"].values) == ["clear", "cloud", "shadow"]

    res = runner.invoke(app, ["predict", path, store, "--group", "f1", "--out", str(tmp_path / "cogs"),
                              "--format", "cog", "--output", "classes"])
    assert res.exit_code == 0, res.output
    classes = predict(ds, path, output="classes").classes.values
    for k, day in enumerate(["2020-01-01", "2020-02-01"]):
        with rasterio.open(tmp_path / "cogs" / f"classes_{day}.tif") as src:
            assert src.dtypes[0] == "uint8" and src.nodata == 255 and src.crs.to_epsg() == 32629
            assert src.transform == ds.rio.transform()
            np.testing.assert_array_equal(src.read(1), classes[k])
            cmap = src.colormap(1)
            assert cmap[0] == (0, 150, 0, 255) and cmap[1][:3] == (255, 255, 255)  # TIFF palettes: no alpha
            assert json.loads(src.tags()["classes"]) == ["clear", "cloud", "shadow"]

    res = runner.invoke(app, ["predict", path, f"{store}/f1", "--out", str(tmp_path / "pcogs"),
                              "--format", "cog", "--uint8"])
    assert res.exit_code == 0, res.output
    scaled = predict(ds, path, probability_dtype="uint8").probability.values
    with rasterio.open(tmp_path / "pcogs" / "probability_2020-02-01.tif") as src:
        assert src.count == 3 and src.descriptions == ("clear", "cloud", "shadow") and src.nodata == 255
        np.testing.assert_array_equal(src.read(), scaled[1])

    res = runner.invoke(app, ["predict", path, store, "--out", str(tmp_path / "x.zarr")])
    assert res.exit_code == 1 and "holds the groups f1: pick one with --group" in res.output
    res = runner.invoke(app, ["predict", path, f"{store}/f1", "--out", str(tmp_path / "p.zarr")])
    assert res.exit_code == 1 and "already exists" in res.output
    res = runner.invoke(app, ["predict", str(tmp_path / "nope.keras"), f"{store}/f1", "--out", "o.zarr"])
    assert res.exit_code == 1 and res.output.strip().startswith("error:") and res.output.count("\n") == 1
