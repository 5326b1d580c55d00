"""rio-color formulas: strict parsing, and bit-exact results against the rio-color package on real images."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixels_xr.pxm.color import FormulaError, Op, apply, band_luts, format_formula, parse_formula

rio_ops = pytest.importorskip("rio_color.operations")
rio_utils = pytest.importorskip("rio_color.utils")

FORMULAS = [
    "sigmoidal RGB 3 0.6",
    "sigmoidal RGB 4 0.5",
    "sigmoidal RGB 3 0.4 gamma B 1.1 saturation 1.25",
    "gamma 3 0.95, sigmoidal rgb 35 0.13",
    "gamma g 2",  # numpy's x ** 0.5 fast path (sqrt)
    "gamma rgb 0.5",  # x ** 2
    "sigmoidal rg 0 0.5 gamma 1 1",
    "sigmoidal b -3 0.3",
    "sigmoidal RGB 20 0",
    "saturation 0",
    "saturation 2 gamma r 1.3",
    "saturation 0.7, sigmoidal gb 7 0.35 saturation 1.1",
]
IMAGES = ["rasterio_RGB.byte.tif", "W4441A.tiny.tif", "2012_30cm_594_5450.tiny.tif",
          "201404_13SED190110_201404_0x1500m_CL_1.tif"]


def rio_color(rgb: np.ndarray, formula: str) -> np.ndarray:
    """The oracle: exactly what rio-color's color_worker does on a uint8 block."""
    arr = rio_utils.to_math_type(rgb)
    for func in rio_ops.parse_operations(formula):
        arr = func(arr)
    return rio_utils.scale_dtype(arr, np.uint8)


@pytest.fixture(scope="module")
def images(shared_data: Path) -> dict[str, np.ndarray]:
    out = {}
    for name in IMAGES:
        with rasterio.open(shared_data / "rgb" / name) as ds:
            out[name] = ds.read([1, 2, 3])
    return out


# ------------------------------------------------------------------------------------------------ parser


def test_parse_examples() -> None:
    assert parse_formula("sigmoidal RGB 3 0.4 gamma B 1.1 saturation 1.25") == [
        Op("sigmoidal", (1, 2, 3), (3.0, 0.4)), Op("gamma", (3,), (1.1,)), Op("saturation", (1, 2, 3), (1.25,))]
    assert parse_formula("gamma 3 0.95, sigmoidal rgb 35 0.13") == [
        Op("gamma", (3,), (0.95,)), Op("sigmoidal", (1, 2, 3), (35.0, 0.13))]
    assert parse_formula("Gamma rR1 2") == [Op("gamma", (1,), (2.0,))]


@pytest.mark.parametrize("formula", FORMULAS)
def test_format_round_trip(formula: str) -> None:
    ops = parse_formula(formula)
    assert parse_formula(format_formula(ops)) == ops


@pytest.mark.parametrize(
    ("formula", "message"),
    [
        ("", "empty formula"),
        ("   ,  ", "empty formula"),
        ("brightness rgb 2", "not an operation"),
        ("sigmoidal rgb 3", "sigmoidal takes 3 argument"),
        ("gamma rgb", "gamma takes 2 argument"),
        ("gamma", "gamma takes 2 argument"),
        ("saturation", "saturation takes 1 argument"),
        ("gamma 1.5", "BANDS must be"),  # '1.5' is read as BANDS: '.' is no band
        ("gamma x 1.5", "BANDS must be"),
        ("gamma 4 1.5", "BANDS must be"),
        ("gamma 0 1.5", "BANDS must be"),
        ("gamma rgba 1.5", "BANDS must be"),
        ("gamma 3,0.95", "BANDS must be"),  # commas are deleted: BANDS '30.95'
        ("gamma rgb\t1.5", "BANDS must be"),  # rio-color splits on spaces only
        ("gamma rgb 0", "gamma VALUE must be > 0"),
        ("gamma rgb -1", "gamma VALUE must be > 0"),
        ("gamma rgb nan", "gamma VALUE must be > 0"),
        ("gamma rgb 1.5x", "must be a number"),
        ("gamma rgb 1.5 x", "extra argument must be a number"),  # rio-color converts extras too
        ("gamma rgb 1.5 ", "empty token"),
        (" gamma rgb 1.5", "empty token"),
        ("gamma rgb  1.5", "empty token"),
        ("gamma  rgb 1.5", "VALUE must be a number"),  # BANDS '' (no band), then VALUE 'rgb'
        ("gamma r 1  gamma g 2", "empty token"),
        ("sigmoidal rgb 3 1.5", "BIAS must be between 0 and 1"),
        ("sigmoidal rgb 3 -0.1", "BIAS must be between 0 and 1"),
        ("sigmoidal rgb 1e-300 0.5", "undefined values"),
        ("sigmoidal rgb -100 1", "undefined values"),
        ("sigmoidal rgb -10 0.5 sigmoidal rgb -10 0.5", "outside 0-1"),  # rio-color's input check
        ("saturation inf", "undefined values"),
        ("saturation nan", "undefined values"),
    ],
)
def test_parse_errors(formula: str, message: str) -> None:
    with pytest.raises(FormulaError, match=message) as err:
        parse_formula(formula)
    assert "\n" not in str(err.value)


# Ported from rio-color's own tests (mapbox/rio-color tests/test_operations.py, the parse_operations
# cases): the same formulas on the same fixture array, compared bit for bit with rio-color itself.
RIO_ARR = (np.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]], [[9, 10], [11, 12]]]) * 10).astype(np.uint8)


@pytest.mark.parametrize("formula", [
    "gamma rgb 0.95",  # test_parse_gamma
    "sigmoidal rgb 5 0.53",  # test_parse_sigmoidal
    "gamma rgb 0.95 sigmoidal rgb 35 0.13",  # test_parse_multi
    "gamma r,g,b 0.95, sigmoidal r,g,b 35 0.13",  # test_parse_comma: commas are optional
    "saturation 1.25",  # test_parse_saturation_rgb
    "gamma 1,2 0.95",  # test_parse_bands
    "gamma Rg 0.95",  # test_parse_bands
    "saturation 1.25 gamma rgb 0.95",  # test_parse_multi_saturation_first
    # issue 14.4: rio-color's comma syntax
    "gamma 1,2,3 1.85",
    "gamma r,g,b 0.95",
    "gamma 3 0.95, sigmoidal rgb 35 0.13",
])
def test_rio_color_parse_cases(formula: str) -> None:
    for arr in (RIO_ARR, np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 4, 256)).copy()):
        np.testing.assert_array_equal(apply(arr, parse_formula(formula)), rio_color(arr, formula))


def test_rio_color_parse_names_and_bands() -> None:
    # test_parse_multi_name, test_parse_bands
    assert [op.name for op in parse_formula("saturation 1.25 gamma rgb 0.95")] == ["saturation", "gamma"]
    assert parse_formula("gamma 1,2 0.95") == parse_formula("gamma Rg 0.95") == [Op("gamma", (1, 2), (0.95,))]
    assert parse_formula("gamma r,g,b 0.95, sigmoidal r,g,b 35 0.13") == parse_formula(
        "gamma rgb 0.95 sigmoidal rgb 35 0.13")
    for bad in ("gamma 7,8,9 1.05", "foob 123"):  # test_parse_bands, test_parse_bad_op
        with pytest.raises(ValueError):
            rio_ops.parse_operations(bad)
        with pytest.raises(FormulaError):
            parse_formula(bad)


@pytest.mark.parametrize(("formula", "same_as"), [
    ("gamma rgb 1,5", "gamma rgb 15"),  # commas are deleted, not read as decimal points
    ("sigmoidal rgb 3 0.5 7", "sigmoidal rgb 3 0.5"),  # rio-color drops extra arguments
    ("saturation 1.2 3", "saturation 1.2"),
    ("gamma rgb 1_0", "gamma rgb 10"),  # Python float literals
    ("GAMMA RGB 1e1", "gamma 321 10"),
    ("gamma rrgg 2", "gamma rg 2"),
])
def test_rio_color_quirks_are_accepted(formula: str, same_as: str) -> None:
    assert parse_formula(formula) == parse_formula(same_as)
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 2, 256)).copy()
    np.testing.assert_array_equal(apply(ramp, formula), rio_color(ramp, formula))


def test_rio_color_no_ops_and_extremes() -> None:
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 2, 256)).copy()
    assert parse_formula("gamma  1.5") == [] and parse_formula("gamma ") == []  # no band: rio-color's no-op
    for formula in ("gamma rgb inf", "gamma rgb 1e999", "gamma rgb 5e-324", "saturation -1", "saturation 0",
                    "sigmoidal rgb 0 nan", "sigmoidal rgb 3 1.0000000000000002", "sigmoidal  3 2"):
        np.testing.assert_array_equal(apply(ramp, parse_formula(formula)), rio_color(ramp, formula),
                                      err_msg=formula)


def _rio_outcome(img: np.ndarray, formula: str) -> np.ndarray | None:
    """rio-color's result on ``img``, or None where rio-color raises or its result is undefined."""
    import warnings

    try:
        arr = rio_utils.to_math_type(img)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for func in rio_ops.parse_operations(formula):
                arr = func(arr)
    except Exception:  # noqa: BLE001 - ValueError, KeyError, IndexError, TypeError: all are rejections
        return None
    scaled = arr * 255
    if not np.all(np.isfinite(scaled)) or scaled.min() <= -1 or scaled.max() >= 256:
        return None
    return scaled.astype(np.uint8)


_BAD_NAMES = st.sampled_from(["sat", "x", "gamma\trgb", "", "Gamma"])
_BANDS_OK = st.sampled_from(["rgb", "RGB", "r", "g,b", "1,2,3", "13", "2", "rR1", "B"])
_BANDS_ANY = st.text(alphabet="rgbRGB01234,x.", max_size=4)
_VALUES_OK = st.sampled_from(["0.5", "1.5", "3", "20", "0.95", "1", "2.", ".7", "1e1", "1,5", "inf"])
_BIAS_OK = st.sampled_from(["0.5", "0.13", "0", "1", ".35", "0,5"])
_CONTRAST_OK = st.sampled_from(["3", "-3", "20", "0", "35", "-1.5", "0.5", "1,0"])
_ANY_NUMBER = st.sampled_from(["-1", "nan", "-inf", "1e-300", "1_0", "", "x", "1e3", "1.01", "-0.1", "0.95,"])
_SEPARATORS = st.sampled_from([" "] * 8 + [", ", " ,", "  ", " , ", "\t"])


@st.composite
def _formulas(draw) -> str:
    """rio-color formulas, mostly well formed, with every kind of defect mixed in now and then."""
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(["gamma", "sigmoidal", "saturation", "SIGMOIDAL"]))
        clean = draw(st.integers(0, 9)) < 8
        if name.lower() == "saturation":
            args = [draw(st.sampled_from(["1.25", "0", "0.5", "2", "-1", "1,1"]))]
        else:
            args = [draw(_BANDS_OK)] + ([draw(_VALUES_OK)] if name == "gamma" else
                                        [draw(_CONTRAST_OK), draw(_BIAS_OK)])
        if not clean:
            what = draw(st.integers(0, 4))
            if what == 0:
                name = draw(_BAD_NAMES)
            elif what == 1:
                args[draw(st.integers(0, len(args) - 1))] = draw(_ANY_NUMBER | _BANDS_ANY)
            elif what == 2:
                args.append(draw(_ANY_NUMBER | _VALUES_OK))
            elif what == 3:
                args.pop(draw(st.integers(0, len(args) - 1)))
            else:
                args.insert(0, "")
        parts += [name, *args]
    out = parts[0]
    for tok in parts[1:]:
        out += draw(_SEPARATORS) + tok
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(formula=_formulas())
def test_differential_against_rio_color(formula: str) -> None:
    """Any formula: we accept exactly when rio-color gives a defined result, and then the same bytes.

    The oracle image holds every 8-bit value per band (greys) and an 18^3 grid of colours: exact for
    per-band formulas, and the same probe our parser uses for formulas with saturation.
    """
    idx = np.r_[0:256:15, 255].astype(np.uint8)
    r, g, b = np.meshgrid(idx, idx, idx, indexing="ij")
    greys = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 256))
    img = np.concatenate([greys, np.stack([r.ravel(), g.ravel(), b.ravel()])], axis=1)[:, None, :]
    expected = _rio_outcome(img, formula)
    try:
        ours = apply(img, parse_formula(formula))
    except FormulaError as err:
        assert expected is None, f"{formula!r}: rio-color accepts it, we say {err}"
        assert "\n" not in str(err)
        return
    assert expected is not None, f"{formula!r}: rio-color rejects it, we accept {parse_formula(formula)}"
    np.testing.assert_array_equal(ours, expected, err_msg=formula)


def test_parse_rejects_non_string() -> None:
    with pytest.raises(FormulaError, match="must be a string"):
        parse_formula(3)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- bit-exactness


def test_every_8bit_value_per_band() -> None:
    """Per-band formulas: every one of the 256 values of every band matches rio-color."""
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 16, 256)).copy()
    for formula in [f for f in FORMULAS if "saturation" not in f]:
        np.testing.assert_array_equal(apply(ramp, formula), rio_color(ramp, formula), err_msg=formula)
        luts = band_luts(parse_formula(formula))
        assert luts.shape == (3, 256) and luts.dtype == np.uint8


def test_random_colours_with_saturation() -> None:
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, size=(3, 300, 400), dtype=np.uint8)
    for formula in [f for f in FORMULAS if "saturation" in f]:
        np.testing.assert_array_equal(apply(rgb, formula), rio_color(rgb, formula), err_msg=formula)


@pytest.mark.parametrize("name", IMAGES)
def test_real_images_bit_exact(images, name: str) -> None:
    rgb = images[name]
    for formula in FORMULAS:
        ours = apply(rgb, formula)
        assert ours.dtype == np.uint8 and ours.shape == rgb.shape
        np.testing.assert_array_equal(ours, rio_color(rgb, formula), err_msg=f"{name}: {formula}")


@pytest.mark.slow
def test_all_16m_colours_with_saturation() -> None:
    """Every 24-bit colour through the spec's example formula (about a minute)."""
    allc = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([(allc >> 16) & 255, (allc >> 8) & 255, allc & 255]).astype(np.uint8).reshape(3, 4096, 4096)
    formula = "sigmoidal RGB 3 0.4 gamma B 1.1 saturation 1.25"
    np.testing.assert_array_equal(apply(rgb, formula), rio_color(rgb, formula))


# ---------------------------------------------------------------------------------------------- behaviour


def test_apply_keeps_input_and_shape(images) -> None:
    rgb = images["W4441A.tiny.tif"][:, :50, :60]
    before = rgb.copy()
    out = apply(rgb, "saturation 1.5")
    np.testing.assert_array_equal(rgb, before)
    assert out.shape == rgb.shape and out is not rgb
    np.testing.assert_array_equal(apply(rgb, []), rgb)


def test_apply_rejects_non_rgb_uint8() -> None:
    with pytest.raises(FormulaError, match="uint8"):
        apply(np.zeros((3, 4, 4), np.uint16), "gamma rgb 1.1")
    with pytest.raises(FormulaError, match="uint8"):
        apply(np.zeros((4, 4, 4), np.uint8), "gamma rgb 1.1")  # alpha/mask never go through colour


def test_cached_table_reused_across_tiles(images) -> None:
    rgb = images["rasterio_RGB.byte.tif"]
    formula = "saturation 1.3 gamma b 0.9"
    a = apply(rgb[:, :300], formula)
    b = apply(rgb, formula)  # second call: mostly lookups, new colours filled in
    np.testing.assert_array_equal(b[:, :300], a)
    np.testing.assert_array_equal(b, rio_color(rgb, formula))


def test_threads_agree(images) -> None:
    rgb = images["2012_30cm_594_5450.tiny.tif"]
    formula = "saturation 0.8 sigmoidal rgb 5 0.45"
    expected = rio_color(rgb, formula)
    tiles = [rgb[:, i * 111:(i + 1) * 111] for i in range(6)]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = apply(tiles[i], formula)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(np.concatenate([results[i] for i in range(6)], axis=1), expected)
