"""Units of a run and why a re-run recomputes them: fingerprints of what each unit is made from.

A unit is one feature × time bin (× acquisition day in mode ``all``). Its fingerprint hashes the items the
search gives for it — each item's id with its processing version (``s2:processing_baseline`` and the
``updated``/generation/created stamp: a reprocessed scene keeps its tile and day but changes this) — with
the output's identity (config hash) and ``OUTPUT_VERSION``, the version of what this software writes for
the same inputs. The ledger keeps the fingerprint and the item versions with each finished unit, so a
re-run searches again and classifies every unit (``classify``):

- ``done``: same fingerprint — nothing to do;
- ``stale``: items added, removed or reprocessed since (the reason names them), or the bin's end moved
  (the partial last bin of a rolling range);
- ``retry``: last written with assets that could not be read (they are tried again);
- ``new``: a bin the output does not have yet (the range grew, a dynamic date moved, a new acquisition
  day) or one an interrupted run did not finish;
- ``gone``: a bin the output has that is now outside the range: kept and reported, never deleted.

Units are identified by their start day (the time coordinate), so a partial last bin that grows keeps its
place. Items are fingerprinted from the search, before any read: planning a re-run (``--plan``) costs
searches only. A catalog that publishes no update stamp gives unchanged versions, so only added or removed
items make a unit stale there (an asset's ETag is not fetched: it would cost a request per asset per night).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pixels_xr.config import PixelsConfig
from pixels_xr.features import Feature
from pixels_xr.items import ParsedItem
from pixels_xr.timeslices import assign_bins

__all__ = ["OUTPUT_VERSION", "UnitPlan", "UnitState", "classify", "fingerprint", "start_of", "unit_sources",
           "version_stamp"]

#: Version of the bytes this software writes for the same inputs; raising it makes every unit stale.
OUTPUT_VERSION = "1"

UnitState = Literal["done", "new", "stale", "retry", "gone"]
#: The states a run computes.
TO_COMPUTE: frozenset[str] = frozenset({"new", "stale", "retry"})


@dataclasses.dataclass(frozen=True)
class UnitPlan:
    """One unit's classification: its label, state, why, and (for current units) its fingerprint and the
    versions of its items."""

    label: str
    state: UnitState
    reason: str = ""
    fingerprint: str = ""
    items: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def computes(self) -> bool:
        return self.state in TO_COMPUTE

    def to_dict(self) -> dict[str, str]:
        return {"unit": self.label, "state": self.state, "reason": self.reason}


def start_of(label: str) -> str:
    """A unit's identity: the start day of its label (``2021-01-01/2021-01-31`` → ``2021-01-01``)."""
    return label.split("/", 1)[0]


def version_stamp(item: ParsedItem) -> str:
    """An item's processing version as one string (baseline and update stamp)."""
    baseline, stamp = item.version
    return f"{baseline:g}|{stamp}"


def unit_sources(items: Sequence[ParsedItem], config: PixelsConfig,
                 feature: Feature) -> dict[str, dict[str, str]]:
    """The search's items behind each unit (label → item id → version), in time order: every bin of a
    binned mode (empty ones too), or every acquisition day in mode ``all``."""
    if config.mode == "all":
        out: dict[str, dict[str, str]] = {}
        for item in sorted(items, key=lambda i: (i.datetime, i.id)):
            out.setdefault(item.datetime.date().isoformat(), {})[item.id] = version_stamp(item)
        return dict(sorted(out.items()))
    bins = config.bins(feature)
    out = {b.label: {} for b in bins}
    for item, k in zip(items, assign_bins([i.datetime.date() for i in items], bins)):
        if k >= 0:
            out[bins[k].label][item.id] = version_stamp(item)
    return out


def fingerprint(items: Mapping[str, str], identity: str) -> str:
    """The fingerprint of a unit made from ``items`` (id → version) for an output ``identity``."""
    return _fingerprint(tuple(sorted(items.items())), identity)


@functools.lru_cache(maxsize=4096)
def _fingerprint(items: tuple[tuple[str, str], ...], identity: str) -> str:
    """Computed once per item set: nearby features share their bins' items (a group's members, every
    feature of a re-run), and the JSON and hash were a tenth of a re-run's planning."""
    text = json.dumps({"items": [list(pair) for pair in items], "identity": identity, "format": OUTPUT_VERSION})
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def classify(current: Mapping[str, Mapping[str, str]], recorded: Mapping[str, Mapping[str, Any]],
             known: Sequence[str], identity: str) -> list[UnitPlan]:
    """Every unit's state: ``current`` (``unit_sources``), ``recorded`` (label → the ledger's record of a
    finished unit), ``known`` (the labels the output already has, its time axis). Current units come
    first, in order, then the gone ones."""
    by_start = {start_of(label): label for label in [*known, *recorded]}
    plans = []
    for label, items in current.items():
        fp = fingerprint(items, identity)
        old_label = by_start.pop(start_of(label), None)
        record = recorded.get(old_label) if old_label is not None else None
        if record is None:
            reason = "not written yet" if old_label is not None else "new bin" if "/" in label else "new day"
            plans.append(UnitPlan(label, "new", reason, fp, dict(items)))
            continue
        plans.append(_compare(label, old_label, record, items, fp))
    plans += [UnitPlan(label, "gone", "outside the range now: kept") for label in by_start.values()]
    return plans


def _compare(label: str, old_label: str | None, record: Mapping[str, Any], items: Mapping[str, str],
             fp: str) -> UnitPlan:
    skipped = list(record.get("skipped") or [])
    if skipped:
        return UnitPlan(label, "retry", f"{len(skipped)} items had unreadable assets: {', '.join(skipped[:3])}",
                        fp, dict(items))
    if "fingerprint" not in record:  # written before fingerprints: trusted as before
        return UnitPlan(label, "done", "recorded without a fingerprint", record.get("fingerprint", ""),
                        dict(items))
    if old_label != label:
        return UnitPlan(label, "stale", f"bin end moved ({old_label} → {label})", fp, dict(items))
    if record["fingerprint"] == fp:
        return UnitPlan(label, "done", "", fp, dict(items))
    before: dict[str, str] = dict(record.get("items") or {})
    added = sorted(set(items) - set(before))
    removed = sorted(set(before) - set(items))
    reprocessed = sorted(i for i in set(items) & set(before) if items[i] != before[i])
    parts = [f"{what} {', '.join(ids[:3])}{' …' if len(ids) > 3 else ''}" for what, ids in
             (("added", added), ("removed", removed), ("reprocessed", reprocessed)) if ids]
    return UnitPlan(label, "stale", "; ".join(parts) or "config or software changed", fp, dict(items))
