"""The audit modules' output: one line per event, text or JSON, to a file (0600, left as it
was by a refused command) or stdout; losses told on stderr within a second and as `lost`
records, and a summary at exit (the same honesty as the TLS outputs)."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

from ..sinks.files import OutputFile

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass(slots=True)
class AuditEvent:
    """One command line or query. `fields` are the module's own (JSON keys as given), after
    the ones every module has; `text` is the command line or query text."""
    kind: str                   #: "bash", "zsh", "mysqld", "postgres"
    ts_ns: int                  #: wall clock, ns since the epoch
    pid: int
    tid: int
    uid: int
    comm: str
    text: str
    fields: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"type": self.kind, "ts_ns": self.ts_ns, "pid": self.pid, "tid": self.tid, "uid": self.uid,
                "comm": self.comm, **self.fields, "text": self.text}

    def line(self) -> str:
        """Text mode: a header of who and where, the module's fields, then the text (control
        characters escaped: what was typed must not drive the reader's terminal)."""
        t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.ts_ns // 1_000_000_000))
        extra = " ".join(f"{k}={v}" for k, v in self.fields.items() if v is not None)
        text = self.text.encode("unicode_escape").decode("ascii") if not self.text.isprintable() else self.text
        return (f"{t}.{self.ts_ns % 1_000_000_000 // 1000:06d}Z {self.kind} pid={self.pid} uid={self.uid} "
                f"comm={self.comm}{' ' + extra if extra else ''}: {text}")


class AuditSource(Protocol):
    """What an audit module's source offers the output (besides runner.Source)."""
    def deliver(self) -> int: ...                       #: decode what is in the ring; events to .on_event
    def drain(self) -> None: ...
    def attached(self) -> list[str]: ...
    def describe(self) -> str: ...
    def new_lost(self) -> tuple[int, str]: ...           #: records lost since the last call, and why
    def counters(self) -> dict: ...                      #: at least events, lost (for the summary)
    on_event: object                                     #: set by AuditOutput: callable(AuditEvent)


class AuditOutput:
    """runner.Output for an audit module."""

    poll_s = 0.2

    def __init__(self, source, path: str, fmt: str, status):
        self.source = source
        self.path = path
        self.fmt = fmt
        self._status = status
        self._file = OutputFile(path)
        self._out = None
        self.written = 0
        source.on_event = self._write

    def prepare(self) -> None:
        pass

    def commit(self) -> None:
        f = self._file
        f.commit()
        self._out = sys.stdout.buffer if f.is_stdout else os.fdopen(f.fd, "wb", buffering=0, closefd=False)

    def discard(self) -> None:
        self._file.discard()

    def attached(self) -> list[str]:
        return self.source.attached()

    def describe(self) -> str:
        where = "" if self.path == "-" else f"; events to {os.path.abspath(self.path)}"
        return f"{self.source.describe()}{where}"

    def _emit(self, line: str) -> None:
        # unbuffered, one write per line: a reader (tail -f) never sees half a line, and
        # nothing waits in a buffer at Ctrl-C
        self._out.write((line + "\n").encode("utf-8", "replace"))
        if self._file.is_stdout:
            self._out.flush()

    def _write(self, ev: AuditEvent) -> None:
        self._emit(_dumps(ev.record()) if self.fmt == "json" else ev.line())
        self.written += 1

    def pump(self) -> int:
        return self.source.deliver()

    def tick(self) -> None:
        pass

    def report(self) -> None:
        recs, why = self.source.new_lost()
        if recs:
            self._status(f"lost {recs} events: {why}")
            self._emit(_dumps({"type": "lost", "records": recs, "why": why}) if self.fmt == "json"
                       else f"[lost {recs} events: {why}]")

    def drain(self) -> None:
        self.source.drain()

    def finish(self, why: str, stop: list) -> str:
        c = self.source.counters()
        if self.fmt == "json" and self._out is not None:
            self._emit(_dumps({"type": "summary", **c, "written": self.written}))
        self._file.close()
        return f"{why}: {self.written} events written; lost {c.get('lost', 0)}"
