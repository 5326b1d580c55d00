"""Batch runs: every feature of a config searched, built and written on a Dask cluster, resumably.

A *unit* is one feature × one time bin (one acquisition day in mode ``all``). Nearby small features run as
groups (``groups``): one search (``catalog.search_many``), one cube and one reduction per group over the
union of their grids, each member a window of it, cut, clipped and written whole by a task that writes 16
members (``_write_members``: each member's failure is its own), with its own items, empty bins, item ids,
fingerprints and ledger records. A feature that cannot be grouped (large, another CRS or date range), a
member whose grid is not a window of the group's, a member without items and every COG output take the
per-feature path below. The client plans groups a
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

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import xarray as xr
from affine import Affine
from dask.base import tokenize
from distributed import Client

from pixels_xr.catalog import SearchResult, search, search_many
from pixels_xr.cluster import ClusterOptions, open_client
from pixels_xr.compose import composite, observations, unit_item_ids
from pixels_xr.cube import centres_inside, output_grid
from pixels_xr.config import PixelsConfig
from pixels_xr.errors import ConfigError, OutputError, PixelsError
from pixels_xr.features import Feature, check_id
from pixels_xr.graph import List, Task, TaskRef, culled, materialized, submittable
from pixels_xr.grid import Grid
from pixels_xr.groups import FeatureGroup, group_features, window
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
from pixels_xr.io.stac_out import (grid_record, labelled_grid_item, recorded_item, write_output_catalog,
                                   zarr_item)
from pixels_xr.io.zarr_store import (
    aligned,
    open_feature,
    region_write,
    time_chunk,
    update_feature,
    write_feature,
    write_steps,
    write_time_axis,
)
from pixels_xr.items import AssetProblem, ParsedItem
from pixels_xr.ledger import RunManifest
from pixels_xr.read_problems import cluster_problems, mark, read_events
from pixels_xr.run_cache import run_cache
from pixels_xr.signing import redact
from pixels_xr.units import UnitPlan, classify, start_of, unit_sources

OutputFormat = Literal["zarr", "cog"]
#: Chunk side (pixels) of a group's cube and reduction: blocks no member touches are neither read nor
#: reduced, so sparse groups read little more than their members' pixels.
GROUP_CHUNK = 256
#: Most members written by one task (half the run's ``window`` when that is smaller): the scheduler's and
#: the client's time is per task.
MEMBERS_PER_TASK = 16
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


_RESULT_FIELDS = tuple(f.name for f in fields(FeatureResult))


def _result_dict(result: FeatureResult) -> dict[str, Any]:
    """``dataclasses.asdict(result)`` for its plain fields, copied two levels deep as it would (its
    recursion over every value was most of ``to_dict`` in runs of thousands of features)."""
    out = {name: getattr(result, name) for name in _RESULT_FIELDS}
    out["items_filtered"] = dict(result.items_filtered)
    for name in ("asset_problems", "read_problems", "units"):
        out[name] = [dict(entry) for entry in out[name]]
    return out


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
                "features": [_result_dict(f) for f in self.features]}

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
    #: the feature's unit records (the ledger's, then this run's as they are recorded) and the sources its
    #: template records: copied into the template once the feature is finished (``ledger``)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    template_sources: dict[str, str] | None = None
    summarised: bool = False
    #: ids of the items behind each unit, by label (the COG tags' ``items``)
    unit_items: dict[str, list[str]] = field(default_factory=dict)
    #: asset hrefs the feature reads, and the scheduler's clock when its job was submitted (read problems
    #: received after it on those hrefs make it degraded)
    hrefs: set[str] = field(default_factory=set)
    submitted: float = 0.0
    #: a group's member: its write task, and the group's reduction it reads from
    member: _MemberWrite | None = None
    group: _GroupGraph | None = None
    grid: Grid | None = None
    axis_update: tuple[xr.Dataset, dict[str, Any]] | None = None


@dataclass(frozen=True)
class _MemberWrite:
    """What the task writing a group's member needs: where, which variables, its window of the group's
    grid, the group's steps to write and their positions on the member's time axis, and, when the
    member's store is new (``template``: its Zarr format), everything to write it whole (coordinates,
    attributes, CRS, transform). Plain values only: it is pickled once per member."""

    store: str
    group: str
    names: tuple[str, ...]
    where: tuple[slice, slice]
    steps: tuple[int, ...]
    at: tuple[int, ...]
    template: int | None
    time_coords: dict[str, tuple[tuple[str, ...], np.ndarray]]
    space_coords: dict[str, np.ndarray]
    attrs: dict[str, Any]
    var_attrs: dict[str, dict[str, Any]]
    crs: str
    transform: tuple[float, ...]
    #: the geometry to clip to, in the grid's CRS (None: not clipped)
    clip: Any
    chunksize: int
    #: a known member's time axis and attributes after this run (``write_time_axis``), set by its writer
    axis_update: tuple[xr.Dataset, dict[str, Any]] | None = None
    #: the ids of the member's items this run checked (``_items_to_check``; None: all): the store's asset
    #: problems of the others are kept
    checked: frozenset[str] | None = None
    #: this write's identity in task keys: unique per write, so no two runs' tasks share a key, and cheap
    #: (dask tokenized every field, time axes and attribute Datasets included: most of the client's CPU of a
    #: small incremental run went there, once for the key and again in ``Client.get``)
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)

    def __dask_tokenize__(self) -> str:
        return self.nonce


class _GroupGraph:
    """A group's reduction as one plain graph (``graph.materialized``), made once when its first member is
    submitted; the members' write tasks read its blocks."""

    def __init__(self, arrays: list[Any]) -> None:
        self.arrays = arrays
        chunks = arrays[0].chunks
        self.y_edges, self.x_edges = np.cumsum((0,) + chunks[1]), np.cumsum((0,) + chunks[2])
        self._graph: dict | None = None
        self._lock = threading.Lock()

    @property
    def graph(self) -> dict:
        with self._lock:
            if self._graph is None:
                self._graph = materialized(self.arrays)
            return self._graph

    def blocks(self, where: tuple[slice, slice]) -> tuple[range, range, int, int]:
        """The block rows and columns a window covers, and the window's offset in the first block."""
        rows, cols = where
        by0 = int(np.searchsorted(self.y_edges, rows.start, side="right")) - 1
        by1 = int(np.searchsorted(self.y_edges, rows.stop, side="left"))
        bx0 = int(np.searchsorted(self.x_edges, cols.start, side="right")) - 1
        bx1 = int(np.searchsorted(self.x_edges, cols.stop, side="left"))
        return (range(by0, by1), range(bx0, bx1), rows.start - int(self.y_edges[by0]),
                cols.start - int(self.x_edges[bx0]))


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
        for planned in plans:
            todo = []
            for plan in planned:
                report.features.append(plan.result)
                remaining[plan.feature.id] = len(plan.pending)
                if not plan.pending:
                    bar(plan.result)
                elif read_only:
                    _fail(plan.result, "write", OutputError(f"{len(plan.pending)} units are missing and the "
                                                            "output's storage is read-only", out))
                    bar(plan.result)
                else:
                    todo.append(plan)
            if not todo:
                continue
            # a group larger than the window is admitted once what is in flight is down to half of it, so
            # the workers do not idle between groups while the next one is submitted
            limit = max(window, sum(len(plan.pending) for plan in todo) // 2)
            while in_flight and _units_in_flight(in_flight) >= limit:
                _drain(in_flight, remaining, manifest, bar, on_unit, items, block=True, client=client)
            submitted = mark(client)
            members = [plan for plan in todo if plan.member is not None]
            if members:  # a group's members: one submission over the group's reduction
                for plan in members:
                    plan.submitted = submitted
                for job, plan in _submit_group(client, members, retries, max(1, min(MEMBERS_PER_TASK, window // 2))):
                    in_flight[job] = (plan, list(plan.pending))
            for plan in todo:
                if plan.member is not None:
                    continue
                # A feature's pending bins go in one submission: bins share tasks (clip mask, reader tables),
                # and two computations with common keys in flight at once can hang distributed's scheduler.
                plan.submitted = submitted
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
                             keep={f.id for f in report.features if f.status == "skipped"},
                             recorded=functools.partial(_recorded_item, manifest))
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
        for planned in _plans(pool, features, config, manifest, output_format, zarr_format, lookahead=8,
                              plan_only=mode):
            report.features.extend(plan.result for plan in planned)
    report.seconds = time.perf_counter() - started
    return report


def _plans(pool: concurrent.futures.Executor, features: Sequence[Feature], config: PixelsConfig,
           manifest: RunManifest, output_format: str, zarr_format: int, lookahead: int,
           plan_only: Literal["", "plan", "fresh"] = "") -> Iterator[list[_Planned]]:
    """The planned features of each group (``groups``) in order, planning up to ``lookahead`` groups ahead
    in background threads."""
    jobs: list[concurrent.futures.Future] = []
    for group in group_features(config, features):
        jobs.append(pool.submit(_plan_group, group, config, manifest, output_format, zarr_format, plan_only))
        if len(jobs) > lookahead:
            yield jobs.pop(0).result()
    for job in jobs:
        yield job.result()


def _plan_group(group: FeatureGroup, config: PixelsConfig, manifest: RunManifest, output_format: str,
                zarr_format: int, plan_only: Literal["", "plan", "fresh"] = "") -> list[_Planned]:
    """A group's members planned together: one search for all (``search_many``), every member's units
    classified, and one cube and reduction for the members with units to compute (``_build_group``).
    A single feature, or a group whose search fails, is planned feature by feature (each then reports
    its own error)."""
    if group.single:
        return [_plan(group.features[0], config, manifest, output_format, zarr_format, plan_only)]
    try:
        found = search_many(config, group.features)
    except Exception:  # noqa: BLE001 - every member searches again alone and records its own failure
        return [_plan(f, config, manifest, output_format, zarr_format, plan_only) for f in group.features]
    plans: list[_Planned] = []
    members: list[tuple[_Planned, SearchResult, _State]] = []
    for feature, items in zip(group.features, found):
        plan = _Planned(feature, FeatureResult(feature.id))
        plans.append(plan)
        try:
            state = _classify(plan, items, config, manifest, output_format, plan_only)
            if state is None:
                continue
            if not items or output_format != "zarr":  # empty features and COG units: the feature's own path
                _build_alone(plan, items, state, config, manifest, output_format, zarr_format)
            else:
                members.append((plan, items, state))
        except Exception as exc:  # noqa: BLE001 - recorded for this member only
            _fail(plan.result, "build" if plan.units else "search", exc)
    if members:
        _build_group(group, members, config, manifest, output_format, zarr_format)
    return plans


def _build_group(group: FeatureGroup, members: list[tuple[_Planned, SearchResult, _State]],
                 config: PixelsConfig, manifest: RunManifest, output_format: str, zarr_format: int) -> None:
    """One cube and one reduction over the group's grid from the union of its members' items; each member
    a window of it (``groups.window``), written by one task of its own (``_write_member``). A member whose
    grid is not a window of the group's (another lattice phase), or every member when the group's build
    fails, is built alone."""
    union = {i.id: i for _, items, _ in members for i in items}
    checked = _items_to_check(members, config)
    if checked is not None:
        union = {k: i for k, i in union.items() if k in checked}
    gfeature = group.as_feature()
    # the group's grid is checked by its members' (max_pixels applies to each feature, not to the group)
    gconfig = config.model_copy(update={"clip": False, "force": True,
                                        "chunksize": min(config.chunksize, GROUP_CHUNK)})
    try:
        obs = observations(gconfig, gfeature, items=sorted(union.values(), key=lambda i: (i.datetime, i.id)),
                           reads_here=False)  # workers read
        gds = composite(obs, config, gfeature)  # the config as given: the attrs record it
        ggrid = output_grid(obs.items, gfeature, gconfig)
    except Exception:  # noqa: BLE001 - each member alone meets (and reports) the error or succeeds
        obs = None
    names = [] if obs is None else [n for n, v in gds.data_vars.items() if v.dims == ("time", "y", "x")]
    shared = None if obs is None else _GroupGraph([gds[n].data for n in names])
    glabels = [] if obs is None else unit_labels(gds)
    gtime = {} if obs is None else {str(n): c.values for n, c in gds.coords.items() if c.dims == ("time",)}
    problems = {} if obs is None else {p["item"]: p for p in obs.problems}
    for plan, items, state in members:
        try:
            mgrid = output_grid(items, plan.feature, config) if obs is not None else None
            where = window(ggrid, mgrid) if mgrid is not None else None
            if where is None:
                _build_alone(plan, items, state, config, manifest, output_format, zarr_format)
                continue
            _member_plan(plan, items, state, gds, gtime, glabels, names, where, mgrid, problems, config,
                         manifest, output_format, zarr_format, shared, checked)
        except Exception as exc:  # noqa: BLE001 - recorded for this member only
            _fail(plan.result, "build", exc)


def _items_to_check(members: list[tuple[_Planned, SearchResult, _State]],
                    config: PixelsConfig) -> set[str] | None:
    """Ids of the only items a group's build needs when every member is known and computes some of its
    bins (an incremental re-run): those of the units it computes. None: every item (a new or rebuilt
    member writes every bin; mode ``all``'s steps are its items' days).

    The asset check opens every item's assets, and in a nightly re-run that adds one date it was most of
    the client's work: each bin is reduced from its own items only, so the others are neither checked nor
    read. The members' time coordinates and provenance come from all their items, as before."""
    if config.mode == "all" or any(plan.rebuild or not state[2] for plan, _, state in members):
        return None
    needed = {item for plan, _, _ in members for u in plan.units if u.computes for item in u.items}
    return needed or None


def _member_plan(plan: _Planned, items: SearchResult, state: _State, gds: xr.Dataset,
                 gtime: dict[str, np.ndarray], glabels: list[str],
                 names: list[str], where: tuple[slice, slice], grid: Grid, problems: dict[str, AssetProblem],
                 config: PixelsConfig, manifest: RunManifest, output_format: str, zarr_format: int,
                 shared: _GroupGraph, checked: set[str] | None = None) -> None:
    """A member's units from the group's reduction: its steps, its own flags and provenance (its items),
    and the write task's description (``_MemberWrite``)."""
    feature = plan.feature
    ids = {i.id for i in items}
    plan.unit_items = unit_item_ids(list(items), config, feature)
    own = [p for item_id, p in problems.items() if item_id in ids]
    plan.result.asset_problems = own
    if config.mode == "all":
        steps = [glabels.index(label) for label in plan.unit_items]  # the member's acquisition days
    else:
        steps = list(range(len(glabels)))
    coords = {n: ("time", values[steps]) for n, values in gtime.items()}
    if "empty" in coords:
        coords["empty"] = ("time", np.array([not plan.unit_items.get(glabels[k]) for k in steps]))
    attrs = {**gds.attrs, "feature": feature.id, "item_ids": json.dumps(plan.unit_items),
             "asset_problems": json.dumps(own), "items_filtered": json.dumps(items.filtered)}
    attrs.pop("empty_reason", None)
    if not _prepare(plan, [glabels[k] for k in steps], lambda: xr.Dataset(coords=coords, attrs=attrs), items,
                    {p["item"] for p in own}, state, manifest, output_format, zarr_format, defer_axis=True):
        return
    template = plan.template
    write = steps if template is not None else [steps[i] for i in plan.pending]  # a new group: every step
    plan.member = _MemberWrite(
        manifest.out, feature.id, tuple(names), where, tuple(write),
        tuple(range(len(steps))) if template is not None else tuple(plan.at), template,
        {n: (("time",), values) for n, (_, values) in coords.items()}, {
            "y": np.array(grid.ys()), "x": np.array(grid.xs())}, attrs,
        {n: dict(gds[n].attrs) for n in names}, f"EPSG:{grid.epsg}", tuple(grid.transform)[:6],
        feature.geometry_in(grid.crs) if config.clip else None, config.chunksize, plan.axis_update,
        None if checked is None else frozenset(ids & checked))
    plan.group, plan.grid = shared, grid


def _plan(feature: Feature, config: PixelsConfig, manifest: RunManifest, output_format: str,
          zarr_format: int, plan_only: Literal["", "plan", "fresh"] = "",
          items: SearchResult | None = None) -> _Planned:
    """Search (unless ``items``), classify every unit against the ledger (``units``), and build what the
    stale and new ones need; ``plan_only`` stops after the classification (nothing read but the catalog,
    nothing written), against the ledger (``plan``) or as for a fresh output (``fresh``)."""
    plan = _Planned(feature, FeatureResult(feature.id))
    stage = "search"
    try:
        if items is None:
            items = search(config, feature)
        state = _classify(plan, items, config, manifest, output_format, plan_only)
        if state is not None:
            stage = "build"
            _build_alone(plan, items, state, config, manifest, output_format, zarr_format)
    except Exception as exc:  # one feature's failure is recorded and must not stop the run
        _fail(plan.result, stage, exc)
    return plan


#: What ``_classify`` leaves to build: the labels to compute, the output's time axis after this run, and
#: the labels the output already has.
_State = tuple[set[str], list[str], list[str]]


def _classify(plan: _Planned, items: SearchResult, config: PixelsConfig, manifest: RunManifest,
              output_format: str, plan_only: Literal["", "plan", "fresh"]) -> _State | None:
    """Every unit of a feature classified against the ledger (``plan.units``, ``plan.result``); None when
    nothing is left to build (all done, or ``plan_only``)."""
    feature = plan.feature
    plan.result.items = len(items)
    plan.result.items_filtered = dict(items.filtered)
    current = unit_sources(items, config, feature)
    fresh = plan_only == "fresh"
    known = [] if fresh else manifest.template(feature.id) or []
    plan.records = {} if fresh else manifest.unit_records(feature.id)
    units = classify(current, plan.records, known, manifest.hash)
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
        return None
    return todo, axis, known


def _build_alone(plan: _Planned, items: SearchResult, state: _State, config: PixelsConfig,
                 manifest: RunManifest, output_format: str, zarr_format: int) -> None:
    """A feature's own cube and reduction (the per-feature path: a feature not in a group)."""
    feature = plan.feature
    todo, axis, known = state
    if known and output_format == "zarr" and time_chunk(manifest.out, feature.id) > 1:
        # written whole as a group's member (a chunk holds every step): region writes of some steps by
        # several tasks would share chunks, so the feature is rewritten from scratch instead
        plan.units = [dataclasses.replace(u, state="new", reason="rewritten whole (stored as one chunk)")
                      for u in plan.units if u.state != "gone"]
        plan.result.units = [u.to_dict() for u in plan.units]
        plan.result.units_skipped = 0
        plan.rebuild = True
        state = ({u.label for u in plan.units}, [u.label for u in plan.units], [])
    obs = observations(config, feature, items=items, reads_here=False)  # workers read
    ds = aligned(composite(obs, config, feature), config.chunksize)
    plan.result.empty_reason = ds.attrs.get("empty_reason")
    plan.result.asset_problems = list(obs.problems)
    plan.unit_items = unit_item_ids(obs.cube, config, feature)
    if _prepare(plan, unit_labels(ds), lambda: ds, items, {p["item"] for p in obs.problems}, state, manifest,
                output_format, zarr_format):
        plan.ds = ds


def _prepare(plan: _Planned, labels: list[str], timeline: Callable[[], xr.Dataset], items: list[ParsedItem],
             skipped: set[str], state: _State, manifest: RunManifest, output_format: str,
             zarr_format: int, defer_axis: bool = False) -> bool:
    """The pending steps of a built feature (its step ``labels``) and where they go; for a known feature
    the output's time axis grown (from ``timeline()``: its Dataset, or a member's time coordinates and
    attributes) and recorded. False when there is nothing to write."""
    todo, axis, known = state
    feature = plan.feature
    plan.hrefs = {s.href for i in items for s in i.sources.values()}
    plan.skipped = skipped
    plan.unit_labels = labels
    if not labels:  # mode all without any acquisition: nothing to write, the report says why
        return False
    if manifest.read_only:
        plan.labels, plan.pending = axis, [axis.index(u) for u in labels if u in todo]
        return False
    if plan.rebuild or not known:
        manifest.forget(feature.id)
        known = []
        plan.records = {}
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
            ds = timeline()
            update = (_axis_coords(manifest, feature.id, axis, ds), dict(ds.attrs))
            if defer_axis:  # a group's member: its write task updates the axis first, on a worker
                plan.axis_update = update
            else:
                write_time_axis(manifest.out, feature.id, update[0], _merged_attrs(manifest.out, feature.id,
                                                                                   update[1]))
    for u in plan.units:  # a relabelled (grown) partial bin: its old record (and COGs) go once it is rewritten
        old = next((k for k in known if start_of(k) == start_of(u.label) and k != u.label), None)
        if old is not None and u.computes:
            plan.replaces[u.label] = old
    if output_format != "zarr" or known:
        plan.template_sources = {**manifest.sources(feature.id), **plan.sources}
        # a member's steps are all written by one task and recorded whole with its batch: with the time
        # axis as recorded, there is nothing to record before (the sources go with the records)
        if not (defer_axis and axis == known):
            # the records so far as the base the new unit records override (a replaced bin's left out: its
            # data is about to be overwritten)
            replaced = set(plan.replaces.values())
            manifest.record_template(feature.id, axis, plan.template_sources,
                                     {k: v for k, v in plan.records.items() if k not in replaced})
    return True


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


def _merged_attrs(store: str, feature_id: str, now: dict[str, Any],
                  checked: frozenset[str] | None = None) -> dict[str, Any]:
    """The feature group's attributes after this run: this run's (``now``) merged with the store's
    (``_merge_item_ids``)."""
    import zarr

    return _merge_item_ids(dict(zarr.open_group(store, path=feature_id, mode="r").attrs), now, checked)


def _merge_item_ids(old: dict[str, Any], now: dict[str, Any],
                    checked: frozenset[str] | None = None) -> dict[str, Any]:
    """``now``, with the item ids of ``old``'s bins that ``now`` does not cover and, when this run checked
    only the items ``checked``, ``old``'s asset problems of the others."""
    attrs = dict(now)
    with contextlib.suppress(KeyError, TypeError, ValueError):
        attrs["item_ids"] = json.dumps({**json.loads(old["item_ids"]), **json.loads(now["item_ids"])})
    if checked is not None:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            kept = [p for p in json.loads(old["asset_problems"]) if p.get("item") not in checked]
            attrs["asset_problems"] = json.dumps(kept + json.loads(now["asset_problems"]))
    return attrs


def _axis_coords(manifest: RunManifest, feature_id: str, axis: list[str], ds: xr.Dataset) -> xr.Dataset:
    """The time coordinates of the whole axis: this run's for its units, the store's for the others."""
    now = {start_of(label): k for k, label in enumerate(unit_labels(ds))}
    names = [n for n, c in ds.coords.items() if c.dims == ("time",)]
    if all(start_of(label) in now for label in axis):  # every bin is this run's: the store is not read
        order = [now[start_of(label)] for label in axis]
        return xr.Dataset(coords={n: ("time", ds[n].values[order]) for n in names})
    existing = open_feature(manifest.out, feature_id)
    old = {start_of(label): k for k, label in enumerate(manifest.template(feature_id) or [])}
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


def _submit_group(client: Client, plans: list[_Planned], retries: int,
                  per_task: int = MEMBERS_PER_TASK) -> list[tuple[concurrent.futures.Future, _Planned]]:
    """The writes of a group's members with pending units, in one submission over the group's reduction
    (its blocks computed once, only those some member reads). Members are written ``per_task`` to a task
    (``MEMBERS_PER_TASK``, fewer under a small ``window``: progress is recorded per task), each in its own
    ``try`` (``_write_members``): a member's failure is its own, and the scheduler's and client's cost is
    per task, not per member. One future per member."""
    shared = plans[0].group
    assert shared is not None
    graph = shared.graph
    layer, needed, batches = {}, set(), []
    for start in range(0, len(plans), per_task):
        batch = plans[start:start + per_task]
        keys: dict[tuple, int] = {}  # the blocks the batch reads, each once: members name them by position
        layouts = []
        for plan in batch:
            job = plan.member
            assert job is not None
            rows, cols, dy, dx = shared.blocks(job.where)
            layouts.append(([[[[keys.setdefault((a.name, t, iy, ix), len(keys)) for ix in cols] for iy in rows]
                               for t in job.steps] for a in shared.arrays], (dy, dx)))
        needed.update(keys)
        jobs = [plan.member for plan in batch]
        key = f"pixels-members-{tokenize([job.nonce for job in jobs], shared.arrays[0].name)}"
        layer[key] = Task(key, _write_members, List(*(TaskRef(k) for k in keys)), layouts, jobs)
        batches.append(batch)
    dsk = {**culled(graph, needed), **layer}
    started = time.perf_counter()
    futures = client.get(submittable(dsk), list(layer), sync=False, retries=retries)
    out = []
    for future, batch in zip(futures, batches):
        settled = [concurrent.futures.Future() for _ in batch]
        _when_done(future, functools.partial(_settle_members, settled, started))
        out.extend(zip(settled, batch))
    return out


def _settle_members(settled: list[concurrent.futures.Future], started: float,
                    outcome: concurrent.futures.Future) -> None:
    """Each member's future from its batch task's result (its error, or the seconds since submission)."""
    try:
        errors = outcome.result()
    except Exception as exc:  # the whole task failed (after its retries): every member
        for f in settled:
            f.set_exception(exc)
        return
    for k, f in enumerate(settled):  # a member the task did not answer for fails, never waits forever
        error = errors[k] if k < len(errors) else "the batch task returned no result for this member"
        if error is None:
            f.set_result({"seconds": round(time.perf_counter() - started, 3)})
        else:
            f.set_exception(OutputError(error, "write"))


def _write_members(blocks: list[np.ndarray], layouts: list[tuple[list, tuple[int, int]]],
                   jobs: list[_MemberWrite]) -> list[str | None]:
    """Runs on a worker: every member of a batch written (``_write_member``) from the batch's blocks (each
    member's variables × steps × block rows × block columns, as positions in ``blocks``), each failure
    caught and returned as that member's one-line error (None: written)."""
    errors: list[str | None] = []
    for (positions, offset), job in zip(layouts, jobs):
        try:
            values = [[[[blocks[k] for k in row] for row in step] for step in var] for var in positions]
            _write_member(values, offset, job)
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - reported for this member; the batch goes on
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            errors.append(f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__)
    return errors


def _write_member(values: list, offset: tuple[int, int], job: _MemberWrite) -> int:
    """Runs on a worker: a member's window cut from the group's blocks, clipped to its geometry, written
    whole (a new store) or at its pending steps; returns the steps written."""
    (rows, cols), (dy, dx) = job.where, offset
    height, width = rows.stop - rows.start, cols.stop - cols.start
    inside = None if job.clip is None else centres_inside(job.clip, (height, width), Affine(*job.transform))
    arrays = {}
    for name, per_step in zip(job.names, values):
        stack = _window(per_step, dy, dx, height, width)
        if inside is not None:
            stack = np.where(inside, stack, _clip_fill(stack.dtype, job.var_attrs.get(name, {})))
        arrays[name] = stack
    if job.template is None:
        axis, attrs = job.axis_update or (None, None)
        merge = None if attrs is None else functools.partial(_merge_item_ids, now=attrs, checked=job.checked)
        if update_feature(job.store, job.group, arrays, list(job.at), axis, merge):
            return len(job.steps)
        if axis is not None:
            write_time_axis(job.store, job.group, axis, _merged_attrs(job.store, job.group, attrs, job.checked))
        write_steps(job.store, job.group, arrays, list(job.at))
        return len(job.steps)
    reference = xr.Variable((), 0, {**_grid_mapping(job.crs),
                                    "GeoTransform": " ".join(str(v) for v in Affine(*job.transform).to_gdal())})
    ds = xr.Dataset({n: (("time", "y", "x"), a, job.var_attrs.get(n, {})) for n, a in arrays.items()},
                    coords={**job.time_coords, **{k: (k, v) for k, v in job.space_coords.items()},
                            "spatial_ref": reference}, attrs=job.attrs)
    write_feature(ds, job.store, job.group, chunksize=job.chunksize, zarr_format=job.template)
    return len(job.steps)


def _window(per_step: list, dy: int, dx: int, height: int, width: int) -> np.ndarray:
    """The (steps, height, width) window at (``dy``, ``dx``) of a member's blocks (per step group, rows of
    (steps, rows, columns) blocks), cut from each block before joining: joining whole blocks first copied
    every block a member touches (a member is ~20 × 20 px of 256 × 256 blocks)."""
    steps = []
    for step in per_step:
        rows, y0 = [], 0
        for row in step:
            h = row[0].shape[1]
            top, bottom = max(dy - y0, 0), min(dy + height - y0, h)
            if top < bottom:
                parts, x0 = [], 0
                for block in row:
                    w = block.shape[2]
                    left, right = max(dx - x0, 0), min(dx + width - x0, w)
                    if left < right:
                        parts.append(block[:, top:bottom, left:right])
                    x0 += w
                rows.append(np.concatenate(parts, axis=2))
            y0 += h
        steps.append(np.concatenate(rows, axis=1))
    return np.concatenate(steps, axis=0)


@functools.lru_cache(maxsize=16)
def _grid_mapping(crs: str) -> dict[str, Any]:
    """The CF grid-mapping attributes rioxarray's ``write_crs`` gives ``spatial_ref`` (made once per CRS and
    process: per member it was most of the write's time); the GeoTransform is the member's own."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)

    ref = xr.Dataset(coords={"y": [0.0], "x": [0.0]}).rio.write_crs(crs)
    return {k: v for k, v in ref["spatial_ref"].attrs.items() if k != "GeoTransform"}


def _clip_fill(dtype: np.dtype, attrs: dict[str, Any]) -> Any:
    """What a clipped-out pixel of a variable holds: NaN, NaT, else its nodata (0 for counts)."""
    if dtype.kind == "f":
        return np.nan
    if dtype.kind == "M":
        return np.datetime64("NaT")
    return attrs.get("nodata", 0)


#: Longest wait for a finished task's result (a small value; longer only when its worker died and the task
#: runs again): past it the job fails, and its units are redone by the next run, instead of waiting forever.
RESULT_TIMEOUT = 600.0
_FETCHERS: list = [None, None]  # (pid, pool): the threads that fetch finished tasks' results


def _when_done(future: Any, then: Callable[[concurrent.futures.Future], None]) -> None:
    """``then(outcome)`` once a distributed ``future`` is done, ``outcome`` a settled concurrent future of
    its result or error, fetched on a thread of ours with ``RESULT_TIMEOUT``.

    distributed runs every done-callback of the process on one thread; a callback that fetches a result
    there (``future.result()``, a round trip, or a wait for a recomputation when the key was lost) holds up
    the callbacks of every other job, and one that never returns stalls the whole run. A cancelled task
    becomes an ``OutputError`` naming it, recorded for its feature like any failure."""
    def fetch(done: Any) -> None:
        outcome: concurrent.futures.Future = concurrent.futures.Future()
        try:
            outcome.set_result(done.result(timeout=RESULT_TIMEOUT))
        except (asyncio.CancelledError, concurrent.futures.CancelledError) as exc:  # scheduler or client
            outcome.set_exception(OutputError(f"the task was cancelled ({exc})", "write"))
        except Exception as exc:  # noqa: BLE001 - the job's failure, handed to ``then``
            outcome.set_exception(exc)
        then(outcome)

    future.add_done_callback(lambda done: _fetchers().submit(fetch, done))


def _fetchers() -> concurrent.futures.ThreadPoolExecutor:
    """This process's result-fetching threads (made again in a forked child)."""
    pid, pool = _FETCHERS
    if pool is None or pid != os.getpid():
        pool = concurrent.futures.ThreadPoolExecutor(4, "pixels-xr-results")
        _FETCHERS[:] = [os.getpid(), pool]
    return pool


def _bridge(future: Any, started: float) -> concurrent.futures.Future:
    """A ``concurrent.futures.Future`` settled when a distributed future finishes (``_when_done``)."""
    bridged: concurrent.futures.Future = concurrent.futures.Future()

    def settle(outcome: concurrent.futures.Future) -> None:
        if outcome.exception() is not None:
            bridged.set_exception(outcome.exception())
        else:
            bridged.set_result({"seconds": round(time.perf_counter() - started, 3)})

    _when_done(future, settle)
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
    events = None  # the scheduler's read errors, fetched once for every job finished together
    batch: dict[str, dict[str, Any]] = {}  # features finished whole: one job record for them all
    then: list[Callable[[], None]] = []  # progress callbacks, once what they report is recorded
    for job in finished:
        plan, units = in_flight.pop(job)
        fid = plan.feature.id
        try:
            info = job.result()
        except Exception as exc:  # recorded per feature; the run goes on
            if plan.result.status != "failed":
                _fail(plan.result, "write", exc, unit=plan.unit_labels[units[0]] if len(units) == 1 else None)
        else:
            if plan.hrefs and events is None:
                events = read_events(client)
            problems = cluster_problems(client, plan.hrefs, plan.submitted, events) if plan.hrefs else []
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
            recorded = {}
            if plan.result.status not in {"failed", "degraded"}:
                for i in units:
                    label = plan.unit_labels[i]
                    unit = by_label.get(label)
                    items_used = unit.items if unit is not None else {}
                    recorded[label] = manifest.unit_record(
                        fid, label, **info, fingerprint=unit.fingerprint if unit else "", items=items_used,
                        skipped=sorted(plan.skipped & set(items_used)))
            # every unit of the feature this run computes, done: recorded whole with the batch (COGs, a
            # file per unit, keep a record per unit)
            whole = remaining[fid] == len(units) and plan.result.status == "done" and \
                not manifest.output_format.startswith("cog")
            if whole:
                replaced = {plan.replaces[label] for label in recorded if label in plan.replaces}
                grid = None if plan.member is None or plan.grid is None else grid_record(
                    plan.grid.crs, plan.grid.transform, plan.grid.shape, list(plan.member.names))
                records = {k: v for k, v in {**plan.records, **recorded}.items() if k not in replaced}
                batch[fid] = {"labels": plan.labels, "sources": plan.template_sources or plan.sources,
                              "units": records, "grid": grid}
                plan.summarised = True
            elif plan.template is not None:  # a new feature's template, before its first job's units
                manifest.record_template(fid, plan.labels, plan.sources)
            if plan.template is not None:
                plan.template, plan.template_sources = None, plan.sources
            for label, record in recorded.items():
                if not whole:
                    manifest.write_unit(fid, label, record)
                plan.records[label] = record
                if label in plan.replaces:  # the unit's old name, now rewritten under the new one
                    old = plan.replaces.pop(label)
                    manifest.forget_unit(fid, old)
                    plan.records.pop(old, None)
                    if manifest.output_format.startswith("cog"):
                        for layer in COG_LAYERS:
                            storage.remove_tree(CogUnit(manifest.out, fid, old).path(layer))
                plan.result.units_written += 1
                if on_unit is not None and whole:  # reported once the job record holds it
                    then.append(functools.partial(on_unit, fid, label))
                elif on_unit is not None:
                    on_unit(fid, label)
        remaining[fid] -= len(units)
        if remaining[fid] == 0 and plan.result.status == "done" and not plan.summarised:
            # the template again, with the copy of every unit record (``ledger``)
            manifest.record_template(fid, plan.labels, plan.template_sources or plan.sources, plan.records,
                                     complete=True)
        if remaining[fid] == 0:
            # the item from what was written: a member's grid and the store's time axis, or the Dataset
            # written when it is the whole axis (else the group is read back at the end)
            if items is not None and plan.result.status == "done":
                with contextlib.suppress(Exception):  # then the catalog reads the group back instead
                    if plan.member is not None and plan.grid is not None:
                        items[fid] = _member_item(plan.member, plan.grid, plan.template_sources or plan.sources,
                                                  plan.labels)
                    elif plan.ds is not None and plan.labels == plan.unit_labels:
                        items[fid] = zarr_item(fid, plan.ds, plan.sources)
            plan.ds = plan.member = plan.group = None  # the feature's graph is no longer needed
            then.append(functools.partial(bar, plan.result))
    manifest.record_features(batch)
    for call in then:
        call()


def _units_in_flight(in_flight: dict) -> int:
    return sum(len(units) for _, units in in_flight.values())


def _member_item(job: _MemberWrite, grid: Grid, sources: dict[str, str], axis: list[str]) -> Any:
    """The STAC item of a group's member, from its grid, write description and the store's time axis (its
    labels: ``unit_labels`` of the whole store, however few steps this run wrote)."""
    return labelled_grid_item(job.group, grid.crs, grid.transform, grid.shape, axis, list(job.names), sources)


def _recorded_item(manifest: RunManifest, feature_id: str) -> dict[str, Any] | None:
    """A feature's STAC item from the ledger (its job record's grid and its time axis), None without one:
    a re-run after a killed run makes the items its predecessor never wrote without opening the stores."""
    grid, axis = manifest.grid(feature_id), manifest.template(feature_id)
    if not grid or not axis:
        return None
    return recorded_item(feature_id, grid, axis, manifest.sources(feature_id))


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

