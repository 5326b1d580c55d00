"""Regenerate docs/quicklook.png, the README's picture, by running notebooks/quickstart.ipynb's code.

    .venv/bin/python scripts/make_readme_figure.py

The quick-start's code cells run in this process (IPython magics dropped, ``display`` a no-op) in a
temporary folder; its figure of the latest pixel per month of field-2 is copied to docs/quicklook.png.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
FIGURE = "latest_field-2_rgb.png"
TARGET = REPO / "docs" / "quicklook.png"


def notebook_code(path: Path) -> str:
    """The notebook's code cells as one Python program (lines starting with ``%`` or ``!`` dropped)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    lines = [line for cell in nb.cells if cell.cell_type == "code" for line in cell.source.splitlines()
             if not line.lstrip().startswith(("%", "!"))]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Run the quick-start and copy its RGB quicklook to docs/quicklook.png."""
    import matplotlib

    matplotlib.use("Agg")
    with tempfile.TemporaryDirectory(prefix="pixels-xr-readme-") as work:
        os.environ["PIXELS_XR_WORKDIR"] = work
        os.environ["PIXELS_XR_REPO"] = str(REPO)
        exec(compile(notebook_code(NOTEBOOK), str(NOTEBOOK), "exec"), {"display": lambda *a, **k: None})
        TARGET.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(work) / "figures" / FIGURE, TARGET)
    print(f"wrote {TARGET.relative_to(REPO)} ({TARGET.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
