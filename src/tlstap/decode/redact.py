"""Redaction: credentials out of what leaves the host (the exporters, always) and out of the
local text/JSON output with --redact.

Rules, one set for every output: the values of credential headers (Authorization,
Proxy-Authorization, Cookie, Set-Cookie, X-Api-Key, and --redact-header names) and of
credential query parameters (a default list and --redact-query names), in request targets and
in URL-valued headers (Referer, Location: a token in a redirect is still a token), become
REDACTED. Raw records (traffic the HTTP view did not parse, or --raw) get the header rule
line by line: an HTTP/1 request on a connection that turned raw still carries its
Authorization line. Bodies are the exporters' and the sinks' business (--export-bodies,
--max-body): a body's secrets have no name to find them by.

Hand-written: no library redacts decoded HTTP messages; urllib.parse would re-encode the
parts of a target it does not change, and a redacted target must differ from the original
only where a value was removed.
"""
from __future__ import annotations

import dataclasses
import re
from urllib.parse import unquote

from ..events import TlsData
from .events import Exchange, Message

REDACTED = "REDACTED"
DEFAULT_HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key")
#: query parameters that carry credentials by convention (OAuth 2.0, signed URLs, API keys)
DEFAULT_QUERY = ("access_token", "id_token", "refresh_token", "token", "api_key", "apikey", "key",
                 "password", "passwd", "secret", "client_secret", "signature", "sig", "code")
#: headers whose value is a URL whose query the query rule applies to
URL_HEADERS = frozenset(("referer", "location", "content-location"))


class Redactor:
    def __init__(self, headers: tuple[str, ...] | list[str] = (), query: tuple[str, ...] | list[str] = ()):
        self.headers = frozenset(h.lower() for h in (*DEFAULT_HEADERS, *headers))
        self.query = frozenset(q.lower() for q in (*DEFAULT_QUERY, *query))
        names = b"|".join(re.escape(h.encode()) for h in sorted(self.headers))
        # a header line in raw bytes: its value up to the end of the line
        self._raw_line = re.compile(rb"(?im)^((?:" + names + rb")[ \t]*:)[^\r\n]*")

    # ---- pieces ----------------------------------------------------------------------------

    def target(self, t: str | None) -> str | None:
        """The request target (or a URL) with credential parameters' values REDACTED."""
        if not t or "?" not in t:
            return t
        head, _, rest = t.partition("?")
        query, hash_, frag = rest.partition("#")
        parts = query.split("&")
        changed = False
        for i, p in enumerate(parts):
            name, eq, value = p.partition("=")
            if eq and value and unquote(name.replace("+", " ")).lower() in self.query:
                parts[i] = f"{name}={REDACTED}"
                changed = True
        if not changed:
            return t
        return f"{head}?{'&'.join(parts)}{hash_}{frag}"

    def header_list(self, hs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        out = None
        for i, (k, v) in enumerate(hs):
            low = k.lower()
            if low in self.headers:
                nv = REDACTED
            elif low in URL_HEADERS:
                nv = self.target(v)
            else:
                continue
            if nv != v:
                if out is None:
                    out = list(hs)
                out[i] = (k, nv)
        return hs if out is None else tuple(out)

    # ---- decoded events ----------------------------------------------------------------------

    def message(self, m: Message | None) -> Message | None:
        if m is None:
            return None
        target, headers, trailers = self.target(m.target), self.header_list(m.headers), self.header_list(m.trailers)
        if target is m.target and headers is m.headers and trailers is m.trailers:
            return m            # nothing to hide: no copy
        return dataclasses.replace(m, target=target, headers=headers, trailers=trailers)

    def exchange(self, ex: Exchange) -> Exchange:
        req, resp = self.message(ex.request), self.message(ex.response)
        if req is ex.request and resp is ex.response:
            return ex
        return Exchange(req, resp, ex.latency_ns)

    def raw(self, data: bytes) -> bytes:
        """Raw bytes with credential header lines' values REDACTED."""
        if b":" not in data:
            return data
        return self._raw_line.sub(rb"\1 " + REDACTED.encode(), data)

    def data(self, ev: TlsData) -> TlsData:
        new = self.raw(ev.data)
        return ev if new == ev.data else dataclasses.replace(ev, data=new)


class RedactingSink:
    """A decoder-side sink in front of another: what reaches `inner` is redacted."""

    def __init__(self, inner, redactor: Redactor):
        self.inner = inner
        self.redactor = redactor
        self.out = getattr(inner, "out", None)

    def on_data(self, ev: TlsData) -> None:
        self.inner.on_data(self.redactor.data(ev))

    def on_exchange(self, meta, ex: Exchange) -> None:
        self.inner.on_exchange(meta, self.redactor.exchange(ex))

    def on_lost(self, ev) -> None:
        self.inner.on_lost(ev)

    def on_frame(self, meta, f) -> None:
        self.inner.on_frame(meta, f)

    def on_note(self, meta, n) -> None:
        self.inner.on_note(meta, n)

    def on_summary(self, counters, line) -> None:
        self.inner.on_summary(counters, line)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()
