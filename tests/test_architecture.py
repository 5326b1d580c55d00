"""The house rule, checked on the code: data flows one way, and the PXM wing shares only cluster and I/O.

``STAGES`` is the order of docs/architecture.md; a module may import only modules of its own or an earlier
stage (imports under ``if TYPE_CHECKING:`` are annotations, not dependencies). A module missing from the
list fails the test: a new module must be placed in the flow on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pixels_xr"

#: Stages in data-flow order; modules within one stage may import each other.
STAGES: list[set[str]] = [
    {"errors", "_version", "run_cache", "jsontext", "graph"},
    {"methods", "timeslices", "platforms", "items", "indices"},
    {"signing", "features"},
    {"config"},
    {"grid", "groups", "plan", "units"},
    {"catalog"},
    {"read_problems", "local_raster", "readers"},
    {"cube"},
    {"masks"},
    {"reducers"},
    {"compose"},
    {"io", "io.storage", "io.layout", "io.lock", "io.cog", "io.zarr_store", "io.stac_out", "io.predictions"},
    {"ledger", "cluster"},
    {"batch", "inference", "inference.blocks", "inference.model", "inference.pipeline", "inference.sidecar",
     "plot", "testing", "testing.sample", "testing.latency_proxy", "testing.range_server",
     "training", "training.build", "training.labels", "training.loaders", "training.sampling", "training.split",
     "training.store", "stats"},
    {"pxm", "pxm.archives", "pxm.checks", "pxm.color", "pxm.encode", "pxm.interrupts", "pxm.manifest", "pxm.pyramid",
     "pxm.renderer", "pxm.sources", "pxm.tiles", "pxm.warp", "pxm.cli"},
    {"serve", "serve.app", "serve.run", "serve.tilesets"},  # the map: reads run outputs and PXM tilesets
    {"cli", ""},  # "" is the package root (its public API names everything)
]
RANK = {name: k for k, stage in enumerate(STAGES) for name in stage}
#: What the PXM wing may use of the rest (DESIGN §2: it shares cluster.py and the I/O helpers).
PXM_SHARES = {"errors", "cluster", "jsontext", "signing"} | {n for n in RANK if n.startswith("io")}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__")
        out[name] = path
    return out


def _imports(path: Path, name: str) -> set[str]:
    """Modules of the package that ``path`` imports (function-local imports included)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
                   for n in ast.walk(node)}
    package = name.rsplit(".", 1)[0] if "." in name else ""
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                base = ".".join(filter(None, [package, base]))
            elif base == "pixels_xr" or base.startswith("pixels_xr."):
                base = base.removeprefix("pixels_xr").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from pixels_xr import reducers` imports the module reducers
                sub = ".".join(filter(None, [base, alias.name]))
                found.add(sub if sub in RANK else base)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "pixels_xr" or alias.name.startswith("pixels_xr."):
                    found.add(alias.name.removeprefix("pixels_xr").lstrip("."))
    return found - {name}


def test_every_module_has_a_stage() -> None:
    assert sorted(set(_modules()) - set(RANK)) == []


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_imports_from_a_later_stage(name: str) -> None:
    later = {dep for dep in _imports(_modules()[name], name) if dep in RANK and RANK[dep] > RANK[name]}
    assert not later, f"{name} (stage {RANK[name]}) imports later stages: {sorted(later)}"


@pytest.mark.parametrize("name", sorted(n for n in _modules() if n.startswith("pxm")))
def test_pxm_wing_shares_only_cluster_and_io(name: str) -> None:
    outside = {d for d in _imports(_modules()[name], name) if not d.startswith("pxm") and d not in PXM_SHARES}
    assert not outside, f"{name} uses {sorted(outside)}"
