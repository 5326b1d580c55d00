"""How one observation or value per pixel is chosen: the registry of modes' and composite methods' rules.

Data, not code paths (as ``platforms``): each :class:`Method` says which reduction it is (``latest`` clear
observation, the first clear one in an ``order``, the best by a ``score``, or the ``median``), what it
needs (a cloud mask, bands) and which original pixels name it answers to. ``config`` validates against these
requirements; ``compose`` runs the kernel of the method's ``reduction`` on blocks. Adding a method that
reuses a reduction is one entry here; a new reduction is one kernel in ``reducers`` and one entry in
``compose``'s table of reductions. Nothing here imports a later stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Reduction = Literal["latest", "first_by_order", "best_by_score", "median"]
Order = Literal["time", "cloud_cover"]
Score = Literal["s2_quality", "qa_pixel_class"]


@dataclass(frozen=True)
class Method:
    """One rule for choosing a pixel's value from the clear observations of a time step."""

    name: str
    reduction: Reduction
    description: str
    order: Order | None = None  # first_by_order: least cloudy first (cloud_cover) or oldest first (time)
    score: Score | None = None  # best_by_score: how an observation is ranked (ties → newest)
    needs_mask: bool = False  # the method ranks by a mask band: ``mask: "none"`` cannot serve it
    needs_bands: tuple[str, ...] = ()  # common band names the score reads
    original_names: tuple[str, ...] = ()  # the original pixels' ``composite_method`` values
    picks: bool = True  # one observation per pixel (then ``source_time`` says which)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("latest_pixel", "latest", "the newest clear observation (mode latest_pixel)"),
    Method("cloud_sorted_pixel", "first_by_order", "the first clear observation, least cloudy scene first "
           "(mode cloud_sorted_pixel)", order="cloud_cover"),
    Method("all_first", "first_by_order", "same-day tiles fused, first clear in time order (mode all)",
           order="time"),
    Method("median", "median", "per-band median of the clear observations' reflectance", picks=False),
    Method("first_clear", "first_by_order", "the first clear observation by SCL, least cloudy scene first "
           "(the original's SCL method)", order="cloud_cover", needs_mask=True, original_names=("SCL",)),
    Method("quality", "best_by_score", "the best observation by SCL class rank, then NDVI (the original's "
           "FULL method)", score="s2_quality", needs_mask=True, needs_bands=("red", "nir"),
           original_names=("FULL",)),
    Method("qa_pixel", "best_by_score", "clear land > water > snow by Landsat QA_PIXEL, newest first",
           score="qa_pixel_class", needs_mask=True, original_names=("QA_PIXEL",)),
)}

#: Names a configuration may give as ``composite_method`` (the modes' own rules are chosen by ``mode``).
COMPOSITE_METHODS = ("median", "first_clear", "quality", "qa_pixel")

#: The original pixels' ``composite_method`` values → ours.
ORIGINAL_NAMES = {alias: m.name for m in METHODS.values() for alias in m.original_names}


def method_for(mode: str, composite_method: str | None) -> Method:
    """The rule of a mode (``all``, ``latest_pixel``, ``cloud_sorted_pixel``) or of a composite method."""
    if mode == "all":
        return METHODS["all_first"]
    if mode == "composite":
        return METHODS[composite_method or "median"]
    return METHODS[mode]
