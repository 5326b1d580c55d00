"""``pixels-xr serve``: a MapLibre map of a run's outputs or of PXM tilesets, on loopback, working offline.

``MapServer(path)`` runs the server in a background thread; ``show(path)`` puts the map inline in a Jupyter
notebook (an IFrame on a server kept for that path). The page and its JavaScript (maplibre-gl, pmtiles,
vendored from npm by ``scripts/vendor_js.py``, versions and licences in ``static/vendor/VENDOR.json``) ship
in the package: nothing is fetched from the internet at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pixels_xr.serve.app import LOOPBACK, MapServer, Served, make_app, open_path

__all__ = ["LOOPBACK", "MapServer", "Served", "make_app", "open_path", "show"]

_SHOWN: dict[Path, MapServer] = {}


def show(path: str | Path, *, width: str | int = "100%", height: int = 520) -> Any:
    """The map of ``path`` inline in a notebook: an ``IPython.display.IFrame`` on a loopback server.

    One server per path for the life of the kernel; showing the same path again reuses it.
    """
    from IPython.display import IFrame

    key = Path(path).expanduser().resolve()
    server = _SHOWN.get(key)
    if server is None:
        server = _SHOWN[key] = MapServer(key).start()
    return IFrame(server.url, width=width, height=height)
