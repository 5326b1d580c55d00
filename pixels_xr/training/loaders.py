"""Loaders over a sample store: numpy batches, a Keras 3 ``PyDataset`` and a ``tf.data.Dataset``.

All three yield ``(x, y, sample_weight)`` batches made by one function, ``SampleStore.batches``: ``x``
normalised with the manifest's ``scale``/``offset`` and nodata filled exactly as ``predict`` does it (so a
model sees the same numbers in training and inference), ``y`` the class index, ``sample_weight`` the label
weight × the class weight. Train batches are shuffled (seeded, a new order each epoch) and chips are
augmented with the 8 flips/90° rotations of the square (also seeded); validation and test are never
augmented. Pixel tables are read into memory (they are small); chips are read per batch from Zarr.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pixels_xr.errors import ConfigError, OutputError
from pixels_xr.io import storage
from pixels_xr.training.split import SPLITS
from pixels_xr.training.store import read_manifest, value_columns


class SampleStore:
    """A finished sample store (``build_samples``'s ``out``): its manifest and the samples of each split."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.manifest = read_manifest(self.path)
        self.classes: list[str] = list(self.manifest["classes"])
        self.bands: list[str] = list(self.manifest["bands"])
        norm = self.manifest["normalisation"]
        self.scale = np.asarray(norm["scale"], np.float32)
        self.offset = np.asarray(norm["offset"], np.float32)
        self.fill = np.float32(norm["fill"])
        url = storage.join(self.path, self.manifest["store"])
        if self.manifest["kind"] == "pixels":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(storage.local_path(url) if not storage.is_remote(url) else url)
            except (OSError, ValueError) as exc:
                raise OutputError(f"cannot read the samples: {exc}", url) from None
            names = value_columns(self.bands, self.manifest["times"], self.manifest["spec"]["time"] is None)
            shape = tuple(self.manifest["sample_shape"])
            self._values: Any = np.stack([table[n].to_numpy() for n in names], -1).reshape(-1, *shape) \
                if names else np.empty((0, *shape), np.float32)
            self._columns = {k: table[k].to_numpy(zero_copy_only=False) for k in ("class", "split", "weight", "x", "y")}
        else:
            import zarr

            group = zarr.open_group(url, mode="r")
            self._values = group["values"]
            self._columns = {k: np.asarray(group[k][:]) for k in ("class", "split", "weight", "x", "y")}
        self._columns["split"] = np.asarray(self._columns["split"]).astype(object)
        weights = self.manifest["class_weights"]
        table = np.array([weights[c] for c in self.classes], np.float32)
        self._sample_weight = self._columns["weight"].astype(np.float32) * table[self._columns["class"]]

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    def indexes(self, split: str) -> np.ndarray:
        """Sample indexes of ``split`` (train, validation or test)."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; use one of {list(SPLITS)}", "split")
        return np.flatnonzero(self._columns["split"] == split)

    def column(self, name: str, split: str | None = None) -> np.ndarray:
        """A per-sample column (class, split, weight, x, y), optionally of one split."""
        values = self._columns[name]
        return values if split is None else values[self.indexes(split)]

    def normalised(self, values: np.ndarray) -> np.ndarray:
        """Raw values (…, band) → model inputs: ``value · scale + offset``, nodata → ``fill`` (as ``predict``)."""
        x = values.astype(np.float32) * self.scale + self.offset
        x[np.isnan(values)] = self.fill
        return x

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The whole split as ``(x, y, sample_weight)`` (normalised, not augmented, in store order)."""
        return self._batch(self.indexes(split))

    def _batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if isinstance(self._values, np.ndarray):
            raw = self._values[idx]
        else:  # Zarr: read in ascending order (whole chunks), then put back in the batch's order
            order = np.argsort(idx, kind="stable")
            raw = np.empty((len(idx), *self._values.shape[1:]), np.float32)
            raw[order] = self._values.get_orthogonal_selection((idx[order],)) if len(idx) else raw
        return (self.normalised(raw), self._columns["class"][idx].astype(np.int32),
                self._sample_weight[idx])

    def batches(self, split: str = "train", *, batch_size: int = 64, shuffle: bool | None = None,
                augment: bool | None = None, seed: int = 0, epoch: int = 0) -> Iterator[tuple[np.ndarray, ...]]:
        """``(x, y, sample_weight)`` batches of ``split`` for one epoch (``epoch`` varies the seeded order
        and augmentation). ``shuffle`` and ``augment`` default to on for train (augment: chips only)."""
        idx = self.indexes(split)
        shuffle, augment = self._options(split, shuffle, augment)
        if batch_size < 1:
            raise ConfigError(f"must be ≥ 1, got {batch_size}", "batch_size")
        if shuffle:
            idx = np.random.default_rng([seed, epoch]).permutation(idx)
        for i, start in enumerate(range(0, len(idx), batch_size)):
            x, y, w = self._batch(idx[start:start + batch_size])
            # one generator per batch: the PyDataset's batch i of an epoch is the same batch
            yield (augment_chips(x, np.random.default_rng([seed, epoch, i])) if augment else x), y, w

    def _options(self, split: str, shuffle: bool | None, augment: bool | None) -> tuple[bool, bool]:
        if augment and split != "train":
            raise ConfigError("augmentation is for the train split only", "augment")
        if augment and self.kind != "chips":
            raise ConfigError("augmentation (flips, rotations) needs chips", "augment")
        return (split == "train" if shuffle is None else bool(shuffle),
                (split == "train" and self.kind == "chips") if augment is None else bool(augment))

    def batch_count(self, split: str, batch_size: int) -> int:
        return -(-len(self.indexes(split)) // batch_size)

    def keras_dataset(self, split: str = "train", *, batch_size: int = 64, shuffle: bool | None = None,
                      augment: bool | None = None, seed: int = 0, **kwargs: Any) -> Any:
        """A Keras 3 ``PyDataset`` of ``split`` (``kwargs``: workers, use_multiprocessing, max_queue_size)."""
        return _pydataset_class()(self, split, batch_size, shuffle, augment, seed, **kwargs)

    def tf_dataset(self, split: str = "train", *, batch_size: int = 64, shuffle: bool | None = None,
                   augment: bool | None = None, seed: int = 0) -> Any:
        """A ``tf.data.Dataset`` of ``(x, y, sample_weight)`` batches streamed from the store; each pass
        over it is the next epoch (new seeded order and augmentation)."""
        from pixels_xr.inference.model import _tensorflow

        tf = _tensorflow()
        self._options(split, shuffle, augment)
        shape = tuple(self.manifest["sample_shape"])
        epochs = iter(range(2**62))

        def generate() -> Iterator[tuple[np.ndarray, ...]]:
            yield from self.batches(split, batch_size=batch_size, shuffle=shuffle, augment=augment, seed=seed,
                                    epoch=next(epochs))

        signature = (tf.TensorSpec((None, *shape), tf.float32), tf.TensorSpec((None,), tf.int32),
                     tf.TensorSpec((None,), tf.float32))
        return tf.data.Dataset.from_generator(generate, output_signature=signature).prefetch(2)


def augment_chips(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each chip (n, [time,] h, w, band) under one of the 8 symmetries of the square (seeded)."""
    out = np.empty_like(x)
    k = rng.integers(0, 4, len(x))
    flip = rng.integers(0, 2, len(x)).astype(bool)
    for i in range(len(x)):
        chip = np.rot90(x[i], k[i], axes=(-3, -2))
        out[i] = chip[..., ::-1, :, :] if flip[i] else chip
    return out


def open_samples(path: str | Path) -> SampleStore:
    """Open a sample store written by ``build_samples``."""
    return SampleStore(path)


def _pydataset_class() -> type:
    """The ``PyDataset`` subclass, made on first use (Keras is imported only when asked for)."""
    global _PYDATASET
    if _PYDATASET is not None:
        return _PYDATASET
    from pixels_xr.inference.model import _tensorflow

    _tensorflow()
    import keras

    class StorePyDataset(keras.utils.PyDataset):
        """Batches of one split of a sample store; reshuffled (seeded) at each epoch's end."""

        def __init__(self, store: SampleStore, split: str, batch_size: int, shuffle: bool | None,
                     augment: bool | None, seed: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.store, self.split, self.batch_size, self.seed = store, split, batch_size, seed
            self.shuffle, self.augment = store._options(split, shuffle, augment)
            self.epoch = 0
            self._order()

        def _order(self) -> None:
            idx = self.store.indexes(self.split)
            self.idx = np.random.default_rng([self.seed, self.epoch]).permutation(idx) if self.shuffle else idx

        def __len__(self) -> int:
            return (len(self.idx) + self.batch_size - 1) // self.batch_size

        def __getitem__(self, i: int) -> tuple[np.ndarray, ...]:
            x, y, w = self.store._batch(self.idx[i * self.batch_size:(i + 1) * self.batch_size])
            if self.augment:  # per batch generator: the same batch of the same epoch augments the same way
                x = augment_chips(x, np.random.default_rng([self.seed, self.epoch, i]))
            return x, y, w

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self._order()

    _PYDATASET = StorePyDataset
    return _PYDATASET


_PYDATASET: type | None = None
