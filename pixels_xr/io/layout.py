"""Where a run's outputs live and how their names are made: the one home of the output layout.

``OUT/.pixels_xr/`` holds the run's ledger and lock (a name no feature id can take: ids never start with a
dot). Zarr: one group per feature, ``OUT/<feature>``. COG: per feature × bin ``OUT/<feature>/<name>.tif``
(the bands), ``<name>_clear_count.tif`` and, for modes that pick one observation, ``<name>_source_time.tif``
(int32 days since 1970-01-01, nodata ``SOURCE_TIME_NODATA``), where ``<name>`` is the bin label with ``/``
made ``_`` (``2021-11-01_2021-11-30``; the acquisition day in mode ``all``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pixels_xr.io import storage

MANIFEST_DIR = ".pixels_xr"
#: nodata of ``source_time`` COGs (int32 days since the epoch)
SOURCE_TIME_NODATA = -2147483648
SOURCE_TIME_UNITS = "days since 1970-01-01"


def safe_label(label: str) -> str:
    """A bin label ("2021-11-01/2021-11-30") as a storage name ("2021-11-01_2021-11-30")."""
    return label.replace("/", "_")


def label_of(name: str) -> str:
    """The bin label of a storage name made by ``safe_label`` (a day stays a day)."""
    start, sep, end = name.partition("_")
    return f"{start}/{end}" if sep else name


@dataclass(frozen=True)
class CogUnit:
    """The files of one feature × bin of a COG output."""

    out: str
    feature_id: str
    label: str

    @property
    def name(self) -> str:
        return safe_label(self.label)

    def path(self, layer: str = "") -> str:
        """URL of a layer: ``""`` (the bands), ``"clear_count"`` or ``"source_time"``."""
        return storage.join(self.out, self.feature_id, f"{self.name}{'_' + layer if layer else ''}.tif")

    def relative(self, layer: str = "") -> str:
        """The layer's path relative to ``out`` (``/``-separated), for STAC hrefs."""
        return f"{self.feature_id}/{self.name}{'_' + layer if layer else ''}.tif"


#: The layers of a COG unit and their STAC roles (``source_time`` only where the mode picks).
COG_LAYERS = {"": ["data"], "clear_count": ["metadata"], "source_time": ["metadata"]}


def days_since_epoch(values: Any) -> Any:
    """``source_time`` (datetime64, NaT where nothing was picked) as int32 days, NaT → nodata; lazy for dask."""
    import dask.array as da

    def convert(block: np.ndarray) -> np.ndarray:
        days = block.astype("datetime64[D]").astype(np.int64)
        return np.where(np.isnat(block), SOURCE_TIME_NODATA, days).astype(np.int32)

    if isinstance(values, da.Array):
        return values.map_blocks(convert, dtype=np.int32)
    return convert(np.asarray(values))
