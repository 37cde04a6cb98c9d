"""Text mode's consumer: ring records -> calls -> [HTTP exchanges] -> text or JSON lines, and
the sinks that leave the host (metrics, the exporter).

It runs in the decoder process (spool.py) and implements spool.Decoder; the capturing
process only spools the ring buffer.
"""
from __future__ import annotations

from ..events import Lost
from .httpview import HttpView
from ..sinks.jsonl import JsonSink
from ..sinks.tee import Tee
from ..sinks.text import TextSink
from .records import RecordDecoder
from .redact import RedactingSink


class TextPipeline:
    def __init__(self, out, fmt: str = "text", hex_: bool = False, raw: bool = False,
                 headers_only: bool = False, lag_ns: int = 0, max_body: int | None = None,
                 max_payload: int = 1 << 20, summary_in_output: bool = True, source: str = "probe",
                 extras: list = (), redactor=None):
        """out: the local output's binary file, or None (only `extras`); extras: more sinks
        (metrics, the exporter: those that redact have their RedactingSink already);
        redactor: --redact's, for the local output."""
        sinks = []
        if out is not None:
            local = JsonSink(out) if fmt == "json" else TextSink(out, hex_=hex_)
            local.headers_only = headers_only and not raw
            sinks.append(RedactingSink(local, redactor) if redactor is not None else local)
        sinks += extras
        self.observers = [s for s in extras if hasattr(s, "observe_decoder")]
        self.sink = sinks[0] if len(sinks) == 1 else Tee(sinks)
        self.view = None
        self.front = self.sink
        if not raw:
            self.front = self.view = HttpView(self.sink, lag_ns=lag_ns, max_body=max_body)
        self.max_payload = max_payload
        self.summary_in_output = summary_in_output
        self.source = source
        self.records = self._decoder(self.front)
        self.feed = self.records.feed

    def _decoder(self, front):
        """Records -> calls for `front`. The probe source's: straight to the sink's own handler
        when it can take records unparsed (a sink declares that by having raw_data_handler; the
        HTTP view cannot). The wire source's: packets and keys -> decrypted TlsData."""
        if self.source == "wire":
            from ..wire.decoder import WireDecoder
            return WireDecoder(front.on_data, front.on_lost, self.max_payload)
        fast = getattr(front, "raw_data_handler", None)
        return RecordDecoder(front.on_data, self.max_payload, fast=fast)

    def tick(self, now_ns: int) -> None:
        if self.source == "wire":
            self.records.tick(now_ns)
        if self.view is not None:
            self.view.tick(now_ns)

    def periodic(self) -> None:
        self.records.flush_stale()
        self.sink.flush()
        for o in self.observers:        # the decoder's own counters, as metrics
            o.observe_decoder(getattr(self.records, "metric_stats", dict)())   # the wire decoder's; RecordDecoder has none

    def on_lost(self, records: int, nbytes: int, why: str) -> None:
        self.front.on_lost(Lost(records, nbytes, why))

    def finish(self, counters: dict | None, line: str | None) -> None:
        self.records.flush_stale(all_=True)
        if self.source == "wire":
            counters, line = self._wire_summary(counters, line)
        try:
            if counters is not None and self.summary_in_output:
                self.front.on_summary(counters, line)
            self.front.close()
        except BrokenPipeError:
            pass

    def _wire_summary(self, counters: dict | None, line: str | None) -> tuple[dict | None, str | None]:
        """The capture's packet counters and line, with what the decoder decrypted (told on
        stderr too: only this process knows it)."""
        if counters is None:          # the capture never ran, or died: nothing to tell
            return None, None
        w = self.records
        told = w.summary()
        w.status(told)
        s = w.stats
        c = dict(counters, calls=s["records_decrypted"], records=s["records_decrypted"],
                 bytes=s["bytes_decrypted"], trunc_calls=s["truncated_pieces"], trunc_bytes=s["truncated_bytes"],
                 wire=dict(s))
        return c, f"{line}; {told}"

    def hurry(self) -> None:
        """What is left goes out one record per call, undecoded (the quickest output)."""
        self.records.flush_stale(all_=True)
        if self.view is not None:
            self.view.finish()
            self.front, self.view = self.sink, None
            if self.source == "wire":      # its connections' state stays: only the HTTP view goes
                self.records.sink, self.records.on_lost = self.sink.on_data, self.sink.on_lost
                return
            self.records = self._decoder(self.sink)
            self.feed = self.records.feed
