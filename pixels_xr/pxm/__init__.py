"""PXM (Mapbox Pixelmonster) renderer wing: manifests, sources with their masks, colour, tile rendering.

The public names are imported on first use (PEP 562), like the package root's: ``pixels-xr``'s command line
imports ``pixels_xr.pxm.cli`` for every command, and each worker process of a cluster imports that script
again, so importing this package must not pull rasterio, numba and the renderer in.
"""

from __future__ import annotations

import importlib

#: Public names → the module that defines them.
_LAZY = {
    "FormulaError": "color", "Op": "color", "apply_color": "color", "format_formula": "color",
    "parse_formula": "color", "Finding": "checks", "check_sources": "checks", "ColorRule": "manifest",
    "Manifest": "manifest", "ManifestInfo": "manifest", "validate_manifest": "manifest",
    "RenderReport": "renderer", "UnreadableSources": "renderer", "render": "renderer",
    "MAX_PIXELS": "sources", "SOURCE_DRIVERS": "sources", "MaskKind": "sources", "SourceHandle": "sources",
    "gdal_path": "sources", "open_source": "sources", "read_source": "sources",
}
_RENAMED = {"apply_color": "apply"}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pixels_xr.pxm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pixels_xr.pxm.{module}"), _RENAMED.get(name, name))
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = list(_LAZY)
