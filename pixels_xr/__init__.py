"""pixels_xr: satellite imagery at scale on Dask + xarray."""

from __future__ import annotations

from pixels_xr._version import __version__

from pixels_xr.errors import (  # noqa: E402
    AssetReadError,
    CatalogError,
    ConfigError,
    ManifestError,
    OutputError,
    PixelsError,
    SourceError,
)

from pixels_xr.catalog import search  # noqa: E402
from pixels_xr.compose import collect  # noqa: E402
from pixels_xr.config import PixelsConfig, load_config  # noqa: E402
from pixels_xr.cube import build_cube  # noqa: E402
from pixels_xr.features import Feature, load_features  # noqa: E402
from pixels_xr.io.zarr_store import open_feature  # noqa: E402


def __getattr__(name: str):  # distributed is imported only when a batch or cluster is asked for
    if name in {"run_batch", "RunReport"}:
        from pixels_xr import batch

        return getattr(batch, name)
    if name == "open_client":
        from pixels_xr.cluster import open_client

        return open_client
    if name == "predict":  # TensorFlow is imported only when a model runs
        from pixels_xr.inference import predict

        return predict
    if name in {"build_samples", "load_labels", "open_samples", "write_sidecar"}:  # training data
        from pixels_xr import training

        return getattr(training, name)
    raise AttributeError(f"module 'pixels_xr' has no attribute {name!r}")


__all__ = [
    "Feature",
    "PixelsConfig",
    "build_cube",
    "build_samples",
    "collect",
    "load_config",
    "load_features",
    "load_labels",
    "open_client",
    "open_feature",
    "open_samples",
    "predict",
    "run_batch",
    "RunReport",
    "search",
    "write_sidecar",
    "__version__",
    "AssetReadError",
    "CatalogError",
    "ConfigError",
    "ManifestError",
    "OutputError",
    "PixelsError",
    "SourceError",
]
