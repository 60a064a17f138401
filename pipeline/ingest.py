"""Ingestion stage: fetch one configured source and normalise its entries into `Document` records.

`fetch_source` never raises for a bad feed: whatever is wrong with it (down, slow, 4xx/5xx, oversized,
malformed, an HTML page, empty) comes back as a failed `FetchResult` naming the source, the URL and the
problem, so a cycle records it and carries on with the other sources.
"""

from __future__ import annotations

import calendar
import codecs
import functools
import hashlib
import io
import ipaddress
import json
import logging
import os
import re
import socket
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urljoin, urlsplit, urlunsplit
from urllib.request import url2pathname

import charset_normalizer
import feedparser
import httpcore
import httpx
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from pipeline.config import PrivacyConfig, SourceConfig, WatchlistEntity
from pipeline.records import Document, EntityMention, FetchResult

log = logging.getLogger(__name__)
# httpx logs every request URL at INFO, credentials and api keys included; our own lines redact them.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)

RETRY_BASE_DELAY_S = 0.2
MAX_ID_CHARS = 500
_ACCEPT = {
    "stocktwits": "application/json",
    "default": "application/rss+xml, application/atom+xml, application/xml;q=0.9, text/xml;q=0.9, */*;q=0.1",
}


# --------------------------------------------------------------------------- text helpers


class _TextExtractor(HTMLParser):
    _SKIP = frozenset({"script", "style", "noscript", "template", "head", "title"})
    _BLOCK = frozenset(
        {
            "p",
            "div",
            "br",
            "li",
            "ul",
            "ol",
            "tr",
            "td",
            "th",
            "table",
            "blockquote",
            "pre",
            "hr",
            "section",
            "article",
            "header",
            "footer",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "dd",
            "dt",
            "figcaption",
        }
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.parts.append(" ")

    def handle_startendtag(self, tag: str, attrs: Any) -> None:
        if tag in self._BLOCK:
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCK:
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


# Zero-width characters and C0 controls: invisible, and Postgres rejects NUL in text columns. Bidi embedding,
# override and isolate controls (and LRM/RLM) are dropped too: they can make an alert read backwards.
_INVISIBLE = dict.fromkeys(
    [
        *map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad\u200e\u200f"),
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
        *range(0x00, 0x09),
        0x0B,
        0x0C,
        *range(0x0E, 0x20),
        0x7F,
        *range(0xD800, 0xE000),
    ]
)


def collapse_ws(text: str) -> str:
    """Text on one line: invisible and control characters dropped, runs of whitespace made one space."""
    return " ".join(text.translate(_INVISIBLE).split())


def strip_html(text: str) -> str:
    """Visible text of an HTML fragment: tags, scripts and comments dropped, entities decoded, whitespace collapsed."""
    if not text:
        return ""
    if "<" not in text and "&" not in text:
        return collapse_ws(text)
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    return collapse_ws("".join(parser.parts))


def content_hash(title: str, summary: str) -> str:
    """sha256 of lowercase title+summary with whitespace collapsed: equal stories from two sources hash equal."""
    return hashlib.sha256(collapse_ws(f"{title} {summary}".lower()).encode("utf-8")).hexdigest()


def canonical_url(url: str) -> str:
    """The URL without tracking parameters (utm_*) or fragment, scheme and host lower-cased, for stable ids."""
    parts = urlsplit(url.strip())
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not k.lower().startswith("utm_")]
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", urlencode(query), ""))


_SECRET_PARAM = re.compile(r"key|token|secret|pass|auth|sig|session|cred", re.IGNORECASE)
# A path segment that looks like a credential: a long run of letters and digits with digits in it, a long hex/UUID,
# or a `name=value` pair whose name looks secret (feeds like /rss/<api-token>/news.xml).
_TOKEN_SEGMENT = re.compile(r"(?=[A-Za-z0-9_]*[0-9])[A-Za-z0-9_]{24,}|[0-9a-fA-F\-]{32,}")  # sk_live_...


def _redact_segment(segment: str) -> str:
    name, eq, _ = segment.partition("=")
    if eq and _SECRET_PARAM.search(name):
        return f"{name}=***"
    return "***" if _TOKEN_SEGMENT.fullmatch(segment) else segment


def display_url(url: str) -> str:
    """The URL safe for logs, errors and `sources.url`: no user:password, secret-looking query values and
    token-like path segments redacted (file:// paths too)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparseable URL>"
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets, so the port stays readable
        host = f"[{host}]"
    if port:
        host = f"{host}:{port}"
    path = "/".join(_redact_segment(seg) for seg in parts.path.split("/"))
    query = [(k, "***" if _SECRET_PARAM.search(k) else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit((parts.scheme, host, path, urlencode(query, safe="*"), ""))


# --------------------------------------------------------------------------- entities

# Letters only, so money ($5, $1.2bn) never matches; an optional upper-case class suffix ($BRK.B).
_CASHTAG = re.compile(r"(?<![\w$])\$([A-Za-z]{1,6}(?:[.\-][A-Z]{1,2})?)(?![\w$])")
_SYMBOL = re.compile(r"^[A-Za-z][A-Za-z0-9.\-]{0,15}$")


@dataclass(frozen=True, slots=True)
class _WatchlistMatcher:
    tickers: re.Pattern[str] | None
    aliases: re.Pattern[str] | None
    alias_keys: dict[str, tuple[str, ...]]
    keys: frozenset[str]


def _alias_norm(text: str) -> str:
    return " ".join(text.lower().split())


@functools.lru_cache(maxsize=64)
def _matcher(spec: tuple[tuple[str, str, tuple[str, ...]], ...]) -> _WatchlistMatcher:
    keys = frozenset(t.upper() for t, _, _ in spec)
    # One-letter tickers (F, T, A...) are everyday words in caps; only their $-form counts, via cashtags.
    multi = sorted({t.upper() for t in keys if len(t) > 1}, key=len, reverse=True)
    tickers = re.compile(r"(?<![\w$])\$?(" + "|".join(map(re.escape, multi)) + r")(?!\w)") if multi else None
    alias_keys: dict[str, list[str]] = {}
    for ticker, name, aliases in spec:
        for alias in (name, *aliases):
            norm = _alias_norm(alias)
            if norm and ticker.upper() not in alias_keys.setdefault(norm, []):
                alias_keys[norm].append(ticker.upper())
    alts = sorted(alias_keys, key=len, reverse=True)
    alias_re = (
        re.compile(
            r"(?<!\w)(?:" + "|".join(r"\s+".join(map(re.escape, a.split(" "))) for a in alts) + r")(?!\w)",
            re.IGNORECASE,
        )
        if alts
        else None
    )
    return _WatchlistMatcher(tickers, alias_re, {k: tuple(v) for k, v in alias_keys.items()}, keys)


def _watchlist_matcher(watchlist: Sequence[WatchlistEntity]) -> _WatchlistMatcher:
    return _matcher(tuple((w.ticker, w.name, tuple(w.aliases)) for w in watchlist))


def _entities(text: str, m: _WatchlistMatcher, symbols: Iterable[str] = ()) -> tuple[EntityMention, ...]:
    hits: list[tuple[int, str, str, str]] = []  # position, key, kind, matched
    for mt in _CASHTAG.finditer(text):
        key = mt.group(1).upper()
        hits.append((mt.start(), key, "watchlist" if key in m.keys else "cashtag", mt.group(0)))
    if m.tickers is not None:
        hits.extend((mt.start(), mt.group(1), "watchlist", mt.group(0)) for mt in m.tickers.finditer(text))
    if m.aliases is not None:
        for mt in m.aliases.finditer(text):
            hits.extend(
                (mt.start(), key, "watchlist", mt.group(0)) for key in m.alias_keys.get(_alias_norm(mt.group(0)), ())
            )
    end = len(text)
    for sym in symbols:
        if _SYMBOL.match(sym):
            key = sym.upper()
            hits.append((end, key, "watchlist" if key in m.keys else "cashtag", f"${sym}"))
    out: dict[str, EntityMention] = {}
    for _, key, kind, matched in sorted(hits, key=lambda h: h[0]):
        if key not in out:
            out[key] = EntityMention(entity=key, kind=kind, matched=matched)
    return tuple(out.values())


def extract_entities(text: str, watchlist: Sequence[WatchlistEntity]) -> tuple[EntityMention, ...]:
    """Cashtags and watchlist entities in `text`, one mention per entity key, in order of first appearance.

    A cashtag is `$` plus letters (`$AAPL` -> "AAPL"), never a money amount (`$5`, `$1.2bn`). A watchlist
    entity matches its ticker as a whole upper-case word or `$TICKER`, or its name or any alias as whole
    words in any case; its key is the upper-case ticker and its kind "watchlist", also when written as a
    cashtag (the store keeps one row per document and entity).
    """
    return _entities(text, _watchlist_matcher(watchlist))


# --------------------------------------------------------------------------- personal data

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}(?![\w-])"
)
# +CC then 2-5 groups, or North American (415) 555-0100 / 415-555-0100; 8-15 digits in all (checked below).
_PHONE = re.compile(
    r"(?<![\w+$])(?:\+\d{1,3}(?:[ .\-]?\(?\d{1,4}\)?){2,5}|(?:\(\d{3}\) ?|\d{3}[ .\-])\d{3}[ .\-]\d{4})(?![\w.,]\d|\w)"
)
_HANDLE = re.compile(r"(?<![\w@/$.])@([A-Za-z0-9_]{1,30})(?!\w)")
_REDDIT_USER = re.compile(r"(?<![\w/])/?u/([A-Za-z0-9_\-]{3,20})(?![\w\-])")


def _phone(m: re.Match[str]) -> str:
    return "[phone]" if 8 <= sum(c.isdigit() for c in m.group(0)) <= 15 else m.group(0)


def _handle_key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


@dataclass(frozen=True, slots=True)
class _Masker:
    rules: PrivacyConfig
    keep: frozenset[str]

    def __call__(self, text: str) -> str:
        if not text:
            return text
        r = self.rules
        if r.mask_emails and "@" in text:
            text = _EMAIL.sub("[email]", text)
        if r.mask_phones:
            text = _PHONE.sub(_phone, text)
        if r.mask_handles:
            text = _HANDLE.sub(lambda m: m.group(0) if _handle_key(m.group(1)) in self.keep else "@user", text)
            text = _REDDIT_USER.sub(lambda m: m.group(0) if _handle_key(m.group(1)) in self.keep else "u/user", text)
        return text


def personal_data_masker(rules: PrivacyConfig, watchlist: Sequence[WatchlistEntity]) -> Callable[[str], str]:
    """A function masking e-mails, phone numbers and handles of people in a text; handles that name a watchlist
    company (ticker, name or alias, ignoring case and punctuation) or `rules.keep_handles` are kept."""
    keep = {_handle_key(h) for h in rules.keep_handles}
    for w in watchlist:
        keep.update(_handle_key(x) for x in (w.ticker, w.name, *w.aliases))
    return _Masker(rules, frozenset(keep - {""}))


# --------------------------------------------------------------------------- fetching


class _FetchError(Exception):
    def __init__(self, message: str, http_status: int | None = None, *, retry: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.retry = retry


@dataclass(frozen=True, slots=True)
class _Body:
    content: bytes
    content_type: str
    http_status: int | None
    etag: str | None = None
    last_modified: str | None = None
    not_modified: bool = False


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Deadline:
    """One wall-clock limit for a whole fetch attempt: DNS, connect, TLS, headers, every redirect hop and the body.

    httpx timeouts are per socket operation, so a server sending one header byte a second, or a slow redirect
    chain, never trips them; every socket call made through `_GuardedBackend` is bounded by what is left here.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def error(self, what: str) -> _FetchError:
        return _FetchError(f"timed out after {self.seconds:.3g} s: deadline exceeded while {what}", retry=True)

    def bound(self, timeout: float | None, what: str) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise self.error(what)
        return left if timeout is None else min(timeout, left)


_DNS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="finsent-dns")
MAX_REDIRECTS = 10
MAX_ENCODING_LAYERS = 2
_INFLATE_PIECE = 64 * 1024


def _address_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address is not a public internet address (None if it is)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv6Address) and ip.sixtofour is not None:  # 2002::/16 routes to the IPv4 inside
        inner = _address_kind(ip.sixtofour)
        return f"{inner} (6to4 of {ip.sixtofour})" if inner else None
    for kind in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-global"


def _private_allowed(src: SourceConfig, host: str, port: int) -> bool:
    allow = src.allow_private_network
    if isinstance(allow, bool):
        return allow
    return host in allow or f"{host}:{port}" in allow


class _GuardedStream(httpcore.NetworkStream):
    """A socket whose every read, write and handshake is bounded by the fetch deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: _Deadline) -> None:
        self.inner = inner
        self.deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, self.deadline.bound(timeout, "reading the response"))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, self.deadline.bound(timeout, "sending the request"))

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        inner = self.inner.start_tls(ssl_context, server_hostname, self.deadline.bound(timeout, "in the TLS handshake"))
        return _GuardedStream(inner, self.deadline)

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


class _GuardedBackend(httpcore.NetworkBackend):
    """Resolves each host itself, refuses non-public addresses unless the source opts in, and connects to the
    address it checked (so DNS cannot answer differently between check and connect). Every hop goes through here."""

    def __init__(self, src: SourceConfig, deadline: _Deadline) -> None:
        self.src = src
        self.deadline = deadline
        self.plain = httpcore.SyncBackend()

    def _resolve(self, host: str, port: int) -> list[str]:
        future = _DNS.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            infos = future.result(timeout=self.deadline.bound(None, f"resolving {host}"))
        except FutureTimeout:
            raise self.deadline.error(f"resolving {host}") from None
        except OSError as e:
            raise _FetchError(f"cannot resolve host {host}: {_describe(e)}", retry=True) from None
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = self._resolve(host, port)
        if not _private_allowed(self.src, host, port):
            for addr in addresses:
                kind = _address_kind(ipaddress.ip_address(addr.split("%", 1)[0]))
                if kind:
                    raise _FetchError(
                        f"refused to connect to {host}:{port}: it resolves to {addr}, a {kind} address "
                        "(set allow_private_network for this source to allow it)"
                    )
        last: Exception | None = None
        for addr in addresses:
            try:
                stream = self.plain.connect_tcp(
                    addr, port, self.deadline.bound(timeout, f"connecting to {host}"), local_address, socket_options
                )
            except httpcore.ConnectError as e:
                last = e
                continue
            return _GuardedStream(stream, self.deadline)
        raise last or httpcore.ConnectError(f"no address for {host}")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def _check_hop(request: httpx.Request) -> None:
    """httpx request hook: every request, redirects included, must be http(s) (addresses are checked at connect)."""
    if request.url.scheme not in ("http", "https"):
        raise _FetchError(f"refused a redirect to a {request.url.scheme}:// URL; only http(s) is fetched")


def _client(src: SourceConfig, deadline: _Deadline) -> httpx.Client:
    transport = httpx.HTTPTransport(retries=0)
    # httpx has no public knob for the network backend; the pool is rebuilt with the same TLS context.
    transport._pool = httpcore.ConnectionPool(
        ssl_context=transport._pool._ssl_context, network_backend=_GuardedBackend(src, deadline)
    )
    return httpx.Client(
        transport=transport,
        follow_redirects=False,
        timeout=src.timeout_s,
        trust_env=False,
        event_hooks={"request": [_check_hop]},
    )


def _inflate(chunks: Iterator[bytes], encoding: str) -> Iterator[bytes]:
    """One Content-Encoding layer, decoded lazily in pieces of at most 64 KiB, so stacked layers never
    hold more than a piece each in memory (httpx decodes every network chunk through all layers at once)."""
    wbits = 47  # zlib or gzip header, detected
    d = zlib.decompressobj(wbits)
    for chunk in chunks:
        data = chunk
        while data:
            out = d.decompress(data, _INFLATE_PIECE)
            if out:
                yield out
            if d.eof:  # concatenated gzip members
                data = d.unused_data
                d = zlib.decompressobj(wbits)
            else:
                data = d.unconsumed_tail
    while not d.eof:
        out = d.decompress(b"", _INFLATE_PIECE)
        if not out:
            break
        yield out


def _decoded(resp: httpx.Response, src: SourceConfig, deadline: _Deadline) -> bytes:
    """The body with every Content-Encoding layer undone, raw and decoded sizes both capped at max_bytes."""
    layers = [e.strip().lower() for e in resp.headers.get("content-encoding", "").split(",") if e.strip()]
    layers = [e for e in layers if e != "identity"]
    if len(layers) > MAX_ENCODING_LAYERS:
        raise _FetchError(
            f"refused a response with {len(layers)} Content-Encoding layers ({', '.join(layers)})", resp.status_code
        )
    unknown = [e for e in layers if e not in ("gzip", "x-gzip", "deflate")]
    if unknown:
        raise _FetchError(f"unsupported Content-Encoding {', '.join(unknown)}", resp.status_code)
    raw_total = 0

    def raw() -> Iterator[bytes]:
        nonlocal raw_total
        for chunk in resp.iter_raw(_INFLATE_PIECE):
            raw_total += len(chunk)
            if raw_total > src.max_bytes:
                raise _FetchError(f"response exceeds max_bytes={src.max_bytes}; download aborted", resp.status_code)
            yield chunk

    stream: Iterator[bytes] = raw()
    for enc in reversed(layers):
        stream = _inflate(stream, enc)
    buf = bytearray()
    try:
        for piece in stream:
            buf += piece
            if len(buf) > src.max_bytes:
                raise _FetchError(
                    f"decoded response exceeds max_bytes={src.max_bytes} "
                    f"(Content-Encoding: {', '.join(layers)}); aborted",
                    resp.status_code,
                )
            if deadline.expired:
                raise deadline.error("reading the response")
    except zlib.error as e:
        raise _FetchError(f"body is not valid {', '.join(layers)} data: {e}", resp.status_code) from None
    return bytes(buf)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)


def _without_values(url: httpx.URL, values: Iterable[str]) -> httpx.URL:
    """`url` minus any query parameter carrying one of `values` (a redirect echoing a credential elsewhere)."""
    drop = set(values)
    if not drop or not url.query:
        return url
    pairs = parse_qsl(url.query.decode("ascii", "replace"), keep_blank_values=True)
    query = [(k, v) for k, v in pairs if v not in drop]
    return url.copy_with(query=urlencode(query).encode("ascii") or None)


def _response_body(resp: httpx.Response, src: SourceConfig, deadline: _Deadline) -> _Body:
    code = resp.status_code
    if code == 304:
        return _Body(b"", "", code, resp.headers.get("etag"), resp.headers.get("last-modified"), not_modified=True)
    if not 200 <= code < 300:
        raise _FetchError(f"HTTP {code} {resp.reason_phrase}".strip(), code, retry=code >= 500)
    declared = resp.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > src.max_bytes:
        raise _FetchError(f"response of {int(declared)} bytes exceeds max_bytes={src.max_bytes}; not downloaded", code)
    content = _decoded(resp, src, deadline)
    ctype, etag = resp.headers.get("content-type", ""), resp.headers.get("etag")
    return _Body(content, ctype, code, etag, resp.headers.get("last-modified"))


def _http_once(
    src: SourceConfig,
    url: str,
    headers: dict[str, str],
    env_headers: dict[str, str] | None = None,
    env_query: dict[str, str] | None = None,
    seconds: float | None = None,
) -> _Body:
    """One GET (bounded by `seconds`, default timeout_s), redirects followed by hand: the credentials from
    `headers_env`/`query_env` go only to the source's own scheme, host and port; once a hop leaves it they are
    dropped for the rest of the chain (httpx would only strip Authorization)."""
    deadline = _Deadline(src.timeout_s if seconds is None else max(seconds, 0.001))
    env_headers, env_query = env_headers or {}, env_query or {}
    try:
        target = httpx.URL(_with_query(url, env_query))
        home, credentials = _origin(target), True
        with _client(src, deadline) as client:
            for _hop in range(MAX_REDIRECTS + 1):
                sent = {**headers, **env_headers} if credentials else headers
                with client.stream("GET", target, headers=sent) as resp:
                    if not resp.has_redirect_location:
                        return _response_body(resp, src, deadline)
                    target = resp.url.join(resp.headers["location"])
                if target.scheme not in ("http", "https") or not target.host:  # httpx would read file:/x as a path
                    scheme = target.scheme or "schemeless"
                    raise _FetchError(f"refused a redirect to a {scheme}:// URL; only http(s) is fetched")
                credentials = credentials and _origin(target) == home
                if not credentials:
                    target = _without_values(target, env_query.values())
            raise _FetchError(f"more than {MAX_REDIRECTS} redirects")
    except httpx.TimeoutException as e:
        if deadline.expired:
            raise deadline.error("waiting for the server") from None
        raise _FetchError(f"timed out after {deadline.seconds:.3g} s ({type(e).__name__})", retry=True) from None
    except httpx.InvalidURL as e:
        raise _FetchError(f"refused a redirect to an invalid URL: {_describe(e)}") from None
    except (httpx.NetworkError, httpx.RemoteProtocolError) as e:
        raise _FetchError(f"connection failed: {_describe(e)}", retry=True) from None
    except httpx.HTTPError as e:
        raise _FetchError(f"request failed: {_describe(e)}") from None


def _http_get(
    src: SourceConfig,
    url: str,
    headers: dict[str, str],
    env_headers: dict[str, str] | None = None,
    env_query: dict[str, str] | None = None,
) -> _Body:
    """GET with exponential backoff on timeouts, connection errors and 5xx (never on 4xx or a refused target),
    all within the source's overall deadline (`fetch_deadline_s`): an attempt gets at most what is left of it,
    and no retry starts once the backoff would spend it."""
    attempts = src.retries + 1
    overall = src.fetch_deadline_s
    ends = time.monotonic() + overall
    for attempt in range(1, attempts + 1):
        try:
            return _http_once(src, url, headers, env_headers, env_query, min(src.timeout_s, ends - time.monotonic()))
        except _FetchError as e:
            delay = RETRY_BASE_DELAY_S * 2 ** (attempt - 1)
            spent = e.retry and attempt < attempts and time.monotonic() + delay >= ends
            if not e.retry or attempt == attempts or spent:
                if spent:
                    why = f"the overall deadline of {overall:g} s is spent"
                    e.message = f"{e.message} (gave up after {attempt} attempts: {why})"
                elif attempt > 1:
                    e.message = f"{e.message} (after {attempt} attempts)"
                raise
            log.info("source %s: %s; retry %d/%d in %.1f s", src.name, e.message, attempt, src.retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _env_secrets(src: SourceConfig) -> tuple[dict[str, str], dict[str, str]]:
    """Headers and query parameters whose values come from the environment (credentials never live in the URL)."""
    missing = [v for v in (*src.headers_env.values(), *src.query_env.values()) if not os.environ.get(v)]
    if missing:
        raise _FetchError(f"credential env var {', '.join(sorted(set(missing)))} is not set")
    return (
        {h: os.environ[v] for h, v in src.headers_env.items()},
        {q: os.environ[v] for q, v in src.query_env.items()},
    )


def _with_query(url: str, params: dict[str, str]) -> str:
    if not params:
        return url
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *params.items()]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def _scrub(message: str, secrets: Iterable[str]) -> str:
    for value in secrets:
        if value:
            message = message.replace(value, "***")
    return message


def _file_path(url: str) -> Path:
    parts = urlsplit(url)
    path = url2pathname(unquote(parts.path))
    if parts.netloc and parts.netloc != "localhost":
        return Path(parts.netloc + path)  # file://relative/dir/feed.xml: relative to the working directory
    return Path(path)


def _shown_path(path: Path) -> str:
    """A local path for messages, token-like segments redacted as in display_url."""
    return "/".join(_redact_segment(seg) for seg in str(path).split("/"))


def _read_file(src: SourceConfig, last_modified: str | None) -> _Body:
    """A local feed (the offline demo); its mtime stands in for Last-Modified."""
    path = _file_path(src.url)
    shown = _shown_path(path)
    try:
        st = path.stat()
        if not path.is_file():
            raise _FetchError(f"{shown} is not a regular file")
        if st.st_size > src.max_bytes:
            raise _FetchError(f"file of {st.st_size} bytes exceeds max_bytes={src.max_bytes}")
        mtime = formatdate(st.st_mtime, usegmt=True)
        if last_modified == mtime:
            return _Body(b"", "", None, last_modified=mtime, not_modified=True)
        with path.open("rb") as fh:
            data = fh.read(src.max_bytes + 1)
    except FileNotFoundError:
        raise _FetchError(f"file not found: {shown}") from None
    except OSError as e:  # strerror only: str(e) repeats the raw path
        raise _FetchError(f"cannot read {shown}: {type(e).__name__}: {e.strerror or 'error'}") from None
    if len(data) > src.max_bytes:
        raise _FetchError(f"file exceeds max_bytes={src.max_bytes}")
    suffix = path.suffix.lower()
    ctype = {".json": "application/json", ".html": "text/html", ".htm": "text/html"}.get(suffix, "application/xml")
    return _Body(data, ctype, None, last_modified=mtime)


# --------------------------------------------------------------------------- decoding and parsing

_XML_DECL_ENCODING = re.compile(rb"""^\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._\-]+)["']""")
_CHARSET = re.compile(r"charset\s*=\s*[\"']?([A-Za-z0-9._\-]+)", re.IGNORECASE)
_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


_DETECT_BYTES = 200_000  # charset-normalizer reads this much at most: detection cost stays bounded


def _known_encoding(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def _sniff_utf16_32(head: bytes) -> str | None:
    """UTF-16/32 without a BOM, as XML's autodetection finds it: the first `<` with NULs beside it."""
    starts = (("utf-32-le", b"<\0\0\0"), ("utf-32-be", b"\0\0\0<"), ("utf-16-le", b"<\0"), ("utf-16-be", b"\0<"))
    for enc, start in starts:
        if head.startswith(start):
            return enc
    return None


def decode_bytes(data: bytes, content_type: str = "") -> str:
    """Text of a feed body. The first that applies: a BOM; UTF-16/32 without BOM (XML autodetection); the XML
    declaration; the HTTP charset; valid UTF-8; charset-normalizer's best guess for undeclared legacy encodings.

    Bytes still invalid in that encoding become U+FFFD instead of failing the whole feed. The document's own
    declaration wins over the HTTP header because servers often send a default charset that is wrong.
    """
    for bom, enc in _BOMS:
        if data.startswith(bom):
            return data.decode(enc, errors="replace")
    wide = _sniff_utf16_32(data[:64])
    if wide:
        return data.decode(wide, errors="replace")
    decl = _XML_DECL_ENCODING.match(data[:512])
    header = _CHARSET.search(content_type or "")
    declared = _known_encoding(decl.group(1).decode("ascii") if decl else None) or _known_encoding(
        header.group(1) if header else None
    )
    if declared:
        return data.decode(declared, errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    return data.decode(_guess_encoding(data[:_DETECT_BYTES]), errors="replace")


def _guess_encoding(sample: bytes) -> str:
    """charset-normalizer's guess for undeclared bytes. On short texts many single-byte code pages decode with no
    chaos at all, and which one it ranks first changes between its releases (cp775 made "Café" read "Cafķ"); among
    the cleanest decodings, windows-1252 (the web's default for undeclared Western text, as in WHATWG) wins."""
    matches = list(charset_normalizer.from_bytes(sample))
    if not matches:
        return "utf-8"
    cleanest = min(m.chaos for m in matches)
    tied = [m.encoding for m in matches if m.chaos <= cleanest]
    choice = "cp1252" if "cp1252" in tied else matches[0].encoding
    return _known_encoding(choice) or "utf-8"


def _looks_like_html(text: str, content_type: str) -> bool:
    head = text[:2048].lstrip().lower()
    return "html" in content_type.lower() or head.startswith(("<!doctype html", "<html")) or "<html" in head[:512]


_LANG = re.compile(r"^[a-z]{2,3}(?:-[a-z0-9]{1,8})*$")


def _language(*candidates: Any) -> str | None:
    for c in candidates:
        if isinstance(c, str) and c.strip():
            lang = c.strip().lower().replace("_", "-")
            if len(lang) <= 16 and _LANG.match(lang):
                return lang
    return None


def _utc(struct: Any) -> datetime | None:
    if not struct:
        return None
    try:
        return datetime.fromtimestamp(calendar.timegm(struct), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


EARLIEST_PUBLISHED = datetime(1990, 1, 1, tzinfo=UTC)
_REDDIT_FOOTER = re.compile(r"\s*submitted by\s+/?u/[\w\-]+\s*(?:\[link\])?\s*(?:\[comments\])?\s*$", re.IGNORECASE)


class _Builder:
    """Turns raw entry fields into Documents for one source, sharing the watchlist matcher."""

    def __init__(
        self, src: SourceConfig, watchlist: Sequence[WatchlistEntity], fetched_at: datetime, privacy: PrivacyConfig
    ) -> None:
        self.src = src
        self.matcher = _watchlist_matcher(watchlist)
        self.fetched_at = fetched_at
        self.mask = personal_data_masker(privacy, watchlist)

    def build(
        self,
        *,
        raw_id: str | None,
        title: str,
        summary: str,
        link: str | None,
        published: datetime | None,
        language: str | None,
        symbols: Iterable[str] = (),
    ) -> Document | None:
        title, summary = self.mask(title), self.mask(summary)  # before anything is derived from the text
        if not title and not summary:
            return None
        chash = content_hash(title, summary)
        link = (collapse_ws(link) if isinstance(link, str) else "") or None
        if link and len(link) > self.src.max_link_chars:
            link = None  # a cut URL would point somewhere else; the id falls back to the GUID or content hash
        external_id = collapse_ws(raw_id or "") or (canonical_url(link) if link else "") or chash
        if len(external_id) > MAX_ID_CHARS:  # a B-tree unique index rejects very long keys
            external_id = "sha256:" + hashlib.sha256(external_id.encode("utf-8")).hexdigest()
        return Document(
            source=self.src.name,
            external_id=external_id,
            content_hash=chash,
            title=title,
            summary=summary,
            link=link,
            published_at=self._published(published),
            language=language,
            entities=_entities(f"{title}\n{summary}", self.matcher, symbols),
        )

    def _published(self, published: datetime | None) -> datetime:
        """Future dates are clamped to the fetch time and pre-1990 dates count as missing, so a feed cannot
        plant items in a future window or deep in the baseline."""
        if published is None or published < EARLIEST_PUBLISHED:
            return self.fetched_at
        if published > self.fetched_at + timedelta(seconds=self.src.max_future_skew_s):
            return self.fetched_at
        return published


def _capped(raw: Any, limit: int) -> str:
    """Visible text of a raw feed field, at most `limit` characters. The raw value is cut first (at 4x the
    limit, room for markup) so HTML stripping never works on more than a bounded amount of text."""
    if not isinstance(raw, str):
        return ""
    return strip_html(raw[: limit * 4])[:limit].rstrip()


@dataclass(frozen=True, slots=True)
class _Parsed:
    documents: list[Document]
    seen: int
    skipped: int


_NUM_REF = re.compile(r"&#([xX][0-9a-fA-F]{1,8}|[0-9]{1,10});")


def _fix_surrogate_refs(text: str) -> str:
    """Character references to UTF-16 surrogates (an emoji written as two refs, or a lone half) crash
    feedparser's encoder: join an adjacent high+low pair into its character, replace a lone half with U+FFFD."""
    if "&#" not in text:
        return text
    out: list[str] = []
    last = 0
    high: tuple[re.Match[str], int] | None = None

    def lone(m: re.Match[str]) -> None:
        nonlocal last
        out.append(text[last : m.start()])
        out.append("\ufffd")
        last = m.end()

    for m in _NUM_REF.finditer(text):
        tok = m.group(1)
        v = int(tok[1:], 16) if tok[0] in "xX" else int(tok)
        if high is not None:
            hm, hv = high
            high = None
            if m.start() == hm.end() and 0xDC00 <= v <= 0xDFFF:
                out.append(text[last : hm.start()])
                out.append(f"&#{0x10000 + ((hv - 0xD800) << 10) + (v - 0xDC00)};")
                last = m.end()
                continue
            lone(hm)
        if 0xD800 <= v <= 0xDBFF:
            high = (m, v)
        elif 0xDC00 <= v <= 0xDFFF:
            lone(m)
    if high is not None:
        lone(high[0])
    out.append(text[last:])
    return "".join(out)


_ENTITY_DECL = re.compile(r"<!\s*ENTITY", re.IGNORECASE)
_DOCTYPE = re.compile(r"<!DOCTYPE\b[^\[>]*(?:\[[^\]]*\])?\s*>", re.IGNORECASE)


def _without_doctype(text: str, http_status: int | None) -> str:
    """Entity declarations are refused (feedparser's loose parser would expand them past every cap: a 68 KB
    feed became a 300-million-character summary); any other DOCTYPE is stripped before parsing."""
    if _ENTITY_DECL.search(text):
        raise _FetchError(
            "refused: the feed declares DOCTYPE entities (<!ENTITY>), which finsent never expands", http_status
        )
    return _DOCTYPE.sub("", text)


def _parse_feed(src: SourceConfig, body: _Body, b: _Builder) -> _Parsed:
    text = decode_bytes(body.content, body.content_type)
    if not text.strip():
        raise _FetchError("empty response (no content)", body.http_status)
    text = _fix_surrogate_refs(_without_doctype(text, body.http_status))
    # Already decoded: hand feedparser UTF-8 with a matching header (it rewrites the XML declaration),
    # and a stream, never bytes, which it would first try to open as a local file name. No base URL:
    # feedparser would resolve GUIDs against it, and ids must not change when a feed moves host.
    parsed = feedparser.parse(
        io.BytesIO(text.encode("utf-8")), response_headers={"content-type": "application/xml; charset=utf-8"}
    )
    entries = parsed.entries
    if not entries:
        if _looks_like_html(text, body.content_type):
            ctype = body.content_type.split(";")[0] or "unknown content type"
            raise _FetchError(f"returned an HTML page ({ctype}), not an RSS/Atom feed", body.http_status)
        if parsed.bozo:
            raise _FetchError(
                f"malformed feed, no entries could be read: {_describe(parsed.bozo_exception)}", body.http_status
            )
        if not parsed.get("version"):
            raise _FetchError("not an RSS/Atom feed (no feed element found)", body.http_status)
        raise _FetchError(f"feed is empty ({parsed.version}, no entries)", body.http_status)
    if parsed.bozo:
        log.warning(
            "source %s: feed is not well-formed (%s); kept the %d entries that parsed",
            src.name,
            _describe(parsed.bozo_exception),
            len(entries),
        )
    feed_lang = parsed.feed.get("language")
    docs: list[Document] = []
    invalid = 0
    for e in entries[: src.max_entries]:
        title = _capped(e.get("title"), src.max_title_chars)
        content = e.get("content") or []
        summary_detail = e.get("summary_detail") or (content[0] if content else None)
        summary = _capped(e.get("summary") or (content[0].get("value") if content else ""), src.max_summary_chars)
        if src.kind == "reddit":
            summary = _REDDIT_FOOTER.sub("", summary)
        if summary == title:
            summary = ""
        doc = _safe_build(
            b,
            src,
            raw_id=e.get("id"),
            title=title,
            summary=summary,
            link=_absolute(src.url, e.get("link")),
            published=_utc(e.get("published_parsed")) or _utc(e.get("updated_parsed")),
            language=_language(
                (e.get("title_detail") or {}).get("language"), (summary_detail or {}).get("language"), feed_lang
            ),
        )
        if doc is None:
            invalid += 1
        else:
            docs.append(doc)
    if not docs:
        problem = f"malformed feed ({_describe(parsed.bozo_exception)})" if parsed.bozo else "feed"
        raise _FetchError(f"{problem}: none of its {len(entries)} entries has a title or text", body.http_status)
    return _finish(src, docs, len(entries), invalid)


def _absolute(base: str, link: str | None) -> str | None:
    """Relative entry links resolved against an http(s) feed URL."""
    if not link or urlsplit(link).scheme or not base.startswith(("http://", "https://")):
        return link
    return urljoin(base, link)


class _StSymbol(BaseModel):
    model_config = ConfigDict(extra="ignore")
    symbol: str


class _StUser(BaseModel):
    model_config = ConfigDict(extra="ignore")
    username: str | None = None


class _StMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: int | str
    body: str
    created_at: Any = None  # parsed on its own: a bad date should not cost the message
    symbols: list[_StSymbol] = []
    user: _StUser | None = None


_DATETIME = TypeAdapter(datetime)


def _iso_utc(value: Any) -> datetime | None:
    if value is None:
        return None
    try:
        dt = _DATETIME.validate_python(value)
    except ValidationError:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _parse_stocktwits(src: SourceConfig, body: _Body, b: _Builder) -> _Parsed:
    text = decode_bytes(body.content, body.content_type)
    if not text.strip():
        raise _FetchError("empty response (no content)", body.http_status)
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as e:
        if _looks_like_html(text, body.content_type):
            raise _FetchError("returned an HTML page, not a StockTwits JSON stream", body.http_status) from None
        raise _FetchError(f"not valid JSON: {e}", body.http_status) from None
    messages = payload.get("messages") if isinstance(payload, dict) else None
    if not isinstance(messages, list):
        raise _FetchError('not a StockTwits stream: expected a JSON object with a "messages" list', body.http_status)
    if not messages:
        raise _FetchError("stream is empty (no messages)", body.http_status)
    docs: list[Document] = []
    invalid = 0
    for raw in messages[: src.max_entries]:
        try:
            msg = _StMessage.model_validate(raw)
        except ValidationError:
            invalid += 1
            continue
        published = _iso_utc(msg.created_at)
        user = msg.user.username if msg.user and msg.user.username else None
        doc = _safe_build(
            b,
            src,
            raw_id=str(msg.id),
            title=_capped(msg.body, src.max_title_chars),
            summary="",
            link=f"https://stocktwits.com/{user}/message/{msg.id}" if user else None,
            published=published,
            language=None,
            symbols=[s.symbol for s in msg.symbols],
        )
        if doc is None:
            invalid += 1
        else:
            docs.append(doc)
    if not docs:
        raise _FetchError(
            f"none of the {len(messages)} messages is valid (each needs an id and a body)", body.http_status
        )
    return _finish(src, docs, len(messages), invalid)


def _safe_build(builder: Any, src: SourceConfig, **fields: Any) -> Document | None:
    """One odd entry (bad id, unencodable text) is skipped and counted, never the whole feed."""
    try:
        return builder.build(**fields)
    except (UnicodeError, ValueError, TypeError) as e:
        log.warning("source %s: skipped an entry that cannot be normalised (%s)", src.name, type(e).__name__)
        return None


def _finish(src: SourceConfig, docs: list[Document], seen: int, invalid: int) -> _Parsed:
    capped = max(0, seen - src.max_entries)
    if capped:
        log.warning(
            "source %s: %d entries, kept the first max_entries=%d, skipped %d", src.name, seen, src.max_entries, capped
        )
    if invalid:
        log.warning("source %s: skipped %d entries without usable id/title/text", src.name, invalid)
    return _Parsed(docs, seen, capped + invalid)


# --------------------------------------------------------------------------- the stage


def fetch_source(
    src: SourceConfig,
    watchlist: Sequence[WatchlistEntity],
    *,
    etag: str | None = None,
    last_modified: str | None = None,
    user_agent: str = "finsent/0.1",
    privacy: PrivacyConfig | None = None,
) -> FetchResult:
    """Fetch and normalise one source; any problem with the feed becomes a failed FetchResult, never an exception.

    `etag`/`last_modified` are the validators stored from the last good fetch (conditional GET; a 304 gives
    status "not_modified"); the result carries the new ones. `privacy`: what personal data is masked in the
    documents (default: e-mails, phones and handles of people, as `PrivacyConfig()`).
    """
    fetched_at = datetime.now(UTC)
    where = f"source {src.name!r}"
    body: _Body | None = None
    secrets: list[str] = []
    try:
        where = f"source {src.name!r} ({display_url(src.url)})"
        if src.url.startswith("file://"):
            body = _read_file(src, last_modified)
        else:
            env_headers, env_query = _env_secrets(src)
            secrets = [*env_headers.values(), *env_query.values()]
            headers = {
                "User-Agent": user_agent,
                "Accept": _ACCEPT.get(src.kind, _ACCEPT["default"]),
                "Accept-Encoding": "gzip, deflate",
            }
            if etag:
                headers["If-None-Match"] = etag
            if last_modified:
                headers["If-Modified-Since"] = last_modified
            body = _http_get(src, src.url, headers, env_headers, env_query)
        if body.not_modified:
            log.info("%s: not modified since the last fetch", where)
            return FetchResult(
                source=src.name,
                status="not_modified",
                http_status=body.http_status,
                etag=body.etag or etag,
                last_modified=body.last_modified or last_modified,
            )
        builder = _Builder(src, watchlist, fetched_at, privacy or PrivacyConfig())
        parsed = (_parse_stocktwits if src.kind == "stocktwits" else _parse_feed)(src, body, builder)
    except _FetchError as e:
        return _failed(src, _scrub(f"{where}: {e.message}", secrets), e.http_status)
    except Exception as e:  # a parser bug on one odd feed, or a URL that got past validation, must not stop the cycle
        log.error("%s: unexpected error (%s)", where, _scrub(_describe(e), secrets))
        log.debug("traceback", exc_info=True)
        msg = _scrub(f"{where}: unexpected error while fetching or parsing: {_describe(e)}", secrets)
        return _failed(src, msg, body.http_status if body else None)
    log.info("%s: %d entries, %d documents", where, parsed.seen, len(parsed.documents))
    return FetchResult(
        source=src.name,
        documents=parsed.documents,
        status="ok",
        http_status=body.http_status,
        etag=body.etag,
        last_modified=body.last_modified,
        entries_seen=parsed.seen,
        entries_skipped=parsed.skipped,
    )


def _failed(src: SourceConfig, message: str, http_status: int | None) -> FetchResult:
    log.warning("%s", message, extra={"source": src.name})
    return FetchResult(source=src.name, status="failed", http_status=http_status, error=message)
