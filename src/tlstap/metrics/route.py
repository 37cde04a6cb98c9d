"""Request target -> a low-cardinality route for the http_route label.

A metrics label must take few values: one series per raw path would grow without bound (and
carry user ids and tokens off the host). So the query and fragment are dropped, a user pattern
that matches names the route, and otherwise every segment that looks like a value rather than
a name (numbers, UUIDs, hex and base64-ish ids, dates, e-mail addresses, very long segments)
becomes "{id}"; paths deeper than MAX_DEPTH end in "/*". What is left can still be many
values (words chosen by clients): the series cap (traffic.py) bounds that.
"""
from __future__ import annotations

import re

from ..errors import UsageError

ID = "{id}"
#: segments kept; deeper paths end in "/*"
MAX_DEPTH = 6
#: a segment longer than this is a value (a slug, a token), whatever its characters
MAX_SEGMENT = 40
UNKNOWN = "_unknown"          # a request without a target (none seen, or empty)
#: segments remembered as names (templating one costs ~1.5 us; a service's names repeat, its ids do not)
NAMES_CACHED = 4096

_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
_HEX = re.compile(r"[0-9a-fA-F]+")
_TOKEN = re.compile(r"[A-Za-z0-9_+=~-]+")
_NO_LETTERS = re.compile(r"[^A-Za-z]*[0-9][^A-Za-z]*")      # 42, 2024-01-15, 1.5, 10:30
_EXT = re.compile(r"(.+)\.([A-Za-z][A-Za-z0-9]{0,4})")        # stem.ext: 42.json keeps .json
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")  # absolute-form (proxies)


def looks_like_id(seg: str) -> bool:
    """A segment that is a value, not a name."""
    if len(seg) > MAX_SEGMENT or "@" in seg or _NO_LETTERS.fullmatch(seg) or _UUID.fullmatch(seg):
        return True
    digits = any(c.isdigit() for c in seg)
    if _HEX.fullmatch(seg) and (len(seg) >= 16 or (len(seg) >= 8 and digits)):
        return True          # hashes, object ids ("deadbeef" alone is a word)
    # base64/base62 tokens: long, letters mixed with digits ("v2", "user1" stay names)
    return len(seg) >= 16 and digits and bool(_TOKEN.fullmatch(seg))


def _template(seg: str) -> str:
    if looks_like_id(seg):
        return ID
    m = _EXT.fullmatch(seg)
    if m and looks_like_id(m.group(1)):
        return f"{ID}.{m.group(2)}"
    return seg


class _Pattern:
    """"/users/{id}/posts": "{...}" is any one segment; "*" last is the rest of the path
    (any depth, none too), elsewhere one segment; other segments match themselves."""

    def __init__(self, text: str):
        if not text.startswith("/") or "?" in text or "#" in text:
            raise UsageError(f"--metrics-route {text}: a route pattern is a path starting with / "
                             f"(e.g. /users/{{id}}/posts or /static/*), without a query")
        self.text = text
        self.segs = text.split("/")[1:]
        self.rest = self.segs[-1] == "*"
        if self.rest:
            self.segs = self.segs[:-1]

    def match(self, segs: list[str]) -> bool:
        if len(segs) < len(self.segs) or (not self.rest and len(segs) != len(self.segs)):
            return False
        for want, got in zip(self.segs, segs):
            if want == "*" or (want.startswith("{") and want.endswith("}")):
                if not got:
                    return False
            elif want != got:
                return False
        return True


class RouteTemplater:
    def __init__(self, patterns: list[str] = ()):
        self.patterns = [_Pattern(p) for p in patterns]
        self._names: set[str] = set()

    def _segment(self, seg: str) -> str:
        if seg in self._names:
            return seg
        out = _template(seg)
        if out == seg:
            if len(self._names) >= NAMES_CACHED:
                self._names.clear()
            self._names.add(seg)
        return out

    def route(self, target: str | None) -> str:
        if not target:
            return UNKNOWN
        if target == "*":                   # OPTIONS * (asterisk-form)
            return "*"
        path = target.split("?", 1)[0].split("#", 1)[0]
        m = _ABSOLUTE.match(path)
        if m:
            path = path[m.end():] or "/"
        if not path.startswith("/"):        # authority-form (CONNECT host:port) or garbage
            return UNKNOWN
        segs = path.split("/")[1:]
        for p in self.patterns:
            if p.match(segs):
                return p.text
        deep = len(segs) > MAX_DEPTH
        out = "/" + "/".join([self._segment(s) for s in segs[:MAX_DEPTH]])
        return out + "/*" if deep else out
