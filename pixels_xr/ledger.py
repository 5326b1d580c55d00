"""The batch run's ledger next to its output: which units (feature × time bin) are complete, and the report.

Everything lives under ``OUT/.pixels_xr/`` (a name no feature id can take):

- ``run.json``: the config (and its hash), output format and software that own this output;
- ``jobs/<seq>-<nonce>.json``: the records of features finished whole together (one object per batch of
  finished jobs, however many features and units it holds): per feature its time labels, its source items
  and the record of every unit (fingerprint, item versions, skipped items), written only after all their
  data is written. This is how a new feature is recorded: 10,000 fields finished in 100 batches are 100
  objects, not 130,000 (one per unit and one template per feature), which on an object store is as many
  PUTs fewer, and a re-run reads 100 objects instead of 10,000 templates;
- ``units/<feature>/``: a feature recorded or changed one unit at a time (COGs, a feature's own region
  writes, an incremental run updating some bins): ``<bin label>.json`` per finished unit, written only
  after the unit's data, and ``_template.json``, the feature's time labels and sources with a copy of its
  unit records (``units``). The copy is the whole truth when it says ``complete`` (written after every
  unit of the run was); otherwise unit files override it label by label. Templates written before the
  ``complete`` flag existed are trusted only while the folder lists exactly their units, as then;
- ``report.json``: the last run's report (per feature: status, stage, error).

A feature's newest document wins: each carries ``seq`` (nanoseconds, increasing within a run), so a
template written after a job record (an incremental update, or a rebuild's ``forgotten`` mark) supersedes
it, and a job record after a template supersedes that. A unit without a record is never trusted and is
redone. Every object is written whole (temp + rename locally, one PUT remotely): markers stay atomic on
object stores and nothing is ever appended.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pixels_xr._version import __version__
from pixels_xr.errors import OutputError
from pixels_xr.io import storage
from pixels_xr.io.layout import MANIFEST_DIR, label_of, safe_label
from pixels_xr.io.lock import LOCK_NAME
from pixels_xr.signing import redact, redact_json, redact_obj

TEMPLATE = "_template"
JOBS = "jobs"


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
    _last_seq: int = field(init=False, repr=False, compare=False, default=0)
    _folder_names: set[str] | None = field(init=False, repr=False, compare=False, default=None)
    _job_entries: dict[str, dict[str, Any]] | None = field(init=False, repr=False, compare=False, default=None)
    _lock: threading.Lock = field(init=False, repr=False, compare=False, default_factory=threading.Lock)

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
        return sorted({*self.features_in_folders(), *self._jobs()})

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
            self._folder_names, self._job_entries = set(), {}
            self._changed()
        self.read_only = read_only
        if read_only:  # nothing can be recorded: the run may only find every unit done
            return
        record = {"config": json.loads(self.config_json), "config_hash": self.hash, "format": self.output_format,
                  "software": f"pixels_xr {__version__}", "started": _now()}
        storage.write_bytes(storage.join(self.root, "run.json"), json.dumps(record, indent=1).encode())

    def done_labels(self, feature_id: str) -> list[str]:
        """Bin labels (``start/end``, or the day) of the finished units of a feature, in order."""
        return sorted(self.unit_records(feature_id))

    def _seq(self) -> int:
        """An increasing stamp for the next document (``seq``: the newest document of a feature wins): above
        every stamp this ledger has read, so a host whose clock is behind the last writer's still writes the
        newer document."""
        with self._lock:
            self._last_seq = max(time.time_ns(), self._last_seq + 1)
            return self._last_seq

    def _saw(self, seq: int) -> None:
        with self._lock:
            self._last_seq = max(self._last_seq, seq)

    def _folders(self) -> set[str]:
        """Features with a folder under ``units/`` (listed once, then kept up to date by this ledger)."""
        with self._lock:
            if self._folder_names is None:
                self._folder_names = set(self.features_in_folders())
            return self._folder_names

    def features_in_folders(self) -> list[str]:
        return [n for n in storage.list_names(storage.join(self.root, "units")) if not n.startswith(".")]

    def _jobs(self) -> dict[str, dict[str, Any]]:
        """Feature id → its newest entry in the job records (with the record's ``seq``), read once."""
        with self._lock:
            return self._read_jobs()

    def _read_jobs(self) -> dict[str, dict[str, Any]]:
        if self._job_entries is None:
            folder = storage.join(self.root, JOBS)
            names = [n for n in storage.list_names(folder) if n.endswith(".json") and not n.startswith(".")]
            entries: dict[str, dict[str, Any]] = {}
            for data in _read_all(self.out, [storage.join(folder, n) for n in names]):
                try:
                    doc = json.loads(data) if data is not None else None
                    seq = int(doc["seq"])
                    features = dict(doc["features"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # an unreadable job record: its features are not trusted, and are redone
                self._last_seq = max(self._last_seq, seq)
                for feature_id, entry in features.items():
                    if not (isinstance(entry, dict) and isinstance(entry.get("labels"), list)
                            and isinstance(entry.get("units"), dict)):
                        continue  # a malformed entry: that feature is not trusted
                    if seq >= entries.get(feature_id, {}).get("seq", -1):
                        entries[feature_id] = {**entry, "seq": seq}
            self._job_entries = entries
        return self._job_entries

    def _template_doc(self, feature_id: str) -> dict[str, Any] | None:
        """The feature's newest document: its folder's template or its job entry (``job``: True)."""
        kept = getattr(self._read, "doc", None)
        if kept is not None and kept[:2] == (feature_id, self._generation):
            return kept[2]
        doc = None
        if feature_id in self._folders():
            data = storage.read_bytes(storage.join(self.root, "units", feature_id, f"{TEMPLATE}.json"))
            with contextlib.suppress(json.JSONDecodeError):
                doc = json.loads(data) if data is not None else None
            doc = doc if isinstance(doc, dict) else None
            with contextlib.suppress(TypeError, ValueError):
                self._saw(int(doc.get("seq", 0)) if doc else 0)
        entry = self._jobs().get(feature_id)
        if entry is not None and (doc is None or entry["seq"] > int(doc.get("seq", 0))):
            doc = {**entry, "job": True}
        self._read.doc = (feature_id, self._generation, doc)
        return doc

    def _changed(self) -> None:
        with self._lock:
            self._generation += 1

    def template(self, feature_id: str) -> list[str] | None:
        """The time labels the feature's template was written with (None: no template yet)."""
        doc = self._template_doc(feature_id)
        return None if doc is None or doc.get("forgotten") else list(doc["labels"])

    read_only: bool = False

    def record_template(self, feature_id: str, labels: list[str], sources: dict[str, str],
                        units: dict[str, dict[str, Any]] | None = None, *, complete: bool = False) -> None:
        """Record the feature's time labels and its source items (id → self href, redacted: no tokens) for
        the STAC output, with a copy of unit records (label → record, as ``unit_record`` made them): the
        base that unit files override, or with ``complete`` every record of the feature (no unit file is
        then needed, and none is read)."""
        sources = {k: redact(v) for k, v in sources.items()}
        doc: dict[str, Any] = {"labels": labels, "sources": sources, "written": _now(), "seq": self._seq(),
                               "units": dict(units or {}), "complete": complete}
        self._write_template(feature_id, doc)

    def _write_template(self, feature_id: str, doc: dict[str, Any]) -> None:
        self._changed()
        storage.write_bytes(storage.join(self.root, "units", feature_id, f"{TEMPLATE}.json"),
                            json.dumps(doc).encode())
        self._folders().add(feature_id)

    def record_features(self, features: dict[str, dict[str, Any]]) -> None:
        """Record features finished whole, in one job record: feature id → ``{"labels", "sources",
        "units"}`` (every unit's record) and optionally ``"grid"`` (``stac_out.grid_record``: its STAC item
        can then be made without opening its store); written after all their data is."""
        if not features:
            return
        seq = self._seq()
        entries = {fid: {"labels": list(e["labels"]), "sources": {k: redact(v) for k, v in e["sources"].items()},
                         "units": dict(e["units"]), **({"grid": e["grid"]} if e.get("grid") else {})}
                   for fid, e in features.items()}
        self._changed()
        storage.write_bytes(storage.join(self.root, JOBS, f"{seq:020d}-{uuid.uuid4().hex[:8]}.json"),
                            json.dumps({"seq": seq, "written": _now(), "features": entries}).encode())
        jobs = self._jobs()
        for fid, entry in entries.items():
            jobs[fid] = {**entry, "seq": seq}

    def grid(self, feature_id: str) -> dict[str, Any] | None:
        """The grid a job record holds for the feature (None: recorded otherwise, or without one)."""
        doc = self._template_doc(feature_id)
        return doc.get("grid") if doc is not None and doc.get("job") else None

    def sources(self, feature_id: str) -> dict[str, str]:
        """Source item id → href recorded with the feature's template."""
        doc = self._template_doc(feature_id)
        return {} if doc is None else dict(doc.get("sources", {}))

    def forget(self, feature_id: str) -> None:
        """Drop every record of a feature (its template changed: it is rewritten from scratch). A feature
        a job record holds is marked ``forgotten`` (job records are never rewritten)."""
        self._changed()
        if feature_id in self._folders():
            storage.remove_tree(storage.join(self.root, "units", feature_id))
            self._folders().discard(feature_id)
        if feature_id in self._jobs():
            self._write_template(feature_id, {"forgotten": True, "written": _now(), "seq": self._seq()})

    def unit_records(self, feature_id: str) -> dict[str, dict[str, Any]]:
        """The records of a feature's finished units by label (fingerprint, item versions, skipped items:
        ``units``); an unreadable record counts as not finished."""
        doc = self._template_doc(feature_id)
        if doc is not None and (doc.get("job") or doc.get("forgotten")):
            return {label: dict(record) for label, record in doc.get("units", {}).items()}
        if feature_id not in self._folders():
            return {}
        copy = (doc or {}).get("units")
        if isinstance(copy, dict) and doc.get("complete"):
            return {label: dict(record) for label, record in copy.items()}
        names = [n for n in storage.list_names(storage.join(self.root, "units", feature_id))
                 if n.endswith(".json") and not n.startswith(TEMPLATE)]
        if isinstance(copy, dict) and "complete" not in doc and names and \
                sorted(names) == sorted(f"{safe_label(label)}.json" for label in copy):
            return {label: dict(record) for label, record in copy.items()}  # a template of an earlier version
        current = isinstance(copy, dict) and "complete" in doc  # a template of this version: its base
        base = dict(copy) if current else {}
        # unit files override the base only when written after it: an older file's record is in the base
        # already, or was superseded (a job record) before the base was written
        since = int(doc.get("seq", 0)) if current else -1
        urls = [storage.join(self.root, "units", feature_id, n) for n in names]
        for name, data in zip(names, _read_all(self.out, urls)):
            try:
                record = json.loads(data) if data is not None else None
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and int(record.get("seq", 0)) > since:
                base[str(record.get("bin") or label_of(name[:-5]))] = record
        return {label: dict(record) for label, record in base.items()}

    def forget_unit(self, feature_id: str, label: str) -> None:
        """Drop one unit's record (it is rewritten, possibly under a new label)."""
        self._changed()
        storage.remove_tree(self._unit(feature_id, label))

    def unit_record(self, feature_id: str, label: str, **info: Any) -> dict[str, Any]:
        """The record of a finished unit (``write_unit`` or ``record_features`` writes it)."""
        return {"feature": feature_id, "bin": label, "config_hash": self.hash, "finished": _now(), **info}

    def write_unit(self, feature_id: str, label: str, record: dict[str, Any]) -> None:
        """Record a finished unit: written only after its data is (stamped: ``unit_records``)."""
        self._changed()
        record["seq"] = self._seq()
        storage.write_bytes(self._unit(feature_id, label), json.dumps(record).encode())
        self._folders().add(feature_id)

    def write_report(self, report: dict[str, Any]) -> str:
        url = storage.join(self.root, "report.json")
        plain = json.loads(json.dumps(report, default=str))
        storage.write_bytes(url, json.dumps(redact_obj(plain), indent=1).encode())  # errors may quote URLs
        return url


def _read_all(out: str, urls: list[str]) -> list[bytes | None]:
    """The bytes at ``urls`` (None where nothing is), several at a time on an object store."""
    if len(urls) > 4 and storage.is_remote(out):
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(storage.read_bytes, urls))
    return [storage.read_bytes(url) for url in urls]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
