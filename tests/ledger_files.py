"""A run's ledger read and edited the way tests need: which units are recorded (job records, templates and
unit files together, as a re-run reads them), and records taken out as if the run had died before writing
them (``pixels_xr.ledger`` describes the layout)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pixels_xr.io.layout import MANIFEST_DIR, safe_label
from pixels_xr.ledger import JOBS, TEMPLATE, RunManifest


def recorded(out: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Feature id → label → record of every finished unit the ledger of ``out`` holds."""
    ledger = RunManifest(str(out), "{}", "zarr3")
    return {fid: records for fid in ledger.features() if (records := ledger.unit_records(fid))}


def recorded_units(out: str | Path) -> list[tuple[str, str]]:
    """(feature id, label) of every recorded unit, sorted."""
    return sorted((fid, label) for fid, records in recorded(out).items() for label in records)


def unit_count(out: str | Path) -> int:
    """How many units are recorded; 0 before the ledger exists (readable while a run writes it)."""
    return len(recorded_units(out)) if (Path(out) / MANIFEST_DIR).is_dir() else 0


def drop_units(out: str | Path, lost: list[tuple[str, str]]) -> None:
    """Take the records of ``lost`` (feature id, label) out of every document that holds them."""
    root = Path(out) / MANIFEST_DIR
    by_feature: dict[str, set[str]] = {}
    for fid, label in lost:
        by_feature.setdefault(fid, set()).add(label)
    for path in sorted((root / JOBS).glob("*.json")):
        doc = json.loads(path.read_text())
        for fid, labels in by_feature.items():
            entry = doc["features"].get(fid)
            if entry is not None:
                entry["units"] = {k: v for k, v in entry["units"].items() if k not in labels}
        path.write_text(json.dumps(doc))
    for fid, labels in by_feature.items():
        folder = root / "units" / fid
        template = folder / f"{TEMPLATE}.json"
        if template.exists():
            doc = json.loads(template.read_text())
            doc["units"] = {k: v for k, v in (doc.get("units") or {}).items() if k not in labels}
            template.write_text(json.dumps(doc))
        for label in labels:
            (folder / f"{safe_label(label)}.json").unlink(missing_ok=True)


def drop_feature(out: str | Path, fid: str) -> None:
    """Take every record of feature ``fid`` out of the ledger (job records and its folder)."""
    import shutil

    root = Path(out) / MANIFEST_DIR
    for path in sorted((root / JOBS).glob("*.json")):
        doc = json.loads(path.read_text())
        doc["features"].pop(fid, None)
        path.write_text(json.dumps(doc))
    shutil.rmtree(root / "units" / fid, ignore_errors=True)


def recorded_whole(out: str | Path) -> dict[str, bool]:
    """Feature id → True when one document (its job entry, or a template marked complete) holds every
    record of the feature, including a copy of each unit file on disk, so a re-run reads nothing else."""
    ledger = RunManifest(str(out), "{}", "zarr3")
    whole = {}
    for fid in ledger.features():
        doc = ledger._template_doc(fid) or {}
        copy = doc.get("units", {})
        files = {json.loads(p.read_text())["bin"]: json.loads(p.read_text())
                 for p in (Path(out) / MANIFEST_DIR / "units" / fid).glob("*.json") if not p.name.startswith("_")}
        whole[fid] = bool(doc.get("job") or doc.get("complete")) and bool(copy) and \
            all(copy.get(label) == record for label, record in files.items())
    return whole
