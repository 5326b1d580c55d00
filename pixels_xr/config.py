"""The pixels configuration: pydantic models, loading and validation; the only place defaults live."""

from __future__ import annotations

import datetime as dt
import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_serializer, \
    field_validator, model_validator

from pixels_xr import jsontext
from pixels_xr.errors import ConfigError
from pixels_xr.features import Feature
from pixels_xr.indices import SpectralIndex
from pixels_xr.indices import resolve as resolve_indices
from pixels_xr.methods import ORIGINAL_NAMES, Method, method_for
from pixels_xr.platforms import (
    PROVIDERS,
    MaskSpec,
    Platform,
    canonical_band,
    collection_for,
    default_mask,
    platform_family,
    resolve_platform,
)
from pixels_xr.timeslices import Interval, TimeBin, dynamic_range, on_interval_grid, resolve_rolling, \
    rolling_spelling, run_date, time_bins

Mode = Literal["all", "latest_pixel", "cloud_sorted_pixel", "composite"]
CompositeMethod = Literal["median", "first_clear", "quality", "qa_pixel"]  # = methods.COMPOSITE_METHODS
#: The original pixels' ``composite_method`` values and what they are here (README: differences table).
COMPOSITE_ALIASES = ORIGINAL_NAMES
Resampling = Literal["nearest", "bilinear", "cubic", "average", "mode", "min", "max", "med", "q1", "q3"]

#: Refuse output grids larger than this many pixels per feature and time slice unless ``force`` is set.
DEFAULT_MAX_PIXELS = 100_000_000
#: Largest accepted ``scale``: 100 km pixels (anything coarser is a unit mistake, e.g. degrees vs metres).
MAX_SCALE = 100_000.0
#: Largest ``interval_step`` / ``dynamic_dates_step``: 10,000 intervals (days: 27 years) keeps every date
#: arithmetic inside the calendar; longer ranges are refused before any date is computed.
MAX_STEP = 10_000
#: Most time bins one feature may have (a daily bin over 270 years); more is refused with the count.
MAX_BINS = 100_000
#: ``pool_size`` of the original pixels' default (0: no pool of dates) means this bound on reads here.
DEFAULT_POOL_SIZE = 8

_LEVEL_DEFAULT = {"sentinel-2": "L2A"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True, allow_inf_nan=False)


class MaskRule(_Strict):
    """A user clear-sky rule on one asset: clear unless a value is listed or a bit is set.

    Give either ``clear_values`` (whitelist, e.g. Fmask ``[0, 1]``) or ``not_clear_values`` and/or
    ``not_clear_bits`` (blacklists, e.g. SCL classes or QA_PIXEL bits).
    """

    asset: str = Field(min_length=1)
    clear_values: list[int] | None = None
    not_clear_values: list[int] | None = None
    not_clear_bits: list[int] | None = None
    nodata: int | None = None

    @field_validator("not_clear_bits")
    @classmethod
    def _bits(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(b < 0 or b > 63 for b in v):
            raise ValueError("bits must be within 0..63")
        return v

    @model_validator(mode="after")
    def _one_rule(self) -> MaskRule:
        if self.clear_values is None and self.not_clear_values is None and self.not_clear_bits is None:
            raise ValueError("give clear_values, not_clear_values or not_clear_bits")
        if self.clear_values is not None and (self.not_clear_values or self.not_clear_bits):
            raise ValueError("clear_values cannot be combined with not_clear_values/not_clear_bits")
        return self


class MaskCleanup(_Strict):
    """Morphological cleanup of the not-clear mask: opening then dilation (pixels; 0 = off)."""

    opening: int = Field(0, ge=0, le=50)
    dilation: int = Field(0, ge=0, le=100)


class ClusterOptions(_Strict):
    """Where and how big a batch runs (``cluster`` in the config; every field optional).

    Unset sizing falls back to ``PIXELS_XR_WORKERS``, ``PIXELS_XR_ADAPT_MIN`` and ``PIXELS_XR_ADAPT_MAX``
    in the environment; Gateway address/auth fall back to dask-gateway's own configuration
    (``DASK_GATEWAY__ADDRESS``, ``DASK_GATEWAY__AUTH__TYPE``, …).
    """

    workers: int | None = Field(None, ge=1)
    threads_per_worker: int | None = Field(None, ge=1)
    memory_limit: str | None = None
    adapt_min: int | None = Field(None, ge=0)
    adapt_max: int | None = Field(None, ge=1)
    gateway_address: str | None = None
    gateway_proxy_address: str | None = None
    gateway_auth: Literal["basic", "kerberos", "jupyterhub"] | None = None
    gateway_username: str | None = None
    gateway_password: str | None = None
    cluster_options: dict[str, Any] = Field(default_factory=dict)


class PixelsConfig(_Strict):
    """A validated pixels configuration (see README for every field)."""

    start: dt.date | str | None = None  #: a date, or a rolling date (``timeslices``): ``"-12 months"``
    end: dt.date | str | None = None  #: a date, or a rolling date: ``"today"``
    dynamic_dates_interval: Interval | None = None
    dynamic_dates_step: int | None = Field(None, ge=1, le=MAX_STEP)
    mode: Mode = "latest_pixel"
    interval: Interval | None = None
    interval_step: int | None = Field(None, ge=1, le=MAX_STEP)
    composite_method: CompositeMethod | None = None
    platforms: tuple[str, ...]
    level: str | None = None
    bands: list[str] = Field(min_length=1)
    #: spectral indices by Awesome Spectral Indices name (``pixels_xr.indices``); read by ``stats``. None
    #: (not an empty list) by default, so that a configuration without them keeps its output identity.
    indices: list[str] | None = None
    scale: float | None = Field(None, gt=0, le=MAX_SCALE)
    maxcloud: float = Field(100.0, ge=0, le=100)
    clip: bool = False
    pool_size: int = Field(DEFAULT_POOL_SIZE, ge=1, le=256)
    pool_bands: bool = False
    geojson: dict[str, Any] | None = None
    limit: int | None = Field(None, ge=1)
    catalog: str = "earth-search"
    collection: str | None = None
    mask: MaskRule | Literal["none"] | None = None
    mask_cleanup: MaskCleanup = MaskCleanup()
    crs: str | None = None
    resampling: Resampling = "nearest"
    output: Literal["reflectance", "raw"] = "reflectance"
    on_asset_error: Literal["skip", "fail"] = "skip"
    chunksize: int = Field(1024, ge=64, le=8192)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    force: bool = False
    cluster: ClusterOptions = ClusterOptions()

    @model_validator(mode="before")
    @classmethod
    def _original_forms(cls, data: Any) -> Any:
        """The original pixels' spellings and defaults, turned into this model's (README: differences)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        method = data.get("composite_method")
        if isinstance(method, str) and method.strip().upper() in COMPOSITE_ALIASES:
            data["composite_method"] = COMPOSITE_ALIASES[method.strip().upper()]
        if data.get("interval") == "all":  # the original's interval "all" is mode all, whatever the mode
            data.pop("interval")
            if data.get("interval_step") in (None, 1):
                data.pop("interval_step", None)
            if data.get("mode") in (None, "latest_pixel", "cloud_sorted_pixel", "composite", "all"):
                data["mode"] = "all"
                if data.get("composite_method") in (None, "first_clear"):  # the original's default SCL
                    data.pop("composite_method", None)
        elif data.get("mode") is None and data.get("interval") is None:
            data["mode"] = "all"  # the original's defaults: latest_pixel over interval "all"
        if data.get("pool_size") == 0:
            data["pool_size"] = DEFAULT_POOL_SIZE
        if data.get("dynamic_dates_interval") is not None:
            data.setdefault("dynamic_dates_step", 1)
            if data.get("start") is not None and data.get("end") is not None:  # the original: dynamic wins
                data.pop("start")
                data.pop("end")
        bands = data.get("bands")
        if isinstance(bands, list) and any(isinstance(b, str) and "," in b for b in bands):
            data["bands"] = [part.strip() if isinstance(part, str) else part  # a non-string: the field's error
                             for b in bands for part in (b.split(",") if isinstance(b, str) else [b])
                             if part != ""]
        return data

    @field_validator("start", "end", mode="before")
    @classmethod
    def _dates(cls, v: Any) -> Any:
        if isinstance(v, str):
            rolling = rolling_spelling(v)
            if rolling is not None:
                return rolling  # kept as spelled (canonically): the output's identity does not roll
            try:
                return _DATE.validate_python(v)  # pydantic's own date parsing, as for a plain date field
            except ValidationError:
                raise ValueError("must be a date YYYY-MM-DD or a rolling date such as 'today' or "
                                 "'-12 months'") from None
        return v

    @field_validator("platforms", mode="before")
    @classmethod
    def _platforms(cls, v: Any) -> Any:
        names = v if isinstance(v, (list, tuple)) else [v]
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError("must be a platform name such as 'sentinel-2' or 'LANDSAT_8', or a list of them")
        resolved = tuple(dict.fromkeys(resolve_platform(n).name for n in names))
        families = {platform_family(resolve_platform(n)) for n in resolved}
        if len(families) > 1:
            raise ValueError(f"platforms {list(resolved)} mix families {sorted(families)} that share neither "
                             "grid nor bands; run one configuration per family")
        return resolved

    @field_serializer("platforms")
    def _platforms_out(self, v: tuple[str, ...] | str) -> str | list[str]:
        names = self.platform_names
        return names[0] if len(names) == 1 else list(names)  # one platform dumps as before: same output identity

    @field_validator("crs")
    @classmethod
    def _crs(cls, v: str | None) -> str | None:
        if v is not None:
            from pyproj import CRS

            try:
                if not CRS.from_user_input(v).is_projected:
                    raise ValueError(f"output CRS {v!r} must be projected (metres)")
            except ValueError:
                raise
            except Exception:
                raise ValueError(f"unknown CRS {v!r}") from None
        return v

    @model_validator(mode="after")
    def _semantics(self) -> PixelsConfig:
        fixed = self.start is not None or self.end is not None
        dynamic = self.dynamic_dates_interval is not None or self.dynamic_dates_step is not None
        if fixed and dynamic:
            raise ConfigError("give either start/end or dynamic_dates_interval/dynamic_dates_step, not both",
                              "dynamic_dates_interval")
        if not fixed and not dynamic:
            raise ConfigError("a date range is required: start and end, or dynamic_dates_interval and "
                              "dynamic_dates_step", "start")
        if fixed:
            if self.start is None or self.end is None:
                raise ConfigError("start and end are both required for a fixed range",
                                  "start" if self.start is None else "end")
            start, end = self.fixed_range()
            if end < start:
                raise ConfigError(f"end {end} is before start {start}" + (
                    f" on the run date {run_date()}" if self.rolling else ""), "end")
        elif self.dynamic_dates_interval is None or self.dynamic_dates_step is None:
            raise ConfigError("dynamic dates need both dynamic_dates_interval and dynamic_dates_step",
                              "dynamic_dates_step" if self.dynamic_dates_step is None
                              else "dynamic_dates_interval")
        if self.mode == "all":
            for name in ("interval", "interval_step"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name} is meaningless with mode 'all' (one slice per acquisition); "
                                      "remove it or choose latest_pixel/composite", name)
        elif self.interval is None:
            raise ConfigError(f"interval (days, weeks or months) is required with mode {self.mode!r}",
                              "interval")
        if self.composite_method is not None and self.mode != "composite":
            raise ConfigError(f"composite_method only applies to mode 'composite', not {self.mode!r}",
                              "composite_method")
        if self.pool_bands and self.pool_size > 1 and self.pool_size != DEFAULT_POOL_SIZE:
            raise ConfigError("pool_bands cannot be combined with pool_size > 1 (as in the original pixels); "
                              "bands of a scene are always read together here", "pool_bands")
        if self.geojson is not None:
            from pixels_xr.features import load_features

            try:
                load_features(self.geojson)
            except ConfigError as exc:
                raise ConfigError(exc.message, "geojson" + (exc.where or "").removeprefix("features")) from None
        platform = self.platform
        level = self.resolved_level
        for p in self.platform_list:
            if level not in p.levels:
                raise ConfigError(f"level {self.level!r} is not offered by {p.name}; allowed: "
                                  f"{', '.join(p.levels)}", "level")
        for i, b in enumerate(self.bands):
            try:
                names_by_platform = {p.name: canonical_band(p, level, b).name for p in self.platform_list}
            except ConfigError as exc:
                raise ConfigError(exc.message, f"bands[{i}]") from None
            if len(set(names_by_platform.values())) > 1:
                raise ConfigError(f"band {b!r} means different bands on {names_by_platform}; use the common "
                                  "name", f"bands[{i}]")
        names = [canonical_band(platform, level, b).name for b in self.bands]
        if len(set(names)) != len(names):
            raise ConfigError(f"bands repeat the same band under two names: {self.bands}", "bands")
        if self.mode == "composite":
            method = self.resolved_composite_method
            allowed = tuple(m for m in platform.composite_methods.get(level, ())
                            if all(m in p.composite_methods.get(level, ()) for p in self.platform_list))
            if method not in allowed:
                raise ConfigError(f"composite_method {method!r} is not available for {platform.name} {level}; "
                                  f"allowed: {', '.join(allowed) or 'none'}", "composite_method")
            rule = self.method
            if rule.needs_mask and self.mask == "none":
                raise ConfigError(f"composite_method {method!r} needs a cloud mask; mask 'none' disables it",
                                  "mask")
            if not set(rule.needs_bands) <= set(names):
                raise ConfigError(f"composite_method {method!r} ({rule.description}) needs bands "
                                  f"{' and '.join(rule.needs_bands)}", "bands")
        if self.mode in {"latest_pixel", "cloud_sorted_pixel", "composite"} and self.mask is None:
            if default_mask(platform, level) is None and self.mode != "latest_pixel":
                raise ConfigError(f"{platform.name} {level} has no cloud mask band; give `mask` (or 'none')",
                                  "mask")
        if self.catalog in PROVIDERS and self.collection is None:  # local catalogs accept any collection
            collection_for(self.catalog, platform, level)
        if self.indices:
            self.spectral_indices  # noqa: B018 - resolved once here so that a bad name fails at load
        return self

    # ----- derived values (no defaults elsewhere) -----
    @property
    def platform(self) -> Platform:
        """The first configured platform: its band table and rules stand for the family (all platforms of
        a configuration name the bands alike, checked at load)."""
        return resolve_platform(self.platform_names[0])

    @property
    def platform_names(self) -> tuple[str, ...]:
        """Configured platform names (also for a copy made with ``model_copy(update={"platforms": str})``)."""
        return (self.platforms,) if isinstance(self.platforms, str) else tuple(self.platforms)

    @property
    def platform_list(self) -> tuple[Platform, ...]:
        """Every configured platform (several Landsat missions may share one configuration)."""
        return tuple(resolve_platform(p) for p in self.platform_names)

    @property
    def resolved_level(self) -> str:
        lvl = (self.level or _LEVEL_DEFAULT.get(self.platform.name, "L2")).upper()
        return lvl

    @property
    def resolved_composite_method(self) -> str:
        return self.composite_method or "median"

    @property
    def method(self) -> Method:
        """The rule that picks or reduces each pixel: the mode's, or the composite method's."""
        return method_for(self.mode, self.resolved_composite_method)

    @property
    def resolved_interval_step(self) -> int:
        return self.interval_step or 1

    @property
    def band_names(self) -> list[str]:
        """Requested bands in their common names (``B04`` → ``red``), in the order given."""
        return [canonical_band(self.platform, self.resolved_level, b).name for b in self.bands]

    @property
    def spectral_indices(self) -> list[SpectralIndex]:
        """The configured spectral indices resolved on the platform's bands (``indices.resolve``)."""
        if not self.indices:
            return []
        return resolve_indices(self.indices, self.platform, self.resolved_level, self.band_names)

    @property
    def resolved_scale(self) -> float:
        """Output pixel size: ``scale`` or the finest native resolution of the requested bands."""
        if self.scale is not None:
            return float(self.scale)
        return min(canonical_band(self.platform, self.resolved_level, b).resolution for b in self.bands)

    @property
    def mask_spec(self) -> MaskSpec | None:
        """The clear-sky rule in force: the user's, none, or the platform default."""
        if self.mask == "none":
            return None
        if isinstance(self.mask, MaskRule):
            m = self.mask
            return MaskSpec(m.asset, tuple(m.not_clear_values or ()), tuple(m.not_clear_bits or ()), m.nodata,
                            None if m.clear_values is None else tuple(m.clear_values))
        return default_mask(self.platform, self.resolved_level)

    @property
    def collection_id(self) -> str | None:
        """Collection to search: ``collection`` or the registry's for provider + platform + level."""
        if self.collection:
            return self.collection
        if self.catalog in PROVIDERS:
            return collection_for(self.catalog, self.platform, self.resolved_level)
        if self.catalog.startswith("http"):
            return collection_for("earth-search", self.platform, self.resolved_level)
        return None

    @property
    def rolling(self) -> bool:
        """Whether the fixed range is spelled relative to the run date."""
        return isinstance(self.start, str) or isinstance(self.end, str)

    def fixed_range(self) -> tuple[dt.date, dt.date]:
        """The fixed [start, end] resolved on the run date; a rolling start of a binned mode snapped onto
        the interval's calendar grid (``timeslices``)."""
        assert self.start is not None and self.end is not None
        end = resolve_rolling(self.end) if isinstance(self.end, str) else self.end
        if isinstance(self.start, str):
            start = resolve_rolling(self.start)
            if self.mode != "all" and self.interval is not None:
                start = on_interval_grid(start, self.interval, self.resolved_interval_step)
        else:
            start = self.start
        return start, end

    def date_range(self, feature: Feature) -> tuple[dt.date, dt.date]:
        """Inclusive [start, end] for a feature (fixed or rolling, or dynamic from the feature's date)."""
        if self.start is not None and self.end is not None:
            return self.fixed_range()
        if feature.date is None:
            raise ConfigError("feature has no date but the config uses dynamic dates; add properties.date",
                              f"feature {feature.id!r}")
        assert self.dynamic_dates_interval is not None and self.dynamic_dates_step is not None
        try:
            return dynamic_range(feature.date, self.dynamic_dates_interval, self.dynamic_dates_step)
        except (OverflowError, ValueError):
            raise ConfigError(f"{self.dynamic_dates_step} {self.dynamic_dates_interval} before "
                              f"{feature.date} is outside the calendar", "dynamic_dates_step") from None

    @property
    def output_identity(self) -> str:
        """JSON of the fields that determine output content (not where or how fast it runs)."""
        return self.model_dump_json(exclude={"cluster", "pool_size", "pool_bands", "geojson"}, exclude_none=True)

    def bins(self, feature: Feature) -> list[TimeBin]:
        """Time bins for a feature (empty for mode ``all``, which slices by acquisition)."""
        if self.mode == "all":
            return []
        start, end = self.date_range(feature)
        assert self.interval is not None
        step = self.resolved_interval_step
        days_per = {"days": 1, "weeks": 7, "months": 28}[self.interval] * step
        if ((end - start).days + 1) / days_per > MAX_BINS:
            raise ConfigError(f"{start}..{end} in bins of {step} {self.interval} is more than {MAX_BINS:,} "
                              "time bins; use a longer interval or a shorter range", "interval")
        try:
            return time_bins(start, end, self.interval, step)
        except (OverflowError, ValueError):
            raise ConfigError(f"bins of {step} {self.interval} from {start} run outside the calendar",
                              "interval_step") from None


_DATE = TypeAdapter(dt.date)


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"MaskRule", "MaskCleanup"} or "[" in str(part):
            continue  # pydantic's union/validator branch names, not user fields
        else:
            out += ("." if out else "") + str(part)
    return out or "config"


def _model_fields(loc: tuple[Any, ...]) -> list[str]:
    if loc and loc[0] == "mask":
        return list(MaskRule.model_fields)
    if loc and loc[0] == "mask_cleanup":
        return list(MaskCleanup.model_fields)
    return list(PixelsConfig.model_fields)


def _read_source(source: str | Path | dict) -> tuple[dict, str]:
    if isinstance(source, dict):
        return source, "config"
    if isinstance(source, Path) or not str(source).lstrip().startswith(("{", "[")):
        path = Path(source)
        where = str(path) if len(str(path)) <= 200 else str(path)[:200] + "…"
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError("config file not found", where) from None
        except (OSError, ValueError) as exc:  # a directory, a name too long, a NUL byte in the name
            raise ConfigError(f"cannot read config: {getattr(exc, 'strerror', None) or exc}", where) from None
    else:
        text, where = str(source), "config"
    data = jsontext.loads(text, where, ConfigError)
    if not isinstance(data, dict):
        raise ConfigError("the configuration must be a JSON object", where)
    return data, where


def _shown(value: Any) -> str:
    """A user's value in an error message, cut short (a 10 MB string is not echoed whole)."""
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "…"


def load_config(source: str | Path | dict) -> PixelsConfig:
    """Load and validate a pixels configuration from a JSON file path, JSON string or dict.

    Raises ``ConfigError`` naming the field at fault (unknown keys get the nearest known key suggested).
    """
    data, where = _read_source(source)
    try:
        return PixelsConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err.get("loc", ()))
        field = _loc(loc)
        if err["type"] == "extra_forbidden":
            key = str(loc[-1])
            raise ConfigError(f"unknown key {key!r}{_suggest(key, _model_fields(loc))}", field) from None
        if err["type"] == "missing":
            raise ConfigError("required field is missing", field) from None
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, ConfigError):
            raise ConfigError(ctx_err.message, ctx_err.where) from None
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        raise ConfigError(f"{msg} (got {_shown(err.get('input'))})" if "input" in err and not isinstance(
            err.get("input"), dict) else msg, field) from None
