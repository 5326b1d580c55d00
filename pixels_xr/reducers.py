"""Numba kernels that reduce a time-ordered (t, band, y, x) stack to one slice, using a clear-sky mask.

Pure array code: numpy arrays in, numpy arrays out; no xarray, no I/O. ``compose.py`` wraps these with
``xr.apply_ufunc``.

Conventions shared by every kernel
----------------------------------
- ``data``: (t, band, y, x), any integer or float dtype (uint16, int16, float32, ... ), any strides.
  The pick kernels read strided data in place (they gather one value per pixel and band);
  median/percentile copy a non-C-contiguous input once. Masks and scores are made C-contiguous.
- ``clear``: (t, y, x) bool; True = a clear *and* valid observation. Fold data nodata (fill, saturation,
  ...) into ``clear`` before calling: the pick kernels trust it.
- ``nodata``: scalar (cast to ``data.dtype``) written where a pixel has no clear observation; use NaN for
  float data.
- ``clear_count``: (y, x) uint16, the number of clear observations of each pixel (``clear.sum(0)``).
- ``index``: (y, x) int16, the *original* t index of the observation a pixel came from, -1 where none.
  Hence ``t <= 32767``.

The public functions validate and normalise their arguments in Python, then call ``_*_kernel`` njit
functions (``parallel=True``, ``prange`` over rows or tiles, ``cache=True``; the thread count is passed in
because calling ``numba.get_num_threads()`` inside a kernel defeats the on-disk cache). Kernels never
allocate per pixel: the pick kernels need no scratch at all (quality_mosaic one score row per chunk),
the median/percentile kernels one (t, tile) buffer per parallel chunk.

How they are fast
-----------------
- Pick kernels (latest / by order / quality): one vectorisable pass over the mask row by row gives the
  index and the count together (the count needs every t anyway, so a per-pixel early exit would save no
  mask reads), then exactly one gather per band reads only the chosen value: the data cube is touched
  only where the answer lives.
- Median / percentiles: per tile of pixels (one row, up to a few hundred x) the t values of one band are
  copied into a (t, tile) buffer with non-clear values replaced by the dtype's maximum (+inf for floats),
  then sorted *across pixels at once* by a Batcher odd-even merge sorting network: every comparator is a
  branch-free min/max over a contiguous row of the tile, which the compiler turns into SIMD. The
  sentinels sort to the end, so the first ``n`` sorted entries of a pixel are exactly its ``n`` clear
  values. Order statistics then come from the sorted column in float64, with numpy's formulas.
"""

from __future__ import annotations

import functools
import os

import numba
import numpy as np
from numba import njit, prange

__all__ = [
    "S2_SCL_RANK",
    "clear_median",
    "clear_percentile",
    "first_valid_by_order",
    "latest_valid",
    "quality_mosaic",
    "s2_quality_score",
]

MAX_T = 32767  # index is int16

# Sentinel-2 L2A SCL classes, best first (used by ``s2_quality_score``):
#   4 vegetation, 5 not vegetated, 6 water, 11 snow/ice  -- clear surface observations
#   2 dark area / topographic shadow, 7 unclassified       -- probably surface, less reliable
#   10 thin cirrus, 8 cloud medium probability             -- surface partly visible
#   3 cloud shadow, 9 cloud high probability               -- surface hidden or dark
#   1 saturated / defective, 0 no data                     -- no usable measurement
# Any other value (e.g. 12..255 in a uint8 band) ranks after 0.
S2_SCL_ORDER = (4, 5, 6, 11, 2, 7, 10, 8, 3, 9, 1, 0)
S2_SCL_RANK = np.full(256, len(S2_SCL_ORDER), dtype=np.int64)
for _rank, _cls in enumerate(S2_SCL_ORDER):
    S2_SCL_RANK[_cls] = _rank
del _rank, _cls


# ---------------------------------------------------------------------------------------------------
# argument checks (plain Python, run once per call)


def _kernel_threads() -> int:
    """Threads the kernels of this call may use: numba's, capped by ``OMP_NUM_THREADS`` when that is set.

    A dask worker process gets ``OMP_NUM_THREADS=1`` from its nanny (``distributed.nanny.pre-spawn-environ``)
    because its task threads already use its cores; a kernel taking every core in each of them would
    oversubscribe the machine (two one-thread workers on two cores ran four kernel threads). The cap is set
    for the calling thread only (numba's thread count is per thread).
    """
    n = numba.get_num_threads()
    cap = os.environ.get("OMP_NUM_THREADS", "")
    if cap.isdigit() and 0 < int(cap) < n:
        n = int(cap)
        numba.set_num_threads(n)
    return n


def _check_stack(data: np.ndarray, clear: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(data)
    clear = np.asarray(clear)
    if data.ndim != 4:
        raise ValueError(f"data must be (t, band, y, x), got shape {data.shape}")
    if data.dtype.kind not in "uif":
        raise TypeError(f"data must be an integer or float array, got {data.dtype}")
    t, _, y, x = data.shape
    if clear.shape != (t, y, x):
        raise ValueError(f"clear must be (t, y, x) = {(t, y, x)}, got {clear.shape}")
    if t > MAX_T:
        raise ValueError(f"at most {MAX_T} observations (index is int16), got {t}")
    if clear.dtype != np.bool_:
        clear = clear.astype(np.bool_)
    # The mask is read in full by every kernel; a strided mask (say t innermost) is read ~20x slower
    # than a copy costs (1 byte per observation), so make it C-contiguous. Read it as bytes: numba
    # vectorises uint8 loads better than bool ones.
    return data, np.ascontiguousarray(clear).view(np.uint8)


def _nodata_value(data: np.ndarray, nodata) -> np.ndarray:
    """``nodata`` as a 0-d array of data's dtype; refuses values the dtype cannot hold."""
    value = np.asarray(nodata)
    if value.ndim != 0:
        raise ValueError(f"nodata must be a scalar, got shape {value.shape}")
    if data.dtype.kind in "ui":
        if not np.isfinite(value) or value != np.round(value):
            raise ValueError(f"nodata {nodata!r} is not an integer, data is {data.dtype}")
        info = np.iinfo(data.dtype)
        if not info.min <= int(value) <= info.max:
            raise ValueError(f"nodata {nodata!r} does not fit {data.dtype}")
    return value.astype(data.dtype)


def _high_sentinel(dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "f":
        return np.array(np.inf, dtype=dtype)
    return np.array(np.iinfo(dtype).max, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# pick kernels: latest, by order, best score


@njit(parallel=True, cache=True)
def _pick_last_kernel(data, clear, seq, nodata, out, index, count):
    """For each pixel the clear observation met *last* while walking ``seq`` (t indices)."""
    nt = seq.shape[0]
    nb = data.shape[1]
    ny = data.shape[2]
    nx = data.shape[3]
    for y in prange(ny):
        idx = index[y]
        cnt = count[y]
        for x in range(nx):
            idx[x] = -1
            cnt[x] = 0
        for k in range(nt):
            t = seq[k]
            c = clear[t, y]
            tt = np.int16(t)
            for x in range(nx):
                ok = c[x] != 0
                idx[x] = tt if ok else idx[x]
                cnt[x] += np.uint16(ok)
        for b in range(nb):
            o = out[b, y]
            for x in range(nx):
                i = idx[x]
                if i >= 0:
                    o[x] = data[i, b, y, x]
                else:
                    o[x] = nodata


@njit(parallel=True, cache=True)
def _pick_best_kernel(data, clear, score, nodata, nthreads, out, index, count):
    """For each pixel the clear observation with the highest score; ties -> the newest (largest t)."""
    nt = data.shape[0]
    nb = data.shape[1]
    ny = data.shape[2]
    nx = data.shape[3]
    nchunks = min(ny, 4 * nthreads)
    for ch in prange(nchunks):
        best = np.empty(nx, dtype=np.float64)  # per-chunk scratch
        for y in range(ch * ny // nchunks, (ch + 1) * ny // nchunks):
            idx = index[y]
            cnt = count[y]
            for x in range(nx):
                idx[x] = -1
                cnt[x] = 0
                best[x] = -np.inf
            for t in range(nt):
                c = clear[t, y]
                s = score[t, y]
                tt = np.int16(t)
                for x in range(nx):
                    v = np.float64(s[x])
                    v = v if v == v else -np.inf  # NaN score ranks lowest, but still beats no observation
                    take = (c[x] != 0) & (v >= best[x])
                    best[x] = v if take else best[x]
                    idx[x] = tt if take else idx[x]
                    cnt[x] += np.uint16(c[x] != 0)
            for b in range(nb):
                o = out[b, y]
                for x in range(nx):
                    i = idx[x]
                    if i >= 0:
                        o[x] = data[i, b, y, x]
                    else:
                        o[x] = nodata


def _pick_outputs(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    _, nb, ny, nx = data.shape
    return (
        np.empty((nb, ny, nx), dtype=data.dtype),
        np.empty((ny, nx), dtype=np.int16),
        np.empty((ny, nx), dtype=np.uint16),
    )


def latest_valid(
    data: np.ndarray, clear: np.ndarray, nodata
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Newest clear observation per pixel.

    Parameters: ``data`` (t, band, y, x) any numeric dtype, time-ordered (oldest first); ``clear``
    (t, y, x) bool; ``nodata`` scalar of data's dtype (NaN for floats) for pixels never clear.

    Returns ``(out, index, clear_count)``: ``out`` (band, y, x) data's dtype, all bands from the
    observation with the highest t among the clear ones; ``index`` (y, x) int16 that t, -1 where none;
    ``clear_count`` (y, x) uint16.
    """
    data, clear = _check_stack(data, clear)
    nd = _nodata_value(data, nodata)
    out, index, count = _pick_outputs(data)
    seq = np.arange(data.shape[0], dtype=np.int64)
    _kernel_threads()
    _pick_last_kernel(data, clear, seq, nd[()], out, index, count)
    return out, index, count


def first_valid_by_order(
    data: np.ndarray, clear: np.ndarray, order: np.ndarray, nodata
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First clear observation per pixel when observations are tried in ``order``.

    ``order`` is an integer permutation of ``range(t)``, most preferred first (e.g. scenes sorted by
    cloud cover, least cloudy first). Other arguments and the returned ``(out, index, clear_count)`` are
    as in :func:`latest_valid`; ``index`` holds the original t index (not the position in ``order``).
    ``first_valid_by_order(d, c, np.arange(t)[::-1], nd)`` equals ``latest_valid(d, c, nd)``.
    """
    data, clear = _check_stack(data, clear)
    nd = _nodata_value(data, nodata)
    order = np.asarray(order)
    nt = data.shape[0]
    if order.ndim != 1 or order.dtype.kind not in "ui":
        raise ValueError(f"order must be a 1-d integer array, got {order.dtype} {order.shape}")
    if order.shape[0] != nt or not np.array_equal(np.sort(order), np.arange(nt)):
        raise ValueError(f"order must be a permutation of range({nt})")
    out, index, count = _pick_outputs(data)
    # Walk the order backwards: the last clear observation met is the most preferred one.
    seq = np.ascontiguousarray(order[::-1], dtype=np.int64)
    _kernel_threads()
    _pick_last_kernel(data, clear, seq, nd[()], out, index, count)
    return out, index, count


def quality_mosaic(
    data: np.ndarray, clear: np.ndarray, score: np.ndarray, nodata
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel, the clear observation with the highest ``score`` (all bands from it).

    ``score`` is (t, y, x) float (e.g. :func:`s2_quality_score`). Tie rule: among equal best scores the
    newest observation (largest t) wins. A NaN score ranks below every number (also below -inf, which
    ties with NaN), but a clear observation with a NaN score still beats having none. Other arguments
    and the returned ``(out, index, clear_count)`` are as in :func:`latest_valid`.
    """
    data, clear = _check_stack(data, clear)
    nd = _nodata_value(data, nodata)
    score = np.asarray(score)
    if score.shape != clear.shape:
        raise ValueError(f"score must be (t, y, x) = {clear.shape}, got {score.shape}")
    if score.dtype.kind != "f":
        score = score.astype(np.float32)
    score = np.ascontiguousarray(score)  # read in full, like the mask
    out, index, count = _pick_outputs(data)
    _pick_best_kernel(data, clear, score, nd[()], _kernel_threads(), out, index, count)
    return out, index, count


@njit(parallel=True, cache=True)
def _s2_score_kernel(scl, red, nir, rank, out):
    nt, ny, nx = scl.shape
    nr = rank.shape[0]
    for ty in prange(nt * ny):
        t = ty // ny
        y = ty % ny
        for x in range(nx):
            c = np.int64(scl[t, y, x])
            r = rank[c] if 0 <= c < nr else rank[nr - 1]
            a = np.float64(red[t, y, x])
            b = np.float64(nir[t, y, x])
            ndvi = (b - a) / (b + a) if b + a != 0 else 0.0
            if ndvi != ndvi:  # NaN inputs
                ndvi = -1.0
            ndvi = min(max(ndvi, -1.0), 1.0)
            out[t, y, x] = np.float32(ndvi - 10.0 * r)


def s2_quality_score(scl: np.ndarray, red: np.ndarray, nir: np.ndarray) -> np.ndarray:
    """Score for :func:`quality_mosaic` reproducing the original pixels FULL composite rule.

    ``scl``, ``red``, ``nir`` are (t, y, x) (any numeric dtypes; red/nir should be reflectance, or DN
    with the same offset removed). Returns float32 (t, y, x)::

        score = -10 * rank(scl) + clip(ndvi, -1, 1)

    so the SCL rank decides first and NDVI only breaks ties within a rank. Ranks, best first
    (``S2_SCL_ORDER``): 4 vegetation, 5 not vegetated, 6 water, 11 snow/ice, 2 dark area, 7 unclassified,
    10 thin cirrus, 8 cloud medium, 3 cloud shadow, 9 cloud high, 1 saturated, 0 nodata, then any other
    value. Rationale: clear surface classes first (their internal order does not matter much because
    NDVI separates them); then classes that are usually surface but less trustworthy; then cirrus and
    medium cloud, through which surface still shows; then shadow and opaque cloud; defective and missing
    data last. NDVI = (nir - red) / (nir + red) in float64; 0 when nir + red == 0, -1 when an input is
    NaN.
    """
    scl = np.asarray(scl)
    red = np.asarray(red)
    nir = np.asarray(nir)
    if scl.ndim != 3 or red.shape != scl.shape or nir.shape != scl.shape:
        raise ValueError(
            f"scl, red, nir must share one (t, y, x) shape, got {scl.shape}, {red.shape}, {nir.shape}"
        )
    if scl.dtype.kind == "f":
        scl = np.where(np.isfinite(scl), scl, -1).astype(np.int64)
    out = np.empty(scl.shape, dtype=np.float32)
    _kernel_threads()
    _s2_score_kernel(scl, red, nir, S2_SCL_RANK, out)
    return out


# ---------------------------------------------------------------------------------------------------
# median and percentiles: sorting network across a tile of pixels


@functools.lru_cache(maxsize=64)
def _sorting_network(n: int) -> np.ndarray:
    """Batcher odd-even merge sort comparators (i, j), i < j, for ``n`` inputs, as an (m, 2) int64 array.

    Built for the next power of two and pruned: a comparator touching a padding slot (index >= n,
    conceptually +inf) is a no-op because every comparator puts the minimum at the lower index.
    """
    pairs: list[tuple[int, int]] = []
    size = 1
    while size < n:
        size *= 2
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    net = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    net.setflags(write=False)
    return net


def _tile_width(nt: int, itemsize: int, nx: int) -> int:
    """Pixels per tile: keep the (t, tile) sort buffer within ~32 KiB (L1) while rows stay >= 64 wide."""
    w = max(64, (32 * 1024) // max(1, nt * itemsize)) // 64 * 64
    w = min(w, 1024, nx)
    return max(1, w)


@njit(cache=True)
def _fill_tile(data, clear, b, y, x0, w, hi, has_nd, nd, scale, offset, scaled, buf, nvalid):
    """Copy data[:, b, y, x0:x0+w] into buf[:, :w]; non-clear (or NaN / nodata) values become ``hi``.

    With ``scaled`` the values copied are ``float32(data) × scale[t] + offset[t]`` (float32 throughout:
    one rounding for the product, one for the sum, as numpy's float32 ufuncs) and ``nodata`` is not
    tested: converting here, tile by tile, spares the reduction a float32 copy of the whole block.

    nvalid[:w] receives the number of values kept per pixel. Written over 0-based 1-d slices, with the
    nodata test hoisted out of the loop: that form vectorises (6x faster than indexing with x0 + x).
    """
    nt = data.shape[0]
    cnt = nvalid[:w]
    for x in range(w):
        cnt[x] = 0
    for t in range(nt):
        d = data[t, b, y, x0:x0 + w]
        c = clear[t, y, x0:x0 + w]
        row = buf[t, :w]
        if scaled:
            sc = scale[t]
            of = offset[t]
            for x in range(w):
                v = np.float32(d[x]) * sc + of
                ok = (c[x] != 0) & (v == v)
                row[x] = v if ok else hi
                cnt[x] += np.uint16(ok)
        elif has_nd:
            for x in range(w):
                v = d[x]
                ok = (c[x] != 0) & (v == v) & (v != nd)
                row[x] = v if ok else hi
                cnt[x] += np.uint16(ok)
        else:
            for x in range(w):
                v = d[x]
                ok = (c[x] != 0) & (v == v)
                row[x] = v if ok else hi
                cnt[x] += np.uint16(ok)


@njit(cache=True)
def _sort_tile(buf, net, w):
    """Apply the comparator network to every column of buf[:, :w] (branch-free, SIMD over x)."""
    for k in range(net.shape[0]):
        ri = buf[net[k, 0]]
        rj = buf[net[k, 1]]
        for x in range(w):
            a = ri[x]
            c = rj[x]
            lo = a if a < c else c
            hi = c if a < c else a
            ri[x] = lo
            rj[x] = hi


@njit(cache=True)
def _count_tile(clear, y, x0, w, count):
    nt = clear.shape[0]
    cnt = count[y, x0:x0 + w]
    for x in range(w):
        cnt[x] = 0
    for t in range(nt):
        c = clear[t, y, x0:x0 + w]
        for x in range(w):
            cnt[x] += np.uint16(c[x] != 0)


@njit(cache=True)
def _median_of_sorted(buf, n, x):
    """np.median of the n smallest entries of sorted column x: middle value, or (a + b) / 2 in float64."""
    if n % 2 == 1:
        return np.float64(buf[n // 2, x])
    return (np.float64(buf[n // 2 - 1, x]) + np.float64(buf[n // 2, x])) / 2.0


@njit(cache=True)
def _quantile_of_sorted(buf, n, x, q):
    """np.quantile(method='linear') of the n smallest entries of sorted column x, term by term as numpy."""
    vi = (n - 1) * q
    if vi >= n - 1:
        lo = n - 1
        up = n - 1
        g = vi + 1.0  # numpy's gamma once it has moved both indexes to -1 (irrelevant: a == b)
    else:
        f = np.floor(vi)
        lo = np.int64(f)
        up = lo + 1
        g = vi - f
    a = np.float64(buf[lo, x])
    c = np.float64(buf[up, x])
    diff = c - a
    if g >= 0.5:
        return c - diff * (1.0 - g)
    return a + diff * g


@njit(parallel=True, cache=True)
def _order_stat_kernel(data, clear, bands, scale, offset, proto, net, hi, has_nd, nd, tile, nthreads, q,
                       median, out, count):
    """Median (``median=True``, into out[0]) or quantiles q (fractions, into out[iq]) of each band
    ``bands[k]`` of data, into out[:, k].

    ``proto``: an empty array of the sort buffer's dtype. With a ``scale`` of shape (t, len(bands))
    values are converted on the fly into a float32 buffer, ``float32(data) × scale[t, k] + offset[t, k]``
    (``_fill_tile``); with a (0, len(bands)) ``scale`` they are sorted as they are.

    Work is split in chunks of consecutive tiles (a tile = up to ``tile`` pixels of one row). Within a
    chunk the band loop is outermost, so the reads stream through t rows of one band plane at a time:
    t concurrent sequential streams, few enough for the hardware prefetcher to follow.
    """
    nt, _, ny, nx = data.shape
    nq = q.shape[0]
    ntx = (nx + tile - 1) // tile
    ntiles = ny * ntx
    nchunks = min(ntiles, 8 * nthreads)
    scaled = scale.shape[0] > 0
    for ch in prange(nchunks):
        buf = np.empty((max(nt, 1), tile), dtype=proto.dtype)  # per-chunk scratch
        nvalid = np.empty(tile, dtype=np.uint16)
        t0 = ch * ntiles // nchunks
        t1 = (ch + 1) * ntiles // nchunks
        for it in range(t0, t1):
            y = it // ntx
            x0 = (it % ntx) * tile
            _count_tile(clear, y, x0, min(tile, nx - x0), count)
        for k in range(bands.shape[0]):
            b = bands[k]
            for it in range(t0, t1):
                y = it // ntx
                x0 = (it % ntx) * tile
                w = min(tile, nx - x0)
                _fill_tile(data, clear, b, y, x0, w, hi, has_nd, nd, scale[:, k], offset[:, k], scaled, buf,
                           nvalid)
                _sort_tile(buf, net, w)
                if median:
                    o = out[0, k, y]
                    for x in range(w):
                        n = nvalid[x]
                        o[x0 + x] = np.float32(_median_of_sorted(buf, n, x)) if n > 0 else np.nan
                else:
                    for iq in range(nq):
                        o = out[iq, k, y]
                        qq = q[iq]
                        for x in range(w):
                            n = nvalid[x]
                            if n > 0:
                                o[x0 + x] = np.float32(_quantile_of_sorted(buf, n, x, qq))
                            else:
                                o[x0 + x] = np.nan


def _reduce_args(data, clear, nodata, bands=None, scale=None, offset=None):
    """Validated kernel arguments: data (C-contiguous), clear (uint8), the bands to reduce, per (t, band)
    scale and offset (float32; no rows when values are sorted as they are), the sort buffer's prototype,
    the comparator network, the sentinel, nodata and the tile width."""
    data, clear = _check_stack(data, clear)
    # The sort kernels vectorise only over C-contiguous input; on strided views they run ~6x slower,
    # while one contiguous copy costs about half of the kernel's own time. So copy such views once.
    data = np.ascontiguousarray(data)
    bands = np.arange(data.shape[1]) if bands is None else np.asarray(bands, dtype=np.int64)
    if bands.ndim != 1 or ((bands < 0) | (bands >= data.shape[1])).any():
        raise ValueError(f"bands must index the {data.shape[1]} bands of data, got {bands}")
    if scale is None:
        if offset is not None:
            raise ValueError("offset needs scale")
        proto = np.empty(0, data.dtype)
        scale = offset = np.empty((0, bands.shape[0]), np.float32)
    else:
        want = (data.shape[0], bands.shape[0])
        scale = np.ascontiguousarray(scale, dtype=np.float32)
        offset = np.zeros(want, np.float32) if offset is None else np.ascontiguousarray(offset, np.float32)
        if scale.shape != want or offset.shape != want:
            raise ValueError(f"scale and offset must be (t, len(bands)) = {want}, got {scale.shape}, "
                             f"{offset.shape}")
        proto = np.empty(0, np.float32)
    has_nd = nodata is not None and not (data.dtype.kind == "f" and np.isnan(nodata))
    nd = _nodata_value(data, nodata if has_nd else 0)
    hi = _high_sentinel(proto.dtype)
    net = _sorting_network(data.shape[0])
    tile = _tile_width(data.shape[0], proto.dtype.itemsize, data.shape[3])
    return data, clear, bands, scale, offset, proto, net, hi[()], has_nd, nd[()], tile


def clear_median(
    data: np.ndarray, clear: np.ndarray, nodata=None, *, bands=None, scale=None, offset=None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-band median over the clear observations of each pixel.

    ``data`` (t, band, y, x) any numeric dtype; ``clear`` (t, y, x) bool. Values are left out of a band's
    median when not clear, when NaN (float data), or when equal to ``nodata`` (optional; a second guard
    for fill values that the mask missed). Returns ``(out, clear_count)``: ``out`` (band, y, x) float32,
    NaN where no value is left; ``clear_count`` (y, x) uint16 counts ``clear`` only.

    ``bands`` (indexes into data's band axis) reduces only those, in that order. ``scale`` and
    ``offset`` (t, len(bands)): the median is of ``float32(data) × scale + offset`` computed in float32,
    the same numbers as converting the stack first (``nodata`` is then ignored: the mask rules).

    Same numbers as ``np.nanmedian`` on the values as float64 cast to float32: the middle value for odd
    counts, ``(a + b) / 2`` in float64 of the two middle values for even counts.
    """
    data, clear, bands, scale, offset, proto, net, hi, has_nd, nd, tile = \
        _reduce_args(data, clear, None if scale is not None else nodata, bands, scale, offset)
    _, _, ny, nx = data.shape
    out = np.empty((1, bands.shape[0], ny, nx), dtype=np.float32)
    count = np.empty((ny, nx), dtype=np.uint16)
    nthreads = _kernel_threads()
    q = np.zeros(0, dtype=np.float64)
    _order_stat_kernel(data, clear, bands, scale, offset, proto, net, hi, has_nd, nd, tile, nthreads, q,
                       True, out, count)
    return out[0], count


def clear_percentile(
    data: np.ndarray, clear: np.ndarray, q, nodata=None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-band percentiles over the clear observations of each pixel.

    ``q``: percentiles in [0, 100] (scalar or 1-d; taken as float64). Values are selected as in
    :func:`clear_median`. Returns ``(out, clear_count)``: ``out`` (len(q), band, y, x) float32, NaN where
    no value is left; ``clear_count`` (y, x) uint16. Same numbers as ``np.nanpercentile(...,
    method="linear")`` (numpy's default) on the values as float64 with ``q`` float64, cast to float32.
    """
    qa = np.atleast_1d(np.asarray(q, dtype=np.float64))
    if qa.ndim != 1:
        raise ValueError(f"q must be a scalar or 1-d, got shape {qa.shape}")
    if not np.all((qa >= 0) & (qa <= 100)):
        raise ValueError(f"percentiles must be within [0, 100], got {qa}")
    data, clear, bands, scale, offset, proto, net, hi, has_nd, nd, tile = _reduce_args(data, clear, nodata)
    _, nb, ny, nx = data.shape
    out = np.empty((qa.shape[0], nb, ny, nx), dtype=np.float32)
    count = np.empty((ny, nx), dtype=np.uint16)
    nthreads = _kernel_threads()
    _order_stat_kernel(data, clear, bands, scale, offset, proto, net, hi, has_nd, nd, tile, nthreads,
                       qa / 100, False, out, count)
    return out, count
