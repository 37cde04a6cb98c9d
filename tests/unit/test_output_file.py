"""OutputFile: opened before the capture starts, changed only by commit(); discard() leaves
the user's file as it was and removes only a file it created."""
import os
import stat

import pytest

from tlstap.errors import UsageError
from tlstap.sinks.files import OutputFile
from tlstap.sinks.pcapng import PcapngWriter

OLD_NS = 1_600_000_000_000_000_000


def _user_file(p, data=b"the user's bytes\n"):
    p.write_bytes(data)
    p.chmod(0o644)
    os.utime(p, ns=(OLD_NS, OLD_NS))
    return os.stat(p)


def _same(p, st):
    now = os.stat(p)
    return (now.st_ino, now.st_size, now.st_mtime_ns, now.st_mode) == (st.st_ino, st.st_size, st.st_mtime_ns,
                                                                         st.st_mode)


@pytest.mark.parametrize("append", [False, True])
def test_existing_file_untouched_until_commit(tmp_path, append):
    p = tmp_path / "out"
    st = _user_file(p)
    f = OutputFile(str(p), append=append)
    assert _same(p, st) and not f.created
    f.discard()
    assert _same(p, st) and p.read_bytes() == b"the user's bytes\n"
    f = OutputFile(str(p), append=append)
    f.commit()
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert p.read_bytes() == (b"the user's bytes\n" if append else b"")
    f.close()


def test_new_file_is_removed_by_discard_and_kept_by_commit(tmp_path):
    p = tmp_path / "new"
    f = OutputFile(str(p))
    assert f.created and stat.S_IMODE(os.stat(p).st_mode) == 0o600
    f.discard()
    assert not p.exists()
    f = OutputFile(str(p))
    f.commit()
    f.close()
    assert p.exists()


def test_symlink_is_written_through_and_kept(tmp_path):
    target, link = tmp_path / "target", tmp_path / "link"
    st = _user_file(target)
    link.symlink_to(target)
    f = OutputFile(str(link))
    f.discard()
    assert link.is_symlink() and _same(target, st)
    f = OutputFile(str(link))
    os.write(f.fd, b"new")      # what a capture writes, after commit()
    f.commit()
    f.close()
    assert link.is_symlink()


def test_discard_leaves_a_newcomer_alone(tmp_path):
    """The path was replaced by someone else meanwhile: discard() removes only its own file."""
    p = tmp_path / "out"
    f = OutputFile(str(p))
    os.unlink(p)
    p.write_bytes(b"someone else's")
    f.discard()
    assert p.read_bytes() == b"someone else's"


def test_unwritable_is_one_line():
    with pytest.raises(UsageError, match="cannot write /nonexistent-dir/x"):
        OutputFile("/nonexistent-dir/x")


def test_pending_pcapng_keeps_direct_io_and_discards_cleanly(tmp_path):
    p = tmp_path / "user.pcapng"
    st = _user_file(p)
    plain = PcapngWriter(str(tmp_path / "plain.pcapng"))    # O_DIRECT where this file system has it
    direct = plain._direct is not None
    plain.close()
    w = PcapngWriter(str(p), pending=True)
    assert (w._direct is not None) == direct, "pending or not, the file is written with O_DIRECT (direct.py)"
    w.add_interface("lo", 1)
    w.discard()
    assert _same(p, st)
    w = PcapngWriter(str(p), pending=True)
    w.add_interface("lo", 1)
    w.commit()
    w.close()
    assert p.read_bytes()[:4] == b"\x0a\x0d\x0d\x0a" and stat.S_IMODE(os.stat(p).st_mode) == 0o600
