"""What every source shares: its configuration (scope and sizes), where the BPF objects are,
the scope written into an object before load, and the Capture base class (one ExitStack owns
the object, links and ring buffer; start() builds them all or nothing, close() releases them).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable

from .. import abi
from ..errors import AttachError, TlstapError
from ..libbpf import BpfObject, RingBuffer
from ..libbpf.object import num_possible_cpus


def bpf_object_path(name: str) -> str:
    """Objects are built into the package at install time; TLSTAP_BPF_DIR overrides (development)."""
    d = os.environ.get("TLSTAP_BPF_DIR")
    path = os.path.join(d, name) if d else str(resources.files("tlstap") / "bpf" / name)
    if not os.path.exists(path):
        raise TlstapError(f"BPF object {path} is missing: reinstall tlstap (pip install . builds it with clang)")
    return path


@dataclass
class CaptureConfig:
    pid: int | None = None
    uid: int | None = None
    cgroup_id: int | None = None
    max_payload: int = 1 << 20
    mapsize: int = 8 << 20
    libssl: list[str] = field(default_factory=list)


def set_scope(obj: BpfObject, cfg: CaptureConfig) -> None:
    """Before load: the scope (pid, uid, cgroup) and the payload cap every object's
    read-only `cfg` holds (tlstap.h: struct config), so the kernel filters."""
    conf = obj.rodata(abi.Config)
    conf.target_tgid = cfg.pid or 0
    conf.target_uid = abi.ANY_UID if cfg.uid is None else cfg.uid
    conf.target_cgroup = cfg.cgroup_id or 0
    conf.max_payload = cfg.max_payload


class Capture:
    """What the captures share: one ExitStack owns the object, links and ring buffer (built
    all or nothing in start()), close() releases everything; use as a context manager.
    Subclasses call Capture.__init__; start() builds what is declared here."""

    cfg: CaptureConfig
    targets: list
    links: list
    _obj: BpfObject | None = None
    _ring: RingBuffer | None = None
    _stack: contextlib.ExitStack
    _on_record: Callable[[memoryview], None]     # the per-record handler
    _find: Callable[[CaptureConfig], list]       # cfg -> the targets to probe
    #: set by start() when it loaded other programs than the preferred ones: which and why
    load_note: str | None = None

    def __init__(self, cfg: CaptureConfig):
        """What every capture starts with, before start() fills it."""
        self.cfg = cfg
        self.targets = []
        self.links = []
        self._stack = contextlib.ExitStack()
        self.ncpus = num_possible_cpus()       #: per-CPU maps are sized and summed by it

    def resolve(self) -> None:
        """Find what to probe (self._find: analyse the libraries), touching neither the kernel
        nor any file: a bad --libssl is refused before an output is opened. start() does it
        if it was not done."""
        if not self.targets:
            self.targets = self._find(self.cfg)

    def attach_uprobe(self, stack: contextlib.ExitStack, prog, path: str, offset: int, what: str, *,
                      pid: int, retprobe: bool = False, cookie: int = 0) -> None:
        """One uprobe of `prog` for the capture's life (its link joins self.links); a refusal
        says what the probe was for and where."""
        try:
            self.links.append(stack.enter_context(prog.attach_uprobe(path, offset, pid=pid, retprobe=retprobe,
                                                                     cookie=cookie)))
        except AttachError as e:
            raise AttachError(f"{e} ({what} in {path})") from None

    def open_events(self, stack: contextlib.ExitStack, obj: BpfObject, ring: str) -> None:
        """The loaded object's ring buffer map `ring` becomes this capture's ring (start()'s
        last step before the stack is kept)."""
        ev = obj.map(ring)
        self._ring = stack.enter_context(contextlib.closing(RingBuffer(ev.fd, ev.max_entries)))
        self._obj = obj

    def counter_sums(self, map_name: str, names) -> dict[str, int]:
        """The loaded object's per-CPU counter map `map_name` summed over the CPUs, by the names
        of the enum `names`; {} when no object is loaded."""
        return self._obj.map(map_name).counter_sums(names, self.ncpus) if self._obj else {}

    def poll(self, timeout: float) -> int:
        """Deliver what is in the ring buffer; wait up to `timeout` s when it is empty."""
        return self._ring.poll(self._on_record, timeout)

    def spool(self, write, timeout: float, max_bytes: int | None = None, scan: bool = True) -> int:
        """Hand the ring buffer's committed bytes, framing and all, to write() (spool.py),
        at most max_bytes at once; wait up to `timeout` s when it is empty. scan: see
        RingBuffer.take."""
        return self._ring.poll(write, timeout, whole=True, max_bytes=max_bytes, scan=scan)

    def deliver(self) -> int:
        """Hand what is in the ring buffer to the record handler, without waiting; how many."""
        return self._ring.read(self._on_record)

    def take(self, write, max_bytes: int | None = None, scan: bool = True) -> int:
        """spool() without the wait: the bytes handed to write()."""
        return self._ring.read(write, whole=True, max_bytes=max_bytes, scan=scan)

    def ring_fds(self) -> list[int]:
        """The ring buffers to wait on (runner.py waits on every source's at once)."""
        return [self._ring.fd]

    def ring_fill(self) -> tuple[int, int] | None:
        """(bytes waiting, size) of the ring buffer; None when it is not open (metrics read it)."""
        r = self._ring
        try:
            return (r.pending_bytes(), r.size) if r is not None else None
        except ValueError:          # closed (its mappings released) while a scrape ran
            return None

    def drain(self) -> None:
        """Take everything still in the ring buffer."""
        while self._ring.consume(self._on_record):
            pass

    def drain_to(self, write, max_bytes: int | None = None, scan: bool = True) -> None:
        """spool() until the ring buffer is empty (after detach_probes)."""
        while self._ring.take(write, max_bytes, scan):
            pass

    def detach_probes(self) -> None:
        """Stop new events (the ring buffer stays readable)."""
        for link in self.links:
            link.close()

    def close(self) -> None:
        self._stack.close()
        self._obj = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
