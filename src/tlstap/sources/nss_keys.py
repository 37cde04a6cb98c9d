"""tlstap nss -m keylog: NSS's key log lines from bpf/nss_keys.bpf.c (probes/nss_keys.py finds
where its probes go).

The kernel reports each TLS 1.3 key schedule secret under its HKDF label ("c hs traffic") with
the client random its transcript began with, and each TLS 1.2 master secret as CLIENT_RANDOM.
Here the labels NSS writes to its key log (tls13con.c) are named as NSS names them; the others
(derived, res master, finished, ...) are dropped. A secret whose transcript was never seen to
start with a ClientHello (capture began mid-handshake) has no client random: it is counted
(no_client_random), never written with a guessed one.
"""
from __future__ import annotations

import contextlib

from ..events import KeyLine
from ..libbpf import BpfObject
from ..abi import CLIENT_RANDOM_LEN, KeyKind
from .base import CaptureConfig, bpf_object_path, set_scope
from .keys import KeyLogCapture, decode_key_event

#: HKDF label (RFC 8446 7.1, without "tls13 ") -> NSS's key log label
NSS_LABELS = {
    b"c e traffic": "CLIENT_EARLY_TRAFFIC_SECRET",
    b"e exp master": "EARLY_EXPORTER_SECRET",
    b"c hs traffic": "CLIENT_HANDSHAKE_TRAFFIC_SECRET",
    b"s hs traffic": "SERVER_HANDSHAKE_TRAFFIC_SECRET",
    b"c ap traffic": "CLIENT_TRAFFIC_SECRET_0",
    b"s ap traffic": "SERVER_TRAFFIC_SECRET_0",
    b"exp master": "EXPORTER_SECRET",
    b"CLIENT_RANDOM": "CLIENT_RANDOM",       # TLS 1.2 and older: named so by the kernel
}
_NO_RANDOM = bytes(CLIENT_RANDOM_LEN)


class NssKeyLogCapture(KeyLogCapture):
    """-m keylog for NSS: one set of probes per libnss3.so and the freebl next to it."""

    OBJECT = "nss_keys.bpf.o"

    def __init__(self, cfg: CaptureConfig, on_line=None):
        from ..probes import nss_keys
        super().__init__(cfg, on_line, find=nss_keys.find_keys,
                         describe=lambda t: f"attached {t.describe()}")
        self.no_client_random = 0

    def start(self) -> None:
        self.resolve()
        with contextlib.ExitStack() as stack:
            obj = stack.enter_context(BpfObject.open(bpf_object_path(self.OBJECT)))
            set_scope(obj, self.cfg)
            obj.map("key_events").max_entries = self.cfg.mapsize
            obj.load()
            pid = self.cfg.pid or -1
            for t in self.targets:
                for p in t.points:       # return probes first (nss_keys.NSS_PLAN)
                    self.attach_uprobe(stack, obj.program(p.program), p.path, p.offset, p.what, pid=pid,
                                       retprobe=p.retprobe)
            self.open_events(stack, obj, "key_events")
            self._stack = stack.pop_all()

    def _on_record(self, view) -> None:
        (kind, _server, _sending, _logs, secret_len, _ts, _out, pid, tid, _uid, comm, label, cr,
         secret) = decode_key_event(view)
        name = NSS_LABELS.get(label.split(b"\0", 1)[0])
        if kind != KeyKind.SECRET or name is None:
            return
        if cr == _NO_RANDOM:
            self.no_client_random += 1
            return
        line = KeyLine(name, cr, secret[:secret_len], pid, tid, comm.split(b"\0", 1)[0].decode(errors="replace"))
        for deliver in self.subscribers:
            deliver(line)

    def counters(self) -> dict[str, int]:
        c = super().counters()
        c["no_client_random"] = self.no_client_random
        return c
