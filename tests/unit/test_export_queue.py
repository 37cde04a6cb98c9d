"""ExportQueue: first in first out across memory and the disk spool, byte bounds, drops counted
by reason, messages given back retried first, the spool file private and nameless."""
from __future__ import annotations

import os
import stat

from hypothesis import given, settings, strategies as st

from tlstap.export.queue import QUEUE_FULL, SHUTDOWN, ExportQueue


def item(i: int, size: int = 10) -> tuple[bytes, bytes]:
    mid = b"id%d" % i
    return mid, bytes([i % 256]) * (size - len(mid))


def drain(q: ExportQueue, n: int = 3) -> list:
    out = []
    while True:
        got = q.take(n)
        if not got:
            return out
        q.done(got)
        out += got


def test_fifo_across_memory_and_disk(tmp_path):
    q = ExportQueue(mem_max=30, disk_max=1000, spool_dir=str(tmp_path))
    items = [item(i) for i in range(20)]
    assert all(q.put(*it) for it in items)
    assert q.mem_bytes == 30 and q.disk_items == 17 and q.disk_bytes > 0
    # a freed memory slot does not let a newer item overtake the spooled ones
    q.done(q.take(1))
    assert q.put(*item(20))
    assert drain(q) == items[1:] + [item(20)]
    assert q.mem_bytes == 0 and q.disk_bytes == 0 and len(q) == 0 and q.dropped == {}


def test_bounds_and_drops_are_counted(tmp_path):
    q = ExportQueue(mem_max=20, disk_max=2 * (6 + 10), spool_dir=str(tmp_path))   # 6: a spooled item's head
    results = [q.put(*item(i)) for i in range(6)]
    assert results == [True, True, True, True, False, False]
    assert q.dropped == {QUEUE_FULL: 2}
    assert q.mem_bytes <= 20 and q.disk_bytes <= 32
    assert drain(q) == [item(i) for i in range(4)]


def test_no_spool_means_memory_only():
    q = ExportQueue(mem_max=20, disk_max=0)
    assert [q.put(*item(i)) for i in range(3)] == [True, True, False]
    assert q.dropped == {QUEUE_FULL: 1} and q._fd is None


def test_given_back_items_go_first_in_their_order(tmp_path):
    q = ExportQueue(mem_max=40, disk_max=1000, spool_dir=str(tmp_path))
    items = [item(i) for i in range(8)]
    for it in items:
        q.put(*it)
    first = q.take(3)
    second = q.take(2)
    q.done(first[:1])
    q.give_back(first[1:] + second)            # no acks for these: resend them before the rest
    assert q.inflight == 0
    assert drain(q) == items[1:]


def test_drop_all_counts_queued_spooled_and_in_flight(tmp_path):
    q = ExportQueue(mem_max=20, disk_max=1000, spool_dir=str(tmp_path))
    for i in range(5):
        q.put(*item(i))
    q.take(1)
    assert q.drop_all(SHUTDOWN) == 5
    assert q.dropped == {SHUTDOWN: 5} and len(q) == 0 and q.mem_bytes == 0 and q.disk_bytes == 0


def test_spool_file_is_private_and_has_no_name(tmp_path):
    q = ExportQueue(mem_max=0, disk_max=1000, spool_dir=str(tmp_path))
    assert q.put(*item(1))
    st_ = os.fstat(q._fd)
    assert stat.S_IMODE(st_.st_mode) == 0o600
    assert st_.st_nlink == 0 and list(tmp_path.iterdir()) == []
    assert os.readlink(f"/proc/self/fd/{q._fd}").endswith("(deleted)")
    q.close()


def test_spool_file_stays_bounded_while_it_never_empties(tmp_path):
    """A producer always a little ahead: the file is compacted, not grown without end."""
    q = ExportQueue(mem_max=0, disk_max=1 << 20, spool_dir=str(tmp_path))
    big = b"x" * 1000
    for i in range(10):
        q.put(b"%d" % i, big)
    taken = []
    for i in range(10, 5000):
        q.put(b"%d" % i, big)
        got = q.take(1)
        q.done(got)
        taken += [int(g[0]) for g in got]
        assert os.fstat(q._fd).st_size <= 2 * (1 << 20) + 2000
    taken += [int(g[0]) for g in drain(q)]
    assert taken == list(range(5000))


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.one_of(st.tuples(st.just("put"), st.integers(1, 40)),
                              st.tuples(st.just("take"), st.integers(0, 5)),
                              st.tuples(st.just("ack"), st.integers(0, 5)),
                              st.tuples(st.just("back"), st.just(0))), max_size=80),
       mem=st.integers(0, 120), disk=st.integers(0, 300))
def test_property_fifo_bounded_and_counted(tmp_path_factory, ops, mem, disk):
    """Against a list model: what is handed out is the accepted items in order (given-back ones
    again first), the bounds hold and every
    refused put is counted."""
    q = ExportQueue(mem_max=mem, disk_max=disk, spool_dir=str(tmp_path_factory.getbasetemp()))
    model: list = []        # queued, oldest first
    flight: list = []       # taken, not acked
    refused = n = 0
    for op, k in ops:
        if op == "put":
            n += 1
            it = (b"%d" % n, b"p" * k)
            if q.put(*it):
                model.append(it)
            else:
                refused += 1
        elif op == "take":
            got = q.take(k)
            assert got == model[:len(got)] and len(got) == min(k, len(model))
            del model[:len(got)]
            flight += got
        elif op == "ack":
            q.done(flight[:k])
            del flight[:k]
        else:
            q.give_back(flight)
            model[:0] = flight
            flight = []
        assert q.disk_bytes <= disk
        assert len(q) == len(model) and q.inflight == len(flight)
        # every queued or in-flight byte is counted once: in memory, or on disk (6: a spooled head)
        assert q.mem_bytes + q.disk_bytes - 6 * q.disk_items == sum(len(a) + len(b) for a, b in model + flight)
    assert q.dropped.get(QUEUE_FULL, 0) == refused
    q.close()
