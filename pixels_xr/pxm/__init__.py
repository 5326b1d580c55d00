"""PXM (Mapbox Pixelmonster) renderer wing: manifests, sources with their masks, colour, tile rendering."""

from __future__ import annotations

from pixels_xr.pxm.color import FormulaError, Op, apply as apply_color, format_formula, parse_formula
from pixels_xr.pxm.checks import Finding, check_sources
from pixels_xr.pxm.manifest import ColorRule, Manifest, ManifestInfo, validate_manifest
from pixels_xr.pxm.renderer import RenderReport, UnreadableSources, render
from pixels_xr.pxm.sources import (
    MAX_PIXELS,
    SOURCE_DRIVERS,
    MaskKind,
    SourceHandle,
    gdal_path,
    open_source,
    read_source,
)

__all__ = [
    "ColorRule",
    "Finding",
    "MAX_PIXELS",
    "FormulaError",
    "Manifest",
    "ManifestInfo",
    "MaskKind",
    "Op",
    "RenderReport",
    "SOURCE_DRIVERS",
    "SourceHandle",
    "UnreadableSources",
    "apply_color",
    "check_sources",
    "format_formula",
    "gdal_path",
    "open_source",
    "parse_formula",
    "read_source",
    "render",
    "validate_manifest",
]
