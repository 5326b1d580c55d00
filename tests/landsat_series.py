"""The real Landsat series in ../shared/data (``landsat-sr-fmask-105dates``): its folder name and the
acquisition date of a scene from its Landsat product id. Imported as ``from landsat_series import ...``."""

from __future__ import annotations

import datetime as dt

SERIES = "landsat-sr-fmask-105dates"


def scene_date(scene: str) -> dt.date:
    """The acquisition day of a scene id such as ``LT50010622009…`` (year and day of year)."""
    year, doy = int(scene[9:13]), int(scene[13:16])
    return dt.date(year, 1, 1) + dt.timedelta(days=doy - 1)
