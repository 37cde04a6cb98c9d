"""tlstap's own health as metrics, read at scrape time in the capture process: what each
source captured and lost (the BPF counters), how full its ring is, the decoder's backlog, the
CPU and memory tlstap uses; merged in, the losses only the decoder process sees (traffic.py
writes them with its snapshot), and how old that snapshot is.

Every number is a total or a level read when Prometheus asks, never a delta: the text output's
once-a-second loss reports consume deltas of their own (TextOutput.report), untouched here.
"""
from __future__ import annotations

import json
import os
import time

from . import DECODER_FILE, TRAFFIC_FILE

#: a source -> its label: which capture the numbers are of
SOURCE_LABELS = (("WireCapture", "wire"), ("PacketCapture", "packets"), ("KeyLogCapture", "keys"),
                 ("OpenSSLCapture", "probe"))
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def source_label(src) -> str:
    names = {c.__name__ for c in type(src).__mro__}
    return next((label for cls, label in SOURCE_LABELS if cls in names), type(src).__name__.lower())


def proc_usage(pid: int) -> tuple[float, int] | None:
    """(CPU seconds, resident bytes) of a process from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()     # after comm, which may hold spaces
        with open(f"/proc/{pid}/statm") as f:
            rss_pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / _TICKS, rss_pages * _PAGE


def captured_and_lost(label: str, c: dict) -> tuple[int, int | None, dict, dict]:
    """A source's counters -> (records, bytes or None, lost records by reason, lost bytes by
    reason). Each source kind names its counters its own way (abi.Counter, PktCounter, KeyCounter)."""
    if label == "keys":
        return c["secrets"] + c["updates"], None, {"ring_full": c["lost"]}, {}
    if label in ("wire", "packets"):
        room = c["lost_room"]
        return c["packets"], c["bytes"], {"ring_full": c["lost"] - room, "ring_refused_with_room": room}, {}
    room = c["lost_room"]
    # the kernel counts the bytes of both kinds of ring loss together: under ring_full
    return (c["records"], c["bytes"], {"ring_full": c["lost_records"] - room, "ring_refused_with_room": room},
            {"ring_full": c["lost_bytes"]})


class HealthCollector:
    """A prometheus_client collector (collect() -> metric families). sources: the capture's;
    text_output: the TextOutput whose decoder backlog and process it reports (or None);
    snapshot_dir: where the decoder writes its snapshots (traffic.py)."""

    def __init__(self, sources: list, text_output=None, snapshot_dir: str | None = None):
        self.sources = sources
        self.text = text_output
        self.dir = snapshot_dir
        self._decoder_last: tuple[float, int] | None = None

    def sample(self) -> None:
        """Once a second (MetricsOutput.tick): the decoder's usage, kept for when it has exited."""
        self._decoder_usage()

    def _decoder_usage(self) -> tuple[float, int] | None:
        """The decoder's (CPU seconds, resident bytes): read while it runs, the last reading after
        (its pid, once reaped, may be another process's)."""
        spool = getattr(self.text, "spool", None)
        pid = spool.pid if spool is not None else None
        if pid:
            u = proc_usage(pid)
            if u is not None:
                self._decoder_last = u
        return self._decoder_last

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        recs = CounterMetricFamily("tlstap_captured_records", "Records captured (probe: read/write calls' "
                                   "records; wire, packets: packets; keys: secrets)", labels=["source"])
        nbytes = CounterMetricFamily("tlstap_captured_bytes", "Bytes captured", labels=["source"])
        lost_r = CounterMetricFamily("tlstap_lost_records", "Records lost", labels=["source", "reason"])
        lost_b = CounterMetricFamily("tlstap_lost_bytes", "Bytes lost", labels=["source", "reason"])
        fill = GaugeMetricFamily("tlstap_ring_fill_ratio", "Part of the ring buffer waiting to be read",
                                 labels=["source"])
        size = GaugeMetricFamily("tlstap_ring_size_bytes", "Ring buffer size", labels=["source"])
        for src in self.sources:
            label = source_label(src)
            try:
                c = src.counters()
                ring = src.ring_fill()
            except Exception:       # noqa: BLE001 - a source closed under a late scrape: skip it
                continue
            r, b, lr, lb = captured_and_lost(label, c)
            recs.add_metric([label], r)
            if b is not None:
                nbytes.add_metric([label], b)
            for why, n in lr.items():
                lost_r.add_metric([label, why], n)
            for why, n in lb.items():
                lost_b.add_metric([label, why], n)
            if ring is not None:
                fill.add_metric([label], ring[0] / ring[1])
                size.add_metric([label], ring[1])
        yield from self._decoder(lost_r, lost_b)
        yield from self._snapshot(lost_r, lost_b)
        yield from (recs, nbytes, lost_r, lost_b, fill, size)
        yield from self._usage()

    def _decoder(self, lost_r, lost_b):
        from prometheus_client.core import GaugeMetricFamily
        spool = getattr(self.text, "spool", None)
        if spool is not None:
            src = source_label(self.text.probe)
            recs, nbytes = spool.dropped
            lost_r.add_metric([src, "decoder_backlog_full"], recs)
            lost_b.add_metric([src, "decoder_backlog_full"], nbytes)
            yield GaugeMetricFamily("tlstap_decoder_backlog_bytes", "Captured bytes waiting for the decoder "
                                    "process", value=spool.backlog())
            yield GaugeMetricFamily("tlstap_decoder_backlog_limit_bytes", "The most bytes the decoder's "
                                    "backlog holds (--spool-max); beyond, records are dropped",
                                    value=spool.max_backlog)

    def _snapshot(self, lost_r, lost_b):
        """The decoder's own losses (source "wire": only the wire decoder has any), and the age
        of its traffic snapshot."""
        from prometheus_client.core import GaugeMetricFamily
        if not self.dir:
            return
        try:
            with open(os.path.join(self.dir, DECODER_FILE)) as f:
                lost = json.load(f)["lost"]
            age = time.time() - os.stat(os.path.join(self.dir, TRAFFIC_FILE)).st_mtime
        except (OSError, ValueError, KeyError):
            return                      # none written yet
        for fam, kind in ((lost_r, "records"), (lost_b, "bytes")):
            for why, n in lost.get(kind, {}).items():
                fam.add_metric(["wire", why], n)
        yield GaugeMetricFamily("tlstap_metrics_snapshot_age_seconds", "Since the decoder process last "
                                "wrote or confirmed the traffic metrics (about once a second; more while it "
                                "lags behind the capture)", value=max(0.0, age))

    def _usage(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        cpu = CounterMetricFamily("tlstap_cpu_seconds", "CPU time of tlstap's processes (user + system)",
                                  labels=["process"])
        rss = GaugeMetricFamily("tlstap_resident_memory_bytes", "Resident memory of tlstap's processes",
                                labels=["process"])
        t = os.times()
        cpu.add_metric(["capture"], t.user + t.system)
        me = proc_usage(os.getpid())
        if me is not None:
            rss.add_metric(["capture"], me[1])
        u = self._decoder_usage()
        if u is not None:
            cpu.add_metric(["decoder"], u[0])
            rss.add_metric(["decoder"], u[1])
        yield cpu
        yield rss
