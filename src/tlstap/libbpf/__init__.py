"""A thin typed ctypes layer over the system libbpf.so.1.

Why our own: BCC needs kernel headers this host lacks and compiles at run
time; pylibbpf has no runtime uprobe targets or ring buffers. libbpf 1.x keeps
a stable ABI, so binding the dozen functions we use is small and fast (~10 ms
to load an object).

Lifecycle (as in libbpf-tools): BpfObject.open() -> configure (rodata, map
sizes, autoload) -> load() -> attach_*() -> Link.close() / BpfObject.close().
"""
from .object import BpfObject, Program, Map
from .link import FdLink, Link
from .ringbuf import RingBuffer

__all__ = ["BpfObject", "Program", "Map", "Link", "FdLink", "RingBuffer"]
