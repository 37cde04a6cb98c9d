"""The text / JSON lines output (-o, -m text): plaintext of the probe source, decoded in a
forked decoder process at idle priority (spool.py says why), written by TextSink or JsonSink
(decode/pipeline.py joins them).

This process only moves the probe ring's bytes into the spool; the output file is opened here
(refused if unwritable, left as it was until commit()) and written by the decoder process.
"""
from __future__ import annotations

import os
import sys

from ..errors import TlstapError
from ..events import ring_why
from ..spool import SpoolPipeline
from .files import OutputFile


class TextOutput:
    """runner.Output for plaintext. make_pipeline(out) builds the decoder's pipeline
    (decode.pipeline.TextPipeline) in the decoder process, writing to the binary file `out`.
    path None: no local output, the decoder feeds only the metrics and the exporter (out None)."""

    poll_s = 0.05      # the decoder's "spool complete up to" notes go out at least this often

    def __init__(self, probe, path: str, make_pipeline, spool_max: int, spool_dir: str | None,
                 status, source_note: str | None = None):
        self.probe = probe
        self.path = path
        self._make_pipeline = make_pipeline
        self._spool_max = spool_max
        self._spool_dir = spool_dir
        self._status = status
        self._source_note = source_note     #: which source of plaintext runs, and why
        self.spool: SpoolPipeline | None = None
        self._file = OutputFile(path) if path is not None else None
        self._committed = False
        self._told_wait = False

    def prepare(self) -> None:
        """Fork the decoder before any BPF object exists (it must hold no probe alive). It
        writes through this fd and closes it only at exit; the fd stays ours too, for commit()
        or discard()."""
        f = self._file
        if f is None:
            out = None
        else:
            out = sys.stdout.buffer if f.is_stdout else os.fdopen(f.fd, "wb", buffering=1 << 20, closefd=False)
        self.spool = SpoolPipeline(lambda: self._make_pipeline(out), self._spool_max, self._spool_dir)

    def commit(self) -> None:
        if self._file is not None:
            self._file.commit()
            self._file.close()        # the decoder process holds its own descriptor
        self._committed = True

    def discard(self) -> None:
        if self.spool is not None and not self._committed:
            self.spool.abort()
            self.spool = None
        if self._file is not None:
            self._file.discard()

    def attached(self) -> list[str]:
        return ([self._source_note] if self._source_note else []) + self.probe.attached()

    def describe(self) -> str:
        where = "" if self.path in ("-", None) else f"; text to {os.path.abspath(self.path)}"
        return f"{self.probe.describe()}{where}"

    def pump(self) -> int:
        return self.probe.take(self.spool.put)

    def tick(self) -> None:
        self.spool.notify()

    def report(self) -> None:
        """New losses into the output (a `lost` record) and onto stderr."""
        recs, nbytes, room = self.probe.new_losses()
        if recs:
            why, told = ring_why(recs, room)
            self._status(f"lost {recs} records ({nbytes} bytes): {told}")
            self.spool.report_lost(recs, nbytes, why)
        recs, nbytes = self.spool.new_drops()
        if recs:
            self._status(f"dropped {recs} records ({nbytes} bytes): decoder backlog full; "
                         f"raise --spool-max or give the host CPU")

    def alive(self) -> bool:
        """False once the decoder process ended (its output was closed): the capture ends."""
        return self.spool.alive()

    def drain(self) -> None:
        self.probe.drain_to(self.spool.put)

    def finish(self, why: str, stop: list) -> str:
        c = self.probe.counters()
        spool = self.spool
        c["backlog_dropped_records"], c["backlog_dropped_bytes"] = spool.dropped
        c["lost_records"] += spool.dropped[0]
        c["lost_bytes"] += spool.dropped[1]
        backlog = f", {spool.dropped[0]} of them for want of decoder backlog room" if spool.dropped[0] else ""
        summary = self.probe.summary(why, c) + backlog

        def waiting(seconds, backlog_bytes):
            if seconds > 1 and not self._told_wait:
                self._told_wait = True
                self._status(f"decoding the last {backlog_bytes >> 20} MiB captured; "
                             f"Ctrl-C again to write it undecoded")

        code = spool.end(c, summary, stop, waiting)
        self.spool = None
        if code:
            self._status(summary)
            raise TlstapError(f"the decoder process failed (exit status {code}); the output may be incomplete")
        return summary
