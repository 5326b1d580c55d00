"""Signing asset hrefs just before they are read: the signer protocol and the Planetary Computer SAS signer.

A signer is a callable ``href -> str | SignedHref``; a ``SignedHref`` may carry the moment (epoch seconds)
after which it must be signed again. Readers call the signer when they open an asset and again once that
moment has passed, so a long run never reads with an expired token. Register signers per catalog with
``register_signer`` (here; also importable from ``catalog``); ``planetary-computer`` has ``PlanetaryComputerSigner`` by default.

Planetary Computer: a blob ``https://{account}.blob.core.windows.net/{container}/{path}`` is read with a SAS
token of its container from ``{token API}/{account}/{container}`` (default
``https://planetarycomputer.microsoft.com/api/sas/v1/token``; override with ``PIXELS_XR_PC_SAS_URL``; an
optional ``PC_SDK_SUBSCRIPTION_KEY`` is sent as ``Ocp-Apim-Subscription-Key``). The token is appended as
the query string and cached per (account, container) until ``margin`` seconds before its ``msft:expiry``.
Emulator-style URLs (``http://127.0.0.1:10000/{account}/{container}/{path}``, as Azurite serves them) are
understood too. Other hrefs pass unchanged. Tokens never reach logs, errors or outputs: see ``redact``.

Which hrefs are opened at all: ``HrefPolicy`` (an allow-list derived from the catalog's own location by
``catalog.href_policy``) checked by ``HrefGate``, the signer every reader, asset check and header read
gets from ``signer_for``. A refused href raises ``HrefRefused`` (an ``AssetReadError``) before
anything is opened, so it is reported like an unreadable asset. The default rules:

- never GDAL virtual file system strings written into a catalog (``/vsicurl/…``, ``/vsizip/…``, any
  ``/vsi`` prefix, also behind ``file://``), GDAL connection strings (``HDF5:…``, ``GTIFF_DIR:…``) or
  hrefs with control characters;
- a remote catalog (a STAC API over http(s), or a provider name): schemes ``REMOTE_HREF_SCHEMES``
  (https, http, s3, gs, az) only, never local paths or ``file://``; an http(s) host must be a public
  address: loopback, private, link-local (169.254.169.254, the cloud metadata service), unspecified and
  multicast IP literals (also in the legacy forms curl accepts, ``2130706433``, ``0x7f.1``, IPv4-mapped
  IPv6) and ``localhost`` are refused unless they are the API's own origin (same host and port). Host
  names are not resolved here (GDAL resolves them when it opens the file): a public name that resolves to
  a private address is not caught;
- a local catalog (a file the user named): ``LOCAL_HREF_SCHEMES`` (the remote ones plus ``file``), any
  local path and any host — it is trusted as much as the files the user points at;
- extra href prefixes are allowed on top, per process from ``$PIXELS_XR_ALLOWED_HREFS`` (comma-separated
  prefixes such as ``http://127.0.0.1:9000/,/vsis3/bucket/``; ``*`` allows every href) and per catalog
  with ``allow_hrefs``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pixels_xr.errors import AssetReadError
from pixels_xr.platforms import PROVIDERS

PC_SAS_URL = "https://planetarycomputer.microsoft.com/api/sas/v1/token"
PC_SAS_ENV = "PIXELS_XR_PC_SAS_URL"
PC_KEY_ENV = "PC_SDK_SUBSCRIPTION_KEY"
_RETRY_STATUSES = {429, 500, 502, 503, 504}


@dataclass(frozen=True)
class SignedHref:
    """A readable href and when it stops being readable (epoch seconds; ``None``: never)."""

    href: str
    expires: float | None = None


Signer = Callable[[str], "str | SignedHref"]


def sign(signer: Signer | None, href: str) -> SignedHref:
    """``href`` signed by ``signer`` (unchanged without one), as a ``SignedHref``."""
    if signer is None:
        return SignedHref(href)
    out = signer(href)
    return out if isinstance(out, SignedHref) else SignedHref(str(out))


#: Query parameters whose values are secrets (compared case-insensitively): masked wherever they appear,
#: also in URLs without a scheme (``url: /search?token=…`` in urllib3 messages).
SECRET_PARAMS = ("token", "access_token", "refresh_token", "id_token", "sig", "signature", "se", "sp", "st",
                 "sv", "skoid", "sktid", "skt", "ske", "sks", "skv", "x-amz-signature", "x-amz-credential",
                 "x-amz-security-token", "x-goog-signature", "x-goog-credential", "key", "api_key", "apikey",
                 "api-key", "subscription-key", "password", "passwd", "secret", "client_secret")
#: Header names whose values are secrets (masked in logged header dicts such as pystac-client's debug log).
SECRET_HEADERS = ("authorization", "proxy-authorization", "cookie", "x-api-key", "ocp-apim-subscription-key",
                  "x-amz-security-token")

_URL_QUERY = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"?#]*)\?[^\s'\"#]*")
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s'\"/?#@]*@")
_PARAM = re.compile(r"(?i)(?<![A-Za-z0-9_.-])(" + "|".join(map(re.escape, SECRET_PARAMS))
                    + r")=[^&;\s'\"#]+")
_HEADER = re.compile(r"(?i)(['\"]?(?:" + "|".join(map(re.escape, SECRET_HEADERS))
                     + r")['\"]?\s*[:=]\s*['\"]?)[^'\"\r\n,}]+")


def redact(text: str) -> str:
    """``text`` without secrets: every URL loses its userinfo (``user:pass@``) and its query string (SAS
    tokens, signatures, API keys), any other ``SECRET_PARAMS`` value and ``SECRET_HEADERS`` value is
    masked as ``***``. Use it on everything that is logged, raised or written (hrefs, URLs, messages).

    Each pattern runs only when what it cannot match without is in ``text`` (its ``@``, ``?`` or ``=``, a
    header's name): a batch redacts every source href of every feature, and all four patterns cost 20-40 µs
    per href, the header pattern most of it."""
    if "@" in text:
        text = _USERINFO.sub(r"\1", text)
    if "?" in text:
        text = _URL_QUERY.sub(r"\1", text)
    if "=" in text:
        text = _PARAM.sub(r"\1=***", text)
    if ":" in text or "=" in text:
        folded = text.casefold()  # the pattern ignores case
        if any(name in folded for name in SECRET_HEADERS):
            text = _HEADER.sub(r"\1***", text)
    return text


def redact_obj(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings) with ``redact`` applied to every string in it."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_obj(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_obj(v) for v in value]
    return value


def redact_json(text: str) -> str:
    """A JSON document (a config's JSON) with every string value redacted; unchanged when nothing is secret."""
    if redact(text) == text:
        return text
    return json.dumps(redact_obj(json.loads(text)), ensure_ascii=False, separators=(",", ":"))


#: Third-party loggers whose records carry request URLs, asset hrefs (signed or pre-signed) or headers:
#: every record is redacted (``redact_logs``), whatever the level a user enables.
REDACTED_LOGGERS = ("pystac_client.stac_api_io", "urllib3.connectionpool", "urllib3.util.retry",
                    "rasterio._base", "rasterio._env", "rasterio._err", "rasterio._io", "rasterio._filepath",
                    "rasterio._vsiopener", "rasterio.env", "rasterio.session", "rasterio._path",
                    "stackstac.timer", "stackstac.rio_reader", "odc.loader._rio")


class RedactingFilter:
    """A ``logging`` filter that redacts each record's message (see ``REDACTED_LOGGERS``)."""

    def filter(self, record: Any) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is the logging module's business
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def redact_logs(names: Iterable[str] = REDACTED_LOGGERS) -> None:
    """Install a ``RedactingFilter`` on each named logger (once; called where requests and reads start, so
    Dask workers have it too)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())


# ----------------------------------------------------------------------------------------------- allow-list
#: Schemes of asset hrefs a remote catalog (STAC API) may give.
REMOTE_HREF_SCHEMES = frozenset({"https", "http", "s3", "gs", "az"})
#: Schemes of asset hrefs a local catalog may give (plus plain local paths).
LOCAL_HREF_SCHEMES = REMOTE_HREF_SCHEMES | {"file"}
#: Extra allowed href prefixes for every catalog, comma-separated; ``*`` allows every href.
ALLOWED_HREFS_ENV = "PIXELS_XR_ALLOWED_HREFS"

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_GDAL_CONNECTION = re.compile(r"^[A-Za-z][A-Za-z0-9_]+:")  # HDF5:"f":d, GTIFF_DIR:1:f, NETCDF:…, MEM:::…
_DEFAULT_PORTS = {"http": 80, "https": 443}


class HrefRefused(AssetReadError):
    """An asset href outside its catalog's allow-list (``HrefPolicy``): it was not opened."""


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:  # the legacy IPv4 forms curl and inet_aton accept: 2130706433, 0x7f.1, 127.1, 017700000001
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def public_host(host: str) -> bool:
    """Whether ``host`` (a URL's host) may be a public address: not ``localhost`` and not a non-global IP
    literal (loopback, private, link-local, unspecified, reserved, multicast). Names are not resolved."""
    h = host.strip("[]").rstrip(".").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return False
    ip = _ip(h)
    if ip is None:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def origin(url: str) -> tuple[str, int] | None:
    """(lower-case host, port) of an http(s) URL, the scheme's default port when none is given."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.hostname.strip("[]").rstrip(".").lower(), port or _DEFAULT_PORTS[scheme]


@dataclass(frozen=True)
class HrefPolicy:
    """Which asset hrefs may be opened (see the module docstring for the defaults).

    ``catalog`` (redacted) names the catalog in messages; ``schemes`` are the allowed URL schemes;
    ``local_paths`` allows plain paths; ``public_only`` refuses http(s) hosts that are not public
    addresses except ``origins`` ((host, port) pairs: the API's own); ``prefixes`` are hrefs allowed
    whatever the other rules say; ``anything`` turns the check off.
    """

    catalog: str
    schemes: tuple[str, ...]
    local_paths: bool
    public_only: bool
    origins: tuple[tuple[str, int], ...] = ()
    prefixes: tuple[str, ...] = ()
    anything: bool = False

    @classmethod
    def remote(cls, catalog_url: str, prefixes: Iterable[str] = ()) -> HrefPolicy:
        """The policy of a STAC API at ``catalog_url``."""
        own = origin(catalog_url)
        return cls(redact(catalog_url), tuple(sorted(REMOTE_HREF_SCHEMES)), local_paths=False,
                   public_only=True, origins=(own,) if own else (), **_extra(prefixes))

    @classmethod
    def local(cls, catalog_path: str, prefixes: Iterable[str] = ()) -> HrefPolicy:
        """The policy of a local catalog file."""
        return cls(redact(catalog_path), tuple(sorted(LOCAL_HREF_SCHEMES)), local_paths=True,
                   public_only=False, **_extra(prefixes))

    def refusal(self, href: str) -> str | None:
        """Why ``href`` may not be opened, or ``None`` when it may."""
        if not isinstance(href, str) or not href:
            return "empty href"
        if self.anything or any(href.startswith(p) for p in self.prefixes):
            return None
        if any(ord(c) < 32 or ord(c) == 127 for c in href) or href != href.strip():
            return "control characters or surrounding whitespace in the href"
        if href.lower().startswith("/vsi"):
            return "GDAL virtual file system paths (/vsi…) are never opened from a catalog"
        match = _SCHEME.match(href)
        if match is None:
            if not self.local_paths:
                return "local paths are not opened from a remote catalog"
            if _GDAL_CONNECTION.match(href):
                return "GDAL connection strings (DRIVER:…) are never opened from a catalog"
            return None
        scheme = match.group(1).lower()
        if scheme not in self.schemes:
            return f"scheme {scheme!r} is not allowed (allowed: {', '.join(self.schemes)})"
        parts = urllib.parse.urlsplit(href)
        if "\\" in parts.netloc or parts.netloc.count("@") > 1:
            return "ambiguous host in the href"
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                return "file:// URLs on another host are not opened"
            if urllib.parse.unquote(parts.path).lower().startswith("/vsi"):
                return "GDAL virtual file system paths (/vsi…) are never opened from a catalog"
            return None
        if scheme in _DEFAULT_PORTS:
            own = origin(href)
            if own is None:
                return "no valid host and port in the href"
            if self.public_only and own not in self.origins and not public_host(own[0]):
                return (f"host {own[0]} is not a public address (loopback, private, link-local or "
                        "localhost) and not the catalog's own")
        return None

    def check(self, href: str) -> None:
        """Raise ``HrefRefused`` (naming the redacted href) when ``href`` may not be opened."""
        why = self.refusal(href)
        if why is not None:
            raise HrefRefused(f"refused by the href allow-list of catalog {self.catalog}: {why} (allow it "
                              f"with ${ALLOWED_HREFS_ENV} or allow_hrefs)", _printable(redact(str(href))))


def _printable(text: str) -> str:
    """``text`` on one line: control characters escaped (``\\n`` → ``\\x0a``)."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _extra(prefixes: Iterable[str]) -> dict[str, Any]:
    wanted = [p.strip() for p in prefixes if p and p.strip()]
    return {"prefixes": tuple(p for p in wanted if p != "*"), "anything": "*" in wanted}


def env_prefixes() -> list[str]:
    """The href prefixes ``$PIXELS_XR_ALLOWED_HREFS`` allows (comma-separated)."""
    return [p.strip() for p in os.environ.get(ALLOWED_HREFS_ENV, "").split(",") if p.strip()]


@dataclass(frozen=True)
class HrefGate:
    """The signer readers get for a catalog: checks each href against ``policy`` (``HrefRefused`` before
    anything is opened), then signs it with ``signer`` (unchanged without one). Picklable."""

    policy: HrefPolicy
    signer: Signer | None = None

    def __call__(self, href: str) -> str | SignedHref:
        self.policy.check(href)
        return href if self.signer is None else self.signer(href)


def _emulator_host(host: str) -> bool:
    return host in {"localhost", "127.0.0.1", "::1"} or host.startswith("127.")


def blob_container(href: str) -> tuple[str, str] | None:
    """(account, container) of an Azure blob href, or ``None`` for any other href."""
    parts = urllib.parse.urlsplit(href)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        return None
    path = [p for p in parts.path.split("/") if p]
    if parts.hostname.endswith(".blob.core.windows.net") and len(path) >= 2:
        return parts.hostname.split(".", 1)[0], path[0]
    if _emulator_host(parts.hostname) and len(path) >= 3:
        return path[0], path[1]
    return None


class PlanetaryComputerSigner:
    """Signs Planetary Computer blob hrefs with cached SAS tokens (see the module docstring).

    ``endpoint`` defaults to ``$PIXELS_XR_PC_SAS_URL`` or the public token API, read when a token is
    fetched; ``margin`` seconds before a token's expiry it is fetched again; ``clock`` gives epoch seconds.
    Thread-safe; a copy sent to another process starts with an empty cache (tokens are never pickled).
    """

    def __init__(self, endpoint: str | None = None, margin: float = 300.0, timeout: float = 30.0,
                 retries: int = 3, clock: Callable[[], float] = time.time) -> None:
        self.endpoint, self.margin, self.timeout, self.retries = endpoint, margin, timeout, retries
        self.clock = clock
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()

    def __call__(self, href: str) -> str | SignedHref:
        key = blob_container(href)
        if key is None or "sig=" in urllib.parse.urlsplit(href).query:
            return href
        token, expiry = self.token(*key)
        return SignedHref(f"{href}{'&' if '?' in href else '?'}{token}", expiry - self.margin)

    def token(self, account: str, container: str) -> tuple[str, float]:
        """(SAS token, expiry in epoch seconds) of a container, from the cache while fresh."""
        with self._lock:
            cached = self._tokens.get((account, container))
            if cached is not None and self.clock() < cached[1] - self.margin:
                return cached
            cached = self._tokens[(account, container)] = self._fetch(account, container)
            return cached

    def _url(self, account: str, container: str) -> str:
        base = self.endpoint or os.environ.get(PC_SAS_ENV) or PC_SAS_URL
        return f"{base.rstrip('/')}/{urllib.parse.quote(account)}/{urllib.parse.quote(container)}"

    def _fetch(self, account: str, container: str) -> tuple[str, float]:
        url = self._url(account, container)
        headers = {"Accept": "application/json"}
        if os.environ.get(PC_KEY_ENV):
            headers["Ocp-Apim-Subscription-Key"] = os.environ[PC_KEY_ENV]
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                            timeout=self.timeout) as resp:
                    body = json.loads(resp.read())
                break
            except urllib.error.HTTPError as exc:
                if exc.code not in _RETRY_STATUSES or attempt == self.retries:
                    raise AssetReadError(f"SAS token request failed: HTTP {exc.code}", url) from None
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                if attempt == self.retries:
                    reason = getattr(exc, "reason", exc)
                    raise AssetReadError(f"SAS token request failed: {reason}", url) from None
            except ValueError:
                raise AssetReadError("SAS token response is not JSON", url) from None
            time.sleep(min(0.5 * 2 ** attempt, 8.0))
        try:
            token = str(body["token"])
            expiry = dt.datetime.fromisoformat(str(body["msft:expiry"]).replace("Z", "+00:00"))
        except (KeyError, TypeError, ValueError):
            raise AssetReadError("SAS token response lacks 'token' or a valid 'msft:expiry'", url) from None
        if expiry.tzinfo is None:
            expiry = expiry.replace(tzinfo=dt.timezone.utc)
        return token.lstrip("?"), expiry.timestamp()

    def __reduce__(self) -> tuple:
        return (_process_signer, (self.endpoint, self.margin, self.timeout, self.retries))


_PROCESS_SIGNERS: dict[tuple, PlanetaryComputerSigner] = {}
_PROCESS_LOCK = threading.Lock()


def _process_signer(endpoint: str | None, margin: float, timeout: float,
                    retries: int) -> PlanetaryComputerSigner:
    """One signer (one token cache) per process and settings: what an unpickled signer becomes."""
    key = (endpoint, margin, timeout, retries)
    with _PROCESS_LOCK:
        if key not in _PROCESS_SIGNERS:
            _PROCESS_SIGNERS[key] = PlanetaryComputerSigner(endpoint, margin, timeout, retries)
        return _PROCESS_SIGNERS[key]


# ----------------------------------------------------------------------------------------------- registry
#: (the per-catalog registries of signers and allowed hrefs, used by every reader through ``signer_for``)
#: Catalog (provider name, STAC API URL or local path) → signer of asset hrefs, called by the readers just
#: before they open an asset and again when its signature expires (see ``pixels_xr.signing``).
SIGNERS: dict[str, Signer] = {"planetary-computer": PlanetaryComputerSigner()}


def register_signer(catalog: str, signer: Signer) -> None:
    """Register ``signer`` (``href -> str | SignedHref``) for items of ``catalog`` (a provider name such as
    ``planetary-computer``, a STAC API URL or a local catalog path)."""
    SIGNERS[catalog] = signer


def registered_signer(catalog: str) -> Signer | None:
    """The signer registered for a catalog, also when a provider is named by its API URL."""
    if catalog in SIGNERS:
        return SIGNERS[catalog]
    names = [name for name, url in PROVIDERS.items() if url.rstrip("/") == catalog.rstrip("/")]
    return SIGNERS.get(names[0]) if names else None


def signer_for(catalog: str) -> HrefGate:
    """What readers, asset checks and header reads call on every href just before opening it: the
    catalog's allow-list (``href_policy``; a refused href raises ``signing.HrefRefused`` and is never
    opened), then the catalog's registered signer (``registered_signer``)."""
    return HrefGate(href_policy(catalog), registered_signer(catalog))


# ----------------------------------------------------------------------------------------------- allow-list
#: Catalog (provider name, STAC API URL or local path) → extra href prefixes allowed for its items, on
#: top of ``href_policy``'s defaults and ``$PIXELS_XR_ALLOWED_HREFS`` (``"*"`` allows every href).
ALLOWED_HREFS: dict[str, tuple[str, ...]] = {}


def allow_hrefs(catalog: str, *prefixes: str) -> None:
    """Allow asset hrefs starting with any of ``prefixes`` for items of ``catalog`` (added to those already
    allowed), e.g. ``allow_hrefs("https://stac.internal/api", "http://10.0.0.7:9000/")``."""
    ALLOWED_HREFS[catalog] = (*ALLOWED_HREFS.get(catalog, ()), *prefixes)


def is_remote(catalog: str) -> bool:
    """Whether a configured catalog is a STAC API (a provider name or an http(s) URL), not a local file."""
    return catalog in PROVIDERS or catalog.startswith(("http://", "https://"))


def href_policy(catalog: str) -> HrefPolicy:
    """The asset href allow-list of a configured catalog (see ``pixels_xr.signing`` for the rules): a
    STAC API's items may point at http(s) public hosts or its own origin, s3, gs and az; a local catalog's
    at local paths too. ``$PIXELS_XR_ALLOWED_HREFS`` (read now, in this process: workers get the policy
    itself) and ``allow_hrefs`` add prefixes."""
    if not is_remote(catalog):
        return HrefPolicy.local(catalog, [*env_prefixes(), *ALLOWED_HREFS.get(catalog, ())])
    url = PROVIDERS.get(catalog, catalog)
    keys = dict.fromkeys([catalog, url, *(n for n, u in PROVIDERS.items() if u.rstrip("/") == url.rstrip("/"))])
    return HrefPolicy.remote(url, [*env_prefixes(), *(p for k in keys for p in ALLOWED_HREFS.get(k, ()))])
