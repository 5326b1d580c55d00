"""The JSON sidecar beside a model (band order, normalisation, nodata, classes, colours), validated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pixels_xr.errors import ModelError, OutputError
from pixels_xr.io import storage

#: File suffixes of single-file Keras models (anything else is taken as a SavedModel folder).
MODEL_SUFFIXES = ("keras", "h5", "hdf5")
RGB = Annotated[list[Annotated[int, Field(ge=0, le=255)]], Field(min_length=3, max_length=4)]

#: Colours of classes the sidecar gives none for (a qualitative palette; nodata is transparent).
DEFAULT_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)


class NodataRule(BaseModel):
    """Which inputs are nodata and what the model sees in their place."""

    model_config = ConfigDict(extra="forbid")

    value: float | None = Field(None, description="nodata value of the inputs (NaN always is); default: the "
                                                  "variable's nodata attribute, else 0 for unsigned integers")
    when: Literal["any", "all"] = "any"
    fill: float = 0.0


class ModelSpec(BaseModel):
    """The validated sidecar of one model.

    A model ``cloud.keras`` (or a SavedModel folder ``cloud/``) is described by ``cloud.json`` beside it::

        {"bands": ["blue", "green", "red", "nir"],       # dataset variables, in the model's channel order
         "scale": 1.0, "offset": 0.0,                     # input = value * scale + offset (per band or one)
         "input": "reflectance",                          # what the values must be: reflectance | raw | any
         "nodata": {"value": 0, "when": "any", "fill": 0.0},
         "classes": ["clear", "cloud", "shadow"],         # names of the model's output channels
         "colors": {"clear": [0, 160, 0], "cloud": [255, 255, 255]},      # RGB(A) per class (COG: RGB only)
         "margin": 2,                                     # receptive-field margin in pixels (image models)
         "patch": [256, 256]}                             # tile size when the model's input size is not fixed

    A pixel is nodata when its value is NaN or ``nodata.value`` (default: the variable's ``nodata`` attribute,
    else 0 for unsigned integers) in ``any`` (default) or ``all`` of the bands (and dates) the model reads.
    Nodata inputs are replaced by ``nodata.fill`` (in model units) before the model sees them, and the outputs
    of nodata pixels are nodata.
    """

    model_config = ConfigDict(extra="forbid")

    bands: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    scale: float | list[float] = 1.0
    offset: float | list[float] = 0.0
    input: Literal["reflectance", "raw", "any"] = "any"
    nodata: NodataRule = Field(default_factory=NodataRule)
    classes: list[Annotated[str, Field(min_length=1)]] | None = None
    colors: dict[str, RGB] | None = None
    margin: int = Field(0, ge=0, le=1024)
    patch: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        for name in ("scale", "offset"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != len(self.bands):
                raise ValueError(f"{name}: {len(value)} values for {len(self.bands)} bands")
        if len(set(self.bands)) != len(self.bands):
            raise ValueError("bands: repeated band name")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("classes: repeated class name")
        unknown = sorted(set(self.colors or ()) - set(self.classes or ()))
        if unknown:
            raise ValueError(f"colors: {unknown[0]!r} is not one of the classes")
        if self.patch is not None and min(self.patch) <= 2 * self.margin:
            raise ValueError(f"patch {list(self.patch)} must exceed twice the margin ({self.margin})")
        return self

    def per_band(self, name: Literal["scale", "offset"], count: int) -> tuple[float, ...]:
        """``scale`` or ``offset`` as one value for each of ``count`` bands."""
        value = getattr(self, name)
        return tuple(float(v) for v in value) if isinstance(value, list) else (float(value),) * count

    def class_names(self, channels: int) -> list[str]:
        """Class names for a model with ``channels`` outputs (one sigmoid output means two classes)."""
        n = 2 if channels == 1 else channels
        if self.classes is None:
            return [f"class_{k}" for k in range(n)]
        if len(self.classes) != n:
            raise ModelError(f"{len(self.classes)} classes for a model with {channels} output channel"
                             f"{'s' if channels != 1 else ' (sigmoid: 2 classes)'}", "classes")
        return list(self.classes)

    def colormap(self, names: list[str]) -> dict[int, tuple[int, int, int, int]]:
        """GDAL colour table: class index → RGBA (the sidecar's colours, else a default palette)."""
        table: dict[int, tuple[int, int, int, int]] = {}
        for k, name in enumerate(names):
            given = (self.colors or {}).get(name)
            rgb = tuple(given) if given is not None else DEFAULT_PALETTE[k % len(DEFAULT_PALETTE)]
            table[k] = (*rgb, 255) if len(rgb) == 3 else rgb  # type: ignore[assignment]
        return table


#: Location parts pydantic adds for members of ``float | list[float]`` unions (not keys of the file).
_UNION_TAGS = {"float", "list[float]", "tuple[int, int]"}


def sidecar_path(model: str | Path) -> str:
    """Sidecar of a model: ``a.keras`` → ``a.json``, SavedModel folder ``a/`` → ``a.json``."""
    path = str(model).rstrip("/")
    stem, dot, suffix = path.rpartition(".")
    if dot and "/" not in suffix and suffix.lower() in MODEL_SUFFIXES:
        return f"{stem}.json"
    return f"{path}.json"


def load_spec(source: str | Path | dict) -> ModelSpec:
    """Validate a sidecar given as a JSON path/URL or a dict; errors are one line naming file and field."""
    where = "sidecar"
    if isinstance(source, dict):
        data = source
    else:
        where = str(source)
        try:
            raw = storage.read_bytes(where)
        except OutputError as exc:
            raise ModelError(f"cannot read the sidecar: {exc.message}", where) from None
        if raw is None:
            raise ModelError("model sidecar JSON not found (band order and normalisation are required)",
                             where)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"invalid JSON: {exc}", where) from None
    if not isinstance(data, dict):
        raise ModelError("the sidecar must be a JSON object", where)
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err.get("loc", ()) if str(p) not in _UNION_TAGS)
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise ModelError(f"{field + ': ' if field else ''}{msg}", where) from None
