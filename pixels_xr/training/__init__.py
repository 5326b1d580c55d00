"""Training data from labelled geometries: samples from collected cubes, a spatial-block split, loaders.

``load_labels`` → ``build_samples`` (cubes from ``collect``, a ``run_batch`` output or Datasets in hand;
per-pixel series or chips; stratified, seeded, rejected by nodata and ``clear_count``; split on spatial
blocks; one resumable part per feature, merged into Parquet or Zarr with a manifest) → ``open_samples``
(numpy batches, Keras ``PyDataset``, ``tf.data``) → ``write_sidecar`` (the ``predict`` sidecar from the
manifest's band order and normalisation).
"""

from __future__ import annotations

from pixels_xr.training.build import build_samples, label_features
from pixels_xr.training.labels import Labels, load_labels
from pixels_xr.training.loaders import SampleStore, augment_chips, open_samples
from pixels_xr.training.sampling import Samples, SampleSpec, draw_samples, load_spec
from pixels_xr.training.split import SPLITS, block_split, kept_by_buffer
from pixels_xr.training.store import read_manifest, sidecar_from, write_sidecar

__all__ = [
    "SPLITS",
    "Labels",
    "SampleSpec",
    "SampleStore",
    "Samples",
    "augment_chips",
    "block_split",
    "build_samples",
    "draw_samples",
    "kept_by_buffer",
    "label_features",
    "load_labels",
    "load_spec",
    "open_samples",
    "read_manifest",
    "sidecar_from",
    "write_sidecar",
]
