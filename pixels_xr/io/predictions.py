"""Inference I/O: engine Zarr stores in; predictions out as a Zarr store or one COG per date."""

from __future__ import annotations

import json
import warnings
from typing import Any, Literal

import numpy as np
import xarray as xr

from pixels_xr.errors import OutputError, PixelsError
from pixels_xr.io import storage


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an exception, at most 300 characters."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def open_input(url: str, group: str | None = None) -> xr.Dataset:
    """An engine Dataset from a Zarr store: its root, its ``group``, or a group path ``run.zarr/f1``."""
    try:
        with warnings.catch_warnings():  # stores without consolidated metadata are fine (and warn)
            warnings.simplefilter("ignore", RuntimeWarning)
            ds = xr.open_zarr(url, group=group, consolidated=None, chunks={}, decode_coords="all")
    except (FileNotFoundError, KeyError, ValueError, OSError) as exc:
        where = f"{url} (group {group})" if group else url
        raise PixelsError(f"not a readable Zarr dataset: {first_line(exc)}", where) from None
    if not ds.data_vars:
        import zarr

        try:
            children = sorted(zarr.open_group(url, mode="r", path=group or "").group_keys())
        except Exception:  # noqa: BLE001 - only used to improve the message
            children = []
        hint = f"; it holds the groups {', '.join(children)}: pick one with --group" if children else ""
        raise PixelsError(f"no data variables{hint}", url if not group else f"{url} (group {group})")
    return ds


def output_name(var: str, time: Any, taken: set[str]) -> str:
    """File name of one COG: ``classes.tif`` or ``classes_2021-11-01.tif`` (a counter when dates repeat)."""
    stem = var if time is None else f"{var}_{str(np.datetime_as_string(time, unit='D'))}"
    name, k = f"{stem}.tif", 1
    while name in taken:
        name, k = f"{stem}_{k}.tif", k + 1
    taken.add(name)
    return name


def colormap_of(dataset: xr.Dataset) -> dict[int, tuple[int, int, int, int]] | None:
    """The colour table stored with ``classes`` by ``predict``, nodata transparent (None when absent)."""
    var = dataset["classes"] if "classes" in dataset else None
    raw = var.attrs.get("colormap") if var is not None else None
    if not raw:
        return None
    table = {int(k): tuple(int(c) for c in v) for k, v in json.loads(raw).items()}
    nodata = var.attrs.get("nodata")  # type: ignore[union-attr]
    return table if nodata is None else {**table, int(nodata): (0, 0, 0, 0)}  # type: ignore[dict-item]


def write_predictions(result: xr.Dataset, out: str, fmt: Literal["zarr", "cog"] = "zarr") -> list[str]:
    """Write ``predict``'s result to a Zarr store or one COG per date in folder ``out``; returns the paths."""
    from zarr.errors import ContainsArrayError, ContainsGroupError

    from pixels_xr.io.cog import write_cog

    if fmt == "zarr":
        regular = result.chunk({d: max(c) for d, c in result.chunks.items()})  # Zarr needs regular chunks
        try:
            regular.to_zarr(out, mode="w-", consolidated=False)
        except (FileExistsError, ContainsGroupError, ContainsArrayError) as exc:
            raise OutputError(f"already exists ({type(exc).__name__}); remove it first", out) from None
        return [out]
    var = "classes" if "classes" in result else "probability"
    data = result[var]
    taken: set[str] = set()
    written: list[str] = []
    times = data["time"].values if "time" in data.dims else [None]
    for k, when in enumerate(times):
        layer = data.isel(time=k) if when is not None else data
        if var == "probability":
            layer = layer.rename({"class": "band"})
        path = storage.join(out, output_name(var, when, taken))
        nodata = data.attrs.get("nodata")
        write_cog(layer, path, nodata=nodata, band_names=[str(c) for c in result["class"].values]
                  if var == "probability" else ["classes"],
                  tags={"model": result.attrs.get("model"), "classes": result.attrs.get("classes"),
                        "datetime": str(when)[:19] if when is not None else None},
                  colormap=colormap_of(result) if var == "classes" else None)
        written.append(path)
    return written
