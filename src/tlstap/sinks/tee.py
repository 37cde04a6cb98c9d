"""One decoder-side sink standing for several: the local text/JSON output, the metrics and the
exporter each get every event (decode/pipeline.py builds it when more than one is asked)."""
from __future__ import annotations


class Tee:
    def __init__(self, sinks: list):
        self.sinks = list(sinks)
        self.out = next((s.out for s in self.sinks if getattr(s, "out", None) is not None), None)

    def on_data(self, ev) -> None:
        for s in self.sinks:
            s.on_data(ev)

    def on_lost(self, ev) -> None:
        for s in self.sinks:
            s.on_lost(ev)

    def on_exchange(self, meta, ex) -> None:
        for s in self.sinks:
            s.on_exchange(meta, ex)

    def on_frame(self, meta, f) -> None:
        for s in self.sinks:
            s.on_frame(meta, f)

    def on_note(self, meta, n) -> None:
        for s in self.sinks:
            s.on_note(meta, n)

    def on_summary(self, counters, line) -> None:
        for s in self.sinks:
            s.on_summary(counters, line)

    def flush(self) -> None:
        for s in self.sinks:
            s.flush()

    def close(self) -> None:
        """Every sink is closed, even when one fails (the first failure is raised after)."""
        first = None
        for s in self.sinks:
            try:
                s.close()
            except Exception as e:      # noqa: BLE001 - re-raised below, once the others are closed
                first = first or e
        if first is not None:
            raise first
