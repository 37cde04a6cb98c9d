"""Undo HTTP Content-Encoding (RFC 9110 §8.4) for display, with a bound on the output.

Rules:

1. Never raise. `decode_content()` returns ``(decoded, error)``; the raw body stays with
   the caller (STYLE.md lesson 7: raw beside decoded).
2. Never produce more than ``limit`` bytes, whatever the input claims. A 1 KiB gzip bomb
   inflates to 1 MiB, a brotli or zstd one to far more; every codec here is driven so that
   it stops at ``limit + 1`` bytes of output (zlib: ``max_length``; brotli:
   ``output_buffer_limit``; zstd: a bounded ``stream_reader.read``). Past the limit the
   caller gets the first ``limit`` bytes and an error saying so.
3. Codings are undone in reverse order of listing (``Content-Encoding: gzip, br`` means
   gzip was applied first). ``identity`` is skipped; ``x-gzip`` is gzip (RFC 9110 §8.4.1.3).

Codecs: gzip (all members of a multi-member stream), deflate (zlib-wrapped as the RFC says,
or raw DEFLATE as some old servers send it), br (PyPI ``brotli``), zstd (PyPI ``zstandard``,
all frames).
"""
from __future__ import annotations

import io
import zlib

#: Default cap on decoded output: enough for any page a person reads in a terminal, small
#: enough that a few concurrent bombs cannot exhaust the observed host's memory.
DEFAULT_MAX_DECODED = 16 << 20


class _TooBig(Exception):
    def __init__(self, prefix: bytes):
        self.prefix = prefix


class _Bad(Exception):
    pass


def _zlib(data: bytes, limit: int, wbits: int, name: str, members: bool) -> bytes:
    out = bytearray()
    while True:
        d = zlib.decompressobj(wbits)
        try:
            out += d.decompress(data, limit + 1 - len(out))
        except zlib.error as e:
            raise _Bad(f"{name}: {e}") from None
        if len(out) > limit:
            raise _TooBig(bytes(out[:limit]))
        if not d.eof:
            raise _Bad(f"{name}: data truncated")
        data = d.unused_data
        # gzip allows several members back to back (RFC 1952 §2.2); tolerate zero padding.
        if not members or not data.strip(b"\x00"):
            return bytes(out)


def _gzip(data: bytes, limit: int) -> bytes:
    return _zlib(data, limit, 31, "gzip", True)


def _deflate(data: bytes, limit: int) -> bytes:
    # RFC 9110 §8.4.1.2: "deflate" is a zlib stream (RFC 1950), but some servers send raw
    # DEFLATE (RFC 1951). A zlib header is two bytes with CM=8 and a multiple of 31.
    if len(data) >= 2 and data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0:
        try:
            return _zlib(data, limit, 15, "deflate", False)
        except _Bad:
            pass
    return _zlib(data, limit, -15, "deflate", False)


def _br(data: bytes, limit: int) -> bytes:
    try:
        import brotli
    except ImportError:  # pragma: no cover - a dependency in pyproject.toml
        raise _Bad("br: the 'brotli' package is not installed") from None
    d = brotli.Decompressor()
    try:
        # The output buffer stops growing once it reaches the limit (it may overshoot by
        # part of one buffer block, which is bounded).
        out = d.process(data, output_buffer_limit=limit + 1)
    except brotli.error as e:
        raise _Bad(f"br: {e or 'corrupt data'}") from None
    if len(out) > limit:
        raise _TooBig(out[:limit])
    if not d.is_finished():
        raise _Bad("br: data truncated")
    return out


def _zstd(data: bytes, limit: int) -> bytes:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - a dependency in pyproject.toml
        raise _Bad("zstd: the 'zstandard' package is not installed") from None
    dctx = zstandard.ZstdDecompressor()
    try:
        # Bounded read first: the reader stops at limit + 1 bytes whatever the frames say.
        r = dctx.stream_reader(io.BytesIO(data), read_across_frames=True)
        out = r.read(limit + 1)
        if len(out) > limit:
            raise _TooBig(out[:limit])
        # All the output fits, so decoding again frame by frame is bounded too; it tells a
        # complete stream from a truncated one, which the reader does not.
        parts = []
        rest = data
        while rest:
            o = dctx.decompressobj()
            parts.append(o.decompress(rest))
            if not o.eof:
                raise _Bad("zstd: data truncated")
            rest = o.unused_data
        return b"".join(parts)
    except zstandard.ZstdError as e:
        raise _Bad(f"zstd: {e}") from None


_CODECS = {"gzip": _gzip, "x-gzip": _gzip, "deflate": _deflate, "br": _br, "zstd": _zstd}


def decode_content(body: bytes, content_encoding: str,
                   limit: int = DEFAULT_MAX_DECODED) -> tuple[bytes | None, str | None]:
    """Undo ``content_encoding`` (the header's value) on ``body``.

    Returns ``(decoded, None)`` on success; ``(None, error)`` when a coding is unknown or
    the data is corrupt; ``(first limit bytes, error)`` when the output would exceed
    ``limit``. Never raises."""
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None, None
    for c in codings:
        if c not in _CODECS:
            return None, f"unsupported content-encoding {c!r}"
    data = body
    order = codings[::-1]
    try:
        for i, c in enumerate(order):
            try:
                data = _CODECS[c](data, limit)
            except _TooBig as e:
                if i + 1 < len(order):  # a prefix of an inner coding is no use to show
                    return None, f"{c}: decoded body over {limit} bytes"
                return e.prefix, f"decoded body over {limit} bytes; truncated"
    except _Bad as e:
        return None, str(e)
    except Exception as e:  # a codec library bug must not take the pipeline down
        return None, f"{type(e).__name__}: {e}"
    return data, None
