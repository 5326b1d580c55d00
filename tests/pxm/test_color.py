"""rio-color formulas: strict parsing, and bit-exact results against the rio-color package on real images."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio

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
        ("sigmoidal rgb 3 0.5 7", "sigmoidal takes 3 argument"),
        ("gamma 1.5", "gamma takes 2 argument"),
        ("saturation", "saturation takes 1 argument"),
        ("saturation 1 2", "saturation takes 1 argument"),
        ("gamma x 1.5", "BANDS must be"),
        ("gamma 4 1.5", "BANDS must be"),
        ("gamma 0 1.5", "BANDS must be"),
        ("gamma rgba 1.5", "BANDS must be"),
        ("gamma rgb 0", "gamma VALUE must be > 0"),
        ("gamma rgb -1", "gamma VALUE must be > 0"),
        ("gamma rgb nan", "must be a number"),
        ("gamma rgb inf", "must be a number"),
        ("gamma rgb 1_0", "must be a number"),
        ("gamma rgb 1e999", "must be finite"),
        ("gamma rgb 1,5", "comma inside"),
        ("sigmoidal rgb 3 1.5", "BIAS must be between 0 and 1"),
        ("sigmoidal rgb 3 -0.1", "BIAS must be between 0 and 1"),
        ("sigmoidal rgb 1e-300 0.5", "undefined values"),
        ("sigmoidal rgb -100 1", "undefined values"),
        ("saturation -1", "PROPORTION must be >= 0"),
    ],
)
def test_parse_errors(formula: str, message: str) -> None:
    with pytest.raises(FormulaError, match=message) as err:
        parse_formula(formula)
    assert "\n" not in str(err.value)


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
