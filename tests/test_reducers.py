"""Tests for pixels_xr.reducers: every kernel against a plain numpy reference, on random and real data."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixels_xr import reducers as R

DTYPES = [np.uint16, np.int16, np.float32, np.uint8, np.int32, np.float64]
QS = np.array([0.0, 1.0, 10.0, 25.0, 33.3, 50.0, 66.7, 75.0, 90.0, 99.0, 100.0])


# ---------------------------------------------------------------------------------------------------
# numpy references (deliberately naive)


def ref_pick_by_order(data, clear, order, nodata):
    t = data.shape[0]
    pref = np.empty(t, dtype=np.int64)
    pref[np.asarray(order)] = np.arange(t)  # position of each t in the preference order
    key = np.where(clear, pref[:, None, None], t)
    idx = np.argmin(key, axis=0) if t else np.zeros(clear.shape[1:], dtype=np.int64)
    has = clear.any(axis=0)
    if t:
        out = np.take_along_axis(data, idx[None, None], axis=0)[0]
    else:
        out = np.zeros(data.shape[1:], dtype=data.dtype)
    out = np.where(has[None], out, np.asarray(nodata).astype(data.dtype))
    return out, np.where(has, idx, -1).astype(np.int16), clear.sum(axis=0).astype(np.uint16)


def ref_latest(data, clear, nodata):
    return ref_pick_by_order(data, clear, np.arange(data.shape[0])[::-1], nodata)


def ref_quality(data, clear, score, nodata):
    t = data.shape[0]
    s = np.where(np.isnan(score), -np.inf, score.astype(np.float64))
    best = np.max(np.where(clear, s, -np.inf), axis=0)
    cand = clear & (s == best[None])
    idx = t - 1 - np.argmax(cand[::-1], axis=0)  # last (newest) of the best
    has = clear.any(axis=0)
    out = np.take_along_axis(data, idx[None, None], axis=0)[0]
    out = np.where(has[None], out, np.asarray(nodata).astype(data.dtype))
    return out, np.where(has, idx, -1).astype(np.int16), clear.sum(axis=0).astype(np.uint16)


def _valid_f64(data, clear, nodata):
    valid = np.broadcast_to(clear[:, None], data.shape)
    if nodata is not None and not (isinstance(nodata, float) and np.isnan(nodata)):
        valid = valid & (data != np.asarray(nodata).astype(data.dtype))
    return np.where(valid, data.astype(np.float64), np.nan)


def ref_median(data, clear, nodata=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if data.shape[0] == 0:
            return np.full(data.shape[1:], np.nan, np.float32)
        return np.nanmedian(_valid_f64(data, clear, nodata), axis=0).astype(np.float32)


def ref_percentile(data, clear, q, nodata=None):
    q = np.atleast_1d(np.asarray(q, dtype=np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if data.shape[0] == 0:
            return np.full((q.size,) + data.shape[1:], np.nan, np.float32)
        return np.nanpercentile(_valid_f64(data, clear, nodata), q, axis=0).astype(np.float32)


def ref_s2_score(scl, red, nir):
    rank = np.full(scl.shape, 12, dtype=np.int64)
    for r, cls in enumerate([4, 5, 6, 11, 2, 7, 10, 8, 3, 9, 1, 0]):
        rank[scl == cls] = r
    a = red.astype(np.float64)
    b = nir.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ndvi = np.where(a + b != 0, (b - a) / (a + b), 0.0)
    ndvi = np.clip(np.where(np.isnan(ndvi), -1.0, ndvi), -1, 1)
    return (ndvi - 10.0 * rank).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# helpers


def make_stack(rng, shape, dtype, cloud=0.5, levels=6):
    """Random stack with many ties (few levels), all-cloudy pixels and one all-clear pixel."""
    t, b, y, x = shape
    data = rng.integers(0, levels, size=shape).astype(dtype)
    clear = rng.random((t, y, x)) >= cloud
    if y * x >= 3:
        clear[:, 0, 0] = False  # never clear
        clear[:, -1, -1] = True  # always clear
    return data, clear


def check_all(data, clear, nodata=0, q=QS, order=None, score=None, med_nodata=None):
    """Run every kernel against its reference; exact equality (NaN == NaN)."""
    t = data.shape[0]
    eq = np.testing.assert_array_equal
    for got, want in zip(R.latest_valid(data, clear, nodata), ref_latest(data, clear, nodata)):
        eq(got, want)
        assert got.dtype == want.dtype
    if order is None:
        order = np.random.default_rng(t).permutation(t)
    for got, want in zip(
        R.first_valid_by_order(data, clear, order, nodata), ref_pick_by_order(data, clear, order, nodata)
    ):
        eq(got, want)
        assert got.dtype == want.dtype
    med, cnt = R.clear_median(data, clear, med_nodata)
    assert med.dtype == np.float32 and cnt.dtype == np.uint16
    eq(med, ref_median(data, clear, med_nodata))
    eq(cnt, clear.sum(0))
    pct, cnt = R.clear_percentile(data, clear, q, med_nodata)
    assert pct.dtype == np.float32 and pct.shape == (np.size(q),) + data.shape[1:]
    eq(pct, ref_percentile(data, clear, q, med_nodata))
    eq(cnt, clear.sum(0))
    if t:
        if score is None:
            score = np.random.default_rng(t + 1).integers(0, 3, clear.shape).astype(np.float32)
        for got, want in zip(
            R.quality_mosaic(data, clear, score, nodata), ref_quality(data, clear, score, nodata)
        ):
            eq(got, want)


# ---------------------------------------------------------------------------------------------------
# random data


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_with_ties_all_dtypes(dtype):
    rng = np.random.default_rng(42)
    data, clear = make_stack(rng, (13, 3, 9, 37), dtype)
    nodata = np.nan if np.dtype(dtype).kind == "f" else 0
    check_all(data, clear, nodata=nodata)


@pytest.mark.parametrize("t", [0, 1, 2, 3, 24, 70])
def test_time_lengths(t):
    rng = np.random.default_rng(t)
    data, clear = make_stack(rng, (t, 2, 5, 11), np.uint16, levels=1000)
    check_all(data, clear, nodata=65535)


def test_all_cloudy_everywhere():
    data = np.arange(5 * 2 * 3 * 4, dtype=np.int16).reshape(5, 2, 3, 4)
    clear = np.zeros((5, 3, 4), bool)
    out, idx, cnt = R.latest_valid(data, clear, -9999)
    assert (out == -9999).all() and (idx == -1).all() and (cnt == 0).all()
    med, cnt = R.clear_median(data, clear)
    assert np.isnan(med).all() and (cnt == 0).all()
    check_all(data, clear, nodata=-9999)


def test_single_observation_is_returned_verbatim():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(1, 3, 4, 5)).astype(np.float32)
    clear = rng.random((1, 4, 5)) > 0.3
    out, idx, cnt = R.latest_valid(data, clear, np.nan)
    np.testing.assert_array_equal(out, np.where(clear, data[0], np.nan))
    med, _ = R.clear_median(data, clear)
    np.testing.assert_array_equal(med, np.where(clear, data[0], np.nan))
    check_all(data, clear, nodata=np.nan)


def test_int16_nodata_values_excluded_from_median():
    rng = np.random.default_rng(7)
    data, clear = make_stack(rng, (20, 3, 8, 16), np.int16, levels=50)
    data[rng.random(data.shape) < 0.2] = -9999
    check_all(data, clear, nodata=-9999, med_nodata=-9999)
    # without the nodata guard, -9999 takes part (as the reference says)
    check_all(data, clear, nodata=-9999, med_nodata=None)


def test_float_nan_values_skipped_by_median_kept_by_picks():
    rng = np.random.default_rng(8)
    data, clear = make_stack(rng, (9, 2, 6, 10), np.float32, levels=5)
    data[rng.random(data.shape) < 0.2] = np.nan
    data[rng.random(data.shape) < 0.05] = np.inf
    data[rng.random(data.shape) < 0.05] = -np.inf
    check_all(data, clear, nodata=np.nan)


def test_extreme_values_equal_to_sentinel():
    # the dtype maximum is the sort sentinel: real values equal to it must still count
    info = np.iinfo(np.uint16)
    rng = np.random.default_rng(9)
    data = rng.choice(np.array([0, 1, info.max - 1, info.max], np.uint16), size=(11, 2, 5, 9))
    clear = rng.random((11, 5, 9)) > 0.4
    check_all(data, clear, nodata=0)
    data32 = rng.choice(np.array([np.iinfo(np.int32).min, -1, 0, np.iinfo(np.int32).max]), (11, 2, 5, 9))
    check_all(data32.astype(np.int32), clear, nodata=0)


def test_non_contiguous_inputs():
    rng = np.random.default_rng(3)
    big, bigclear = make_stack(rng, (10, 4, 20, 30), np.uint16, levels=7)
    data = big[:, 1:4:2, ::2, 1::3]  # strided in every axis
    clear = bigclear[:, ::2, 1::3]
    assert not data.flags.c_contiguous and not clear.flags.c_contiguous
    check_all(data, clear, nodata=0)
    # a transposed memory layout (x, y, band, t) viewed as (t, band, y, x)
    f = np.ascontiguousarray(big.transpose(3, 2, 1, 0)).transpose(3, 2, 1, 0)
    fc = np.asfortranarray(bigclear)
    check_all(f, fc, nodata=0)
    # reversed time (negative stride)
    check_all(big[::-1], bigclear[::-1], nodata=0)


def test_clear_given_as_integers():
    rng = np.random.default_rng(4)
    data, clear = make_stack(rng, (6, 2, 4, 5), np.uint16)
    out = R.latest_valid(data, clear.astype(np.uint8) * 3, 0)
    for got, want in zip(out, ref_latest(data, clear, 0)):
        np.testing.assert_array_equal(got, want)


def test_order_reversed_equals_latest():
    rng = np.random.default_rng(5)
    data, clear = make_stack(rng, (12, 3, 7, 9), np.int16)
    a = R.latest_valid(data, clear, -1)
    b = R.first_valid_by_order(data, clear, np.arange(12)[::-1], -1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_quality_ties_go_to_newest_and_nan_scores_rank_last():
    data = np.arange(4, dtype=np.uint16).reshape(4, 1, 1, 1)
    clear = np.ones((4, 1, 1), bool)
    score = np.array([1.0, 5.0, 5.0, 2.0], np.float32).reshape(4, 1, 1)
    out, idx, cnt = R.quality_mosaic(data, clear, score, 0)
    assert idx[0, 0] == 2 and out[0, 0, 0] == 2 and cnt[0, 0] == 4
    score = np.array([np.nan, np.nan, -np.inf, np.nan], np.float32).reshape(4, 1, 1)
    assert R.quality_mosaic(data, clear, score, 0)[1][0, 0] == 3  # NaN ties with -inf: newest wins
    clear[3] = False
    score[1] = -1e30
    assert R.quality_mosaic(data, clear, score, 0)[1][0, 0] == 1  # any number beats NaN
    clear[:] = False
    assert R.quality_mosaic(data, clear, score, 7)[0][0, 0, 0] == 7


def test_median_even_count_is_mean_of_middles_in_float64():
    # 16777217 is not a float32: (16777216 + 16777218) / 2 in float64 then cast, as numpy does
    data = np.array([16777216, 16777218, 3, 2**31 - 1], np.int32).reshape(4, 1, 1, 1)
    clear = np.array([True, True, False, False]).reshape(4, 1, 1)
    med, _ = R.clear_median(data, clear)
    assert med[0, 0, 0] == np.float32(np.float64(16777217))
    np.testing.assert_array_equal(med, ref_median(data, clear))


def test_scalar_percentile_and_bounds():
    rng = np.random.default_rng(6)
    data, clear = make_stack(rng, (8, 2, 3, 4), np.uint16, levels=100)
    p, _ = R.clear_percentile(data, clear, 50)
    m, _ = R.clear_median(data, clear)
    assert p.shape == (1, 2, 3, 4)
    np.testing.assert_array_equal(p[0], m)
    ends, _ = R.clear_percentile(data, clear, [0, 100])
    np.testing.assert_array_equal(ends, ref_percentile(data, clear, [0, 100]))


@pytest.mark.parametrize(
    "call",
    [
        lambda d, c: R.latest_valid(d[0], c, 0),  # 3-d data
        lambda d, c: R.latest_valid(d, c[:, :1], 0),  # mask shape
        lambda d, c: R.latest_valid(d, c, 70000),  # nodata does not fit uint16
        lambda d, c: R.latest_valid(d, c, 0.5),  # nodata not an integer
        lambda d, c: R.first_valid_by_order(d, c, np.array([0, 0, 1]), 0),  # not a permutation
        lambda d, c: R.first_valid_by_order(d, c, np.array([0, 1]), 0),  # wrong length
        lambda d, c: R.first_valid_by_order(d, c, np.array([0.0, 1.0, 2.0]), 0),  # not integers
        lambda d, c: R.clear_percentile(d, c, [50, 101]),
        lambda d, c: R.clear_percentile(d, c, [np.nan]),
        lambda d, c: R.quality_mosaic(d, c, np.zeros((3, 2)), 0),
        lambda d, c: R.latest_valid(d.astype(bool), c, 0),
    ],
)
def test_bad_arguments_raise(call):
    d = np.zeros((3, 2, 4, 5), np.uint16)
    c = np.ones((3, 4, 5), bool)
    with pytest.raises((ValueError, TypeError)):
        call(d, c)


def test_sorting_network_sorts_every_0_1_input():
    # 0-1 principle: a comparator network sorts everything iff it sorts all 0/1 sequences
    for n in range(0, 13):
        net = R._sorting_network(n)
        assert (net[:, 0] < net[:, 1]).all() and (net < max(n, 1)).all()
        bits = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1
        a = bits.copy()
        for i, j in net:
            lo = np.minimum(a[:, i], a[:, j])
            a[:, j] = np.maximum(a[:, i], a[:, j])
            a[:, i] = lo
        np.testing.assert_array_equal(a, np.sort(bits, axis=1))


def test_sorting_network_random_long():
    rng = np.random.default_rng(0)
    for n in (17, 24, 33, 105, 129):
        net = R._sorting_network(n)
        a = rng.integers(0, 5, size=(200, n))
        want = np.sort(a, axis=1)
        for i, j in net:
            lo = np.minimum(a[:, i], a[:, j])
            a[:, j] = np.maximum(a[:, i], a[:, j])
            a[:, i] = lo
        np.testing.assert_array_equal(a, want)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    t=st.integers(0, 12),
    b=st.integers(1, 3),
    y=st.integers(1, 4),
    x=st.integers(1, 9),
    dtype=st.sampled_from([np.uint16, np.int16, np.float32]),
    cloud=st.floats(0.0, 1.0),
    levels=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_hypothesis_against_numpy(t, b, y, x, dtype, cloud, levels, seed):
    rng = np.random.default_rng(seed)
    data, clear = make_stack(rng, (t, b, y, x), dtype, cloud=cloud, levels=levels)
    q = rng.uniform(0, 100, size=3)
    nodata = np.nan if np.dtype(dtype).kind == "f" else 0
    check_all(data, clear, nodata=nodata, q=q, med_nodata=None if dtype == np.float32 else 1)


# ---------------------------------------------------------------------------------------------------
# s2_quality_score


def test_s2_quality_score_matches_reference_and_rank_dominates():
    rng = np.random.default_rng(11)
    shape = (6, 7, 8)
    scl = rng.integers(0, 14, size=shape).astype(np.uint8)
    red = rng.integers(0, 4000, size=shape).astype(np.uint16)
    nir = rng.integers(0, 4000, size=shape).astype(np.uint16)
    red[0, 0, :3] = 0
    nir[0, 0, :2] = 0  # 0/0 and 0/x
    got = R.s2_quality_score(scl, red, nir)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref_s2_score(scl, red, nir))
    # any pixel of a better class outranks any pixel of a worse class, whatever the NDVI
    order = [4, 5, 6, 11, 2, 7, 10, 8, 3, 9, 1, 0, 12]
    lo = {c: got[scl == c].min() for c in order if (scl == c).any()}
    hi = {c: got[scl == c].max() for c in order if (scl == c).any()}
    present = [c for c in order if c in lo]
    for better, worse in zip(present, present[1:]):
        assert lo[better] > hi[worse]
    # float reflectance with NaN
    redf = rng.random(shape).astype(np.float32)
    nirf = rng.random(shape).astype(np.float32)
    redf[1, 1, 1] = np.nan
    np.testing.assert_array_equal(R.s2_quality_score(scl, redf, nirf), ref_s2_score(scl, redf, nirf))


def test_quality_mosaic_with_s2_score_picks_best_class_then_ndvi():
    # pixel 0: cloud (9) with high NDVI vs vegetation (4) with lower NDVI -> vegetation
    # pixel 1: two vegetation observations -> the higher NDVI
    scl = np.array([[[9, 4]], [[4, 4]], [[3, 4]]], np.uint8)  # (t=3, y=1, x=2)
    red = np.array([[[100, 500]], [[400, 100]], [[10, 300]]], np.uint16)
    nir = np.array([[[900, 600]], [[600, 900]], [[900, 600]]], np.uint16)
    data = np.stack([red, nir], axis=1)  # (t, band, y, x)
    clear = np.ones(scl.shape, bool)
    score = R.s2_quality_score(scl, red, nir)
    out, idx, cnt = R.quality_mosaic(data, clear, score, 0)
    np.testing.assert_array_equal(idx, [[1, 1]])
    np.testing.assert_array_equal(out[:, 0, :], [[400, 100], [600, 900]])


# ---------------------------------------------------------------------------------------------------
# real data: 105 Landsat 5/7 dates with Fmask


def _load_landsat(root: Path):
    rasterio = pytest.importorskip("rasterio")
    folder = root / "landsat-sr-fmask-105dates"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    scenes = sorted((p.name for p in folder.iterdir() if p.is_dir()), key=lambda s: (s[9:16], s))
    assert len(scenes) == 105
    bands, fmask = [], []
    for s in scenes:
        stack = []
        for b in ("b3", "b4", "b5"):
            with rasterio.open(folder / s / f"{s}_{b}.tif") as src:
                stack.append(src.read(1))
        bands.append(stack)
        with rasterio.open(folder / s / f"{s}_fmask.tif") as src:
            fmask.append(src.read(1))
    data = np.asarray(bands)  # (105, 3, y, x)
    fmask = np.asarray(fmask)
    assert data.dtype == np.int16
    return scenes, data, fmask


@pytest.fixture(scope="module")
def landsat(shared_data):
    return _load_landsat(shared_data)


def test_real_landsat_series(landsat):
    scenes, data, fmask = landsat
    nodata = -9999
    fmask_clear = (fmask == 0) | (fmask == 1)
    # the mask masks.py would build: Fmask clear/water and a real value in every band
    clear = fmask_clear & (data != nodata).all(axis=1)
    assert 0 < clear.mean() < 1 and (data == nodata).any()  # real clouds and SLC-off gaps

    eq = np.testing.assert_array_equal
    for got, want in zip(R.latest_valid(data, clear, nodata), ref_latest(data, clear, nodata)):
        eq(got, want)
    # least cloudy scene first (stable on ties), as the original cloud-sorted composite
    cloud = 1 - fmask_clear.mean(axis=(1, 2))
    order = np.argsort(cloud, kind="stable")
    for got, want in zip(
        R.first_valid_by_order(data, clear, order, nodata), ref_pick_by_order(data, clear, order, nodata)
    ):
        eq(got, want)
    # max-NDVI mosaic (b4 = nir, b3 = red), ties -> newest
    red = data[:, 0].astype(np.float64)
    nir = data[:, 1].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ndvi = ((nir - red) / (nir + red)).astype(np.float32)
    for got, want in zip(R.quality_mosaic(data, clear, ndvi, nodata), ref_quality(data, clear, ndvi, nodata)):
        eq(got, want)

    med, cnt = R.clear_median(data, clear)
    eq(med, ref_median(data, clear))
    eq(cnt, clear.sum(0))
    pct, _ = R.clear_percentile(data, clear, [10, 25, 50, 75, 90])
    eq(pct, ref_percentile(data, clear, [10, 25, 50, 75, 90]))
    # Fmask alone as the mask, band nodata excluded per band by the nodata guard
    med2, cnt2 = R.clear_median(data, fmask_clear, nodata)
    eq(med2, ref_median(data, fmask_clear, nodata))
    eq(cnt2, fmask_clear.sum(0))
    pct2, _ = R.clear_percentile(data, fmask_clear, QS, nodata)
    eq(pct2, ref_percentile(data, fmask_clear, QS, nodata))


def test_real_landsat_yearly_bins(landsat):
    # the way compose.py will call the kernels: one call per time bin
    scenes, data, fmask = landsat
    clear = ((fmask == 0) | (fmask == 1)) & (data != -9999).all(axis=1)
    years = np.array([int(s[9:13]) for s in scenes])
    for year in np.unique(years):
        sel = years == year
        d, c = data[sel], clear[sel]
        for got, want in zip(R.latest_valid(d, c, -9999), ref_latest(d, c, -9999)):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(R.clear_median(d, c)[0], ref_median(d, c))


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.float64])
@pytest.mark.parametrize("t", [0, 1, 4, 13])
def test_median_of_scaled_values_equals_converting_first(dtype, t):
    """``scale``/``offset``: the kernel converts DN as it reads; same numbers as a float32 copy of
    ``DN × scale + offset`` (numpy's float32 ufuncs) reduced by numpy, band subset and order kept."""
    rng = np.random.default_rng(t)
    data = rng.integers(0, 12000, (t, 5, 9, 70)).astype(dtype)
    clear = rng.random((t, 9, 70)) < 0.6
    bands = np.array([3, 0, 2])
    scale = np.full((t, 3), 1e-4, np.float32)
    offset = np.where(np.arange(t)[:, None] % 2, np.float32(-0.1), np.float32(0)) * np.ones((1, 3), np.float32)
    refl = data[:, bands].astype(np.float32) * scale[:, :, None, None] + offset[:, :, None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.nanmedian(np.where(clear[:, None], refl, np.nan).astype(np.float64), axis=0).astype(np.float32)
    out, count = R.clear_median(data, clear, bands=bands, scale=scale, offset=offset)
    np.testing.assert_array_equal(out, want if t else np.full((3, 9, 70), np.nan, np.float32))
    np.testing.assert_array_equal(count, clear.sum(0))
    with pytest.raises(ValueError, match="scale and offset"):
        R.clear_median(data, clear, bands=bands, scale=scale[:, :2])
