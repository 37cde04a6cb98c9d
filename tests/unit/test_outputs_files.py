"""open_private: output files are 0600, devices are left as they are."""
import os
import stat

from tlstap.sinks.files import open_private


def test_new_and_existing_files_become_0600(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    old.write_bytes(b"x")
    old.chmod(0o644)
    for p in (new, old):
        open_private(str(p)).close()
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600


def test_dev_null_keeps_its_mode():
    before = stat.S_IMODE(os.stat("/dev/null").st_mode)
    try:
        f = open_private("/dev/null")
        f.write(b"discarded")
        f.close()
        assert stat.S_IMODE(os.stat("/dev/null").st_mode) == before
    finally:
        os.chmod("/dev/null", before)
