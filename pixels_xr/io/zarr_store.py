"""Zarr outputs: one store per run, one group per feature, written as a template then per-bin regions.

Layout (scales to many features: groups are independent prefixes, nothing is consolidated at the root, so
concurrent writers never touch a shared object)::

    OUT.zarr/zarr.json                 root group
    OUT.zarr/<feature id>/…            one Dataset per feature (time, y, x): bands, clear_count, source_time
    OUT.zarr/.pixels_xr/…              run manifest (see batch), never a Zarr node

A group's small member is written whole by ``write_feature`` (one chunk per variable, chunk keys
``c.0.0.0``); everything else as below.

``write_template`` writes every array's metadata and the coordinates (``compute=False`` for the data);
``region_write`` gives the delayed write of one time bin (or a run of bins; optionally after the template,
in the same graph), one fused task per block, so bins and features can be written independently and in
parallel. Dask chunks are aligned to Zarr chunks (one time step × ``chunksize``
pixels) before writing; a misaligned chunking raises instead of silently corrupting neighbouring regions.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.delayed import Delayed

from pixels_xr.errors import OutputError
from pixels_xr.graph import block_graph

ZARR_FORMATS = (2, 3)
#: Largest variable (bytes) ``write_feature`` stores as a single chunk (all steps, the whole window).
WHOLE_CHUNK_BYTES = 4 * 2**20


def aligned(ds: xr.Dataset, chunksize: int) -> xr.Dataset:
    """``ds`` rechunked to one time step × ``chunksize`` pixels, with matching Zarr chunk encodings."""
    cy, cx = _chunk_shape(ds, chunksize)
    in_memory = {k: c.variable for k, c in ds.coords.items() if c.chunks is None and k not in ds.indexes}
    ds = _json_attrs(ds.chunk({"time": 1, "y": cy, "x": cx}).assign_coords(in_memory))
    # coordinates stay numpy so the template writes them (region writes carry data variables only); those
    # that were lazy are computed here, in this thread: through a cluster's client each costs a round trip
    ds = ds.assign_coords({k: c.compute(scheduler="synchronous") for k, c in ds.coords.items()
                           if c.chunks is not None})
    _set_encodings(ds, cy, cx)
    check_alignment(ds)
    return ds


def _chunk_shape(ds: xr.Dataset, chunksize: int) -> tuple[int, int]:
    return min(chunksize, ds.sizes["y"]) or 1, min(chunksize, ds.sizes["x"]) or 1


def _set_encodings(ds: xr.Dataset, cy: int, cx: int, steps: int = 1, shards: int | None = None) -> None:
    """The Zarr encoding of every data variable: chunks of ``steps`` time steps × ``cy`` × ``cx`` (with
    ``shards``: stored ``shards`` steps to an object, each step its own chunk inside), NaN fill for floats,
    integers without a fill (nodata stays an attribute), datetimes as int64 microseconds."""
    for var in ds.data_vars.values():
        var.encoding = variable_encoding(var.dtype, (steps, cy, cx),
                                         None if shards is None else (shards, cy, cx))


def variable_encoding(dtype: np.dtype, chunks: tuple[int, ...],
                      shards: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The encoding ``aligned`` gives a data variable of ``dtype`` (also what a step write encodes with)."""
    encoding: dict[str, Any] = {"chunks": chunks}
    if shards is not None:
        encoding["shards"] = shards
    if dtype.kind == "f":
        encoding["_FillValue"] = np.float32(np.nan) if dtype == np.float32 else np.nan
    elif dtype.kind in "ui":  # integers keep their dtype on read: nodata stays an attribute
        encoding["_FillValue"] = None
    elif dtype.kind == "M":
        encoding.update(units="microseconds since 1970-01-01", dtype="int64")
    return encoding


def write_feature(ds: xr.Dataset, store: str, group: str, *, chunksize: int, zarr_format: int = 3) -> None:
    """A whole in-memory feature Dataset written at once, metadata and data, encoded as ``aligned``
    encodes: what a worker does for a small member of a group, instead of a template plus region writes.

    A small feature (every variable at most ``WHOLE_CHUNK_BYTES``) is stored as one object per variable,
    all its time steps together: an object per step was a dozen files per variable, and creating files,
    not encoding pixels, was most of a member's write. In Zarr v3 that object is a shard of one chunk per
    step (``sharding_indexed``), so a later write of some steps (an incremental run: ``update_feature``)
    encodes only those steps and copies the others' bytes: with one chunk of every step, re-encoding the
    unchanged steps was most of such an update. Zarr v2 has no shards: there the object is one chunk.
    One task writes a feature, so no two writers share an object (``region_write`` refuses such a store:
    ``time_chunk``). The group's files are made in memory (``feature_files``) and written in one go
    (``storage.write_tree``: renamed into place locally, PUT concurrently on object stores)."""
    from pixels_xr.io import storage

    _check_format(zarr_format)
    ds = _json_attrs(ds)
    whole = all(v.nbytes <= WHOLE_CHUNK_BYTES for v in ds.data_vars.values())
    steps = max(ds.sizes.get("time", 1), 1) if whole else 1
    cy, cx = (ds.sizes["y"] or 1, ds.sizes["x"] or 1) if whole else _chunk_shape(ds, chunksize)
    if whole and zarr_format == 3:
        _set_encodings(ds, cy, cx, 1, shards=steps)
    else:
        _set_encodings(ds, cy, cx, steps)
    root, files = feature_files(ds, zarr_format)
    for name, data in root.items():  # the store's root group, made once (by the first writer)
        if not storage.exists(storage.join(store, name)):
            storage.write_bytes(storage.join(store, name), data)
    storage.write_tree(storage.join(store, group), files)


#: Per process: the Zarr metadata xarray wrote for each structure of feature Dataset seen (``_structure``).
_LAYOUTS: dict[tuple, dict[str, Any] | None] = {}
_TEMPLATE_GROUP = "template"


def feature_files(ds: xr.Dataset, zarr_format: int = 3) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """The files of the store's root group and of ``ds`` as a Zarr group in it (names relative to each),
    as xarray's ``to_zarr`` writes them (``ds`` encoded: ``_set_encodings``).

    xarray's own write goes through zarr's store one await per array and chunk: about 60-250 ms for a small
    feature's 80-odd files, most of it waiting on zarr's event-loop thread. The first Dataset of each
    structure (variables, dims, dtypes, encodings, attributes' names, time values) is written by xarray; its
    metadata is kept, and every later Dataset of that structure is written from it directly: the
    metadata with this Dataset's shapes and attributes, and its chunks encoded with the very codecs the
    metadata names (Zarr v3 ``bytes`` + ``zstd`` only; any other layout always goes through xarray). Chunk
    keys use the ``.`` separator Zarr v3 allows (``c.0.0.0``): with ``/`` every time step is two more
    folders, and making folders was most of a small feature's write on a local disk."""
    key = _structure(ds, zarr_format)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _layout_of(*_xarray_files(ds, zarr_format), zarr_format)
    layout = _LAYOUTS[key]
    if layout is not None:
        try:
            return layout["root"], _direct_files(ds, layout)
        except _NotDirect:
            pass
    return _xarray_files(ds, zarr_format)


class _NotDirect(Exception):
    """This Dataset's files cannot be made from the kept metadata (xarray writes them)."""


def _xarray_files(ds: xr.Dataset, zarr_format: int) -> tuple[dict[str, bytes], dict[str, bytes]]:
    import zarr

    store: dict[str, Any] = {}
    ds.to_zarr(zarr.storage.MemoryStore(store_dict=store), group=_TEMPLATE_GROUP, mode="w",
               zarr_format=zarr_format, consolidated=False)
    prefix = f"{_TEMPLATE_GROUP}/"
    return ({name: data.to_bytes() for name, data in store.items() if "/" not in name},
            {name[len(prefix):]: data.to_bytes() for name, data in store.items() if name.startswith(prefix)})


def _structure(ds: xr.Dataset, zarr_format: int) -> tuple:
    """What decides a Dataset's Zarr metadata apart from its shapes and attribute values."""
    variables = tuple(sorted(
        (str(n), v.dims, v.dtype.str, tuple(sorted((k, repr(e)) for k, e in v.encoding.items() if k not in ("chunks", "shards"))),
         v.encoding.get("shards") is not None,
         tuple(sorted(v.attrs)), n in ds.coords)
        for n, v in ds.variables.items()))
    # xarray picks the units of datetime coordinates from their values
    times = tuple((str(n), ds[n].values.tobytes()) for n in ds.coords if ds[n].dtype.kind == "M")
    return zarr_format, variables, tuple(sorted(ds.attrs)), times


def _layout_of(root: dict[str, bytes], files: dict[str, bytes], zarr_format: int) -> dict[str, Any] | None:
    """The metadata of every array of a group xarray wrote, when they can all be written directly (Zarr v3,
    regular chunks, ``bytes`` little-endian then ``zstd``, or a shard of such chunks: ``_codec_of``); else
    None."""
    if zarr_format != 3:
        return None
    import json

    arrays = {}
    for name, data in files.items():
        parts = name.split("/")
        if len(parts) != 2 or parts[1] != "zarr.json":
            continue
        meta = json.loads(data)
        if (meta.get("chunk_grid", {}).get("name") != "regular" or meta.get("storage_transformers")
                or meta.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}
                or _codec_of(meta) is None):
            return None
        meta["chunk_key_encoding"] = {"name": "default", "configuration": {"separator": "."}}
        arrays[parts[0]] = meta
    group = files.get("zarr.json")
    return {"arrays": arrays, "root": root, "group": json.loads(group)} if arrays and group else None


@dataclass(frozen=True)
class _Codec:
    """How an array's stored objects are encoded: ``zstd`` over little-endian bytes, either as whole chunks
    (``inner`` None) or as a shard of chunks of shape ``inner`` (zarr's ``sharding_indexed``: the chunks'
    bytes one after the other, then their (offset, size) index with a CRC32C, all-fill chunks left out)."""

    zstd: Any
    inner: tuple[int, ...] | None


_PLAIN_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
_EMPTY_CHUNK = 2**64 - 1


def _codec_of(meta: dict[str, Any]) -> _Codec | None:
    """The codec of a Zarr v3 array's metadata when ``_direct_files`` and ``update_feature`` can write it."""
    import numcodecs

    def zstd_of(codecs: list[dict[str, Any]]) -> Any:
        if len(codecs) == 2 and {**_PLAIN_BYTES, **codecs[0]} == _PLAIN_BYTES and codecs[1].get("name") == "zstd":
            level = codecs[1].get("configuration", {})
            return numcodecs.Zstd(level=level.get("level", 0), checksum=level.get("checksum", False))
        return None

    codecs = meta.get("codecs", [])
    if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
        config = codecs[0].get("configuration", {})
        index = config.get("index_codecs", [])
        zstd = zstd_of(config.get("codecs", []))
        if (zstd is None or config.get("index_location", "end") != "end" or len(index) != 2
                or {**_PLAIN_BYTES, **index[0]} != _PLAIN_BYTES or index[1].get("name") != "crc32c"):
            return None
        return _Codec(zstd, tuple(config["chunk_shape"]))
    zstd = zstd_of(codecs)
    return None if zstd is None else _Codec(zstd, None)


def _encode_object(values: np.ndarray, codec: _Codec, fill: Any) -> bytes | None:
    """One stored object (a chunk, or a shard of chunks) of ``values`` (its full extent, padded); None for a
    shard whose chunks are all fill (zarr writes none)."""
    if codec.inner is None:
        return codec.zstd.encode(np.ascontiguousarray(values).tobytes())
    grid = [range(0, n, c) for n, c in zip(values.shape, codec.inner)]
    chunks = [values[tuple(slice(g[i], g[i] + c) for g, i, c in zip(grid, corner, codec.inner))]
              for corner in np.ndindex(*[len(g) for g in grid])]
    return _shard_of([_encode_chunk(chunk, codec, fill) for chunk in chunks])


def _encode_chunk(chunk: np.ndarray, codec: _Codec, fill: Any) -> bytes | None:
    """One chunk of a shard encoded; None when it is all fill (zarr leaves such a chunk out)."""
    nan_fill = np.asarray(fill).dtype.kind == "f" and np.isnan(fill)
    all_fill = np.isnan(chunk).all() if nan_fill else (chunk == fill).all()
    return None if all_fill else codec.zstd.encode(np.ascontiguousarray(chunk).tobytes())


def _shard_of(encoded: list[bytes | None]) -> bytes | None:
    """A shard from its chunks' encoded bytes in C order (None: all fill); None when every chunk is."""
    import numcodecs

    if all(e is None for e in encoded):
        return None
    index = np.full((len(encoded), 2), _EMPTY_CHUNK, dtype="<u8")
    offset = 0
    for k, e in enumerate(encoded):
        if e is not None:
            index[k] = offset, len(e)
            offset += len(e)
    return b"".join(e for e in encoded if e is not None) + bytes(numcodecs.CRC32C().encode(index.tobytes()))


def _shard_chunks(data: bytes | None, n: int) -> list[bytes | None]:
    """The encoded bytes of a shard's ``n`` chunks (None: all fill), the inverse of ``_shard_of``."""
    if data is None:
        return [None] * n
    index = np.frombuffer(data[-(16 * n + 4):-4], dtype="<u8").reshape(n, 2)
    return [None if int(o) == _EMPTY_CHUNK else data[int(o):int(o) + int(size)] for o, size in index]


def _direct_files(ds: xr.Dataset, layout: dict[str, Any]) -> dict[str, bytes]:
    import json

    out = {}
    group = dict(layout["group"])
    group["attributes"] = _attr_values(ds.attrs)
    out["zarr.json"] = json.dumps(group).encode()
    for name, template in layout["arrays"].items():
        var = ds.variables[name]
        meta = json.loads(json.dumps(template))
        codec = _codec_of(meta)
        shape = list(var.shape)
        if name in ds.data_vars:
            encoding = var.encoding
            chunks = list(encoding.get("shards") or encoding.get("chunks") or shape)
            if (codec.inner is None) != (encoding.get("shards") is None):
                raise _NotDirect(name)
        else:
            chunks = shape
            if meta["chunk_grid"]["configuration"]["chunk_shape"] != meta["shape"] or codec.inner is not None:
                raise _NotDirect(name)  # a coordinate of several chunks
        meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"] = shape, chunks
        if codec.inner is not None:
            codec = _Codec(codec.zstd, tuple(var.encoding["chunks"]))
            meta["codecs"][0]["configuration"]["chunk_shape"] = list(codec.inner)
        meta["attributes"] = {**meta["attributes"], **_attr_values(var.attrs)}
        out[f"{name}/zarr.json"] = json.dumps(meta).encode()
        encoded = _encoded(name, var, name in ds.coords)
        values = encoded.astype(np.dtype(meta["data_type"]).newbyteorder("<"), copy=False)
        fill = _fill_of(meta, values.dtype)
        if values.ndim == 0:
            out[f"{name}/c"] = codec.zstd.encode(values.tobytes())
            continue
        grid = [range(0, n, c) for n, c in zip(shape, chunks)]
        for corner in np.ndindex(*[len(g) for g in grid]):
            start = [g[i] for g, i in zip(grid, corner)]
            block = values[tuple(slice(a, a + c) for a, c in zip(start, chunks))]
            if block.shape != tuple(chunks):  # edge chunks are stored whole, padded with the fill value
                padded = np.full(chunks, fill, dtype=values.dtype)
                padded[tuple(slice(0, n) for n in block.shape)] = block
                block = padded
            data = _encode_object(block, codec, fill)
            if data is not None:
                out[f"{name}/c." + ".".join(str(i) for i in corner)] = data
    return out


_ENCODED_TIMES: dict[tuple, np.ndarray] = {}


def _encoded(name: str, var: xr.Variable, coordinate: bool) -> np.ndarray:
    """A variable's values CF-encoded as xarray encodes them; datetime coordinates (the same bins for
    every member of a run) encoded once per process."""
    if not (coordinate and var.dtype.kind == "M"):
        cast = None if coordinate else _datetimes_as(var.values, var.encoding,
                                                     np.dtype(var.encoding.get("dtype", "int64")))
        return cast if cast is not None else np.asarray(xr.conventions.encode_cf_variable(var, name=name).data)
    key = (name, var.values.tobytes(), repr(sorted(var.encoding.items())))
    if key not in _ENCODED_TIMES:
        if len(_ENCODED_TIMES) > 256:
            _ENCODED_TIMES.clear()
        _ENCODED_TIMES[key] = np.asarray(xr.conventions.encode_cf_variable(var, name=name).data)
    return _ENCODED_TIMES[key]


def _attr_values(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes as JSON values (numpy scalars and arrays as Python's)."""
    return {k: (v.tolist() if isinstance(v, (np.ndarray, np.generic)) else v) for k, v in attrs.items()}


def _fill_of(meta: dict[str, Any], dtype: np.dtype) -> Any:
    fill = meta.get("fill_value", 0)
    return np.nan if fill == "NaN" else dtype.type(fill)


def update_feature(store: str, group: str, values: dict[str, np.ndarray], at: list[int],
                   axis: xr.Dataset | None = None,
                   attrs: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> bool:
    """A whole-written feature (``write_feature``'s one chunk per variable) given new ``values`` at time
    positions ``at`` and, with ``axis``, its time axis (as ``write_time_axis``), with ``attrs`` (old group
    attributes → new) its attributes: the group read and changed in memory. A grown axis changes shapes, so
    the group is written back whole (``storage.write_tree``: a reader of a local store finds the old group
    or the new one — for the instant between its two renames, none — never a half-grown axis); new values
    at existing steps replace only the files that changed, each atomically (``storage.write_files``:
    rewriting the whole tree was a third of such an update).
    Returns False, changing nothing, when the group is not in that layout (then ``write_time_axis`` and
    ``write_steps`` do it through zarr).

    Through zarr the same update was about 250 ms of a worker per small member (an open, a read and a
    write per array, each a round trip to zarr's event loop); here it is one read and one write of the
    group's few files. Unchanged metadata keeps its bytes, and each chunk is encoded with the codec its
    metadata names, so the group equals what ``write_feature`` makes from the updated Dataset."""
    import json

    from pixels_xr.io import storage

    url = storage.join(store, group)
    files = storage.read_tree(url)
    try:
        group_meta = json.loads(files["zarr.json"])
    except (KeyError, ValueError):
        return False
    metas: dict[str, tuple[dict[str, Any], _Codec]] = {}
    for name, data in files.items():
        if name.endswith("/zarr.json") and name.count("/") == 1:
            meta = json.loads(data)
            chunks = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
            codec = _codec_of(meta) if meta.get("zarr_format") == 3 else None
            dims = tuple(meta.get("dimension_names") or ())
            if not (codec is not None and chunks == meta.get("shape")
                    and meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator") == "."
                    and (codec.inner is None or (dims[:1] == ("time",)
                                                 and list(codec.inner) == [1, *meta["shape"][1:]]))):
                return False
            metas[name.split("/")[0]] = meta, codec
    if any(name not in metas for name in values):
        return False
    out = dict(files)
    whole = False  # the group rewritten whole (shapes changed, or an object left out)
    n = None if axis is None else axis.sizes["time"]
    for name, (meta, codec) in metas.items():
        dims = tuple(meta.get("dimension_names") or ())
        key = f"{name}/c" + "".join(f".{0}" for _ in meta["shape"])
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        fill = _fill_of(meta, dtype)
        shape = tuple(meta["shape"])
        changed_shape = n is not None and dims[:1] == ("time",) and shape[0] < n
        coord = axis is not None and name in axis.coords and axis[name].dims == ("time",)
        if name not in values and not changed_shape and not coord:
            continue
        raw = files.get(key)
        new_shape = (n, *shape[1:]) if changed_shape else shape
        if name in values:
            data = values[name]
            encoded = _datetimes_as(data, meta.get("attributes", {}), dtype)
            if encoded is None:
                encoded = np.asarray(xr.conventions.encode_cf_variable(
                    xr.Variable(("time", "y", "x"), data, encoding=variable_encoding(data.dtype, new_shape)),
                    name=name).data)
            encoded = encoded.astype(dtype, copy=False)
        if codec.inner is not None:  # a shard of one chunk per step: only the steps given are encoded
            steps = _shard_chunks(raw, shape[0]) + [None] * (new_shape[0] - shape[0])
            for k, position in enumerate(at if name in values else []):
                steps[position] = _encode_chunk(encoded[k], codec, fill)
            data_out = _shard_of(steps)
        else:
            current = (np.frombuffer(codec.zstd.decode(raw), dtype=dtype).reshape(shape) if raw is not None
                       else np.full(shape, fill, dtype=dtype))
            if changed_shape:
                grown = np.full(new_shape, fill, dtype=dtype)
                grown[:shape[0]] = current
                current = grown
            else:
                current = current.copy()
            if coord:
                attributes = meta.get("attributes", {})
                encoding = {k: attributes[k] for k in ("units", "calendar") if k in attributes}
                encoded_axis = _encoded(name, xr.Variable(("time",), axis[name].values,
                                                          encoding={**encoding, "dtype": dtype}), True)  # once per axis
                current[:len(axis[name])] = encoded_axis.astype(dtype)
            if name in values:
                current[list(at)] = encoded
            data_out = codec.zstd.encode(np.ascontiguousarray(current).tobytes())
        if new_shape != shape:
            meta["shape"] = meta["chunk_grid"]["configuration"]["chunk_shape"] = list(new_shape)
            key = f"{name}/c" + "".join(f".{0}" for _ in new_shape)
            out[f"{name}/zarr.json"] = json.dumps(meta).encode()
            whole = True
        if data_out is None:
            whole = whole or key in out
            out.pop(key, None)
        else:
            out[key] = data_out
    if attrs is not None:
        group_meta["attributes"] = _attr_values(_json_attrs(xr.Dataset(attrs=attrs(
            dict(group_meta.get("attributes", {}))))).attrs)
        out["zarr.json"] = json.dumps(group_meta).encode()
    if whole:
        storage.write_tree(url, out)
    else:
        storage.write_files(url, {name: data for name, data in out.items() if files.get(name) != data})
    return True


#: CF time units a datetime64 array is encoded in by a plain cast (xarray's own encoding goes through pandas
#: and was a fifth of a member update, for the same integers)
_CAST_UNITS = {"nanoseconds": "ns", "microseconds": "us", "milliseconds": "ms", "seconds": "s"}


def _datetimes_as(data: np.ndarray, attributes: dict[str, Any], dtype: np.dtype) -> np.ndarray | None:
    """``data`` (datetime64) as the integers a variable with these CF ``attributes`` stores, NaT as
    int64's minimum (as xarray writes it); None where that takes more than a cast (then xarray encodes):
    not datetimes, other units, epoch or calendar, or values the unit would truncate."""
    if data.dtype.kind != "M" or dtype.kind != "i" or dtype.itemsize != 8:
        return None
    unit, _, epoch = str(attributes.get("units", "")).partition(" since ")
    if (unit not in _CAST_UNITS or epoch not in ("1970-01-01", "1970-01-01 00:00:00", "1970-01-01T00:00:00")
            or attributes.get("calendar", "proleptic_gregorian") not in ("proleptic_gregorian", "standard")):
        return None
    cast = data.astype(f"datetime64[{_CAST_UNITS[unit]}]")
    if not np.array_equal(cast.astype(data.dtype), data, equal_nan=True):
        return None  # xarray would pick finer units for these
    return cast.view(np.int64)


def write_steps(store: str, group: str, values: dict[str, np.ndarray], at: list[int]) -> None:
    """In-memory ``(step, y, x)`` arrays written into an existing feature group (``write_template``'s) at
    time positions ``at`` (one per step), encoded as its template encoded them."""
    import zarr

    root = zarr.open_group(store, path=group, mode="r+")
    runs: list[list[int]] = []  # consecutive positions go in one write
    for k, position in enumerate(at):
        if runs and at[runs[-1][-1]] == position - 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    for name, data in values.items():
        arr = root[name]
        encoding = variable_encoding(data.dtype, tuple(arr.chunks))
        for run in runs:
            part = data[run[0]:run[-1] + 1]
            encoded = xr.conventions.encode_cf_variable(
                xr.Variable(("time", "y", "x"), part, encoding=dict(encoding)), name=name)
            arr[at[run[0]]:at[run[-1]] + 1] = np.asarray(encoded.data)


def _json_attrs(ds: xr.Dataset) -> xr.Dataset:
    """A copy whose attributes (dataset, variables, coordinates) are all JSON-serialisable."""
    def keep(value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return all(keep(v) for v in value)
        return isinstance(value, (str, int, float, bool, np.integer, np.floating, np.bool_))

    ds = ds.copy()
    ds.attrs = {k: v for k, v in ds.attrs.items() if keep(v)}
    for name in list(ds.variables):
        ds[name].attrs = {k: v for k, v in ds[name].attrs.items() if keep(v)}
    return ds


def check_alignment(ds: xr.Dataset) -> None:
    """Raise when a variable's dask chunks do not line up with its Zarr chunks (all but the last equal)."""
    for name, var in ds.data_vars.items():
        target = var.encoding.get("chunks")
        if var.chunks is None or target is None:
            continue
        for dim, sizes, size in zip(var.dims, var.chunks, target):
            if any(s != size for s in sizes[:-1]) or sizes[-1] > size:
                raise OutputError(f"dask chunks {sizes} along {dim!r} do not match the Zarr chunk {size}", name)


def write_template(ds: xr.Dataset, store: str, group: str, *, zarr_format: int = 3) -> None:
    """Create ``group`` in ``store`` with all metadata and coordinates; data arrays stay unwritten (fill)."""
    _check_format(zarr_format)
    ds.to_zarr(store, group=group, mode="w", compute=False, zarr_format=zarr_format, consolidated=False)


def _check_format(zarr_format: int) -> None:
    if zarr_format not in ZARR_FORMATS:
        raise OutputError(f"zarr_format must be 2 or 3, got {zarr_format}", "zarr_format")


def region_write(ds: xr.Dataset, store: str, group: str, index: int | slice, *, at: int | None = None,
                 template_format: int | None = None) -> Delayed:
    """The delayed write of time step(s) ``index`` of ``ds`` into its template (``write_template``), at
    the same steps of the store's time axis or from step ``at`` (a store whose axis holds more bins than
    ``ds``: bins outside today's range, kept); ``template_format`` (2 or 3) writes the template first, as a
    task of the same graph (on a worker: the client plans the next features meanwhile).

    One task per block writes that block of every variable and runs, inside itself, the work only that
    block needs (``fused.block_graph``): one task instead of about 25 per block, which on a cluster was most
    of the scheduler's and the client's time (xarray's own region write makes a store task per variable
    and block, and its checks cost ~40 ms of client time per call). Values are CF-encoded as xarray encodes
    them (``encode_cf_variable`` with each variable's encoding), so readers see no difference.
    """
    from pixels_xr.graph import List, Task, TaskRef

    region = index if isinstance(index, slice) else slice(index, index + 1)
    names = [name for name, var in ds.data_vars.items() if "time" in var.dims]
    part = ds[names].isel(time=region)
    first = part[names[0]]
    if any(part[n].dims != first.dims or part[n].chunks != first.chunks for n in names):
        raise OutputError("variables of a region write must share dims and chunks", group)
    target = _BlockTarget(store, group, first.dims, first.chunks,
                          tuple(((region.start or 0) if at is None else at) if d == "time" else 0
                                for d in first.dims),
                          tuple((n, dict(part[n].encoding)) for n in names))
    args: tuple = (target,)
    template = {}
    if template_format is not None:
        _check_format(template_format)  # refused here, before any task runs
        key = f"pixels-zarr-template-{tokenize(store, group, target)}"
        template[key] = Task(key, write_template, _skeleton(ds), store, group, zarr_format=template_format)
        args += (TaskRef(key),)  # every block write waits for the template
    blocks = list(np.ndindex(*[len(c) for c in first.chunks]))
    graph, keys = block_graph([part[n].data for n in names], blocks, _write_block, args,
                              name="pixels-zarr-write")
    graph.update(template)
    done = f"pixels-zarr-done-{tokenize(keys)}"
    graph[done] = Task(done, len, List(*(TaskRef(k) for k in keys)))
    return Delayed(done, graph)


@dataclass(frozen=True)
class _BlockTarget:
    """Where the blocks of a region write go: the group, the grid of the region and each variable's
    encoding (``(name, encoding)`` in the order of the blocks handed to ``_write_block``)."""

    store: str
    group: str
    dims: tuple[str, ...]
    chunks: tuple[tuple[int, ...], ...]
    offset: tuple[int, ...]
    variables: tuple[tuple[str, dict], ...]


def _skeleton(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with every dask variable on an empty graph: what a template write needs, small to ship."""
    import dask.array as da

    # one assign (a setitem per variable aligns the Dataset each time); random names: hashing the
    # arguments of da.empty cost more than the rest of this function
    return ds.assign({name: var.copy(data=da.empty(var.shape, chunks=var.chunks, dtype=var.dtype,
                                                   name=f"pixels-skeleton-{uuid.uuid4().hex}"))
                      for name, var in ds.data_vars.items() if var.chunks is not None})


def _write_block(block: tuple[int, ...], values: list[np.ndarray], target: _BlockTarget,
                 *after: Any) -> None:
    """Write one block of every variable into its Zarr array (runs on a worker; ``after``: the template
    task's result when it is written in the same graph)."""
    import zarr

    where = tuple(slice(o + sum(c[:i]), o + sum(c[: i + 1]))
                  for o, c, i in zip(target.offset, target.chunks, block))
    group = zarr.open_group(target.store, path=target.group, mode="r+")
    for (name, encoding), data in zip(target.variables, values):
        encoded = xr.conventions.encode_cf_variable(xr.Variable(target.dims, data, encoding=dict(encoding)),
                                                    name=name)
        group[name][where] = np.asarray(encoded.data)


def time_chunk(store: str, group: str) -> int:
    """Time steps per stored object (chunk or shard) of a feature's arrays in the store (1 as ``aligned``
    writes; more for a small feature written whole by ``write_feature``; 1 when the group is unreadable)."""
    import zarr

    try:
        root = zarr.open_group(store, path=group, mode="r")
        chunks = [(arr.shards or arr.chunks)[0] for _, arr in root.arrays()
                  if _dims(arr)[:1] == ("time",) and arr.ndim == 3]
    except Exception:  # noqa: BLE001 - no readable group: nothing to protect
        return 1
    return max(chunks, default=1)


def write_time_axis(store: str, group: str, axis: xr.Dataset, attrs: dict[str, Any] | None = None) -> None:
    """Give a feature's group the time axis of ``axis`` (its coordinates along ``time``, every step) and,
    with ``attrs``, these group attributes: arrays along time grow to its length (never shrink: bins outside
    the range stay) and the time coordinates are rewritten (``empty`` of a bin that now has items…),
    encoded as the template encoded them. New steps read as fill until their region writes land.

    Arrays are resized one by one (Zarr has no multi-array transaction): a reader opening the group in the
    milliseconds between the first and the last resize finds arrays of two lengths and cannot open it (it
    never reads wrong values: a reopen after the resize sees the new axis, new steps as fill until
    written); the run's lock keeps other writers out."""
    import zarr

    n = axis.sizes["time"]
    root = zarr.open_group(store, path=group, mode="r+")
    arrays = dict(root.arrays())
    for name, arr in arrays.items():
        if name not in axis.coords and _dims(arr)[:1] == ("time",) and arr.shape[0] < n:
            arr.resize((n, *arr.shape[1:]))
    for name, coord in axis.coords.items():
        arr = arrays.get(str(name))
        if arr is None or coord.dims != ("time",):
            continue
        encoding = {k: arr.attrs[k] for k in ("units", "calendar") if k in arr.attrs}
        encoded = xr.conventions.encode_cf_variable(
            xr.Variable(("time",), coord.values, encoding={**encoding, "dtype": arr.dtype}), name=str(name))
        values = np.asarray(encoded.data).astype(arr.dtype)
        if arr.shape[0] == n and np.array_equal(arr[:], values):
            continue  # unchanged: not rewritten (chunks keep their bytes and times)
        if arr.shape[0] < n:
            arr.resize((n,))
        arr[:] = values
    if attrs is not None:
        root.attrs.put(_json_attrs(xr.Dataset(attrs=attrs)).attrs)


def _dims(arr: Any) -> tuple[str, ...]:
    names = getattr(getattr(arr, "metadata", None), "dimension_names", None)
    return tuple(names or arr.attrs.get("_ARRAY_DIMENSIONS") or ())


def open_feature(store: str, feature_id: str, **kwargs: Any) -> xr.Dataset:
    """The Dataset of one feature from a run's store, georeferenced (``.rio.crs`` / ``.rio.transform()``),
    lazy: one dask chunk per stored object (``_chunked_as_stored``) unless ``chunks`` says otherwise."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)

    try:
        if "chunks" in kwargs:
            return xr.open_zarr(store, group=feature_id, consolidated=False, **{"decode_coords": "all", **kwargs})
        ds = xr.open_zarr(store, group=feature_id, consolidated=False, chunks=None,
                          **{"decode_coords": "all", **kwargs})
        return _chunked_as_stored(ds)
    except (FileNotFoundError, KeyError) as exc:
        raise OutputError(f"no feature {feature_id!r} in the store ({exc.__class__.__name__})", store) from None


def _chunked_as_stored(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` (opened without dask) with each variable in dask chunks of its stored objects: its shards
    where it has them, else its chunks. xarray's default, the chunks, would cut a whole-written member's
    shard into a task per time step, each reading the shard's index and one chunk."""
    chunked = {}
    for name, var in ds.variables.items():
        sizes = var.encoding.get("shards") or var.encoding.get("chunks")
        if name not in ds.indexes and sizes is not None and var.ndim:
            # a name of its own: dask would name it by hashing the values, which reads them
            chunked[name] = var.chunk(dict(zip(var.dims, sizes)), name=f"open-feature-{name}-{uuid.uuid4().hex}")
    return ds.assign_coords({k: v for k, v in chunked.items() if k in ds.coords}).assign(
        {k: v for k, v in chunked.items() if k not in ds.coords})
