"""Labelled geometries: a GeoJSON FeatureCollection of points/polygons with a class, optional date and weight."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from pixels_xr.errors import ConfigError
from pixels_xr.features import Feature, load_features, parse_crs, reproject_geometry


@dataclass(frozen=True)
class Labels:
    """The labels (engine ``Feature`` objects: id, geometry, CRS, optional date) and their classes.

    ``classes`` is the class order of the samples and of the model's outputs (index = class value);
    ``class_of[i]`` and ``weight_of[i]`` belong to ``features[i]``.
    """

    features: tuple[Feature, ...]
    classes: tuple[str, ...]
    class_of: tuple[int, ...]
    weight_of: tuple[float, ...]
    source: str

    def __len__(self) -> int:
        return len(self.features)


def load_labels(source: str | Path | dict, *, class_property: str = "class", weight_property: str = "weight",
                classes: Sequence[str] | None = None) -> Labels:
    """Labels from GeoJSON (path, JSON text or dict), read by ``load_features`` (ids, CRSs, ``date``).

    The class is ``properties[class_property]`` (a string or an integer; integers become their decimal
    name). ``classes`` fixes the class order (a label of another class is an error); by default the names
    are sorted (numerically when all are integers), so the order does not depend on the file's order.
    ``properties[weight_property]`` is an optional positive sample weight (default 1).
    """
    text = isinstance(source, dict) or (isinstance(source, str) and source.lstrip()[:1] in ("{", "["))
    where = "labels" if text else str(source)
    features = load_features(source)
    names: list[str] = []
    weights: list[float] = []
    for k, f in enumerate(features):
        props = dict(f.properties)
        value = props.get(class_property)
        if value is None or isinstance(value, (bool, float)) or str(value).strip() == "":
            raise ConfigError(f"label {f.id!r} has no class (a string or integer property "
                              f"{class_property!r})", f"{where}[{k}].properties.{class_property}")
        names.append(str(value).strip())
        weight = props.get(weight_property, 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"weight must be a positive number, got {weight!r}",
                              f"{where}[{k}].properties.{weight_property}")
        weights.append(float(weight))
    if classes is not None:
        order = [str(c) for c in classes]
        if len(set(order)) != len(order) or not order:
            raise ConfigError("classes must be distinct names", "classes")
        unknown = sorted(set(names) - set(order))
        if unknown:
            raise ConfigError(f"class {unknown[0]!r} is not one of {order}", f"{where}: {class_property}")
    else:
        order = sorted(set(names), key=_class_key)
    index = {c: i for i, c in enumerate(order)}
    return Labels(tuple(features), tuple(order), tuple(index[n] for n in names), tuple(weights), where)


def _class_key(name: str) -> tuple[int, Any]:
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)


def geometries_in(features: Sequence[Feature], crs: str) -> list[shapely.Geometry]:
    """The features' geometries in ``crs``, one reprojection per source CRS (not one per feature: building a
    transformer costs more than transforming thousands of points)."""
    from pyproj import CRS

    out: list[shapely.Geometry | None] = [None] * len(features)
    target = CRS.from_user_input(crs)
    groups: dict[str, list[int]] = {}
    for k, f in enumerate(features):
        groups.setdefault(f.crs, []).append(k)
    for src, ks in groups.items():
        geoms = np.array([features[k].geometry for k in ks], dtype=object)
        source = CRS.from_user_input(parse_crs(src, "crs"))
        moved = geoms if source == target else reproject_geometry(geoms, source, target)
        for k, g in zip(ks, moved):
            out[k] = g
    return out  # type: ignore[return-value]
