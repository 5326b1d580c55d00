"""Keras/TensorFlow models over ``xr.Dataset`` cubes, blockwise on Dask: ``predict`` and its parts."""

from __future__ import annotations

from pixels_xr.inference.blocks import NODATA_U8, PROBABILITY_U8_SCALE
from pixels_xr.inference.model import LOAD_COUNT, LoadedModel, _tensorflow, load_model  # noqa: F401
from pixels_xr.inference.pipeline import DEFAULT_BATCH, predict
from pixels_xr.io.predictions import colormap_of, open_input, output_name, write_predictions

__all__ = [
    "DEFAULT_BATCH",
    "LOAD_COUNT",
    "NODATA_U8",
    "PROBABILITY_U8_SCALE",
    "LoadedModel",
    "colormap_of",
    "load_model",
    "open_input",
    "output_name",
    "predict",
    "write_predictions",
]
