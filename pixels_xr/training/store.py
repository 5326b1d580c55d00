"""The sample store: per-feature parts, merged once into Parquet (pixels) or Zarr (chips) with a manifest.

Layout::

    OUT/parts/<feature>.npz     one feature's samples (written atomically: a present part is a done unit)
    OUT/parts/identity.json     spec, configuration and labels the parts were drawn with (resume check)
    OUT/samples.parquet         pixels: one row per sample, value columns ``<band>`` or ``<band>_<t>``
    OUT/samples.zarr            chips: ``values`` (sample, [time,] y, x, band) and per-sample variables
    OUT/manifest.json           written last: config, label source, split, counts, bands, normalisation

The merge applies what needs every feature's samples: the per-class cap (``max_per_class``, seeded), the
normalisation (mean and standard deviation per band over the *train* split only, so nothing of validation
or test leaks into the model's inputs) and the class weights. The manifest's ``normalisation`` is exactly
the ``scale``/``offset`` of ``predict``'s sidecar (``value · scale + offset``; nodata → ``fill``), which
``write_sidecar`` writes from it: the loaders and ``predict`` feed a model identical numbers.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pixels_xr._version import __version__
from pixels_xr.errors import ModelError, OutputError
from pixels_xr.inference.sidecar import load_spec as load_sidecar
from pixels_xr.inference.sidecar import sidecar_path
from pixels_xr.io import storage
from pixels_xr.training.sampling import Samples, SampleSpec
from pixels_xr.training.split import SPLITS

MANIFEST = "manifest.json"
PARTS = "parts"
#: Value that nodata inputs take after normalisation (the train mean under ``standard``).
FILL = 0.0
_ARRAYS = ("values", "cls", "weight", "split", "x", "y", "label_id")


def part_url(out: str, feature: str) -> str:
    return storage.join(out, PARTS, f"{feature}.npz")


def write_part(out: str, samples: Samples) -> None:
    """One feature's samples, atomically (the resume unit)."""
    buf = io.BytesIO()
    meta = {"feature": samples.feature, "epsg": samples.epsg, "bands": samples.bands, "times": samples.times,
            "rejected": samples.rejected}
    np.savez_compressed(buf, values=samples.values, cls=samples.cls, weight=samples.weight, split=samples.split,
                        x=samples.x, y=samples.y, label_id=samples.label_id.astype(str),
                        meta=np.array(json.dumps(meta)))
    storage.write_bytes(part_url(out, samples.feature), buf.getvalue())


def read_part(out: str, feature: str, arrays: Sequence[str] = _ARRAYS) -> tuple[dict[str, np.ndarray], dict]:
    raw = storage.read_bytes(part_url(out, feature))
    if raw is None:
        raise OutputError("sample part missing", part_url(out, feature))
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        return {k: z[k] for k in arrays}, json.loads(str(z["meta"]))


def merge(out: str, features: Sequence[str], spec: SampleSpec, classes: Sequence[str], *,
          context: dict[str, Any]) -> dict[str, Any]:
    """Merge the parts of ``features`` (in this order) into the final store; returns the manifest."""
    small = [read_part(out, f, ("cls", "split", "label_id")) for f in features]
    metas = [m for _, m in small]
    bands = next((m["bands"] for m in metas if m["bands"]), [])
    times = next((m["times"] for m in metas if m["times"]), [])
    for f, m in zip(features, metas):
        if m["bands"] != bands or len(m["times"]) != len(times):
            raise OutputError(f"feature {f!r} has bands {m['bands']} and {len(m['times'])} time steps, others "
                              f"{bands} and {len(times)}: samples of one store need one layout", "samples")
    cls = np.concatenate([p["cls"] for p, _ in small]) if small else np.empty(0, np.int16)
    keep = _capped(cls, spec)
    offsets = np.cumsum([0] + [len(p["cls"]) for p, _ in small])
    split_all = np.concatenate([p["split"] for p, _ in small]) if small else np.empty(0, np.uint8)
    # normalisation over the train split, one pass over the parts
    n_b = len(bands)
    total, sq, count = np.zeros(n_b), np.zeros(n_b), np.zeros(n_b)
    for i, f in enumerate(features):
        mask = keep[offsets[i]:offsets[i + 1]] & (split_all[offsets[i]:offsets[i + 1]] == 0)
        if not mask.any():
            continue
        v = read_part(out, f, ("values",))[0]["values"][mask].reshape(-1, n_b).astype(np.float64)
        ok = ~np.isnan(v)
        total += np.where(ok, v, 0).sum(0)
        sq += np.where(ok, v * v, 0).sum(0)
        count += ok.sum(0)
    if spec.normalise == "standard":
        if (count == 0).any():
            raise OutputError("no train sample to normalise with (no sample fell in a train block: more "
                              "labels, a smaller block_size or other fractions)", "samples")
        mean = total / count
        std = np.sqrt(np.maximum(sq / count - mean**2, 0))
        std = np.where(std > 0, std, 1.0)
        scale, offset = (1 / std).tolist(), (-mean / std).tolist()
    else:
        mean, std = np.full(n_b, np.nan), np.full(n_b, np.nan)
        scale, offset = [1.0] * n_b, [0.0] * n_b
    kept_cls, kept_split = cls[keep], split_all[keep]
    counts = {s: {c: int(((kept_split == k) & (kept_cls == j)).sum()) for j, c in enumerate(classes)}
              for k, s in enumerate(SPLITS)}
    weights = _class_weights(counts["train"], spec)
    table = _write_store(out, features, keep, offsets, spec, classes, bands, times, weights)
    rejected: dict[str, int] = {}
    for m in metas:
        for k, v in m["rejected"].items():
            rejected[k] = rejected.get(k, 0) + int(v)
    rejected["max_per_class"] = int((~keep).sum())
    shape = ([len(times)] if spec.time is None else []) + ([spec.size] * 2 if spec.kind == "chips" else []) + [n_b]
    manifest = {
        "format": "pixels_xr.samples", "version": 1, "software": f"pixels_xr {__version__}",
        "kind": spec.kind, "store": table, "spec": spec.model_dump(mode="json"),
        "classes": list(classes), "bands": bands, "times": times, "sample_shape": shape,
        "epsg": sorted({m["epsg"] for m in metas}),
        "input": context.get("input", "any"),
        "normalisation": {"method": spec.normalise, "scale": scale, "offset": offset, "fill": FILL,
                          "mean": _floats(mean), "std": _floats(std)},
        "split": {"method": "spatial blocks", "block_size": spec.block_size, "buffer": spec.resolved_buffer,
                  "fractions": dict(zip(SPLITS, spec.fractions)), "seed": spec.seed},
        "counts": counts, "class_weights": weights, "rejected": rejected,
        "features": [{"id": f, "samples": int(keep[offsets[i]:offsets[i + 1]].sum())}
                     for i, f in enumerate(features)],
        **{k: v for k, v in context.items() if k != "input"},
    }
    storage.write_bytes(storage.join(out, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def _floats(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def _capped(cls: np.ndarray, spec: SampleSpec) -> np.ndarray:
    """At most ``max_per_class`` samples of each class, chosen by a generator seeded per class."""
    keep = np.ones(len(cls), bool)
    if spec.max_per_class is None:
        return keep
    for c in np.unique(cls):
        idx = np.flatnonzero(cls == c)
        if idx.size > spec.max_per_class:
            rng = np.random.default_rng([spec.seed, 1, int(c)])
            keep[idx] = False
            keep[rng.choice(idx, spec.max_per_class, replace=False)] = True
    return keep


def _class_weights(train: dict[str, int], spec: SampleSpec) -> dict[str, float]:
    """``balanced``: N / (K · n_c) over the train split (scikit-learn's rule); classes absent there get 0."""
    present = {c: n for c, n in train.items() if n > 0}
    if spec.class_weights == "none" or not present:
        return {c: 1.0 for c in train}
    n, k = sum(present.values()), len(present)
    return {c: (n / (k * present[c]) if c in present else 0.0) for c in train}


def value_columns(bands: Sequence[str], times: Sequence[str], timed: bool) -> list[str]:
    """Parquet value columns in (time, band) order: ``<band>`` without a time axis, else ``<band>_<t>``."""
    return list(bands) if not timed else [f"{b}_{t}" for t in range(len(times)) for b in bands]


def _write_store(out: str, features: Sequence[str], keep: np.ndarray, offsets: np.ndarray, spec: SampleSpec,
                 classes: Sequence[str], bands: list[str], times: list[str], weights: dict[str, float]) -> str:
    if spec.kind == "pixels":
        return _write_parquet(out, features, keep, offsets, spec, classes, bands, times)
    return _write_zarr(out, features, keep, offsets, spec, classes, bands, times)


def _columns(part: dict[str, np.ndarray], mask: np.ndarray, feature: str, classes: Sequence[str],
             spec: SampleSpec) -> dict[str, np.ndarray]:
    x, y = part["x"][mask], part["y"][mask]
    return {"feature": np.full(int(mask.sum()), feature, object), "label_id": part["label_id"][mask].astype(object),
            "class": part["cls"][mask].astype(np.int16),
            "class_name": np.array(classes, object)[part["cls"][mask]] if mask.any() else np.empty(0, object),
            "split": np.array(SPLITS, object)[part["split"][mask]] if mask.any() else np.empty(0, object),
            "weight": part["weight"][mask].astype(np.float32), "x": x, "y": y,
            "block_x": np.floor(x / spec.block_size).astype(np.int64),
            "block_y": np.floor(y / spec.block_size).astype(np.int64)}


def _write_parquet(out: str, features: Sequence[str], keep: np.ndarray, offsets: np.ndarray, spec: SampleSpec,
                   classes: Sequence[str], bands: list[str], times: list[str]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = value_columns(bands, times, spec.time is None)
    url = storage.join(out, "samples.parquet")
    writer = None
    with storage.staged_file(url, ".parquet") as tmp:
        for i, f in enumerate(features):
            part, _ = read_part(out, f)
            mask = keep[offsets[i]:offsets[i + 1]]
            cols = _columns(part, mask, f, classes, spec)
            values = part["values"][mask].reshape(int(mask.sum()), -1)
            cols.update({n: values[:, k] for k, n in enumerate(names)})
            table = pa.table(cols)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
        if writer is None:  # no sample at all: an empty table with the columns
            cols = _columns({k: np.empty(0, t) for k, t in (("x", float), ("y", float), ("cls", np.int16),
                             ("split", np.uint8), ("weight", np.float32), ("label_id", str))},
                            np.empty(0, bool), "", classes, spec)
            cols.update({n: np.empty(0, np.float32) for n in names})
            pq.write_table(pa.table(cols), tmp)
        else:
            writer.close()
    return "samples.parquet"


def _write_zarr(out: str, features: Sequence[str], keep: np.ndarray, offsets: np.ndarray, spec: SampleSpec,
                classes: Sequence[str], bands: list[str], times: list[str]) -> str:
    import xarray as xr

    url = storage.join(out, "samples.zarr")
    storage.remove_tree(url)
    dims = ("sample",) + (("time",) if spec.time is None else ()) + ("cy", "cx", "band")
    per_chunk = max(1, (4 * 2**20) // (4 * spec.size**2 * max(len(bands), 1) * max(len(times), 1)))
    written = False
    empty = None
    for i, f in enumerate(features):
        part, _ = read_part(out, f)
        mask = keep[offsets[i]:offsets[i + 1]]
        cols = _columns(part, mask, f, classes, spec)
        ds = xr.Dataset({"values": (dims, part["values"][mask]), **{k: ("sample", v) for k, v in cols.items()}},
                        coords={"band": np.array(bands, dtype=object)})
        if not mask.any():  # an empty object column would be written as float: only written if all are empty
            empty = ds if empty is None else empty
            continue
        if written:
            ds.drop_vars("band").to_zarr(url, append_dim="sample", consolidated=False)
        else:
            enc = {"values": {"chunks": (per_chunk, *ds["values"].shape[1:])}}
            ds.to_zarr(url, mode="w", encoding=enc, consolidated=False)
            written = True
    if not written and empty is not None:
        empty = empty.assign({k: ("sample", np.empty(0, "U1")) for k, v in empty.data_vars.items()
                              if v.dtype == object})
        empty.to_zarr(url, mode="w", consolidated=False)
    return "samples.zarr"


def read_manifest(store: str | Path) -> dict[str, Any]:
    """The manifest of a sample store (the folder ``build_samples`` wrote)."""
    url = storage.join(str(store), MANIFEST)
    raw = storage.read_bytes(url)
    if raw is None:
        raise OutputError("no manifest.json: not a finished sample store", str(store))
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OutputError(f"invalid manifest: {exc}", url) from None
    if not isinstance(manifest, dict) or manifest.get("format") != "pixels_xr.samples":
        raise OutputError("not a pixels_xr sample manifest", url)
    return manifest


def sidecar_from(manifest: dict[str, Any], *, colors: dict[str, list[int]] | None = None, margin: int = 0,
                 patch: tuple[int, int] | None = None) -> dict[str, Any]:
    """The ``predict`` sidecar of a model trained on the store: its bands, normalisation, nodata fill and
    classes."""
    norm = manifest["normalisation"]
    side: dict[str, Any] = {"bands": manifest["bands"], "scale": norm["scale"], "offset": norm["offset"],
                            "input": manifest.get("input", "any"), "nodata": {"when": "any", "fill": norm["fill"]},
                            "classes": manifest["classes"], "margin": margin}
    if colors:
        side["colors"] = colors
    if patch is not None:
        side["patch"] = list(patch)
    load_sidecar(side)  # the sidecar predict will read: validated now
    return side


def write_sidecar(store: str | Path | dict[str, Any], model: str | Path, **kwargs: Any) -> str:
    """Write the sidecar of ``model`` (``a.keras`` → ``a.json``) from a store or its manifest; returns its path."""
    manifest = store if isinstance(store, dict) else read_manifest(store)
    try:
        side = sidecar_from(manifest, **kwargs)
    except ModelError as exc:
        raise ModelError(exc.message, f"sidecar of {model}: {exc.where}") from None
    path = sidecar_path(model)
    storage.write_bytes(path, json.dumps(side, indent=1).encode())
    return path
