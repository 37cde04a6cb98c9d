"""gRPC message framing inside an HTTP body (gRPC over HTTP/2, "Length-Prefixed-Message").

Each message is a 5-byte prefix, a compressed flag (1 byte, 0 or 1) and a big-endian
uint32 length, followed by that many bytes:
https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md

Pure functions, no state: the HTTP decoder hands over a finished body. The payload stays
as it was sent (a compressed message is not inflated here; ``grpc-encoding`` names the
codec). grpc-status and grpc-message live in the HTTP trailers and stay there.
"""
from __future__ import annotations

import struct

from .events import GrpcMessage

_PREFIX = struct.Struct(">BL")


def is_grpc(content_type: str | None) -> bool:
    """True for ``application/grpc`` and ``application/grpc+proto`` (``+json``, ...).

    gRPC-Web (``application/grpc-web*``) is not matched: it carries trailers in the body
    and its ``-text`` form is base64."""
    if not content_type:
        return False
    ct = content_type.split(";", 1)[0].strip().lower()
    return ct == "application/grpc" or ct.startswith("application/grpc+")


def split_messages(body: bytes, truncated: bool = False) -> tuple[tuple[GrpcMessage, ...], str | None]:
    """Split ``body`` into its length-prefixed messages.

    Returns ``(messages, problem)``. ``problem`` is None when the body is a whole number of
    messages; otherwise it says what is left over (a cut-off last message, a bad flag byte).
    When ``truncated`` (the caller kept only a prefix of the body), a cut-off last message is
    expected and not reported. Never raises."""
    out: list[GrpcMessage] = []
    mv = memoryview(body)
    pos, n = 0, len(body)
    while pos < n:
        if n - pos < 5:
            return tuple(out), None if truncated else f"{n - pos} trailing bytes, not a message prefix"
        flag, length = _PREFIX.unpack_from(mv, pos)
        if flag > 1:
            return tuple(out), f"bad compressed-flag byte 0x{flag:02x} at body offset {pos}"
        end = pos + 5 + length
        if end > n:
            return tuple(out), None if truncated else (
                f"last message cut off: {length} bytes announced, {n - pos - 5} present")
        out.append(GrpcMessage(compressed=bool(flag), data=bytes(mv[pos + 5:end])))
        pos = end
    return tuple(out), None
