"""Clear-sky masks from a cube's mask band (SCL classes, QA_PIXEL bits, user values/bits) and its nodata.

A pixel is clear when every requested reflectance band holds data (not the cube's nodata) and the mask
rule calls it clear. The optional cleanup (``mask_cleanup``: opening then dilation of the *not-clear*
mask with disks of the given radii, like odc-stats) runs blockwise with ``map_overlap`` and an overlap
equal to the total radius, so chunk edges never show.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import xarray as xr
from numba import njit, prange

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
    reflectance, e.g. a class band alone) and clear under ``spec``.

    One task per cube block computes it in one pass over the block (``clear_block``), instead of a
    band-selection copy, a comparison per band and ``np.isin`` on the mask band, each a full pass.
    """
    import dask.array as da

    nodata = cube.attrs.get("nodata")
    is_refl = np.asarray(cube.reflectance.values, dtype=bool)
    valid = tuple(int(i) for i in np.flatnonzero(is_refl if is_refl.any() else np.ones_like(is_refl)))
    mask_band = -1 if spec is None else list(cube.band.values).index(spec.asset)
    data = cube.transpose("time", "band", "y", "x").data
    lazy = isinstance(data, da.Array)

    def part(valid_bands: tuple[int, ...], mask: int) -> xr.DataArray:
        kwargs = {"valid_bands": valid_bands, "mask_band": mask, "spec": spec, "nodata": nodata}
        # the band blocks as a list (concatenate=False): dask's own joining (map_blocks with drop_axis)
        # copied the whole cube block even when it is one block, as ``build_cube``'s are
        out = (da.blockwise(_clear_of_band_blocks, "tyx", data, "tbyx", concatenate=False, dtype=bool,
                            meta=np.empty((0, 0, 0), bool), **kwargs)
               if lazy else clear_block(np.asarray(data), **kwargs))
        return xr.DataArray(out, dims=("time", "y", "x"), coords={k: v for k, v in cube.coords.items()
                                                                   if "band" not in v.dims})

    if mask_band < 0 or not (opening or dilation):
        return part(valid, mask_band).rename("clear")
    clear = ~_cleanup(~part((), mask_band), opening, dilation)
    return (clear & part(valid, -1)).rename("clear")


def _clear_of_band_blocks(blocks: list[np.ndarray], **kwargs: Any) -> np.ndarray:
    return clear_block(blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1), **kwargs)


def clear_block(block: np.ndarray, *, valid_bands: tuple[int, ...], mask_band: int, spec: MaskSpec | None,
                nodata: float | None) -> np.ndarray:
    """Clear ``(t, y, x)`` of one ``(t, band, y, x)`` block: every ``valid_bands`` band holds data (not
    ``nodata``; not NaN when ``nodata`` is None or NaN) and, with ``mask_band`` ≥ 0, ``rule_clear`` of that
    band under ``spec`` and (integer nodata) that band is not ``nodata``. Pure numpy and numba."""
    nt, _, ny, nx = block.shape
    out = np.empty((nt, ny, nx), np.uint8)
    has_nd = nodata is not None and not np.isnan(nodata)
    if has_nd and block.dtype.kind in "ui":  # a nodata the dtype cannot hold equals no pixel
        info = np.iinfo(block.dtype)
        has_nd = float(nodata).is_integer() and info.min <= nodata <= info.max
    nd = block.dtype.type(nodata if has_nd else 0)
    if mask_band < 0:
        out[...] = 1
    else:
        table = _rule_table(spec, block.dtype)
        if table is None:  # a dtype without a table: the rule in numpy
            out[...] = rule_clear(block[:, mask_band], spec)
        else:
            _lookup_kernel(block, mask_band, table, out)
    _valid_kernel(block, np.asarray(valid_bands, np.int64), mask_band, has_nd and mask_band >= 0, has_nd, nd, out)
    return out.view(bool)


@functools.lru_cache(maxsize=32)
def _rule_table(spec: MaskSpec, dtype: np.dtype) -> np.ndarray | None:
    """``rule_clear`` of every value of an 8- or 16-bit unsigned dtype (uint8 0/1 by value), else None."""
    if dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        return None
    table = rule_clear(np.arange(np.iinfo(dtype).max + 1, dtype=dtype), spec).astype(np.uint8)
    table.setflags(write=False)
    return table


@njit(parallel=True, cache=True)
def _lookup_kernel(block, mask_band, table, out):
    """out[t, y, x] = table[block[t, mask_band, y, x]] (unsigned integer blocks), rows in parallel."""
    nt, _, ny, nx = block.shape
    for r in prange(nt * ny):
        m = block[r // ny, mask_band, r % ny]
        o = out[r // ny, r % ny]
        for x in range(nx):
            o[x] = table[m[x]]


@njit(parallel=True, cache=True)
def _valid_kernel(block, valid_bands, mask_band, mask_nodata, has_nd, nd, out):
    """out[t, y] &= every valid_bands band holds data there (!= nd with ``has_nd``, else not NaN); with
    ``mask_nodata`` the mask band equal to nd is not clear either. Rows in parallel."""
    nt, _, ny, nx = block.shape
    for r in prange(nt * ny):
        t = r // ny
        y = r % ny
        o = out[t, y]
        if mask_nodata:
            m = block[t, mask_band, y]
            for x in range(nx):
                o[x] &= np.uint8(m[x] != nd)
        for k in range(valid_bands.shape[0]):
            v = block[t, valid_bands[k], y]
            if has_nd:
                for x in range(nx):
                    o[x] &= np.uint8(v[x] != nd)
            else:
                for x in range(nx):
                    o[x] &= np.uint8(v[x] == v[x])


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
