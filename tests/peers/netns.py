"""A network namespace of the test's own, joined to the host's by a veth pair: traffic that is
not on loopback (a real device pair, its own qdiscs), between peers in two namespaces.

    with VethNetns("tlswire-123") as ns:
        with ns.entered():              # processes started here live in the namespace
            srv = PySSLServer(..., host=ns.inner_ip).__enter__()
        ... a client in the host namespace connects to ns.inner_ip ...

entered() moves only the calling thread (setns), and back: children it starts inherit the
namespace, the rest of the test process stays where it was. Leaving the `with` deletes the
namespace, which deletes the veth pair with it (and any qdisc or filter on either end).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import subprocess

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def _run(*argv: str) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: rc={p.returncode}: {p.stderr.strip()}")


class VethNetns:
    """Namespace `name` with the veth end `inner_if` (address inner_ip/24, and lo up); the host
    keeps `outer_if` (outer_ip/24). subnet: the /24's third octet in 10.77.X.0 (pick one no
    other test uses at the same time, e.g. from the pid). gso_segs: the veth's gso_max_segs (1:
    TCP sends one MSS per packet, as over a real NIC without offloads)."""

    def __init__(self, name: str, subnet: int, gso_segs: int | None = None):
        tag = name[-9:]                          # interface names are at most 15 bytes
        self.name, self.outer_if, self.inner_if = name, f"o{tag}", f"i{tag}"
        self.outer_ip, self.inner_ip = f"10.77.{subnet}.1", f"10.77.{subnet}.2"
        self.gso_segs = gso_segs
        self._made = False

    def __enter__(self) -> "VethNetns":
        _run("ip", "netns", "add", self.name)
        self._made = True
        try:
            _run("ip", "link", "add", self.outer_if, "type", "veth", "peer", "name", self.inner_if,
                 "netns", self.name)
            extra = ["gso_max_segs", str(self.gso_segs)] if self.gso_segs else []
            _run("ip", "addr", "add", f"{self.outer_ip}/24", "dev", self.outer_if)
            _run("ip", "link", "set", self.outer_if, *extra, "up")
            _run("ip", "-n", self.name, "addr", "add", f"{self.inner_ip}/24", "dev", self.inner_if)
            _run("ip", "-n", self.name, "link", "set", self.inner_if, *extra, "up")
            _run("ip", "-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._made:
            # the namespace's end goes with it, and a veth's peer goes with its other end
            subprocess.run(["ip", "netns", "delete", self.name], capture_output=True, timeout=20)
            subprocess.run(["ip", "link", "delete", self.outer_if], capture_output=True, timeout=20)
            self._made = False

    @contextlib.contextmanager
    def entered(self):
        """The calling thread in the namespace for the block (children started in it stay there)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield self
            finally:
                _setns(home)
        finally:
            os.close(home)

    def _tc(self, dev: str, *args: str) -> str:
        argv = ["tc", *(["-n", self.name] if dev == self.inner_if else []), *args]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: rc={p.returncode}: {p.stderr.strip()}")
        return p.stdout

    def ingress_bpf(self, obj, sec: str = "classifier") -> None:
        """A cls_bpf filter (direct action) from `obj` on the ingress of both veth ends: it sees
        every packet into the namespace and every packet out of it."""
        for dev in (self.inner_if, self.outer_if):
            self._tc(dev, "qdisc", "add", "dev", dev, "clsact")
            self._tc(dev, "filter", "add", "dev", dev, "ingress", "bpf", "da", "obj", str(obj), "sec", sec)

    def ingress_drops(self) -> dict[str, int]:
        """Packets the filters dropped (TC_ACT_SHOT), per veth end: the clsact qdisc's counter."""
        out = {}
        for dev in (self.inner_if, self.outer_if):
            m = re.search(r"dropped (\d+)", self._tc(dev, "-s", "qdisc", "show", "dev", dev, "ingress"))
            out[dev] = int(m[1]) if m else 0
        return out
