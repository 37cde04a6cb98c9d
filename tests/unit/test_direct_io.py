"""sinks/direct.py on a real file: what flush() and close() put in it, and when."""
from __future__ import annotations

import os
import types

import pytest

from tlstap.sinks import direct


@pytest.fixture
def clock(monkeypatch):
    """direct.py's time.monotonic, moved by hand."""
    now = [1000.0]
    monkeypatch.setattr(direct, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    return now


def open_direct(path):
    f = open(path, "wb")
    d = direct.wrap(f)
    if d is f:
        f.close()
        pytest.skip("no O_DIRECT on this file system")
    return d


def test_flush_brings_the_file_up_to_date_at_most_every_tail_sync(tmp_path, clock):
    """A capture flushes after every read of its ring; the file follows within TAIL_SYNC_S
    (each sync of the unaligned tail costs a page-cache write, and a writeback later)."""
    path = tmp_path / "out"
    d = open_direct(path)
    d.write(b"a" * 100)
    d.flush()
    d.raw.wait()
    assert path.read_bytes() == b"a" * 100
    d.write(b"b" * 100)
    clock[0] += direct.TAIL_SYNC_S / 2
    d.flush()
    d.raw.wait()
    assert path.read_bytes() == b"a" * 100             # not yet: synced a moment ago
    clock[0] += direct.TAIL_SYNC_S
    d.flush()
    d.raw.wait()
    assert path.read_bytes() == b"a" * 100 + b"b" * 100
    d.write(b"c" * 10)
    d.close()                                          # close leaves nothing behind
    assert path.read_bytes() == b"a" * 100 + b"b" * 100 + b"c" * 10


def test_reserved_room_and_writes_over_many_buffers_land_in_order(tmp_path, clock):
    """More than all buffers hold, written and filled in place (reserve/commit), with
    flushes between: the file is what was written, byte for byte."""
    path = tmp_path / "big"
    d = open_direct(path)
    want = bytearray()
    for i in range(3 * direct.NBUF):
        chunk = os.urandom(direct.CHUNK // 3 + i)
        d.write(chunk)
        want += chunk
        room = d.reserve(4096)
        fill = os.urandom(1000 + i)
        room[:len(fill)] = fill
        d.commit(len(fill))
        want += fill
        clock[0] += direct.TAIL_SYNC_S
        d.flush()
    d.close()
    assert path.read_bytes() == bytes(want)
