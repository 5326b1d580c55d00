"""Labels → samples → a small Keras model trained on the train blocks → test blocks → ``predict``.

Real S2 reflectance and its real cloud mask (tests/training/conftest.py). The model must beat the
majority-class baseline of the test split clearly, and ``predict`` with the sidecar written from the
manifest must give, on the cube, exactly the model's own outputs on the loaders' test samples.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import shapely

os.environ.setdefault("PIXELS_XR_TF_THREADS", "1")  # two cores: one TF thread per process
pytest.importorskip("tensorflow", reason="TensorFlow is not installed: pip install -e '.[tf]' (CI has it)")

from pixels_xr import collect, load_config
from pixels_xr.features import Feature
from pixels_xr.inference import _tensorflow, predict
from pixels_xr.training import augment_chips, build_samples, load_labels, open_samples, write_sidecar

from .conftest import EPSG, ORIGIN, RES, MlScene

pytestmark = [pytest.mark.tf, pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")]

_tensorflow()
import keras

SCENE = Feature("scene", shapely.box(ORIGIN[0], ORIGIN[1] - 512 * RES, ORIGIN[0] + 512 * RES, ORIGIN[1]),
                f"EPSG:{EPSG}")


def test_train_on_train_blocks_beats_the_baseline_and_predict_reproduces_the_model(ml_scene: MlScene,
                                                                                   tmp_path: Path) -> None:
    cfg = load_config(ml_scene.config())
    cube = collect(cfg, SCENE).compute()
    labels = load_labels(ml_scene.labels)
    m = build_samples(labels, tmp_path / "px", config=cfg, features=[SCENE],
                      spec={"kind": "pixels", "time": 0, "block_size": 400, "seed": 1})
    store = open_samples(tmp_path / "px")
    assert m["sample_shape"] == [6] and m["bands"] == ["blue", "green", "red", "nir", "swir16", "swir22"]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="sparse_categorical_crossentropy",
                  weighted_metrics=[])
    model.fit(store.keras_dataset("train", batch_size=32), epochs=15, verbose=0)
    x, y, _ = store.arrays("test")
    own = model.predict(x, verbose=0)
    accuracy = float((own.argmax(1) == y).mean())
    baseline = float(np.bincount(y).max() / len(y))
    print(f"test blocks: {len(y)} samples, accuracy {accuracy:.3f}, majority-class baseline {baseline:.3f}")
    assert accuracy >= baseline + 0.1 and accuracy > 0.85, (accuracy, baseline)
    # tf.data streams the same batches as the numpy iterator
    first = next(iter(store.tf_dataset("test", batch_size=50)))
    ref = next(store.batches("test", batch_size=50))
    for a, b in zip(first, ref):
        np.testing.assert_array_equal(a.numpy(), b)
    # the sidecar from the manifest: predict over the cube gives the model's own outputs at the samples
    path = tmp_path / "cloud.keras"
    model.save(path)
    write_sidecar(tmp_path / "px", path)
    prob = predict(cube, path).probability.compute()
    cols = np.round((store.column("x", "test") - ORIGIN[0]) / RES - 0.5).astype(int)
    rows = np.round((ORIGIN[1] - store.column("y", "test")) / RES - 0.5).astype(int)
    got = prob.isel(time=0).values[:, rows, cols].T if "time" in prob.dims else prob.values[:, rows, cols].T
    np.testing.assert_allclose(got, own, atol=1e-5)


def test_chip_loaders_agree_and_augment_train_only(ml_scene: MlScene, tmp_path: Path) -> None:
    cfg = load_config(ml_scene.config())
    build_samples(load_labels(ml_scene.labels), tmp_path / "ch", config=cfg, features=[SCENE],
                  spec={"kind": "chips", "size": 5, "time": 0, "block_size": 400, "buffer": 0})
    store = open_samples(tmp_path / "ch")
    ds = store.keras_dataset("train", batch_size=16, seed=3)
    numpy_batches = list(store.batches("train", batch_size=16, seed=3))
    assert len(ds) == len(numpy_batches) > 2
    for i in (0, len(ds) - 1):
        for a, b in zip(ds[i], numpy_batches[i]):
            np.testing.assert_array_equal(a, b)
    # augmentation is one of the 8 symmetries of each chip; batches of other splits are never augmented
    plain = list(store.batches("train", batch_size=16, seed=3, augment=False))
    x_aug, x = numpy_batches[0][0], plain[0][0]
    variants = [np.rot90(v, k, axes=(-3, -2)) for v in (x, x[..., ::-1, :, :]) for k in range(4)]
    assert all(any(np.array_equal(x_aug[i], v[i]) for v in variants) for i in range(len(x)))
    assert not np.array_equal(x_aug, x)
    test = next(store.batches("test", batch_size=16))
    np.testing.assert_array_equal(test[0], store.arrays("test")[0][:16])
    with pytest.raises(Exception, match="train split only"):
        next(store.batches("test", augment=True))
    assert augment_chips(x[:0], np.random.default_rng(0)).shape == x[:0].shape
    # tf.data streams the same augmented train batches (same seed, same epoch), epoch after epoch
    stream = store.tf_dataset("train", batch_size=16, seed=3)
    for epoch in range(2):
        got = next(iter(stream))
        want = next(store.batches("train", batch_size=16, seed=3, epoch=epoch))
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a.numpy(), b)
