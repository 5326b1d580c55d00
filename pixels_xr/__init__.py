"""pixels_xr: satellite imagery at scale on Dask + xarray."""

from __future__ import annotations

__version__ = "0.1.0"

from pixels_xr.errors import (  # noqa: E402
    AssetReadError,
    CatalogError,
    ConfigError,
    ManifestError,
    OutputError,
    PixelsError,
    SourceError,
)

__all__ = [
    "__version__",
    "AssetReadError",
    "CatalogError",
    "ConfigError",
    "ManifestError",
    "OutputError",
    "PixelsError",
    "SourceError",
]
