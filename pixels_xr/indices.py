"""Spectral indices by name (the Awesome Spectral Indices catalogue, via ``spyndex``): resolved on a platform's
bands at configuration time, evaluated on reflectance arrays.

Names, formulas and constants are spyndex's, not written here. The catalogue names its inputs by symbol
(``N`` near infrared, ``R`` red, ``S1`` SWIR 1.6 µm, …); a symbol becomes one of the platform's bands by
spyndex's own table for that platform (``sentinel2a`` for Sentinel-2, ``landsatN`` for Landsat N: its band
id, e.g. ``B8`` or ``B4``, read through our aliases), else by its STAC common name (``nir``, ``swir16``): the
catalogue lists Landsat 8/9's B5 under ``N2`` only, yet NDVI on OLI uses it as ``N``, and our Landsat
``nir08`` carries ``nir`` as an alias for exactly that. Constants take the catalogue's defaults (``L`` = 1,
``g`` = 2.5, …); an index needing a constant without a default (wavelengths, ``PAR``) or a kernel input
(``kNN``) or radar bands is refused at load with a one-line error, as is an index needing a band that is not
in the configuration's ``bands`` (named, with the index): what a run reads stays what ``bands`` says.

Evaluation compiles the catalogue's formula once and evaluates it the way ``spyndex.computeIndex`` does
(``eval`` of the formula over the named arrays) — the same arithmetic, without computeIndex's ~4 ms of
per-call overhead (measured), which would be paid per index × time step × group.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from pixels_xr.errors import ConfigError
from pixels_xr.platforms import Platform, canonical_band


@dataclass(frozen=True)
class SpectralIndex:
    """One catalogue index on one platform: ``bands`` maps each formula symbol to the band it reads."""

    name: str
    long_name: str
    formula: str
    bands: tuple[tuple[str, str], ...]  # (symbol, band common name)
    constants: tuple[tuple[str, float], ...]

    @property
    def needs(self) -> tuple[str, ...]:
        """The band common names the index reads, in formula order."""
        return tuple(dict.fromkeys(b for _, b in self.bands))

    def compute(self, reflectance: Mapping[str, np.ndarray]) -> np.ndarray:
        """The index over ``reflectance`` (band common name → float32 array), float32; a division by zero or
        a NaN input gives NaN (or ±inf, as the formula says)."""
        params: dict[str, Any] = {sym: reflectance[band] for sym, band in self.bands}
        params.update(self.constants)
        with np.errstate(all="ignore"):
            out = eval(_compiled(self.formula), {}, params)  # spyndex's own catalogue formula, as computeIndex
        return np.asarray(out, dtype=np.float32)


@cache
def _compiled(formula: str) -> Any:
    return compile(formula, "<spectral index>", "eval")


def catalogue() -> Any:
    """spyndex's index catalogue (imported on first use: it costs ~0.3 s and only stats need it)."""
    import spyndex

    return spyndex.indices


def _spyndex_platform(platform: Platform) -> str:
    return "sentinel2a" if platform.name == "sentinel-2" else platform.name.replace("-", "")


def _band_for(symbol: str, platform: Platform, level: str) -> str | None:
    """Our band for a catalogue symbol on ``platform`` (None: the platform has no such reflectance band)."""
    import spyndex

    info = spyndex.bands.get(symbol)
    if info is None:
        return None
    candidates = []
    own = getattr(info, _spyndex_platform(platform), None)
    if own is not None:
        candidates.append(str(own.band))
    candidates.append(str(info.common_name))
    for name in candidates:
        try:
            band = canonical_band(platform, level, name)
        except ConfigError:
            continue
        if band.reflectance:
            return band.name
    return None


def resolve(names: Sequence[str], platform: Platform, level: str, bands: Sequence[str],
            field: str = "indices") -> list[SpectralIndex]:
    """The named indices on ``platform``/``level`` given the configuration's band common names ``bands``;
    ``ConfigError`` naming ``field[i]`` for an unknown name, a band the platform lacks or ``bands`` omits,
    a constant without a default, or a kernel/radar input."""
    import spyndex

    known = catalogue()
    lower = {k.lower(): k for k in known}
    out: list[SpectralIndex] = []
    for i, raw in enumerate(names):
        where = f"{field}[{i}]"
        key = lower.get(str(raw).strip().lower())
        if key is None:
            close = difflib.get_close_matches(str(raw), list(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown spectral index {raw!r} (Awesome Spectral Indices names, e.g. NDVI, EVI, "
                              f"NDWI, NBR){hint}", where)
        index = known[key]
        symbols, constants = [], []
        for sym in index.bands:
            if sym in spyndex.constants:
                default = spyndex.constants[sym].default
                if default is None:
                    raise ConfigError(f"index {key!r} needs constant {sym!r}, which has no default in the "
                                      "catalogue; such indices are not supported", where)
                constants.append((sym, float(default)))
                continue
            band = _band_for(sym, platform, level)
            if band is None:
                what = spyndex.bands[sym].long_name if sym in spyndex.bands else f"input {sym!r}"
                raise ConfigError(f"index {key!r} needs band {sym!r} ({what}), which {platform.name} {level} "
                                  "does not have", where)
            if band not in bands:
                raise ConfigError(f"index {key!r} needs band {band!r} (catalogue symbol {sym}); add {band!r} "
                                  "to bands", where)
            symbols.append((sym, band))
        out.append(SpectralIndex(key, str(index.long_name), str(index.formula), tuple(symbols), tuple(constants)))
    if len({s.name for s in out}) != len(out):
        raise ConfigError(f"indices repeat: {list(names)}", field)
    return out
