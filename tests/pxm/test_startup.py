"""What a render's processes import: the command line imports no engine, and a render on threads (the
default) no Dask — start-up was most of a short render's CPU (RESULTS.md ``pxm-render``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("rasterio", "numba", "distributed", "dask", "xarray", "pandas", "rioxarray")


def _imported(statement: str) -> list[str]:
    code = f"import sys; {statement}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()


@pytest.mark.parametrize(("statement", "allowed"), [
    # every command, and every worker process of a local cluster (it imports the script again)
    ("import pixels_xr.cli, pixels_xr.pxm.cli, pixels_xr.pxm", ()),
    # a render on threads: GDAL and numba, nothing of Dask or xarray
    ("from pixels_xr.pxm import render", ("rasterio", "numba")),
])
def test_imports_stay_light(statement: str, allowed: tuple[str, ...]) -> None:
    assert [m for m in _imported(statement) if m not in allowed] == []
