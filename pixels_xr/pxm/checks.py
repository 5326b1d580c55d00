"""``pxm validate --check-sources``: every source of a valid manifest opened and read, findings per source.

Kept apart from ``manifest`` so that validating a manifest stays pure (no I/O); these checks open files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pixels_xr.errors import SourceError
from pixels_xr.pxm.manifest import Manifest

__all__ = ["Finding", "check_sources"]



@dataclass(frozen=True)
class Finding:
    """One ``--check-sources`` result: ``level`` ("error" or "warning"), the source ``where`` and a message."""

    level: Literal["error", "warning"]
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.where}: {self.message}"


MIN_SIZE, MAX_SIZE = 200, 31000
_FRINGE_TOL, _FRINGE_MAX, _FRINGE_MIN_BORDER, _FRINGE_SIDE = 8, 0.5, 100, 2048


def _fringe(src: Any) -> float | None:
    """Fraction of the nodata border that is almost-nodata (read at <= 2048 px, nearest), if suspicious."""
    from pixels_xr.pxm.sources import nodata_fringe

    scale = max(src.width, src.height) / _FRINGE_SIDE
    shape = None if scale <= 1 else (max(1, round(src.height / scale)), max(1, round(src.width / scale)))
    rgb, _ = src.read(out_shape=shape)
    n, frac = nodata_fringe(rgb, src.ndv, _FRINGE_TOL)
    return frac if n >= _FRINGE_MIN_BORDER and frac >= _FRINGE_MAX else None


def _check_one(manifest: Manifest, i: int, uri: str, max_pixels: int | None) -> list[Finding]:
    from pixels_xr.pxm.sources import open_source

    where = f"sources[{i}] {uri}"
    out: list[Finding] = []

    def err(msg: str) -> None:
        out.append(Finding("error", where, msg))

    try:
        src = open_source(uri, manifest.info, max_pixels=max_pixels)  # GTiff / JP2OpenJPEG only
    except SourceError as e:
        return [Finding("error", where, e.message)]
    with src:
        ds = src.dataset
        try:
            src.probe()  # data, not just the header: a truncated file opens fine
        except SourceError as e:
            err(e.message)
            return out
        bands = list(src.bidx) + ([src.alpha_band] if src.alpha_band else [])
        bad = [b for b in bands if ds.dtypes[b - 1] != "uint8"]
        if bad:
            err(f"band(s) {bad} are {ds.dtypes[bad[0] - 1]}, not 8-bit (uint8)")
        if not src.georeferenced:
            err("not georeferenced (no geotransform or GCPs)")
        elif src.crs is None:
            err("has no CRS; give info.crs (EPSG:NNNN)")
        sized = MIN_SIZE <= ds.width <= MAX_SIZE and MIN_SIZE <= ds.height <= MAX_SIZE
        if not sized:
            err(f"size {ds.width}x{ds.height} px outside {MIN_SIZE}-{MAX_SIZE} px per side")
        if manifest.info.bidx and len(manifest.info.bidx) == 4:
            if ds.colorinterp[src.alpha_band - 1].name != "alpha":  # type: ignore[operator]
                out.append(Finding("warning", where, f"bidx band {src.alpha_band} is used as alpha but is"
                                   f" {ds.colorinterp[src.alpha_band - 1].name}"))  # type: ignore[operator]
        try:  # a whole-image read at <= 2048 px: only for sources of a sane size
            fringe = _fringe(src) if sized and src.mask_kind in ("ndv", "nodata") and not src.lossy else None
        except SourceError as e:
            err(e.message)
            return out
        if fringe is not None:
            err(f"the edge of the {list(src.ndv or ())} nodata area looks lossy: {fringe:.0%} of the pixels"
                f" bordering it are within +/-{_FRINGE_TOL} of the ndv (compression artefacts), so an ndv/nodata"
                " mask is not deterministic (use an alpha band or internal mask made before lossy compression)")
        if src.lossy and src.mask_kind in ("ndv", "nodata"):
            src_of = "info.ndv" if src.mask_kind == "ndv" else "nodata metadata"
            err(f"lossy compression ({src.compression}) with a mask from {src_of} {list(src.ndv or ())}: lossy"
                " edges are not a deterministic nodata mask (use an alpha band, an internal mask or lossless"
                " compression)")
        elif src.lossy and src.mask_kind == "alpha":
            err(f"lossy compression ({src.compression}) also compresses the alpha band: not a deterministic"
                " mask (use an internal mask or lossless compression)")
        elif src.mask_kind == "none":
            out.append(Finding("warning", where, "no alpha, mask or nodata: every pixel is treated as valid"))
    return out


def check_sources(manifest: Manifest, *, max_pixels: int | None = None) -> list[Finding]:
    """Open every source (S3 via GDAL, credentials from the environment) and check it can be rendered.

    Checks: opens with the GTiff or JP2OpenJPEG driver (nothing else, e.g. no VRT under a .tif name); declares
    at most ``max_pixels`` pixels (default ``sources.MAX_PIXELS``); its data reads (the last block of every
    band, mask and overview level: catches truncated files); uint8; >= 3 bands (or those in bidx);
    georeferenced (CRS from the file or info.crs); 200-31000 px per side; a deterministic nodata mask
    (lossy compression with an ndv/nodata mask, or with a lossy alpha band, is an error). Returns the
    findings (empty when all pass).
    """
    from pixels_xr.pxm.sources import MAX_PIXELS

    limit = MAX_PIXELS if max_pixels is None else max_pixels
    findings: list[Finding] = []
    for i, uri in enumerate(manifest.sources):
        findings.extend(_check_one(manifest, i, uri, limit))
    return findings
