"""Clear-sky masks from a cube's mask band (SCL classes, QA_PIXEL bits, user values/bits) and its nodata.

A pixel is clear when every requested reflectance band holds data (not the cube's nodata) and the mask
rule calls it clear. The optional cleanup (``mask_cleanup``: opening then dilation of the *not-clear*
mask with disks of the given radii, like odc-stats) runs blockwise with ``map_overlap`` and an overlap
equal to the total radius, so chunk edges never show.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from pixels_xr.cube import reflectance_bands
from pixels_xr.platforms import MaskSpec


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius


def rule_clear(values: np.ndarray, spec: MaskSpec) -> np.ndarray:
    """Clear (True) per value of a mask band under ``spec`` (pure numpy; nodata is never clear)."""
    values = np.asarray(values)
    if spec.clear_values is not None:
        clear = np.isin(values, np.asarray(spec.clear_values))
    else:
        clear = ~np.isin(values, np.asarray(spec.not_clear_values, dtype=values.dtype)) \
            if spec.not_clear_values else np.ones(values.shape, bool)
        if spec.not_clear_bits:
            bits = np.uint64(sum(1 << b for b in spec.not_clear_bits))
            clear &= (values.astype(np.int64).astype(np.uint64) & bits) == 0
    if spec.nodata is not None:
        clear &= values != spec.nodata
    return clear


def cleanup_not_clear(not_clear: np.ndarray, opening: int, dilation: int) -> np.ndarray:
    """Opening then dilation of a (..., y, x) not-clear mask with disks (radii in pixels), per 2-D slice."""
    from scipy import ndimage

    out = np.asarray(not_clear, dtype=bool)
    if out.size == 0:
        return out
    lead = out.shape[:-2]
    flat = out.reshape((-1,) + out.shape[-2:])
    result = np.empty_like(flat)
    for k in range(flat.shape[0]):
        m = flat[k]
        if opening:
            m = ndimage.binary_opening(m, structure=_disk(opening))
        if dilation:
            m = ndimage.binary_dilation(m, structure=_disk(dilation))
        result[k] = m
    return result.reshape(lead + out.shape[-2:])


def clear_mask(cube: xr.DataArray, spec: MaskSpec | None, opening: int = 0, dilation: int = 0) -> xr.DataArray:
    """Lazy ``(time, y, x)`` bool: data present in all reflectance bands (in every band when none is
    reflectance, e.g. a class band alone) and clear under ``spec``."""
    nodata = cube.attrs.get("nodata")
    refl = reflectance_bands(cube) if np.asarray(cube.reflectance.values, dtype=bool).any() else cube
    if nodata is None or (isinstance(nodata, float) and np.isnan(nodata)):
        valid = refl.notnull().all("band")
    else:
        valid = (refl != nodata).all("band")
    if spec is None:
        return valid.rename("clear")
    band = cube.sel(band=spec.asset)
    clear = xr.apply_ufunc(rule_clear, band, kwargs={"spec": spec}, dask="parallelized", output_dtypes=[bool])
    if nodata is not None and not (isinstance(nodata, float) and np.isnan(nodata)):
        clear = clear & (band != nodata)
    if opening or dilation:
        clear = ~_cleanup(~clear, opening, dilation)
    return (clear & valid).rename("clear")


def _cleanup(not_clear: xr.DataArray, opening: int, dilation: int) -> xr.DataArray:
    import dask.array as da

    data = not_clear.data
    # An opening of radius r looks 2r away; a dilation of radius d looks d away.
    depth = 2 * opening + dilation
    if isinstance(data, da.Array):
        axes = {not_clear.get_axis_num("y"): depth, not_clear.get_axis_num("x"): depth}
        result = data.map_overlap(cleanup_not_clear, depth=axes, boundary="none", opening=opening,
                                  dilation=dilation, dtype=bool)
    else:
        result = cleanup_not_clear(data, opening, dilation)
    return not_clear.copy(data=result)
