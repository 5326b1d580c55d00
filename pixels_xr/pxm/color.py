"""rio-color formulas on 8-bit RGB: rio-color's own grammar, applied as exact lookup tables (bit-exact).

Grammar: exactly what ``rio_color.operations.parse_operations`` accepts (ported step by step)::

    formula    := operation (" " operation)*      commas are deleted first ("r,g,b" is "rgb", "1,5" is "15")
    operation  := "sigmoidal" BANDS CONTRAST BIAS | "gamma" BANDS VALUE | "saturation" PROPORTION
    BANDS      := characters r g b 1 2 3 (any case, any order, repeats allowed: "rgb", "RGB", "13", "rR1")

Tokens are separated by single spaces (a leading, trailing or doubled space is an empty token: an error,
as in rio-color); operation names are case-insensitive; numbers are Python ``float`` literals (``inf``,
``1_0`` included); extra arguments are ignored, as rio-color ignores them; an operation on no band (an
empty BANDS token) is a no-op and is dropped. Values are checked as rio-color checks them when it runs:
gamma VALUE > 0; sigmoidal BIAS within [0, 1] (to one float64 epsilon); every sigmoidal/gamma input
within [0, 1]. On top of that a formula must give a *defined* result for every 8-bit input (rio-color
would cast NaN to uint8, an undefined value): checked exactly over all 256 values per band for
formulas without ``saturation``, on a grid of colours (and of [0, 1] values after it) otherwise. Every
rejection is a :class:`FormulaError` naming the operation and token at fault.

Semantics are rio-color's: ``to_math_type`` (uint8 / 255 in float64), the operations in order on float64,
then ``scale_dtype`` (``(x * 255).astype(uint8)``, i.e. truncation). Because every 8-bit input maps to one
output, formulas without ``saturation`` are three 256-entry tables; with ``saturation`` (which mixes bands in
LCH space) the colours present in the image are computed once with the same float operations (saturation is
a numba transcription of rio-color's Cython, calling the same libm functions, including ``cpow`` where
Cython emits it) and kept in a lazily filled 2^24-entry table per formula, so later tiles are pure lookups.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import numba
import numpy as np

from pixels_xr.errors import PixelsError

__all__ = ["FormulaError", "Op", "parse_formula", "format_formula", "apply", "band_luts"]

OpName = Literal["sigmoidal", "gamma", "saturation"]

_EPS = float(np.finfo(np.float64).eps)
_BAND_LETTERS = {"r": 1, "g": 2, "b": 3}
_ARGS: dict[str, tuple[str, ...]] = {
    "sigmoidal": ("BANDS", "CONTRAST", "BIAS"),
    "gamma": ("BANDS", "VALUE"),
    "saturation": ("PROPORTION",),
}
_EXAMPLE = "e.g. 'sigmoidal RGB 3 0.5'"
_SPACE = "an empty token: rio-color separates tokens by single spaces (no leading, trailing or double spaces)"


class FormulaError(PixelsError, ValueError):
    """A rio-color formula is invalid; the message names the operation and token at fault."""


@dataclass(frozen=True)
class Op:
    """One rio-color operation: ``name``, 1-based ``bands`` it touches, and its float ``args``."""

    name: OpName
    bands: tuple[int, ...]
    args: tuple[float, ...]

    def __str__(self) -> str:
        args = " ".join(repr(a) for a in self.args)
        if self.name == "saturation":
            return f"saturation {args}"
        return f"{self.name} {''.join(str(b) for b in self.bands)} {args}"


# ------------------------------------------------------------------------------------------------ parsing


def _groups(formula: str) -> list[list[str]]:
    """rio-color's tokenizer: delete commas, split on single spaces, strip, lower-case; an operation name
    starts a new group."""
    tokens = [x.strip() for x in formula.replace(",", "").split(" ")]
    groups: list[list[str]] = []
    current: list[str] = []
    for token in tokens:
        if token.lower() in _ARGS and current:
            groups.append(current)
            current = []
        current.append(token.lower())
    if current:
        groups.append(current)
    return groups


def _band_set(name: str, token: str) -> tuple[int, ...]:
    bands = set()
    for ch in token:
        try:
            band = int(ch)
        except ValueError:
            if ch.lower() not in _BAND_LETTERS:
                raise FormulaError(f"{name} BANDS must be letters r, g, b or digits 1-3 (e.g. 'rgb'), got"
                                   f" {token!r}") from None
            band = _BAND_LETTERS[ch.lower()]
        if not 1 <= band <= 3:
            raise FormulaError(f"{name} BANDS must be letters r, g, b or digits 1-3 (e.g. 'rgb'), got {token!r}")
        bands.add(band)
    return tuple(sorted(bands))


def _op(parts: list[str]) -> Op | None:
    """One rio-color operation from its tokens; None for an operation on no band (a no-op in rio-color)."""
    name = parts[0]
    if name not in _ARGS:
        if not name:
            raise FormulaError(f"{_SPACE}")
        raise FormulaError(f"{name!r} is not an operation (expected one of {', '.join(sorted(_ARGS))})")
    want = _ARGS[name]
    if len(parts) < 2:
        raise FormulaError(f"{name} takes {len(want)} argument(s) ({' '.join(want)}), got 0")
    if name == "saturation":
        bands, args, names = (1, 2, 3), parts[1:], want
    else:
        bands, args, names = _band_set(name, parts[1]), parts[2:], want[1:]
    values = []
    for i, tok in enumerate(args):
        what = names[i] if i < len(names) else "extra argument"
        try:
            values.append(float(tok))
        except ValueError:
            raise FormulaError(f"{name} {what}: {_SPACE}" if not tok else
                               f"{name} {what} must be a number, got {tok!r}") from None
    if not bands:
        return None
    if len(values) < len(names):
        raise FormulaError(f"{name} takes {len(want)} argument(s) ({' '.join(want)}), got"
                           f" {len(parts) - 1}: {' '.join(parts[1:])}")
    values = values[: len(names)]  # rio-color zips the arguments with the names: extras are dropped
    if name == "gamma" and not values[0] > 0:
        raise FormulaError(f"gamma VALUE must be > 0, got {args[0]!r}")
    if name == "sigmoidal":
        contrast, bias = values
        if bias > 1.0 + _EPS or bias < 0 - _EPS:
            raise FormulaError(f"sigmoidal BIAS must be between 0 and 1, got {args[1]!r}")
        if contrast == 0 and math.isnan(bias):
            values = [contrast, 0.5]  # the identity either way; keeps operations comparable
    return Op(name, bands, tuple(values))  # type: ignore[arg-type]


def parse_formula(formula: str) -> list[Op]:
    """Parse a rio-color formula into operations, accepting what rio-color accepts; raise
    :class:`FormulaError` on anything rio-color rejects or that gives an undefined result."""
    if not isinstance(formula, str):
        raise FormulaError(f"a formula must be a string, got {type(formula).__name__}")
    if not formula.replace(",", "").strip():
        raise FormulaError(f"empty formula ({_EXAMPLE})")
    ops: list[Op] = []
    for parts in _groups(formula):
        op = _op(parts)
        if op is not None:
            ops.append(op)
    _check_defined(ops)
    return ops


def _check_defined(ops: list[Op]) -> None:
    """Run ``ops`` as rio-color would on every 8-bit value (exact without saturation, a grid with it)."""
    if not ops:
        return
    ramp = np.ascontiguousarray(np.broadcast_to(np.arange(256, dtype=np.float64) / 255, (3, 256)))
    first = next((i for i, op in enumerate(ops) if op.name == "saturation"), len(ops))
    arr = _run_float(ramp, ops[:first])
    if first < len(ops):
        idx = np.r_[0:256:15, 255]
        r, g, b = np.meshgrid(arr[0, idx], arr[1, idx], arr[2, idx], indexing="ij")
        colours = np.concatenate([arr, np.stack([r.ravel(), g.ravel(), b.ravel()])], axis=1)
        out = _run_float(colours, ops[first:first + 1])
        _to_uint8(out)
        levels = np.broadcast_to(np.linspace(0.0, 1.0, 4097), (3, 4097))  # saturation outputs anything in [0,1]
        arr = _run_float(np.concatenate([out, levels, ramp], axis=1), ops[first + 1:])
    _to_uint8(arr)


def format_formula(ops: list[Op]) -> str:
    """The canonical text of parsed operations (parses back to the same operations)."""
    return " ".join(str(op) for op in ops)


# ------------------------------------------------------------------------- float operations (rio-color's)


def _sigmoidal(arr: np.ndarray, contrast: float, bias: float) -> np.ndarray:
    """rio_color.operations.sigmoidal, same numpy expressions in the same order (without its checks)."""
    alpha, beta = bias, contrast
    if alpha == 0:
        alpha = _EPS
    if beta == 0:
        return arr
    if beta > 0:
        numerator = 1 / (1 + np.exp(beta * (alpha - arr))) - 1 / (1 + np.exp(beta * alpha))
        denominator = 1 / (1 + np.exp(beta * (alpha - 1))) - 1 / (1 + np.exp(beta * alpha))
        return numerator / denominator
    return (
        (beta * alpha)
        - np.log(
            (
                1
                / (
                    (arr / (1 + np.exp(beta * alpha - beta)))
                    - (arr / (1 + np.exp(beta * alpha)))
                    + (1 / (1 + np.exp(beta * alpha)))
                )
            )
            - 1
        )
    ) / beta


def _gamma(arr: np.ndarray, g: float) -> np.ndarray:
    """rio_color.operations.gamma (``arr ** (1.0 / g)``, numpy's fast paths included)."""
    return arr ** (1.0 / g)


# Exponents handed to the kernel at run time, so LLVM cannot rewrite pow(x, 0.5) as sqrt(x) etc.
_POW_EXPONENTS = np.array([2.4, 1.0 / 3, 0.5, 3.0])


@numba.njit(cache=True, nogil=True)
def _saturate_to_linear(rgb: np.ndarray, satmult: float, ex: np.ndarray) -> np.ndarray:  # pragma: no cover
    """rio-color's saturate_rgb up to linear RGB: RGB->XYZ->LAB->LCH, C*=satmult, LCH->LAB->XYZ->linear."""
    n = rgb.shape[1]
    out = np.empty((3, n))
    e24, e13, e05, e30 = ex[0], ex[1], ex[2], ex[3]
    t0 = 0.008856451679035631
    alpha = 7.787037037037037
    bint = 0.13793103448275862
    delta = 0.20689655172413793
    k = (3.0 * 0.20689655172413793) * 0.20689655172413793
    for j in range(n):
        r = rgb[0, j]
        g = rgb[1, j]
        b = rgb[2, j]
        rl = r / 12.92 if r <= 0.04045 else math.pow((r + 0.055) / 1.055, e24)
        gl = g / 12.92 if g <= 0.04045 else math.pow((g + 0.055) / 1.055, e24)
        bl = b / 12.92 if b <= 0.04045 else math.pow((b + 0.055) / 1.055, e24)
        x = (((rl * 0.4124564) + (gl * 0.3575761)) + (bl * 0.1804375)) / 0.95047
        y = ((rl * 0.2126729) + (gl * 0.7151522)) + (bl * 0.0721750)
        z = (((rl * 0.0193339) + (gl * 0.1191920)) + (bl * 0.9503041)) / 1.08883
        fx = math.pow(x, e13) if x > t0 else (alpha * x) + bint
        fy = math.pow(y, e13) if y > t0 else (alpha * y) + bint
        fz = math.pow(z, e13) if z > t0 else (alpha * z) + bint
        L = (116.0 * fy) - 16.0
        a = 500.0 * (fx - fy)
        bb = 200.0 * (fy - fz)
        C = math.pow((a * a) + (bb * bb), e05)
        H = math.atan2(bb, a)
        C = C * satmult
        a = C * math.cos(H)
        bb = C * math.sin(H)
        tx = ((L + 16.0) / 116.0) + (a / 500.0)
        x = math.pow(tx, e30) if tx > delta else k * (tx - bint)
        ty = (L + 16.0) / 116.0
        y = math.pow(ty, e30) if ty > delta else k * (ty - bint)
        tz = ((L + 16.0) / 116.0) - (bb / 200.0)
        z = math.pow(tz, e30) if tz > delta else k * (tz - bint)
        x = x * 0.95047
        z = z * 1.08883
        out[0, j] = ((x * 3.2404542) + (y * -1.5371385)) + (z * -0.4985314)
        out[1, j] = ((x * -0.9692660) + (y * 1.8760108)) + (z * 0.0415560)
        out[2, j] = ((x * 0.0556434) + (y * -0.2040259)) + (z * 1.0572252)
    return out


def _saturation(arr: np.ndarray, proportion: float) -> np.ndarray:
    """rio_color.colorspace.saturate_rgb on a (3, N) float64 array.

    The sRGB compand ``1.055 * lin ** (1 / 2.4) - 0.055`` is compiled by Cython as a *complex* power
    (libm ``cpow``); numpy's complex power calls the same ``cpow``, so it is done here, outside numba.
    """
    lin = _saturate_to_linear(np.ascontiguousarray(arr, dtype=np.float64), float(proportion), _POW_EXPONENTS)
    out = 12.92 * lin
    hi = lin > 0.0031308
    c = np.power(lin[hi].astype(np.complex128), 1 / 2.4)
    out[hi] = 1.055 * c.real - 0.055
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _run_float(arr: np.ndarray, ops: list[Op] | tuple[Op, ...]) -> np.ndarray:
    """Apply ``ops`` to a (3, N) float64 array in [0, 1], exactly as rio-color's op closures do, with its
    run-time check: a sigmoidal/gamma band given values outside [0, 1] (by more than epsilon) is an error."""
    with np.errstate(all="ignore"):
        for op in ops:
            if op.name == "saturation":
                arr = _saturation(arr, op.args[0])
                continue
            new = arr.copy()
            for b in op.bands:
                band = arr[b - 1]
                if band.size and (band.max() > 1.0 + _EPS or band.min() < 0 - _EPS):
                    raise FormulaError(f"'{op}' gets values outside 0-1 from the operation before it (rio-color"
                                       " refuses them)")
                new[b - 1] = _gamma(band, *op.args) if op.name == "gamma" else _sigmoidal(band, *op.args)
            arr = new
    return arr


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """rio-color's scale_dtype: ``(arr * 255).astype(uint8)``; refuses values whose cast is undefined."""
    with np.errstate(all="ignore"):
        scaled = arr * 255
    if not np.all(np.isfinite(scaled)) or scaled.min(initial=0) <= -1 or scaled.max(initial=0) >= 256:
        raise FormulaError("formula gives undefined values (NaN, infinite or outside 0-1) for some colours")
    return scaled.astype(np.uint8)


# ------------------------------------------------------------------------------------------- application


def band_luts(ops: list[Op] | tuple[Op, ...]) -> np.ndarray:
    """(3, 256) uint8 tables for a formula without ``saturation``: out[band] = lut[band][in[band]]."""
    if any(op.name == "saturation" for op in ops):
        raise FormulaError("saturation mixes bands: it has no per-band lookup table")
    x = np.ascontiguousarray(np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 256)))
    return _to_uint8(_run_float(x.astype(np.float64) / 255, ops))


@numba.njit(cache=True, nogil=True)
def _missing_colours(rgb: np.ndarray, done: np.ndarray) -> np.ndarray:  # pragma: no cover
    """Packed 24-bit colours of ``rgb`` (3, n) uint8 not yet marked in ``done``; marks them."""
    n = rgb.shape[1]
    found = np.empty(n, np.uint32)
    m = 0
    for j in range(n):
        p = (np.uint32(rgb[0, j]) << 16) | (np.uint32(rgb[1, j]) << 8) | np.uint32(rgb[2, j])
        if not done[p]:
            done[p] = True
            found[m] = p
            m += 1
    return found[:m].copy()


@numba.njit(cache=True, nogil=True)
def _lookup_bands(rgb: np.ndarray, luts: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    for i in range(3):
        lut = luts[i]
        for j in range(rgb.shape[1]):
            out[i, j] = lut[rgb[i, j]]


@numba.njit(cache=True, nogil=True)
def _lookup(rgb: np.ndarray, lut: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    n = rgb.shape[1]
    for j in range(n):
        v = lut[(np.uint32(rgb[0, j]) << 16) | (np.uint32(rgb[1, j]) << 8) | np.uint32(rgb[2, j])]
        out[0, j] = v >> 16
        out[1, j] = (v >> 8) & 0xFF
        out[2, j] = v & 0xFF


class _ColourTable:
    """A lazily filled 2^24-entry RGB -> RGB table for one formula (packed 0xRRGGBB in uint32)."""

    def __init__(self, ops: tuple[Op, ...]) -> None:
        self.ops = ops
        self.lut = np.empty(1 << 24, np.uint32)
        self.done = np.zeros(1 << 24, np.bool_)
        self.lock = threading.Lock()

    def fill(self, rgb: np.ndarray) -> None:
        with self.lock:
            packed = _missing_colours(rgb, self.done)
            if packed.size == 0:
                return
            try:
                cols = np.stack([(packed >> 16) & 0xFF, (packed >> 8) & 0xFF, packed & 0xFF]).astype(np.uint8)
                res = _to_uint8(_run_float(cols.astype(np.float64) / 255, self.ops)).astype(np.uint32)
            except BaseException:
                self.done[packed] = False
                raise
            self.lut[packed] = (res[0] << 16) | (res[1] << 8) | res[2]


_TABLES: OrderedDict[tuple[Op, ...], _ColourTable] = OrderedDict()
_TABLES_LOCK = threading.Lock()
_MAX_TABLES = 4  # 80 MB each


def _table(ops: tuple[Op, ...]) -> _ColourTable:
    with _TABLES_LOCK:
        table = _TABLES.get(ops)
        if table is None:
            table = _TABLES[ops] = _ColourTable(ops)
            while len(_TABLES) > _MAX_TABLES:
                _TABLES.popitem(last=False)
        _TABLES.move_to_end(ops)
        return table


def apply(rgb: np.ndarray, ops: list[Op] | tuple[Op, ...] | str) -> np.ndarray:
    """Colour-correct ``rgb`` (3, ...) uint8 with a formula; returns a new uint8 array of the same shape.

    Bit-exact with ``rio color`` on 8-bit input. Only the three colour bands are given: masks and alpha
    are never passed here (validity is decided before colour).
    """
    if isinstance(ops, str):
        ops = parse_formula(ops)
    ops = tuple(ops)
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim < 2 or arr.shape[0] != 3:
        raise FormulaError(f"colour needs a (3, ...) uint8 array, got {arr.dtype} {arr.shape}")
    if not ops:
        return arr.copy()
    flat = np.ascontiguousarray(arr.reshape(3, -1))
    if not any(op.name == "saturation" for op in ops):
        out = np.empty_like(flat)
        _lookup_bands(flat, band_luts(ops), out)
        return out.reshape(arr.shape)
    table = _table(ops)
    table.fill(flat)
    out = np.empty_like(flat)
    _lookup(flat, table.lut, out)
    return out.reshape(arr.shape)
