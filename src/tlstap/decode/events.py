"""What the decoders emit: slotted dataclasses, treated as immutable (not frozen=True, whose
__init__ costs ~0.1 us per field: events.py); payload reprs are short (STYLE.md lesson 11)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class DecodeError(Exception):
    """The bytes are not the protocol the decoder expected (or are corrupt): the only
    exception a decoder raises."""


class Side(enum.Enum):
    """Who sent the bytes, in protocol terms (not read/write of the captured process)."""
    CLIENT = "client"
    SERVER = "server"


def _short(b: bytes, n: int = 20) -> str:
    return repr(b[:n]) + ("..." if len(b) > n else "") + f" ({len(b)} bytes)"


@dataclass(slots=True)
class Message:
    """A complete (or, at the end of a capture, incomplete) HTTP request or response.

    body is the raw message body as it crossed the wire after transfer decoding (chunked
    removed), capped at the decoder's max_body; body_len counts every body byte seen.
    decoded_body is body with Content-Encoding (gzip, deflate, br, zstd) undone, or None when
    there is none or it could not be undone (then decode_error says why)."""
    side: Side
    proto: str                                   # "HTTP/1.1", "HTTP/1.0", "HTTP/2"
    stream_id: int                               # HTTP/2 stream; HTTP/1: 1, 2, ... per direction
    headers: tuple[tuple[str, str], ...]         # in order, names as sent (HTTP/2: lower case)
    method: str | None = None                    # requests
    target: str | None = None                    # requests: request-target / :path
    authority: str | None = None                 # HTTP/2 :authority, HTTP/1 Host
    scheme: str | None = None                    # HTTP/2 :scheme
    status: int | None = None                    # responses
    reason: str | None = None                    # HTTP/1 reason phrase
    body: bytes = b""
    body_len: int = 0
    body_truncated: bool = False                 # body_len > len(body) because of max_body
    decoded_body: bytes | None = None
    decode_error: str | None = None
    trailers: tuple[tuple[str, str], ...] = ()
    complete: bool = True                        # False: the capture ended mid-message
    ts_start_ns: int = 0                         # first byte of the message
    ts_end_ns: int = 0                           # last byte
    grpc: tuple["GrpcMessage", ...] = ()         # gRPC length-prefixed messages in the body

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def __repr__(self) -> str:
        what = f"{self.method} {self.target}" if self.side is Side.CLIENT else f"{self.status}"
        return f"Message({self.proto} {what} stream={self.stream_id} body={_short(self.body)})"


@dataclass(slots=True)
class GrpcMessage:
    compressed: bool
    data: bytes

    def __repr__(self) -> str:
        return f"GrpcMessage(compressed={self.compressed}, {_short(self.data)})"


@dataclass(slots=True)
class Frame:
    """A protocol unit worth showing on its own: an HTTP/2 frame that is not part of a message
    (SETTINGS, PING, GOAWAY, RST_STREAM, WINDOW_UPDATE, PRIORITY, PUSH_PROMISE) or a WebSocket
    frame after an Upgrade. `info` holds its decoded fields."""
    side: Side
    proto: str                                   # "HTTP/2", "WebSocket"
    type: str                                    # "SETTINGS", "GOAWAY", "text", "binary", "close", ...
    stream_id: int = 0
    flags: tuple[str, ...] = ()
    info: tuple[tuple[str, str], ...] = ()
    payload: bytes = b""
    ts_ns: int = 0

    def __repr__(self) -> str:
        return f"Frame({self.proto} {self.type} stream={self.stream_id} {_short(self.payload)})"


@dataclass(slots=True)
class Raw:
    """Bytes no decoder claimed (other protocols, or after a decode error), passed through."""
    side: Side | None
    data: bytes
    ts_ns: int = 0

    def __repr__(self) -> str:
        return f"Raw({self.side}, {_short(self.data)})"


@dataclass(slots=True)
class Note:
    """Something the reader should know about the stream: 'undecodable: <why>' (the rest of the
    connection comes through as Raw), 'joined mid-stream', 'upgraded to websocket', ..."""
    side: Side | None
    text: str
    ts_ns: int = 0


@dataclass(slots=True)
class Exchange:
    """A request paired with its response (per stream for HTTP/2, in order for HTTP/1)."""
    request: Message | None                       # None: the response's request was not seen
    response: Message | None                      # None: no response by the end of the capture
    latency_ns: int | None = field(default=None)  # response first byte - request last byte


Event = Message | Frame | Raw | Note
