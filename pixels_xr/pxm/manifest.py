"""PXM manifest validation: every MUST of the spec, each failure a ManifestError naming its JSON path.

Two forms are read: the public 0.5 form (a top-level ``"version": "0.5.x"``; ``ndv``/``bidx`` may be JSON
arrays as in its schema) and the 0.4 draft (no ``version``). ``ndv``/``bidx`` are accepted either as the
draft's strings (``"[255, 255, 255]"``, ``"1,2,3"``) or as arrays, in both forms. Unknown keys are rejected
(a misspelt optional key, e.g. ``colour``, would otherwise be silently ignored). ``notes`` may be empty
(``""``): the spec only asks for a string, and its reference tool writes ``"notes": ""`` by default.

Colour keys are regexes *searched* in the source file name (``7RLL675`` selects ``17RLL675930.tif``). When
several keys match one file, **the longest match wins; on a tie the key listed later wins** (so a catch-all
``"."`` listed first is a default that any more specific key overrides). Keys are checked for catastrophic
backtracking (nested or alternating quantifiers, backreferences). Each key is searched once per *distinct*
file name at validation (500 sources in one folder pattern are 500 names, the same name in 500 folders is
one), and all those searches together get ``MATCH_BUDGET`` seconds: a legal but slow key fails the manifest
in one line instead of slowing every later look-up.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import regex

from pixels_xr.errors import ManifestError
from pixels_xr.pxm.color import FormulaError, Op, parse_formula

__all__ = [
    "ColorRule",
    "MATCH_BUDGET",
    "Manifest",
    "ManifestInfo",
    "validate_manifest",
]

SpecVersion = Literal["0.4", "0.5"]

_TOP_KEYS = {"sources", "info", "version"}
_REQUIRED_INFO = ("tilesets", "license", "notes", "account", "product", "date")
_OPTIONAL_INFO = ("bidx", "crs", "color", "ndv")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_BASENAME = re.compile(r"[A-Za-z0-9_]+\.(?:tif|tiff|jp2)", re.IGNORECASE)
_ACCOUNT = {"0.5": re.compile(r"[a-z0-9_-]{1,32}"), "0.4": re.compile(r"[A-Za-z0-9_-]{1,32}")}
_MAPNAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
_PRODUCT = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_DATE = re.compile(r"[0-9]{4}(?:-[0-9]{2}-[0-9]{2})?")
_CRS = re.compile(r"EPSG:([0-9]{4,6})")
_VERSION = re.compile(r"0\.5(?:\.[0-9]+)?")
_MAX_KEY = 256
#: Seconds for every colour key over every distinct source file name of one manifest, all together.
MATCH_BUDGET = 2.0


def _q(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def _child(parent: str, key: str) -> str:
    """JSON path of ``parent``'s member ``key``: ``info.crs``, or ``info["odd key"]`` when not an identifier."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{json.dumps(key)}]"


@dataclass(frozen=True)
class ColorRule:
    """One ``info.color`` entry: the regex ``key``, its ``formula`` text and the parsed ``ops``."""

    key: str
    formula: str
    ops: tuple[Op, ...]
    pattern: Any = field(repr=False, compare=False)

    def search(self, name: str, timeout: float = MATCH_BUDGET) -> int | None:
        """Length of the first match of the key in ``name``, or None when it does not match."""
        try:
            m = self.pattern.search(name, timeout=timeout)
        except TimeoutError:
            raise ManifestError(f"regex key took more than {timeout:.3g} s on {name!r}; simplify it",
                                where=f"info.color[{json.dumps(self.key)}]") from None
        return None if m is None else m.end() - m.start()


Hits = tuple[tuple[int, int], ...]  # (rule index, match length) of every key that matches one file name


def _match_names(rules: tuple[ColorRule, ...], names: list[str], budget: float = MATCH_BUDGET) -> dict[str, Hits]:
    """Search every key in every distinct name once, all within ``budget`` seconds together."""
    deadline = time.monotonic() + budget
    spent = [0.0] * len(rules)  # per key, to name the slowest one when the budget runs out
    out: dict[str, Hits] = {}
    for name in names:
        if name in out:
            continue
        hits = []
        for i, rule in enumerate(rules):
            start = time.monotonic()
            try:
                if start >= deadline:
                    raise TimeoutError
                m = rule.pattern.search(name, timeout=deadline - start)
            except TimeoutError:
                spent[i] += time.monotonic() - start
                slow = rules[max(range(len(rules)), key=spent.__getitem__)]
                raise ManifestError(
                    f"colour keys took more than {budget:g} s to match {len(set(names))} source file name(s),"
                    f" this one most ({max(spent):.2g} s, stopped at {name!r}); simplify the regex",
                    where=f"info.color[{json.dumps(slow.key)}]") from None
            spent[i] += time.monotonic() - start
            if m is not None:
                hits.append((i, m.end() - m.start()))
        out[name] = tuple(hits)
    return out


@dataclass(frozen=True)
class ManifestInfo:
    """The ``info`` object, normalised: ``ndv``/``bidx`` as int tuples, ``color`` as ordered rules."""

    tilesets: tuple[str, ...]
    license: str
    notes: str
    account: str
    product: str
    date: str
    crs: str | None = None
    ndv: tuple[int, int, int] | None = None
    bidx: tuple[int, ...] | None = None
    color: tuple[ColorRule, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """A valid PXM manifest; ``version`` is the spec read ("0.5" or "0.4"), ``version_string`` as written."""

    version: SpecVersion
    sources: tuple[str, ...]
    info: ManifestInfo
    version_string: str | None = None
    path: str | None = None
    matches: dict[str, Hits] = field(default_factory=dict, repr=False, compare=False)

    def _hits(self, source: str) -> Hits:
        name = PurePosixPath(source).name
        hits = self.matches.get(name)
        return hits if hits is not None else _match_names(self.info.color, [name])[name]

    def color_rule(self, source: str) -> ColorRule | None:
        """The colour rule for a source (URI or file name): longest match wins, ties go to the later key.

        The sources' own names were matched once at validation; other names are matched on demand."""
        best = max(((n, i) for i, n in self._hits(source)), default=None)
        return None if best is None else self.info.color[best[1]]

    def unused_color_keys(self) -> list[str]:
        """Colour keys that match no source file name."""
        used = {i for uri in self.sources for i, _ in self._hits(uri)}
        return [r.key for i, r in enumerate(self.info.color) if i not in used]

    def color_ops(self, source: str) -> tuple[Op, ...]:
        """The parsed colour operations for a source (empty when no key matches)."""
        rule = self.color_rule(source)
        return () if rule is None else rule.ops


# ------------------------------------------------------------------------------------------------ JSON


class _DuplicateKey(Exception):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        pos = err.pos
        prev = len(text[:pos].rstrip())
        if pos < len(text) and text[pos] in "}]" and prev and text[prev - 1] == ",":
            line, col = _line_col(text, prev - 1)
            raise ManifestError(
                f"invalid JSON at line {line} column {col}: trailing comma before '{text[pos]}'", where=where
            ) from None
        raise ManifestError(f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}", where=where) from None
    except _DuplicateKey as err:
        raise ManifestError(f"invalid JSON: duplicate key {_q(str(err))}", where=where) from None
    except ValueError as err:  # NaN/Infinity constants, huge numbers
        raise ManifestError(f"invalid JSON: {err}", where=where) from None
    except RecursionError:
        raise ManifestError("invalid JSON: nested too deeply", where=where) from None


def _read(source: str | Path | dict) -> tuple[Any, str | None]:
    if isinstance(source, dict):
        return source, None
    if isinstance(source, str) and source.lstrip().startswith("{"):
        return _loads(source, "<manifest>"), None
    if not isinstance(source, (str, Path)):
        raise ManifestError(f"expected a path, JSON text or dict, got {type(source).__name__}", where="<manifest>")
    path = str(source)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError(f"not UTF-8 text ({err.reason} at byte {err.start})", where=path) from None
    except OSError as err:
        raise ManifestError(f"cannot read: {err.strerror or err}", where=path) from None
    return _loads(text, path), path


# --------------------------------------------------------------------------------------------- checks


def _string(value: Any, where: str, *, nonempty: bool = True) -> str:
    if not isinstance(value, str):
        raise ManifestError(f"must be a string, got {_type(value)}", where=where)
    if nonempty and not value.strip():
        raise ManifestError("must be a non-empty string", where=where)
    return value


def _type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _check_source(uri: Any, where: str) -> str:
    uri = _string(uri, where)
    if not uri.startswith("s3://"):
        raise ManifestError(f"must be an S3 URI s3://bucket/key, got {uri!r}", where=where)
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ManifestError(f"invalid S3 bucket name {bucket!r} in {uri!r}", where=where)
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts) or "\\" in key or not key.isprintable():
        raise ManifestError(f"invalid S3 key in {uri!r} (empty, '.', '..' or '//' segments)", where=where)
    name = parts[-1]
    if not _BASENAME.fullmatch(name):
        raise ManifestError(
            f"basename {name!r} must be ASCII letters, digits and '_' (no dashes) with a .tif, .tiff or .jp2"
            " extension",
            where=where,
        )
    return uri


def _check_date(value: Any, where: str) -> str:
    value = _string(value, where)
    if not _DATE.fullmatch(value):
        raise ManifestError(f"must be YYYY or YYYY-MM-DD, got {value!r}", where=where)
    try:
        if len(value) == 4:
            _dt.date(int(value), 1, 1)
        else:
            _dt.date.fromisoformat(value)
    except ValueError as err:
        raise ManifestError(f"{value!r} is not a real date ({err})", where=where) from None
    return value


def _check_crs(value: Any, where: str) -> str:
    value = _string(value, where)
    m = _CRS.fullmatch(value)
    if not m:
        raise ManifestError(f"must be 'EPSG:NNNN', got {value!r}", where=where)
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        CRS.from_epsg(int(m.group(1)))
    except CRSError:
        raise ManifestError(f"{value} is not a known EPSG code", where=where) from None
    return value


def _int_list(value: Any, where: str, what: str) -> list[int]:
    if isinstance(value, str):
        text = value.strip()
        if what == "ndv":
            try:
                value = json.loads(text)
            except (ValueError, RecursionError):  # a deeply nested string ends in RecursionError
                shown = text if len(text) <= 40 else text[:37] + "…"
                raise ManifestError(f"must hold a list of 3 integers like \"[0, 0, 0]\", got {shown!r}",
                                    where=where) from None
        else:
            if not re.fullmatch(r"[0-9]+(?:\s*,\s*[0-9]+)*", text):
                raise ManifestError(f"must be comma-separated band indexes like \"1,2,3\", got {text!r}",
                                    where=where)
            value = [int(v) for v in text.split(",")]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ManifestError(f"must be a list of integers, got {value!r}", where=where)
    return value


def _check_ndv(value: Any, where: str) -> tuple[int, int, int]:
    vals = _int_list(value, where, "ndv")
    if len(vals) != 3 or not all(0 <= v <= 255 for v in vals):
        raise ManifestError(f"must be 3 integers 0-255 (R, G, B), got {vals}", where=where)
    return (vals[0], vals[1], vals[2])


def _check_bidx(value: Any, where: str) -> tuple[int, ...]:
    vals = _int_list(value, where, "bidx")
    if len(vals) not in (3, 4):
        raise ManifestError(f"must list 3 band indexes (R, G, B) or 4 (R, G, B, alpha), got {len(vals)}",
                            where=where)
    if not all(1 <= v <= 65535 for v in vals):
        raise ManifestError(f"band indexes start at 1, got {vals}", where=where)
    if len(set(vals)) != len(vals):
        raise ManifestError(f"band indexes must be distinct, got {vals}", where=where)
    return tuple(vals)


# ---------------------------------------------------------------------------------------- regex safety


def _regex_risk(pattern: str) -> str | None:
    """Why ``pattern`` could backtrack catastrophically, or None (a structural check on re's parse tree)."""
    import re._constants as c  # type: ignore[import-not-found]
    import re._parser as p  # type: ignore[import-not-found]

    repeats = {c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", c.MAX_REPEAT)}

    def has_branch(sub: Any) -> bool:
        for op, av in sub:
            if op is c.BRANCH:
                return True
            if op is c.SUBPATTERN and has_branch(av[-1]):
                return True
        return False

    def walk(sub: Any, in_repeat: bool) -> str | None:
        for op, av in sub:
            if op in repeats:
                lo, hi, body = av
                multi = hi is c.MAXREPEAT or hi > 1
                if multi and in_repeat:
                    return "nested quantifiers"
                if multi and has_branch(body):
                    return "a quantified alternation"
                why = walk(body, in_repeat or multi)
            elif op is c.SUBPATTERN:
                why = walk(av[-1], in_repeat)
            elif op is c.BRANCH:
                why = next((w for b in av[1] if (w := walk(b, in_repeat))), None)
            elif op in (c.ASSERT, c.ASSERT_NOT):
                why = walk(av[1], in_repeat)
            elif op is getattr(c, "ATOMIC_GROUP", None):
                why = walk(av, in_repeat)
            elif op in (c.GROUPREF, c.GROUPREF_EXISTS):
                return "a backreference"
            else:
                why = None
            if why:
                return why
        return None

    return walk(p.parse(pattern), False)


def _compile_key(key: str, where: str) -> Any:
    if not key:
        raise ManifestError("colour key must be a non-empty regex (use \".\" to match every file)", where=where)
    if len(key) > _MAX_KEY:
        raise ManifestError(f"colour key longer than {_MAX_KEY} characters", where=where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            re.compile(key)
    except re.error as err:
        raise ManifestError(f"colour key is not a valid regex: {err}", where=where) from None
    except (RecursionError, OverflowError):
        raise ManifestError("colour key regex is too complex", where=where) from None
    why = _regex_risk(key)
    if why:
        raise ManifestError(
            f"colour key regex {key!r} risks catastrophic backtracking ({why}); simplify it", where=where
        )
    try:
        return regex.compile(key, flags=regex.VERSION0)
    except (regex.error, RecursionError, OverflowError) as err:
        raise ManifestError(f"colour key is not a valid regex: {err}", where=where) from None


def _check_color(value: Any, where: str) -> tuple[ColorRule, ...]:
    if not isinstance(value, dict):
        raise ManifestError(f"must be an object of regex -> rio-color formula, got {_type(value)}", where=where)
    if not value:
        raise ManifestError("must not be empty (omit 'color' when no colour correction is needed)", where=where)
    rules = []
    for key, formula in value.items():
        kw = f"{where}[{json.dumps(str(key))}]"
        if not isinstance(key, str):
            raise ManifestError("colour keys must be strings", where=kw)
        pattern = _compile_key(key, kw)
        formula = _string(formula, kw)
        try:
            ops = tuple(parse_formula(formula))
        except FormulaError as err:
            raise ManifestError(f"invalid rio-color formula {formula!r}: {err.message}", where=kw) from None
        rules.append(ColorRule(key=key, formula=formula, ops=ops, pattern=pattern))
    return tuple(rules)


def _check_info(info: Any, version: SpecVersion) -> ManifestInfo:
    if not isinstance(info, dict):
        raise ManifestError(f"must be an object, got {_type(info)}", where="info")
    unknown = sorted(str(k) for k in info if k not in _REQUIRED_INFO + _OPTIONAL_INFO)
    if unknown:
        allowed = ", ".join(_REQUIRED_INFO + _OPTIONAL_INFO)
        raise ManifestError(f"unknown key {_q(unknown[0])} (allowed: {allowed})", where=_child("info", unknown[0]))
    for k in _REQUIRED_INFO:
        if k not in info:
            raise ManifestError("required key is missing", where=f"info.{k}")
    account = _string(info["account"], "info.account")
    if not _ACCOUNT[version].fullmatch(account):
        rule = "lowercase letters, digits, '_' or '-'" if version == "0.5" else "letters, digits, '_' or '-'"
        raise ManifestError(f"must be 1-32 {rule} (no spaces), got {account!r}", where="info.account")
    tilesets = info["tilesets"]
    if not isinstance(tilesets, list) or not tilesets:
        raise ManifestError(f"must be a non-empty array of 'username.mapname', got {_type(tilesets)}"
                            if not isinstance(tilesets, list) else "must hold at least one tileset id",
                            where="info.tilesets")
    seen: set[str] = set()
    for i, ts in enumerate(tilesets):
        w = f"info.tilesets[{i}]"
        ts = _string(ts, w)
        user, dot, mapname = ts.partition(".")
        if not dot or not _MAPNAME.fullmatch(mapname) or not user:
            raise ManifestError(f"must be 'username.mapname' (mapname 1-32 of A-Z a-z 0-9 _ -), got {ts!r}",
                                where=w)
        if user != account:
            raise ManifestError(f"username {user!r} must equal info.account {account!r}", where=w)
        if ts in seen:
            raise ManifestError(f"duplicate tileset {ts!r}", where=w)
        seen.add(ts)
    license_ = _string(info["license"], "info.license")
    notes = _string(info["notes"], "info.notes", nonempty=False)  # the spec's own tool writes "" by default
    product = _string(info["product"], "info.product")
    if not _PRODUCT.fullmatch(product) or ".." in product or product.startswith("."):
        raise ManifestError(f"must be 1-128 of A-Z a-z 0-9 _ - . without spaces or '..', got {product!r}",
                            where="info.product")
    date = _check_date(info["date"], "info.date")
    return ManifestInfo(
        tilesets=tuple(tilesets),
        license=license_,
        notes=notes,
        account=account,
        product=product,
        date=date,
        crs=_check_crs(info["crs"], "info.crs") if "crs" in info else None,
        ndv=_check_ndv(info["ndv"], "info.ndv") if "ndv" in info else None,
        bidx=_check_bidx(info["bidx"], "info.bidx") if "bidx" in info else None,
        color=_check_color(info["color"], "info.color") if "color" in info else (),
    )


def validate_manifest(source: str | Path | dict) -> Manifest:
    """Validate a PXM manifest (a file path, JSON text starting with '{', or a parsed dict).

    Returns a :class:`Manifest`; raises :class:`~pixels_xr.errors.ManifestError` whose ``where`` is the
    JSON path at fault (e.g. ``info.tilesets[1]``, ``sources[2]``) or the file for invalid JSON.
    """
    doc, path = _read(source)
    if not isinstance(doc, dict):
        raise ManifestError(f"a manifest must be a JSON object, got {_type(doc)}", where=path or "<manifest>")
    unknown = sorted(str(k) for k in doc if k not in _TOP_KEYS)
    if unknown:
        raise ManifestError(f"unknown top-level key {_q(unknown[0])} (allowed: sources, info, version)",
                            where=_child("", unknown[0]))
    version: SpecVersion = "0.4"
    version_string = None
    if "version" in doc:
        version_string = doc["version"]
        if not isinstance(version_string, str) or not _VERSION.fullmatch(version_string):
            raise ManifestError(f"unsupported version {version_string!r} (this reader knows 0.5.x; omit it for"
                                " the 0.4 draft)", where="version")
        version = "0.5"
    for k in ("sources", "info"):
        if k not in doc:
            raise ManifestError("required key is missing", where=k)
    sources = doc["sources"]
    if not isinstance(sources, list):
        raise ManifestError(f"must be an array of S3 URIs, got {_type(sources)}", where="sources")
    if not sources:
        raise ManifestError("must list at least one source", where="sources")
    first: dict[str, int] = {}
    for i, uri in enumerate(sources):
        uri = _check_source(uri, f"sources[{i}]")
        if uri in first:
            raise ManifestError(f"duplicate of sources[{first[uri]}]", where=f"sources[{i}]")
        first[uri] = i
    info = _check_info(doc["info"], version)
    names = [PurePosixPath(uri).name for uri in sources]
    matches = _match_names(info.color, names) if info.color else {}  # once per distinct name, one budget
    return Manifest(version=version, sources=tuple(sources), info=info, version_string=version_string,
                    path=path, matches=matches)
