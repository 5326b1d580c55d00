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

#: Public names → the module that defines them, imported on first use (PEP 562): ``import pixels_xr`` (and
#: every PXM worker process, which imports ``pixels_xr.pxm``) costs the errors module, not xarray, dask,
#: distributed or TensorFlow.
_LAZY = {
    "search": "pixels_xr.catalog", "collect": "pixels_xr.compose", "PixelsConfig": "pixels_xr.config",
    "load_config": "pixels_xr.config", "build_cube": "pixels_xr.cube", "Feature": "pixels_xr.features",
    "load_features": "pixels_xr.features", "open_feature": "pixels_xr.io.zarr_store",
    "run_batch": "pixels_xr.batch", "RunReport": "pixels_xr.batch", "open_client": "pixels_xr.cluster",
    "predict": "pixels_xr.inference", "build_samples": "pixels_xr.training", "load_labels": "pixels_xr.training",
    "open_samples": "pixels_xr.training", "write_sidecar": "pixels_xr.training", "stats": "pixels_xr.stats",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pixels_xr' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
    "stats",
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
