"""``build_samples``: labels → cubes the engine collects → samples per feature (resumable) → one store."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import shapely
import xarray as xr

from pixels_xr.compose import collect
from pixels_xr.config import PixelsConfig
from pixels_xr.errors import ConfigError, OutputError
from pixels_xr.features import Feature
from pixels_xr.io import storage
from pixels_xr.io.zarr_store import open_feature
from pixels_xr.signing import redact_json
from pixels_xr.training.labels import Labels, geometries_in
from pixels_xr.training.sampling import SampleSpec, draw_samples, load_spec
from pixels_xr.training.store import PARTS, merge, part_url, write_part


def label_features(labels: Labels, config: PixelsConfig, spec: SampleSpec) -> list[Feature]:
    """One feature per label: its geometry in its output CRS, grown by half a chip and a pixel (square
    corners), with the label's id and date (so dynamic date ranges follow each label's date)."""
    scale = float(config.resolved_scale)
    grow = ((spec.size // 2 + 1) if spec.kind == "chips" else 1) * scale
    out = []
    for f in labels.features:
        crs = f"EPSG:{f.output_crs.to_epsg()}"
        geom = shapely.box(*f.geometry_in(crs).buffer(grow, cap_style="square", join_style="mitre").bounds)
        out.append(Feature(f.id, geom, crs, f.date))
    return out


def assign(labels: Labels, features: Sequence[Feature]) -> tuple[dict[str, list[int]], int]:
    """Label indexes per feature id, and the number of labels no feature covers. A label goes to one
    feature only (never sampled twice): of those it intersects, the one it lies deepest inside (its centre's
    distance to the feature's edge, in lon/lat), so a label near an edge is cut from the cube where its
    chip is whole; ties go to the smallest feature id (not the first given: the same features listed in
    another order, as a store lists its groups, assign the same)."""
    shapes = geometries_in(features, "EPSG:4326")
    tree = shapely.STRtree(shapes)
    label_shapes = geometries_in(labels.features, "EPSG:4326")
    out: dict[str, list[int]] = {f.id: [] for f in features}
    best: dict[int, tuple[float, int]] = {}
    rank = {j: r for r, j in enumerate(sorted(range(len(features)), key=lambda j: features[j].id))}
    for k, j in zip(*tree.query(label_shapes, predicate="intersects").tolist()):
        depth = float(shapely.distance(shapely.centroid(label_shapes[k]), shapely.boundary(shapes[j])))
        if not shapely.contains(shapes[j], shapely.centroid(label_shapes[k])):
            depth = -depth
        if k not in best or (depth, -rank[j]) > (best[k][0], -rank[best[k][1]]):
            best[k] = (depth, j)
    for k in sorted(best):
        out[features[best[k][1]].id].append(k)
    return out, len(labels) - len(best)


def window(ds: xr.Dataset, labels: Labels, which: Sequence[int], spec: SampleSpec) -> xr.Dataset:
    """``ds`` cut to the labels' bounds grown by half a chip (and a pixel): only that much is computed."""
    crs = ds.rio.crs
    epsg = crs.to_epsg() if crs is not None else None
    if epsg is None or not which:
        return ds
    bounds = shapely.bounds(geometries_in([labels.features[k] for k in which], f"EPSG:{epsg}"))
    t = ds.rio.transform()
    pad = (spec.size // 2 + 1) if spec.kind == "chips" else 1
    c0, r0 = ~t * (bounds[:, 0].min(), bounds[:, 3].max())
    c1, r1 = ~t * (bounds[:, 2].max(), bounds[:, 1].min())
    rows = slice(max(0, math.floor(min(r0, r1)) - pad), max(0, math.ceil(max(r0, r1)) + pad))
    cols = slice(max(0, math.floor(min(c0, c1)) - pad), max(0, math.ceil(max(c0, c1)) + pad))
    return ds.isel(y=rows, x=cols)


def _identity(labels: Labels, spec: SampleSpec, config: PixelsConfig | None, source: str | None) -> dict:
    digest = hashlib.sha1()
    for f, c, w in zip(labels.features, labels.class_of, labels.weight_of):
        digest.update(f"{f.id}|{labels.classes[c]}|{w}|{f.crs}|{f.date}|".encode())
        digest.update(shapely.to_wkb(f.geometry))
    return {"spec": spec.model_dump(mode="json"), "labels": digest.hexdigest(), "classes": list(labels.classes),
            "config": json.loads(config.output_identity) if config is not None else None, "source": source}


def build_samples(labels: Labels, out: str | Path, *, config: PixelsConfig | None = None,
                  features: Sequence[Feature] | None = None, source: str | None = None,
                  spec: SampleSpec | dict | None = None, client: Any = None, cluster: str | None = None,
                  cluster_options: dict | None = None, workers: int = 4, overwrite: bool = False,
                  datasets: dict[str, xr.Dataset] | None = None) -> dict[str, Any]:
    """Draw samples of ``labels`` into the store ``out``; returns its manifest (see ``training.store``).

    Cubes, one unit per feature: ``datasets`` (feature id → a Dataset in hand), else ``source`` (a
    ``run_batch`` Zarr output: its features' groups), else ``collect(config, feature)`` on the fly. Features
    are ``features``, else (with ``config``) one per label (``label_features``), else the groups of
    ``source``. Labels go to the first feature they intersect. A feature's samples are written as one part
    when drawn; a re-run with the same labels, spec and config skips the features whose part exists (a
    changed one is refused unless ``overwrite``), then merges every part again. Cubes compute on ``client``
    (or a cluster opened from ``cluster``/``cluster_options`` as ``collect`` does), else in-process;
    ``workers`` features are in flight at once.
    """
    spec = load_spec(spec)
    out = storage.check_url(str(out)) if storage.is_remote(str(out)) else str(Path(out).absolute())
    if datasets is None and source is None and config is None:
        raise ConfigError("give a configuration to collect cubes, a run_batch output (source) or datasets",
                          "samples")
    if workers < 1:
        raise ConfigError(f"must be at least 1, got {workers}", "workers")
    per_label = datasets is None and features is None and source is None
    feats = label_features(labels, config, spec) if per_label else _features(features, source, datasets)
    ids = [f.id for f in feats]
    if len(set(ids)) != len(ids):
        raise ConfigError("duplicate feature id", "features")
    owned, lost = ({f.id: [k] for k, f in enumerate(feats)}, 0) if per_label else assign(labels, feats)
    identity = _identity(labels, spec, config, source)
    ident_url = storage.join(out, PARTS, "identity.json")
    if overwrite:
        storage.remove_tree(out)
    previous = storage.read_bytes(ident_url)
    if previous is not None and json.loads(previous) != identity:
        raise OutputError("holds samples of other labels, spec or configuration; pass overwrite=True "
                          "(--overwrite) to replace them", out)
    storage.write_bytes(ident_url, json.dumps(identity).encode())
    done = set(storage.list_names(storage.join(out, PARTS)))
    pending = [f for f in feats if f"{f.id}.npz" not in done]
    with contextlib.ExitStack() as stack:
        if client is None and cluster is not None and pending:
            from pixels_xr.cluster import open_client

            client = stack.enter_context(open_client(cluster, cluster_options or (
                config.cluster if config is not None else None), quiet=True))
        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(workers, "pixels-xr-samples"))
        jobs = [pool.submit(_unit, f, owned[f.id], labels, spec, out, config, source, datasets, client)
                for f in pending]
        for job in concurrent.futures.as_completed(jobs):
            job.result()  # the first failure stops the run; the finished parts stay for the re-run
    outputs = {str(ds.attrs.get("output")) for ds in (datasets or {}).values()}
    kind = config.output if config is not None else (outputs.pop() if len(outputs) == 1 else "any")
    context = {"input": kind if kind in ("reflectance", "raw") else "any",
               "labels": {"source": labels.source, "count": len(labels), "not_in_any_feature": lost},
               "config": json.loads(redact_json(config.model_dump_json(exclude_none=True))) if config else None,
               "source": source}
    return merge(out, ids, spec, labels.classes, context=context)


def _features(features: Sequence[Feature] | None, source: str | None,
              datasets: dict[str, xr.Dataset] | None) -> list[Feature]:
    if datasets is not None:
        return [_footprint(fid, ds) for fid, ds in datasets.items()]
    if features is not None:
        return list(features)
    assert source is not None
    names = [n for n in storage.list_names(source) if not n.startswith(".") and n not in {"stac", "zarr.json"}]
    return [_footprint(n, open_feature(source, n)) for n in names]


def _footprint(fid: str, ds: xr.Dataset) -> Feature:
    """A cube's grid as a feature, in the cube's own CRS (its lon/lat bounds would overlap its neighbours')."""
    crs = ds.rio.crs
    if crs is None or crs.to_epsg() is None:
        raise ConfigError("the cube has no EPSG CRS", f"feature {fid!r}")
    return Feature(fid, shapely.box(*ds.rio.bounds()), f"EPSG:{crs.to_epsg()}")


def _unit(feature: Feature, which: list[int], labels: Labels, spec: SampleSpec, out: str,
          config: PixelsConfig | None, source: str | None, datasets: dict[str, xr.Dataset] | None,
          client: Any) -> None:
    """One feature: its cube (cut to its labels), computed, sampled and written as a part."""
    if datasets is not None:
        ds = datasets[feature.id]
    elif source is not None:
        ds = open_feature(source, feature.id)
    else:
        assert config is not None
        ds = collect(config, feature)
    if which:  # a feature without labels writes an empty part (so a re-run knows it is done)
        ds = window(ds, labels, which, spec)
        ds = client.compute(ds).result() if client is not None else ds.compute()
    write_part(out, draw_samples(ds, labels, spec, feature=feature.id, which=which))


__all__ = ["assign", "build_samples", "label_features", "part_url", "window"]
