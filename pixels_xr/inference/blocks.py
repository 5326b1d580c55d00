"""Pure numpy block functions of ``predict``: normalise, run a model per pixel or on blended tiles, encode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pixels_xr.inference.model import LoadedModel

#: Class value of nodata pixels in ``classes`` and of uint8 ``probability``; uint8 probabilities are p × 254.
NODATA_U8 = 255
PROBABILITY_U8_SCALE = 254


@dataclass(frozen=True)
class Plan:
    """What a block needs besides the model: small and picklable (the task graph carries only this)."""

    model: str
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    nodata: float | None
    when: str
    fill: float
    batch: int
    margin: int = 0
    patch: tuple[int, int] | None = None


def prepare(block: np.ndarray, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """(normalised float32 values in (time, y, x, band) order with nodata filled, bad-value mask)."""
    values = np.moveaxis(block, 0, -1)
    bad = np.isnan(values) if values.dtype.kind == "f" else np.zeros(values.shape, bool)
    if plan.nodata is not None:
        bad |= values == plan.nodata
    x = values.astype(np.float32) * np.asarray(plan.scale, np.float32) + np.asarray(plan.offset, np.float32)
    x[bad] = plan.fill
    return x, bad


def nodata_pixels(bad: np.ndarray, when: str, axes: tuple[int, ...]) -> np.ndarray:
    """Pixels that are nodata: bad in ``any`` or ``all`` of ``axes``."""
    return bad.any(axis=axes) if when == "any" else bad.all(axis=axes)


def run_batches(model: LoadedModel, x: np.ndarray, batch: int) -> np.ndarray:
    """The model on ``x`` in calls of at most ``batch`` samples → (samples, channels) float32."""
    if len(x) == 0:
        return np.empty((0, model.channels), np.float32)
    parts = [np.asarray(model.run(np.ascontiguousarray(x[i:i + batch])), np.float32)
             for i in range(0, len(x), batch)]
    return np.concatenate(parts)


def pixel_block(block: np.ndarray, model: LoadedModel, plan: Plan, timed: bool) -> np.ndarray:
    """Per-pixel model on a (band, time, y, x) block → probabilities (class, time | 1, y, x), NaN nodata."""
    x, bad = prepare(block, plan)  # (time, y, x, band)
    if timed:  # samples (y·x, time, band)
        samples = np.moveaxis(x, 0, 2).reshape(-1, x.shape[0], x.shape[3])
        invalid = nodata_pixels(bad, plan.when, (0, 3)).reshape(-1)
        out_shape = (1, *x.shape[1:3])
    else:  # samples (time·y·x, band)
        samples = x.reshape(-1, x.shape[3])
        invalid = nodata_pixels(bad, plan.when, (3,)).reshape(-1)
        out_shape = x.shape[:3]
    if not invalid.any():  # no gather/scatter copies when every pixel is valid
        result = run_batches(model, samples, plan.batch)
    else:
        result = np.full((len(invalid), model.channels), np.nan, np.float32)
        keep = np.flatnonzero(~invalid)
        result[keep] = run_batches(model, samples[keep], plan.batch)
    return np.moveaxis(result.reshape(*out_shape, model.channels), -1, 0)


def tile_starts(length: int, tile: int, margin: int) -> list[int]:
    """Starts of tiles of ``tile`` pixels covering ``length``, neighbours overlapping by ``2 * margin``."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - 2 * margin))
    return starts + [length - tile]


def trusted(start: int, tile: int, length: int, margin: int) -> tuple[int, int]:
    """Pixels of a tile whose receptive field lies inside it (all of it at block edges)."""
    return (start + margin if start > 0 else 0), (start + tile - margin if start + tile < length else length)


def ramp(lo: int, hi: int) -> np.ndarray:
    """Blending weights of ``hi - lo`` pixels: 1, 2, … rising from both ends."""
    i = np.arange(hi - lo, dtype=np.float32)
    return np.minimum(i + 1, hi - lo - i)


def image_block(block: np.ndarray, model: LoadedModel, plan: Plan, timed: bool) -> np.ndarray:
    """Image model on an overlapped (band, time, y, x) block → (class, time | 1, y, x) probabilities.

    The block is tiled with the model's input size (or ``plan.patch``); tiles overlap by twice the margin
    and their trusted interiors are blended with :func:`ramp` weights.
    """
    x, bad = prepare(block, plan)  # (time, y, x, band)
    n_t, height, width = x.shape[:3]
    fixed = model.size
    tile = tuple(fixed[k] or min(plan.patch[k] if plan.patch else block.shape[2 + k], block.shape[2 + k])
                 for k in range(2))
    pad = (max(0, tile[0] - height), max(0, tile[1] - width))
    if any(pad):  # only a whole array smaller than a fixed-size input; planned as one block
        x = np.pad(x, ((0, 0), (0, pad[0]), (0, pad[1]), (0, 0)), constant_values=plan.fill)
    frames = [x] if timed else [x[t:t + 1] for t in range(n_t)]
    out = np.empty((model.channels, len(frames), height, width), np.float32)
    ys = tile_starts(x.shape[1], tile[0], plan.margin)
    xs = tile_starts(x.shape[2], tile[1], plan.margin)
    windows = [(y0, x0) for y0 in ys for x0 in xs]
    for f, frame in enumerate(frames):
        if len(windows) == 1 and not any(pad):  # one tile as large as the block: nothing to blend
            pred = np.asarray(model.run(frame[None] if timed else frame), np.float32)[0]
            out[:, f] = np.moveaxis(pred, -1, 0)
            continue
        acc = np.zeros((x.shape[1], x.shape[2], model.channels), np.float32)
        weight = np.zeros((x.shape[1], x.shape[2], 1), np.float32)
        for i in range(0, len(windows), plan.batch):
            chunk = windows[i:i + plan.batch]
            tiles = np.stack([frame[:, y0:y0 + tile[0], x0:x0 + tile[1]] for y0, x0 in chunk])
            pred = np.asarray(model.run(tiles if timed else tiles[:, 0]), np.float32)
            for (y0, x0), p in zip(chunk, pred):
                ylo, yhi = trusted(y0, tile[0], x.shape[1], plan.margin)
                xlo, xhi = trusted(x0, tile[1], x.shape[2], plan.margin)
                w = np.multiply.outer(ramp(ylo, yhi), ramp(xlo, xhi))[..., None]
                acc[ylo:yhi, xlo:xhi] += w * p[ylo - y0:yhi - y0, xlo - x0:xhi - x0]
                weight[ylo:yhi, xlo:xhi] += w
        out[:, f] = np.moveaxis(acc[:height, :width] / weight[:height, :width], -1, 0)
    if timed:
        out[:, :, nodata_pixels(bad, plan.when, (0, 3))] = np.nan
    else:
        out[:, nodata_pixels(bad, plan.when, (3,))] = np.nan
    return out


def classes_block(prob: np.ndarray) -> np.ndarray:
    """Probabilities (class, ...) → uint8 class indexes (one sigmoid channel: p ≥ 0.5), 255 nodata."""
    classes = (prob[0] >= 0.5).astype(np.uint8) if prob.shape[0] == 1 else \
        np.argmax(np.nan_to_num(prob, nan=-1.0), axis=0).astype(np.uint8)
    classes[np.isnan(prob[0])] = NODATA_U8
    return classes


def uint8_block(prob: np.ndarray) -> np.ndarray:
    """Probabilities → uint8 p × 254, 255 nodata."""
    out = np.round(np.nan_to_num(prob, nan=0.0) * PROBABILITY_U8_SCALE).astype(np.uint8)
    out[np.isnan(prob)] = NODATA_U8
    return out


def merged_chunks(chunks: tuple[int, ...], minimum: int) -> tuple[int, ...]:
    """Chunks merged with their neighbours until each is at least ``minimum`` long (or the whole axis)."""
    out: list[int] = []
    run = 0
    for c in chunks:
        run += c
        if run >= minimum:
            out.append(run)
            run = 0
    if run:
        if out:
            out[-1] += run
        else:
            out.append(run)
    return tuple(out)
