"""The ledger's documents: job records for features finished whole, templates and unit files for features
changed unit by unit, the newest document of a feature winning, and what an unreadable record means."""

from __future__ import annotations

import json
from pathlib import Path

from pixels_xr.io.layout import MANIFEST_DIR
from pixels_xr.ledger import JOBS, RunManifest


def _ledger(out: Path) -> RunManifest:
    ledger = RunManifest(str(out), '{"mode": "latest_pixel"}', "zarr3")
    ledger.open(overwrite=False)
    return ledger


def _reread(out: Path) -> RunManifest:
    """What the next run reads: a new ledger object, nothing kept in memory."""
    return RunManifest(str(out), '{"mode": "latest_pixel"}', "zarr3")


def _record(ledger: RunManifest, fid: str, label: str, fp: str) -> dict:
    return ledger.unit_record(fid, label, fingerprint=fp, items={"S2A_1": "2021-11-02"}, skipped=[])


A, B = "2021-11-01/2021-11-30", "2021-12-01/2021-12-31"


def test_features_finished_together_are_one_job_record(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ledger = _ledger(out)
    ledger.record_features({fid: {"labels": [A, B], "sources": {"S2A_1": f"https://stac/{fid}?token=x"},
                                  "units": {A: _record(ledger, fid, A, "a"), B: _record(ledger, fid, B, "b")}}
                            for fid in ("f1", "f2", "f3")})
    assert [p.parent.name for p in (out / MANIFEST_DIR).rglob("*.json") if p.name != "run.json"] == [JOBS]
    again = _reread(out)
    assert again.features() == ["f1", "f2", "f3"]
    assert again.template("f2") == [A, B] and again.done_labels("f2") == [A, B]
    assert again.unit_records("f3")[B]["fingerprint"] == "b"
    assert again.sources("f1") == {"S2A_1": "https://stac/f1"}  # redacted, as templates are


def test_the_newest_document_of_a_feature_wins(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ledger = _ledger(out)
    ledger.record_features({"f1": {"labels": [A, B], "sources": {}, "units": {
        A: _record(ledger, "f1", A, "a"), B: _record(ledger, "f1", B, "b")}}})
    # an incremental run: B is recomputed; its template (the other records as the base) comes first
    ledger.record_template("f1", [A, B], {}, {A: ledger.unit_records("f1")[A]})
    assert _reread(out).unit_records("f1").keys() == {A}  # died here: B is not done, A still is
    ledger.write_unit("f1", B, _record(ledger, "f1", B, "b2"))
    assert {k: r["fingerprint"] for k, r in _reread(out).unit_records("f1").items()} == {A: "a", B: "b2"}
    ledger.record_template("f1", [A, B], {}, _reread(out).unit_records("f1"), complete=True)
    (out / MANIFEST_DIR / "units" / "f1" / "2021-12-01_2021-12-31.json").unlink()  # not read any more
    assert {k: r["fingerprint"] for k, r in _reread(out).unit_records("f1").items()} == {A: "a", B: "b2"}
    # rebuilt from scratch: forgotten, then recorded whole again by a later job record
    ledger.forget("f1")
    assert _reread(out).template("f1") is None and _reread(out).unit_records("f1") == {}
    ledger.record_features({"f1": {"labels": [A], "sources": {}, "units": {A: _record(ledger, "f1", A, "c")}}})
    assert _reread(out).template("f1") == [A] and _reread(out).unit_records("f1")[A]["fingerprint"] == "c"


def test_a_forgotten_feature_of_a_job_record_stays_forgotten(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ledger = _ledger(out)
    ledger.record_features({fid: {"labels": [A], "sources": {}, "units": {A: _record(ledger, fid, A, "a")}}
                            for fid in ("f1", "f2")})
    _reread(out).forget("f2")  # job records are never rewritten: the feature's folder says so
    again = _reread(out)
    assert again.template("f2") is None and again.unit_records("f2") == {}
    assert again.template("f1") == [A]


def test_an_unreadable_job_record_is_not_trusted(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ledger = _ledger(out)
    ledger.record_features({"f1": {"labels": [A], "sources": {}, "units": {A: _record(ledger, "f1", A, "a")}}})
    ledger.record_features({"f2": {"labels": [A], "sources": {}, "units": {A: _record(ledger, "f2", A, "a")}}})
    second = sorted((out / MANIFEST_DIR / JOBS).glob("*.json"))[1]
    second.write_bytes(second.read_bytes()[:40])  # cut short (a store that lost its tail)
    again = _reread(out)
    assert again.template("f1") == [A] and again.template("f2") is None and again.unit_records("f2") == {}


def test_templates_of_the_previous_version_are_read_as_then(tmp_path: Path) -> None:
    """Before ``complete``: a template's copy is trusted while the folder lists exactly its units."""
    out = tmp_path / "out"
    ledger = _ledger(out)
    folder = out / MANIFEST_DIR / "units" / "f1"
    folder.mkdir(parents=True)
    records = {A: _record(ledger, "f1", A, "a"), B: _record(ledger, "f1", B, "b")}
    for label, record in records.items():
        (folder / f"{label.replace('/', '_')}.json").write_text(json.dumps(record))
    copy = {**records, B: {**records[B], "fingerprint": "in-copy"}}
    (folder / "_template.json").write_text(json.dumps({"labels": [A, B], "sources": {}, "units": copy}))
    assert _reread(out).unit_records("f1")[B]["fingerprint"] == "in-copy"  # the copy: the folder matches it
    (folder / "2021-12-01_2021-12-31.json").unlink()  # a unit lost since: the files are read
    assert _reread(out).unit_records("f1").keys() == {A}
    assert _reread(out).features() == ["f1"]


def test_a_writer_whose_clock_is_behind_still_writes_the_newer_document(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ledger = _ledger(out)
    ledger.record_features({"f1": {"labels": [A], "sources": {}, "units": {A: _record(ledger, "f1", A, "a")}}})
    record = next((out / MANIFEST_DIR / JOBS).glob("*.json"))
    doc = json.loads(record.read_text())
    doc["seq"] += 10**15  # written by a host whose clock is ~11 days ahead of this one
    record.write_text(json.dumps(doc))
    behind = _reread(out)
    assert behind.template("f1") == [A]
    behind.forget("f1")
    assert _reread(out).template("f1") is None and _reread(out).unit_records("f1") == {}


def test_unit_files_older_than_a_template_do_not_override_its_base(tmp_path: Path) -> None:
    """A unit file left from before a job record must not come back over the template written after it."""
    out = tmp_path / "out"
    ledger = _ledger(out)
    ledger.record_template("f1", [A], {})
    ledger.write_unit("f1", A, _record(ledger, "f1", A, "old"))  # a unit recorded one by one
    ledger.record_features({"f1": {"labels": [A], "sources": {}, "units": {A: _record(ledger, "f1", A, "new")}}})
    again = _reread(out)
    assert again.unit_records("f1")[A]["fingerprint"] == "new"
    again.record_template("f1", [A], {}, again.unit_records("f1"))  # an incremental run's base, then killed
    assert _reread(out).unit_records("f1")[A]["fingerprint"] == "new"
