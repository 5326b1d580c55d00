"""The pure numpy block functions of inference, without TensorFlow: small arrays against numpy references.

The "models" are numpy functions wrapped in a real ``LoadedModel``: a box sum of radius ``r`` has receptive
field margin ``r``, so tiled predictions must equal the box sum of the whole array exactly (integer values).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pixels_xr.inference import blocks
from pixels_xr.inference.blocks import Plan
from pixels_xr.inference.model import LoadedModel


def box(x: np.ndarray, r: int) -> np.ndarray:
    """Sum over a (2r+1)² window with zero padding of (..., h, w, band) images, like a 'same' convolution."""
    h, w = x.shape[-3:-1]
    pad = [(0, 0)] * (x.ndim - 3) + [(r, r), (r, r), (0, 0)]
    p = np.pad(x, pad)
    return sum(p[..., dy:dy + h, dx:dx + w, :] for dy in range(2 * r + 1) for dx in range(2 * r + 1))


def box_model(r: int, bands: int, size: tuple[int | None, int | None] = (None, None),
              calls: list | None = None) -> LoadedModel:
    def run(x: np.ndarray) -> np.ndarray:
        if calls is not None:
            calls.append(x.shape)
        return box(x, r).astype(np.float32)

    return LoadedModel(path="box", run=run, input_shape=(*size, bands), channels=bands)


def plan(bands: int, **kw) -> Plan:
    args = {"model": "box", "scale": (1.0,) * bands, "offset": (0.0,) * bands, "nodata": None, "when": "any",
            "fill": 0.0, "batch": 3, **kw}
    return Plan(**args)


def integers(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-50, 50, shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# No TensorFlow, Keras or dask
# ------------------------------------------------------------------------------------------------


def test_blocks_import_neither_tensorflow_nor_keras() -> None:
    code = ("import sys, pixels_xr.inference.blocks, pixels_xr.inference\n"
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_blocks_module_imports_only_numpy_and_the_standard_library() -> None:
    tree = ast.parse(Path(blocks.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and not _type_checking_only(tree, node)}
    assert imported <= {"__future__", "dataclasses", "typing", "numpy"}, imported


def _type_checking_only(tree: ast.Module, node: ast.ImportFrom) -> bool:
    return any(isinstance(s, ast.If) and ast.unparse(s.test) == "TYPE_CHECKING" and node in ast.walk(s)
               for s in tree.body)


# ------------------------------------------------------------------------------------------------
# Tiling
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("length", "tile", "margin"), [(10, 10, 2), (7, 10, 2), (11, 10, 2), (64, 16, 2),
                                                        (65, 16, 3), (33, 5, 2), (40, 8, 0)])
def test_tiles_cover_the_axis_and_trusted_parts_leave_out_the_margin(length: int, tile: int,
                                                                      margin: int) -> None:
    starts = blocks.tile_starts(length, tile, margin)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert starts[-1] + tile == length or (length <= tile and starts == [0])
    covered = np.zeros(length, int)
    for s in starts:
        lo, hi = blocks.trusted(s, tile, length, margin)
        assert lo == (0 if s == 0 else s + margin)
        assert hi == (length if s + tile >= length else s + tile - margin)
        covered[lo:hi] += 1
    assert (covered >= 1).all()  # every pixel is trusted by some tile


def test_ramp_weights() -> None:
    np.testing.assert_array_equal(blocks.ramp(3, 9), [1, 2, 3, 3, 2, 1])
    np.testing.assert_array_equal(blocks.ramp(0, 5), [1, 2, 3, 2, 1])
    assert blocks.ramp(4, 4).size == 0


@pytest.mark.parametrize("patch", [(5, 7), (8, 8), (13, 30)])
def test_tiling_then_untiling_gives_the_input(patch: tuple[int, int]) -> None:
    x = integers((3, 2, 13, 30))  # (band, time, y, x)
    out = blocks.image_block(x, box_model(0, 3), plan(3, margin=2, patch=patch), timed=False)
    np.testing.assert_array_equal(out, x)  # an identity model: blending identical values is exact


@pytest.mark.parametrize(("r", "patch"), [(1, (5, 6)), (2, (9, 7)), (2, (20, 24)), (3, (7, 11))])
def test_overlapped_tiles_equal_the_model_on_the_whole_array(r: int, patch: tuple[int, int]) -> None:
    x = integers((2, 3, 20, 24), seed=r)
    ref = np.moveaxis(box(np.moveaxis(x, 0, -1), r), -1, 0)  # (band, time, y, x) on each whole date
    calls: list = []
    out = blocks.image_block(x, box_model(r, 2, calls=calls), plan(2, margin=r, patch=patch), timed=False)
    np.testing.assert_array_equal(out, ref)
    assert all(c[1:3] == patch for c in calls) and all(c[0] <= 3 for c in calls)  # batch = 3 tiles
    if patch != (20, 24):
        seamed = blocks.image_block(x, box_model(r, 2), plan(2, margin=0, patch=patch), timed=False)
        assert not np.array_equal(seamed, ref)  # without the margin, tile edges see zero padding


def test_time_image_model_reads_every_date_of_each_tile() -> None:
    x = integers((2, 3, 12, 10), seed=5)

    def run(t: np.ndarray) -> np.ndarray:  # (N, time, h, w, band) → (N, h, w, band)
        return box(t, 1).sum(1).astype(np.float32)

    model = LoadedModel(path="t", run=run, input_shape=(3, None, None, 2), channels=2)
    out = blocks.image_block(x, model, plan(2, margin=1, patch=(6, 5)), timed=True)
    ref = np.moveaxis(box(np.moveaxis(x, 0, -1), 1).sum(0), -1, 0)[:, None]
    assert out.shape == (2, 1, 12, 10)
    np.testing.assert_array_equal(out, ref)


def test_input_smaller_than_a_fixed_model_is_padded_with_fill() -> None:
    x = integers((2, 1, 5, 6))
    calls: list = []
    out = blocks.image_block(x, box_model(1, 2, size=(8, 9), calls=calls), plan(2, margin=1, fill=-3.0),
                             timed=False)
    padded = np.full((1, 8, 9, 2), -3.0, np.float32)
    padded[0, :5, :6] = np.moveaxis(x[:, 0], 0, -1)
    np.testing.assert_array_equal(out[:, 0], np.moveaxis(box(padded, 1)[0, :5, :6], -1, 0))
    assert calls == [(1, 8, 9, 2)]


def test_image_block_nodata_is_filled_for_the_model_and_nan_in_the_output() -> None:
    x = integers((2, 2, 10, 12), seed=3)
    x[0, 0, 2:4, 3:6] = np.nan  # one band
    x[:, 1, 7:, :2] = 0  # every band, nodata value 0
    p = plan(2, margin=1, patch=(6, 6), nodata=0.0, fill=7.0, scale=(2.0, 1.0), offset=(1.0, 0.0))
    out = blocks.image_block(x, box_model(1, 2), p, timed=False)
    bad = np.isnan(x) | (x == 0)
    filled = np.where(bad, 7.0, x * np.array([2.0, 1.0])[:, None, None, None]
                      + np.array([1.0, 0.0])[:, None, None, None])
    ref = np.moveaxis(box(np.moveaxis(filled, 0, -1), 1), -1, 0)
    nodata = bad.any(0)
    assert np.isnan(out[:, nodata]).all()
    np.testing.assert_array_equal(out[:, ~nodata], ref[:, ~nodata])


# ------------------------------------------------------------------------------------------------
# Per-pixel blocks, normalisation, encodings, chunk planning
# ------------------------------------------------------------------------------------------------


def test_prepare_normalises_and_fills_nodata() -> None:
    block = np.array([[[[0, 3], [5, 7]]], [[[2, 0], [0, 9]]]], np.uint16)  # (band 2, time 1, y 2, x 2)
    p = plan(2, scale=(0.5, 2.0), offset=(1.0, -1.0), nodata=0.0, fill=-9.0)
    x, bad = blocks.prepare(block, p)
    values = np.moveaxis(block, 0, -1).astype(np.float32)
    ref = np.where(values == 0, -9.0, values * [0.5, 2.0] + [1.0, -1.0])
    assert x.dtype == np.float32 and x.shape == (1, 2, 2, 2)
    np.testing.assert_array_equal(x, ref)
    np.testing.assert_array_equal(bad, values == 0)
    np.testing.assert_array_equal(blocks.nodata_pixels(bad, "any", (3,)), (values == 0).any(-1))
    np.testing.assert_array_equal(blocks.nodata_pixels(bad, "all", (3,)), (values == 0).all(-1))


@pytest.mark.parametrize("timed", [False, True])
def test_pixel_block_equals_the_model_on_valid_pixels(timed: bool) -> None:
    x = integers((3, 2, 4, 5), seed=1)
    x[1, 0, 1, 2] = np.nan
    weights = np.arange(6 * 4, dtype=np.float32).reshape(6, 4) if timed else np.eye(3, 4, dtype=np.float32)
    calls: list = []

    def run(s: np.ndarray) -> np.ndarray:
        calls.append(len(s))
        return s.reshape(len(s), -1) @ weights

    model = LoadedModel(path="lin", run=run, input_shape=((2, 3) if timed else (3,)), channels=4)
    out = blocks.pixel_block(x, model, plan(3, batch=7), timed)
    samples = np.moveaxis(x, 0, -1)  # (time, y, x, band)
    if timed:
        ref = np.moveaxis(samples, 0, 2).reshape(4, 5, 6) @ weights  # (y, x, time·band)
        nodata = np.isnan(x).any((0, 1))[None]
        ref = ref[None]
    else:
        ref = samples @ weights
        nodata = np.isnan(x).any(0)
    ref = np.moveaxis(ref, -1, 0)
    assert out.shape == ref.shape and max(calls) <= 7
    assert np.isnan(out[:, nodata]).all()
    np.testing.assert_array_equal(out[:, ~nodata], ref[:, ~nodata])
    empty = blocks.run_batches(model, np.empty((0, *model.input_shape), np.float32), 7)
    assert empty.shape == (0, 4)


def test_classes_and_uint8_encodings() -> None:
    prob = np.array([[[0.2, 0.5, np.nan]], [[0.7, 0.1, np.nan]], [[0.1, 0.4, np.nan]]], np.float32)
    np.testing.assert_array_equal(blocks.classes_block(prob), [[1, 0, blocks.NODATA_U8]])
    sigmoid = np.array([[[0.5, 0.49, np.nan]]], np.float32)
    np.testing.assert_array_equal(blocks.classes_block(sigmoid), [[1, 0, 255]])
    scaled = blocks.uint8_block(prob)
    assert scaled.dtype == np.uint8
    np.testing.assert_array_equal(scaled, np.where(np.isnan(prob), 255, np.round(np.nan_to_num(prob) * 254)))


@pytest.mark.parametrize(("chunks", "minimum", "expected"), [((30, 30, 10), 17, (30, 40)),
                                                             ((50, 1, 41, 38), 24, (50, 42, 38)),
                                                             ((3, 3), 10, (6,)), ((5, 5, 5), 5, (5, 5, 5))])
def test_merged_chunks(chunks: tuple, minimum: int, expected: tuple) -> None:
    merged = blocks.merged_chunks(chunks, minimum)
    assert merged == expected and sum(merged) == sum(chunks)
    assert all(c >= minimum for c in merged) or len(merged) == 1
