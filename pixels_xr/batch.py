"""Batch runs: every feature of a config searched, built and written on a Dask cluster, resumably.

A *unit* is one feature × one time bin (one acquisition day in mode ``all``). The client plans features a
few at a time (search → lazy Dataset), then submits each feature's pending units in one go while fewer than
``window`` units are in flight, so the graph in flight never holds all features at once and memory stays
bounded however many there are. (One submission per feature: its bins share tasks, and distributed can lose
track of keys shared by computations in flight at the same time.) A new feature's Zarr template is written
by the first task of its job, on a worker, and recorded when the job completes: the client's time per
feature is what limits scaling when the client shares the machine. Each unit is written completely and only
then recorded in the run's ledger (``ledger``; a feature's consecutive pending bins are written by one
job and recorded when it completes). A re-run is incremental: every feature is searched again and each unit
classified against the fingerprint recorded with it (``units``: done, stale, retry, new, gone); only stale,
retry and new units are computed, and a Zarr feature's time axis grows at the end for new bins (bins now
outside the range are kept). When everything is done it writes nothing. Dask retries transient task failures
(``retries``) and reschedules work of lost workers; a unit that still fails marks its feature failed in
the report (feature id, stage, error) while the other features complete.

Outputs: ``zarr`` (one store, a group per feature, see ``io.zarr_store``) or ``cog`` (per feature × bin, see
``io.layout``). A STAC catalog of the outputs is written to ``OUT/stac/catalog.json`` at the end.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import xarray as xr
from distributed import Client

from pixels_xr.catalog import search
from pixels_xr.cluster import ClusterOptions, open_client
from pixels_xr.compose import composite, observations, unit_item_ids
from pixels_xr.config import PixelsConfig
from pixels_xr.errors import ConfigError, OutputError, PixelsError
from pixels_xr.features import Feature, check_id
from pixels_xr.io import storage
from pixels_xr.io.cog import CogLayer, write_cogs
from pixels_xr.io.layout import (
    COG_LAYERS,
    MANIFEST_DIR,
    SOURCE_TIME_NODATA,
    SOURCE_TIME_UNITS,
    CogUnit,
    days_since_epoch,
)
from pixels_xr.io.lock import ReadOnlyOutput, locked
from pixels_xr.io.stac_out import write_output_catalog, zarr_item
from pixels_xr.io.zarr_store import aligned, open_feature, region_write, write_time_axis
from pixels_xr.items import AssetProblem, ParsedItem
from pixels_xr.ledger import RunManifest
from pixels_xr.read_problems import cluster_problems, mark
from pixels_xr.run_cache import run_cache
from pixels_xr.signing import redact
from pixels_xr.units import UnitPlan, classify, start_of, unit_sources

OutputFormat = Literal["zarr", "cog"]
#: Bytes of one row of chunks computed at once when writing a feature's COGs (its bins are grouped to fit).
COG_ROW_BYTES = 256 * 2**20


@dataclass
class FeatureResult:
    """What happened to one feature in a run."""

    id: str
    status: Literal["done", "skipped", "failed", "degraded", "planned"] = "done"
    units_written: int = 0
    units_skipped: int = 0
    stage: str | None = None
    error: str | None = None
    items: int = 0
    #: why the feature has no observations (no item matched, none overlaps its grid): its bins are written
    #: all nodata and flagged ``empty``; in mode ``all`` it has no time slice and nothing is written
    empty_reason: str | None = None
    #: items the search found but a filter removed, by reason (``platform landsat-7``: 12, …)
    items_filtered: dict[str, int] = field(default_factory=dict)
    #: assets found unreadable by the check before the run and left out (``on_asset_error: skip``)
    asset_problems: list[AssetProblem] = field(default_factory=list)
    #: reads that failed after the check (read as nodata): the units are *degraded*, not recorded done
    read_problems: list[dict[str, Any]] = field(default_factory=list)
    #: every unit that is not done, with its state (new, stale, retry: computed; gone: kept) and why
    units: list[dict[str, str]] = field(default_factory=list)


@dataclass
class RunReport:
    """The outcome of ``run_batch`` (also written to ``OUT/.pixels_xr/report.json``)."""

    out: str
    format: str
    features: list[FeatureResult] = field(default_factory=list)
    seconds: float = 0.0
    report_url: str | None = None

    @property
    def ok(self) -> bool:
        """No feature failed and none is degraded (a read failed mid-run: those units are redone next run)."""
        return all(f.status not in {"failed", "degraded"} for f in self.features)

    @property
    def skipped_assets(self) -> int:
        """Assets left out as unreadable (``on_asset_error: skip``) over all features."""
        return sum(len(f.asset_problems) for f in self.features)

    @property
    def units_written(self) -> int:
        return sum(f.units_written for f in self.features)

    @property
    def units_skipped(self) -> int:
        return sum(f.units_skipped for f in self.features)

    def unit_states(self) -> dict[str, int]:
        """How many units of the run are new, stale, retried (computed) and gone (kept)."""
        counts: dict[str, int] = {}
        for f in self.features:
            for u in f.units:
                counts[u["state"]] = counts.get(u["state"], 0) + 1
        return counts

    @property
    def failed(self) -> list[FeatureResult]:
        return [f for f in self.features if f.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "format": self.format, "ok": self.ok, "seconds": round(self.seconds, 3),
                "units_written": self.units_written, "units_skipped": self.units_skipped,
                "features": [asdict(f) for f in self.features]}

    def summary(self) -> str:
        done = sum(f.status == "done" for f in self.features)
        skipped = sum(f.status == "skipped" for f in self.features)
        empty = sum(f.empty_reason is not None for f in self.features)
        reasons: dict[str, int] = {}
        for f in self.features:
            for reason, n in f.items_filtered.items():
                reasons[reason] = reasons.get(reason, 0) + n
        filtered = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items()))
        degraded = sum(f.status == "degraded" for f in self.features)
        states = self.unit_states()
        return (f"{len(self.features)} features: {done} written, {skipped} already complete, "
                f"{len(self.failed)} failed" + (f", {degraded} degraded by read errors" if degraded else "")
                + (f", {empty} without observations" if empty else "")
                + (f", {self.skipped_assets} unreadable assets skipped" if self.skipped_assets else "")
                + f"; {self.units_written} units written, {self.units_skipped} skipped"
                + (f" ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))})" if states else "")
                + (f"; items left out by filters: {filtered}" if filtered else "")
                + f" in {self.seconds:.1f} s → {self.out}")


@dataclass
class _Planned:
    feature: Feature
    result: FeatureResult
    ds: xr.Dataset | None = None
    #: the output's time axis after this run (the ledger's template)
    labels: list[str] = field(default_factory=list)
    #: the labels of ``ds``'s time steps, and the steps to compute (indices into ``ds``)
    unit_labels: list[str] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    #: where each pending step goes on the output's time axis
    at: list[int] = field(default_factory=list)
    #: every unit's classification (``units.classify``), and whether the feature is rewritten from scratch
    units: list[UnitPlan] = field(default_factory=list)
    rebuild: bool = False
    #: a grown partial bin's new label → the label it was written under
    replaces: dict[str, str] = field(default_factory=dict)
    #: items left out by the asset check (a unit made without them is retried next run)
    skipped: set[str] = field(default_factory=set)
    #: Zarr format of a template still to write (by the feature's first job; recorded once it completes)
    template: int | None = None
    sources: dict[str, str] = field(default_factory=dict)
    #: ids of the items behind each unit, by label (the COG tags' ``items``)
    unit_items: dict[str, list[str]] = field(default_factory=dict)
    #: asset hrefs the feature reads, and the scheduler's clock when its job was submitted (read problems
    #: received after it on those hrefs make it degraded)
    hrefs: set[str] = field(default_factory=set)
    submitted: float = 0.0


def run_batch(config: PixelsConfig, features: Sequence[Feature], out: str, *, cluster: str | None = "local",
              cluster_options: ClusterOptions | dict | None = None, client: Client | None = None,
              output_format: OutputFormat = "zarr", zarr_format: int = 3, overwrite: bool = False,
              window: int | None = None, retries: int = 2, progress: bool = True,
              on_unit: Callable[[str, str], None] | None = None, plan_only: bool = False) -> RunReport:
    """Collect and write every feature into ``out``; resumable and incremental, see the module docstring.

    ``plan_only`` searches and classifies every unit (``FeatureResult.units``: new, stale, retry, gone and
    why) and writes nothing: no cluster, no lock, no ledger change.

    ``client`` reuses a connected client (``cluster`` is then ignored); a new feature is submitted while
    fewer than ``window`` units are in flight (default: 4 × the cluster's threads, at least 16: a feature's
    bins go in one job, and a second feature queued behind it keeps the workers busy through its tail);
    ``on_unit(feature_id, label)`` is called after each unit is recorded (progress hooks, tests).
    """
    if output_format not in ("zarr", "cog"):
        raise OutputError(f"unknown format {output_format!r}; use zarr or cog", "format")
    if window is not None and window < 1:
        raise ConfigError(f"must be at least 1, got {window}", "window")
    out = storage.check_url(out) if storage.is_remote(out) else os.path.abspath(storage.local_path(out))
    seen: set[str] = set()
    for feature in features:  # ids become paths and keys: checked here too, not only by load_features
        check_id(feature.id, f"feature {feature.id!r}")
        if feature.id in seen:
            raise ConfigError(f"duplicate feature id {feature.id!r}", "features")
        seen.add(feature.id)
    manifest = RunManifest(out, config.output_identity, f"{output_format}{zarr_format}")
    manifest.check_location()  # before a cluster starts: a refused output costs nothing
    started = time.perf_counter()
    report = RunReport(out, output_format)
    if plan_only:
        return _plan_run(config, features, manifest, report, output_format, zarr_format, overwrite, started)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locked(out, MANIFEST_DIR))  # one writer per output (stale-lock rule: io.lock)
            read_only = False
        except ReadOnlyOutput:  # a finished output on read-only storage may still be re-run as a no-op
            read_only = True
        stack.enter_context(run_cache())  # local catalog parsed and asset headers checked once per run
        if client is None:
            options = cluster_options if cluster_options is not None else config.cluster
            client = stack.enter_context(open_client(cluster, options, quiet=not progress))
        manifest.open(overwrite=overwrite, read_only=read_only)
        threads = sum(client.nthreads().values()) or 1
        window = window or max(16, 4 * threads)
        bar = stack.enter_context(_progress(len(features), enabled=progress))
        planner = stack.enter_context(_pool(2, "pixels-xr-plan"))
        writers = stack.enter_context(_pool(window, "pixels-xr-unit"))
        plans = _plans(planner, features, config, manifest, output_format, zarr_format, lookahead=2)
        in_flight: dict[concurrent.futures.Future, tuple[_Planned, list[int]]] = {}
        remaining: dict[str, int] = {}
        # STAC items of the Zarr features written, made while the workers are busy (not re-read at the end)
        items: dict[str, Any] | None = {} if output_format == "zarr" else None
        for plan in plans:
            report.features.append(plan.result)
            remaining[plan.feature.id] = len(plan.pending)
            if not plan.pending:
                bar(plan.result)
                continue
            if read_only:
                _fail(plan.result, "write", OutputError(f"{len(plan.pending)} units are missing and the output's "
                                                        "storage is read-only", out))
                bar(plan.result)
                continue
            while sum(len(units) for _, units in in_flight.values()) >= window:
                _drain(in_flight, remaining, manifest, bar, on_unit, items, block=True, client=client)
            # A feature's pending bins go in one submission: bins share tasks (clip mask, reader tables), and
            # two computations with common keys in flight at once can hang distributed's scheduler.
            plan.submitted = mark(client)
            if output_format == "zarr":
                for job, units in _submit_regions(client, plan, out, retries):
                    in_flight[job] = (plan, units)
            else:
                job = writers.submit(_write_feature_cogs, client, plan, config, out)
                in_flight[job] = (plan, list(plan.pending))
            _drain(in_flight, remaining, manifest, bar, on_unit, items, block=False, client=client)
        while in_flight:
            _drain(in_flight, remaining, manifest, bar, on_unit, items, block=True, client=client)
    report.seconds = time.perf_counter() - started
    if read_only:
        return report  # nothing was written, nothing can be: no catalog, no report file
    done = [f for f in report.features if f.status == "done"]
    try:
        write_output_catalog(out, f"pixels_xr {config.mode} output", output_format, [f.id for f in done + [
            f for f in report.features if f.status == "skipped"]], items, sources=manifest.sources,
                             done=manifest.done_labels,
                             keep={f.id for f in report.features if f.status == "skipped"})
    except PixelsError as exc:
        report.features.append(FeatureResult("(stac catalog)", "failed", stage="stac", error=str(exc)))
    report.report_url = manifest.write_report(report.to_dict())
    return report


def _plan_run(config: PixelsConfig, features: Sequence[Feature], manifest: RunManifest, report: RunReport,
              output_format: str, zarr_format: int, overwrite: bool, started: float) -> RunReport:
    """``run_batch(plan_only=True)``: what a run would compute, from searches and the ledger alone."""
    if not overwrite and storage.exists(storage.join(manifest.root, "run.json")):
        manifest.open(overwrite=False, read_only=True)  # refuses another config's output, as a run would
    mode = "fresh" if overwrite else "plan"  # --overwrite: the ledger is ignored, every unit is new
    with run_cache(), _pool(2, "pixels-xr-plan") as pool:
        for plan in _plans(pool, features, config, manifest, output_format, zarr_format, lookahead=8,
                           plan_only=mode):
            report.features.append(plan.result)
    report.seconds = time.perf_counter() - started
    return report


def _plans(pool: concurrent.futures.Executor, features: Sequence[Feature], config: PixelsConfig,
           manifest: RunManifest, output_format: str, zarr_format: int, lookahead: int,
           plan_only: Literal["", "plan", "fresh"] = "") -> Iterator[_Planned]:
    """Planned features in order, planning up to ``lookahead`` ahead in background threads."""
    jobs: list[concurrent.futures.Future] = []
    it = iter(features)
    for f in it:
        jobs.append(pool.submit(_plan, f, config, manifest, output_format, zarr_format, plan_only))
        if len(jobs) > lookahead:
            yield jobs.pop(0).result()
    for job in jobs:
        yield job.result()


def _plan(feature: Feature, config: PixelsConfig, manifest: RunManifest, output_format: str,
          zarr_format: int, plan_only: Literal["", "plan", "fresh"] = "") -> _Planned:
    """Search, classify every unit against the ledger (``units``), and build what the stale and new ones
    need; ``plan_only`` stops after the classification (nothing read but the catalog, nothing written),
    against the ledger (``plan``) or as for a fresh output (``fresh``)."""
    plan = _Planned(feature, FeatureResult(feature.id))
    stage = "search"
    try:
        items = search(config, feature)
        plan.result.items = len(items)
        plan.result.items_filtered = dict(items.filtered)
        current = unit_sources(items, config, feature)
        fresh = plan_only == "fresh"
        known = [] if fresh else manifest.template(feature.id) or []
        units = classify(current, {} if fresh else manifest.unit_records(feature.id), known, manifest.hash)
        axis = _axis(known, [u.label for u in units if u.state != "gone"], output_format)
        if axis is None:  # the output's time axis cannot grow into the new one in place: rewrite the feature
            gone = [u.label for u in units if u.state == "gone"]
            units = [dataclasses.replace(u, state="new", reason="time axis rebuilt" + (
                f" (dropped {len(gone)} bins now outside the range)" if gone else "")) for u in units
                     if u.state != "gone"]
            plan.rebuild, axis = True, [u.label for u in units]
        plan.units = units
        plan.result.units = [u.to_dict() for u in units if u.state != "done"]
        plan.result.units_skipped = sum(u.state == "done" for u in units)
        todo = {u.label for u in units if u.computes}
        if plan_only or (not todo and units):  # no unit at all (mode all, no acquisition): built for the why
            plan.result.status = "skipped" if not todo else "planned"
            plan.labels = axis
            return plan
        stage = "build"
        obs = observations(config, feature, items=items)
        ds = aligned(composite(obs, config, feature), config.chunksize)
        plan.result.empty_reason = ds.attrs.get("empty_reason")
        plan.result.asset_problems = list(obs.problems)
        plan.unit_items = unit_item_ids(obs.cube, config, feature)
        plan.hrefs = {s.href for i in items for s in i.sources.values()}
        plan.skipped = {p["item"] for p in obs.problems}
        labels = plan.unit_labels = unit_labels(ds)
        if not labels:  # mode all without any acquisition: nothing to write, the report says why
            return plan
        if manifest.read_only:
            plan.labels, plan.pending = axis, [axis.index(u) for u in labels if u in todo]
            return plan
        if plan.rebuild or not known:
            manifest.forget(feature.id)
            known = []
        plan.sources = _source_hrefs(items)
        plan.labels = axis
        position = {label: k for k, label in enumerate(labels)}
        plan.pending = [position[label] for label in labels if label in todo]
        plan.at = [axis.index(labels[i]) for i in plan.pending]
        if output_format == "zarr" and not known:
            # the template is written on the cluster by the feature's job, which then writes every bin
            # (a template write empties the group), and recorded when that job completes
            plan.template = zarr_format
        else:
            if output_format == "zarr":  # the axis may grow; flags (empty …) and provenance follow the units
                write_time_axis(manifest.out, feature.id, _axis_coords(manifest, feature.id, axis, ds),
                                _merged_attrs(manifest.out, feature.id, ds))
            manifest.record_template(feature.id, axis, {**manifest.sources(feature.id), **plan.sources})
        for u in units:  # a relabelled (grown) partial bin: its old record (and COGs) go once it is rewritten
            old = next((k for k in known if start_of(k) == start_of(u.label) and k != u.label), None)
            if old is not None and u.computes:
                plan.replaces[u.label] = old
        plan.ds = ds
    except Exception as exc:  # one feature's failure is recorded and must not stop the run
        _fail(plan.result, stage, exc)
    return plan


def _axis(known: list[str], current: list[str], output_format: str) -> list[str] | None:
    """The output's time axis after this run: the known labels (a grown partial bin relabelled in place)
    with the new ones appended; None when a new unit would land before a known one in a Zarr store (its
    time axis can only grow at the end)."""
    if not known:
        return list(current)
    by_start = {start_of(label): label for label in current}
    axis = [by_start.pop(start_of(label), label) for label in known]
    new = sorted(by_start.values(), key=start_of)
    if output_format == "zarr" and new and start_of(new[0]) <= start_of(axis[-1]):
        return None
    return sorted(axis + new, key=start_of) if output_format != "zarr" else axis + new


def _merged_attrs(store: str, feature_id: str, ds: xr.Dataset) -> dict[str, Any]:
    """The feature group's attributes after this run: this run's, with the item ids of the bins it does not
    cover (kept from the store)."""
    import zarr

    old = dict(zarr.open_group(store, path=feature_id, mode="r").attrs)
    attrs = dict(ds.attrs)
    with contextlib.suppress(KeyError, TypeError, ValueError):
        attrs["item_ids"] = json.dumps({**json.loads(old["item_ids"]), **json.loads(ds.attrs["item_ids"])})
    return attrs


def _axis_coords(manifest: RunManifest, feature_id: str, axis: list[str], ds: xr.Dataset) -> xr.Dataset:
    """The time coordinates of the whole axis: this run's for its units, the store's for the others."""
    existing = open_feature(manifest.out, feature_id)
    old = {start_of(label): k for k, label in enumerate(manifest.template(feature_id) or [])}
    now = {start_of(label): k for k, label in enumerate(unit_labels(ds))}
    names = [n for n, c in ds.coords.items() if c.dims == ("time",)]
    columns = {}
    for name in names:
        values = []
        for label in axis:
            key = start_of(label)
            source, k = (ds, now[key]) if key in now else (existing, old[key])
            values.append(source[name].values[k])
        columns[name] = ("time", np.array(values, dtype=ds[name].dtype))
    return xr.Dataset(coords=columns)


def _source_hrefs(items: list[ParsedItem]) -> dict[str, str]:
    """Item id → its self href (or the id when the item has none) for ``derived_from`` links."""
    return {item.id: item.self_href or item.id for item in items}


def unit_labels(ds: xr.Dataset) -> list[str]:
    """One label per time step: ``start/end`` of the bin, or the acquisition day in mode ``all``."""
    starts = [str(t)[:10] for t in ds["time"].values]
    if "time_end" in ds.coords:
        return [f"{s}/{str(e)[:10]}" for s, e in zip(starts, ds["time_end"].values)]
    return starts


def _submit_regions(client: Client, plan: _Planned, out: str,
                    retries: int) -> list[tuple[concurrent.futures.Future, list[int]]]:
    """Region writes of a feature's pending bins in one submission, one write per run of consecutive bins
    (one xarray ``to_zarr`` call each: per bin, those calls were most of the client's time); returns a
    concurrent future with its bins per run."""
    assert plan.ds is not None
    runs: list[list[int]] = []
    where = dict(zip(plan.pending, plan.at))  # a step's place on the output's time axis
    for i in plan.pending:
        if runs and runs[-1][-1] == i - 1 and where[runs[-1][-1]] == where[i] - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    # a template still to write means a fresh feature: every bin pending, one run, one job
    writes = [region_write(plan.ds, out, plan.feature.id, slice(run[0], run[-1] + 1), at=where[run[0]],
                           template_format=plan.template) for run in runs]
    started = time.perf_counter()
    return [(_bridge(f, started), run) for f, run in zip(client.compute(writes, retries=retries), runs)]


def _bridge(future: Any, started: float) -> concurrent.futures.Future:
    """A ``concurrent.futures.Future`` settled when a distributed future finishes (its callback thread)."""
    bridged: concurrent.futures.Future = concurrent.futures.Future()

    def settle(done: Any) -> None:
        try:
            done.result()
        except BaseException as exc:  # noqa: BLE001 - handed over to the run loop as the unit's failure
            bridged.set_exception(exc)
        else:
            bridged.set_result({"seconds": round(time.perf_counter() - started, 3)})

    future.add_done_callback(settle)
    return bridged


def _write_feature_cogs(client: Client, plan: _Planned, config: PixelsConfig, out: str) -> dict[str, Any]:
    """Every pending bin of a feature, a group of bins at a time (a row of chunks within COG_ROW_BYTES)."""
    assert plan.ds is not None
    started = time.perf_counter()
    per_group = max(1, COG_ROW_BYTES // max(_row_bytes(plan.ds.isel(time=0)), 1))
    for k in range(0, len(plan.pending), per_group):
        layers = [layer for i in plan.pending[k:k + per_group] for layer in
                  unit_cog_layers(plan.ds.isel(time=i), out, plan.feature.id, plan.unit_labels[i], config,
                                  plan.unit_items.get(plan.unit_labels[i], []))]
        write_cogs(layers, scheduler=client)
    return {"seconds": round(time.perf_counter() - started, 3)}


def _row_bytes(step: xr.Dataset) -> int:
    """Bytes of one row of dask chunks of every variable of a time step."""
    rows = max(step.chunks["y"]) if step.chunks else step.sizes["y"]
    return sum(v.dtype.itemsize * v.size // step.sizes["y"] * rows for v in step.data_vars.values())


def unit_cog_layers(step: xr.Dataset, out: str, feature_id: str, label: str, config: PixelsConfig,
                    item_ids: Sequence[str]) -> list[CogLayer]:
    """The COGs of one feature × bin (``io.layout.CogUnit``): bands, clear_count and (pick modes)
    source_time, tagged with the ids of the items behind the bin."""
    unit = CogUnit(out, feature_id, label)
    bands = list(config.band_names)
    when = str(step["time"].values)[:10]
    tags = {"datetime": when, "feature": feature_id, "bin": label,
            "items": json.dumps(list(item_ids))}
    stack = xr.concat([step[b] for b in bands], dim="band").assign_coords(band=bands)
    layers = [CogLayer(stack, unit.path(), np.nan if stack.dtype.kind == "f" else 0, bands, tags),
              CogLayer(step["clear_count"], unit.path("clear_count"), None, ["clear_count"], tags)]
    if "source_time" in step:
        days = step["source_time"].copy(data=days_since_epoch(step["source_time"].data))
        layers.append(CogLayer(days, unit.path("source_time"), SOURCE_TIME_NODATA, ["source_time"],
                               {**tags, "units": SOURCE_TIME_UNITS}))
    return layers


def _drain(in_flight: dict, remaining: dict[str, int], manifest: RunManifest, bar: Callable,
           on_unit: Callable[[str, str], None] | None, items: dict[str, Any] | None, *, block: bool,
           client: Client | None = None) -> None:
    if not in_flight:
        return
    finished, _ = concurrent.futures.wait(
        list(in_flight), timeout=None if block else 0, return_when=concurrent.futures.FIRST_COMPLETED)
    for job in finished:
        plan, units = in_flight.pop(job)
        fid = plan.feature.id
        try:
            info = job.result()
        except Exception as exc:  # recorded per feature; the run goes on
            if plan.result.status != "failed":
                _fail(plan.result, "write", exc, unit=plan.unit_labels[units[0]] if len(units) == 1 else None)
        else:
            if plan.template is not None:
                manifest.record_template(fid, plan.labels, plan.sources)
                plan.template = None
            problems = cluster_problems(client, plan.hrefs, plan.submitted) if plan.hrefs else []
            if problems:  # written, but with reads that failed: reported, not recorded, redone next run
                if plan.result.status != "failed":
                    plan.result.status = "degraded"
                    plan.result.stage = "read"
                    plan.result.error = f"{len(problems)} reads failed after the asset check (read as nodata, " \
                                        f"redone next run), first: {problems[0]['href']}: {problems[0]['error']}"
                seen = {(p["href"], p["error"]): p for p in plan.result.read_problems}
                for p in problems:  # one record per asset and error, with how many reads failed
                    entry = seen.setdefault((p["href"], p["error"]), {"href": p["href"], "error": p["error"],
                                                                      "reads": 0})
                    entry["reads"] += 1
                plan.result.read_problems = list(seen.values())
            by_label = {u.label: u for u in plan.units}
            for i in units:
                if plan.result.status not in {"failed", "degraded"}:
                    label = plan.unit_labels[i]
                    unit = by_label.get(label)
                    items_used = unit.items if unit is not None else {}
                    manifest.record_unit(fid, label, **info, fingerprint=unit.fingerprint if unit else "",
                                         items=items_used, skipped=sorted(plan.skipped & set(items_used)))
                    if label in plan.replaces:  # the unit's old name, now rewritten under the new one
                        old = plan.replaces.pop(label)
                        manifest.forget_unit(fid, old)
                        if manifest.output_format.startswith("cog"):
                            for layer in COG_LAYERS:
                                storage.remove_tree(CogUnit(manifest.out, fid, old).path(layer))
                    plan.result.units_written += 1
                    if on_unit is not None:
                        on_unit(fid, label)
        remaining[fid] -= len(units)
        if remaining[fid] == 0:
            # the item from the Dataset written, when it is the whole store's axis (else read back at the end)
            if items is not None and plan.result.status == "done" and plan.ds is not None and \
                    plan.labels == plan.unit_labels:
                with contextlib.suppress(Exception):  # then the catalog reads the group back instead
                    items[fid] = zarr_item(fid, plan.ds, plan.sources)
            plan.ds = None  # the feature's graph is no longer needed
            bar(plan.result)


def _fail(result: FeatureResult, stage: str, exc: BaseException, unit: str | None = None) -> None:
    result.status = "failed"
    result.stage = stage if unit is None else f"{stage} {unit}"
    message = redact(str(exc).strip().splitlines()[0]) if str(exc).strip() else exc.__class__.__name__
    result.error = message if isinstance(exc, PixelsError) else f"{exc.__class__.__name__}: {message}"


@contextlib.contextmanager
def _pool(workers: int, name: str) -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    """A thread pool that, when the run stops on an exception (Ctrl-C included), drops its queued work and
    does not wait for the running work: the client and cluster close next, which ends it. (Waiting here, a
    COG feature's writes ran to the end before Ctrl-C took effect.)"""
    pool = concurrent.futures.ThreadPoolExecutor(workers, name)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


@contextlib.contextmanager
def _progress(total: int, *, enabled: bool) -> Iterator[Callable[[FeatureResult], None]]:
    """A rich progress bar over features on stderr; yields ``advance(result)``."""
    if not enabled:
        yield lambda result: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]features"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("", total=total)

        def advance(result: FeatureResult) -> None:
            bar.update(task, advance=1, description=f"{result.id}: {result.status}")

        yield advance

