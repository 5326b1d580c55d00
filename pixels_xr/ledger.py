"""The batch run's ledger next to its output: which units (feature × time bin) are complete, and the report.

Everything lives under ``OUT/.pixels_xr/`` (a name no feature id can take):

- ``run.json``: the config (and its hash), output format and software that own this output;
- ``units/<feature>/<bin label>.json``: one small object per finished unit, written only after the unit's
  data is fully written — a unit without a marker is never trusted and is redone by the next run; it
  holds the unit's fingerprint and the versions of its items (``units``), so a re-run knows what changed;
- ``units/<feature>/_template.json``: the feature's template (time labels) exists and may be filled; once
  a run has finished the feature it also holds a copy of every unit record (``units``): a re-run reads that
  one file instead of one per unit, for as long as the folder lists exactly those units (a unit recorded or
  lost since makes the folder differ, and the records are read one by one, as before);
- ``report.json``: the last run's report (per feature: status, stage, error).

One object per unit (instead of one appended file) keeps markers atomic on object stores and lets many
writers record progress without coordination.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from pixels_xr._version import __version__
from pixels_xr.errors import OutputError
from pixels_xr.io import storage
from pixels_xr.io.layout import MANIFEST_DIR, label_of, safe_label
from pixels_xr.io.lock import LOCK_NAME
from pixels_xr.signing import redact, redact_json, redact_obj

TEMPLATE = "_template"


def config_hash(config_json: str, output_format: str) -> str:
    """A short stable hash of what determines the output's content."""
    return hashlib.sha256(f"{output_format}\n{config_json}".encode()).hexdigest()[:16]


@dataclass
class RunManifest:
    """Progress records of one output location."""

    out: str
    config_json: str
    output_format: str
    hash: str = field(init=False)
    #: per thread, the last template read (feature id, ledger generation, document): a classification
    #: reads a feature's template for its labels, its sources and its unit records
    _read: threading.local = field(init=False, repr=False, compare=False, default_factory=threading.local)
    #: bumped by every write of the ledger: a kept template read is only used within one generation
    _generation: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        # secrets (a token in the catalog URL) are neither recorded nor part of the identity: a rotated
        # token leaves the output resumable
        self.config_json = redact_json(self.config_json)
        self.hash = config_hash(self.config_json, self.output_format)

    @property
    def root(self) -> str:
        return storage.join(self.out, MANIFEST_DIR)

    def _unit(self, feature_id: str, label: str) -> str:
        return storage.join(self.root, "units", feature_id, f"{safe_label(label)}.json")

    def check_location(self) -> None:
        """Refuse to write where the user has other files: ``out`` must not exist, be empty, or be an
        output of ours (its ``run.json`` is there). A symlinked ledger folder is refused (it would send
        markers, locks and deletions elsewhere)."""
        out = self.out
        if not storage.is_remote(out):
            path = storage.local_path(out)
            if os.path.lexists(path) and not os.path.isdir(path):
                raise OutputError("exists and is not a folder; choose a new output location", out)
            if os.path.islink(os.path.join(path, MANIFEST_DIR)):
                raise OutputError(f"{MANIFEST_DIR} is a symbolic link; refusing to follow it", out)
        names = [n for n in storage.list_names(out) if n != MANIFEST_DIR]
        ours = storage.exists(storage.join(self.root, "run.json"))
        if names and not ours:
            shown = ", ".join(names[:3]) + (" …" if len(names) > 3 else "")
            raise OutputError(f"is not empty ({shown}) and is not a pixels_xr output; write into an empty "
                              "or new location (nothing was changed)", out)

    def features(self) -> list[str]:
        """Ids of the features this output's ledger knows (each owns ``OUT/<id>``)."""
        return [n for n in storage.list_names(storage.join(self.root, "units")) if not n.startswith(".")]

    def open(self, *, overwrite: bool, read_only: bool = False) -> None:
        """Claim the output for this config: refuse another config's output unless ``overwrite``, which
        first deletes every feature output the old ledger knows (so no old-config group stays readable
        beside new ones), then the ledger; nothing the ledger does not know is touched."""
        self.check_location()
        existing = storage.read_bytes(storage.join(self.root, "run.json"))
        if read_only and (overwrite or existing is None):
            raise OutputError("the output's storage is read-only" + (", so --overwrite cannot work" if overwrite
                              else " and holds no previous run"), self.out)
        if existing is not None and not overwrite:
            try:
                previous = json.loads(existing).get("config_hash")
            except (json.JSONDecodeError, AttributeError):
                previous = None
            if previous != self.hash:
                raise OutputError("the output was written with another config or format; use --overwrite "
                                  "or another --out", self.out)
        if overwrite and existing is not None:
            for feature_id in self.features():
                storage.remove_tree(storage.join(self.out, feature_id))
            storage.remove_tree(storage.join(self.out, "stac"))
            for name in storage.list_names(self.root):
                if name != LOCK_NAME:  # the lock of this very run stays
                    storage.remove_tree(storage.join(self.root, name))
        self.read_only = read_only
        if read_only:  # nothing can be recorded: the run may only find every unit done
            return
        record = {"config": json.loads(self.config_json), "config_hash": self.hash, "format": self.output_format,
                  "software": f"pixels_xr {__version__}", "started": _now()}
        storage.write_bytes(storage.join(self.root, "run.json"), json.dumps(record, indent=1).encode())

    def done(self, feature_id: str) -> set[str]:
        """Labels of the finished units of a feature."""
        names = storage.list_names(storage.join(self.root, "units", feature_id))
        return {n[:-5] for n in names if n.endswith(".json") and not n.startswith(TEMPLATE)}

    def done_labels(self, feature_id: str) -> list[str]:
        """Bin labels (``start/end``, or the day) of the finished units of a feature, in order."""
        return sorted(label_of(name) for name in self.done(feature_id))

    def _template_doc(self, feature_id: str) -> dict[str, Any] | None:
        kept = getattr(self._read, "doc", None)
        if kept is not None and kept[:2] == (feature_id, self._generation):
            return kept[2]
        data = storage.read_bytes(storage.join(self.root, "units", feature_id, f"{TEMPLATE}.json"))
        doc = None if data is None else json.loads(data)
        self._read.doc = (feature_id, self._generation, doc)
        return doc

    def _changed(self) -> None:
        self._generation += 1

    def template(self, feature_id: str) -> list[str] | None:
        """The time labels the feature's template was written with (None: no template yet)."""
        doc = self._template_doc(feature_id)
        return None if doc is None else list(doc["labels"])

    read_only: bool = False

    def record_template(self, feature_id: str, labels: list[str], sources: dict[str, str],
                        units: dict[str, dict[str, Any]] | None = None) -> None:
        """Record the feature's time labels and its source items (id → self href, redacted: no tokens) for
        the STAC output; with ``units``, the copy of every unit record of the feature (label → record, as
        ``write_unit`` wrote them) that ``unit_records`` may read instead of the records."""
        sources = {k: redact(v) for k, v in sources.items()}
        doc: dict[str, Any] = {"labels": labels, "sources": sources, "written": _now()}
        if units is not None:
            doc["units"] = units
        self._changed()
        storage.write_bytes(storage.join(self.root, "units", feature_id, f"{TEMPLATE}.json"),
                            json.dumps(doc).encode())

    def sources(self, feature_id: str) -> dict[str, str]:
        """Source item id → href recorded with the feature's template."""
        doc = self._template_doc(feature_id)
        return {} if doc is None else dict(doc.get("sources", {}))

    def forget(self, feature_id: str) -> None:
        """Drop every record of a feature (its template changed: it is rewritten from scratch)."""
        self._changed()
        storage.remove_tree(storage.join(self.root, "units", feature_id))

    def unit_records(self, feature_id: str) -> dict[str, dict[str, Any]]:
        """The records of a feature's finished units by label (fingerprint, item versions, skipped items:
        ``units``), read a few at a time; an unreadable record counts as not finished."""
        import concurrent.futures

        names = [n for n in storage.list_names(storage.join(self.root, "units", feature_id))
                 if n.endswith(".json") and not n.startswith(TEMPLATE)]
        copy = (self._template_doc(feature_id) or {}).get("units") if names else None
        if isinstance(copy, dict) and sorted(names) == sorted(f"{safe_label(label)}.json" for label in copy):
            return {label: dict(record) for label, record in copy.items()}

        def read(name: str) -> dict[str, Any] | None:
            data = storage.read_bytes(storage.join(self.root, "units", feature_id, name))
            try:
                record = json.loads(data) if data is not None else None
            except json.JSONDecodeError:
                return None
            return record if isinstance(record, dict) else None

        if len(names) > 4 and storage.is_remote(self.out):
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                records = list(pool.map(read, names))
        else:
            records = [read(n) for n in names]
        return {str(r.get("bin") or label_of(n[:-5])): r for n, r in zip(names, records) if r is not None}

    def forget_unit(self, feature_id: str, label: str) -> None:
        """Drop one unit's record (it is rewritten, possibly under a new label)."""
        self._changed()
        storage.remove_tree(self._unit(feature_id, label))

    def unit_record(self, feature_id: str, label: str, **info: Any) -> dict[str, Any]:
        """The record of a finished unit (``write_unit`` writes it)."""
        return {"feature": feature_id, "bin": label, "config_hash": self.hash, "finished": _now(), **info}

    def write_unit(self, feature_id: str, label: str, record: dict[str, Any]) -> None:
        """Record a finished unit: written only after its data is."""
        self._changed()
        storage.write_bytes(self._unit(feature_id, label), json.dumps(record).encode())

    def write_report(self, report: dict[str, Any]) -> str:
        url = storage.join(self.root, "report.json")
        plain = json.loads(json.dumps(report, default=str))
        storage.write_bytes(url, json.dumps(redact_obj(plain), indent=1).encode())  # errors may quote URLs
        return url


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
