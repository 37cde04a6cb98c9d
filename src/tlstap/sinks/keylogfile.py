"""The NSS key log file of -m keylog: appended, one write per line, no duplicates, 0600.

Each line goes out in one os.write() on an O_APPEND descriptor, so a reader (tail -f,
Wireshark watching the file) never sees half a line and the line is in the file the moment
the handshake logged it; nothing waits in a Python buffer at Ctrl-C. Lines already in the
file are loaded first, so re-running tlstap on the same file does not repeat them.

The file is opened at once but changed only from commit(), once the capture has started: a
refused command leaves it as it was (sinks/files.py: OutputFile).
"""
from __future__ import annotations

import os

from ..errors import UsageError
from .files import OutputFile


class KeyLogWriter:
    def __init__(self, path: str):
        self.path = path
        self.seen: set[str] = set()
        self.written = 0
        self.duplicates = 0
        if path != "-":
            self.seen.update(_existing_lines(path))
        self._file = OutputFile(path, append=True)
        self._fd = self._file.fd

    def commit(self) -> None:
        """The capture started: the file may change from now on (0600)."""
        self._file.commit()

    def discard(self) -> None:
        """The command was refused: the file stays as it was (removed if this run created it)."""
        self._file.discard()

    def write(self, line: str) -> bool:
        """Append `line` unless it is already in the file; True if written."""
        if line in self.seen:
            self.duplicates += 1
            return False
        self.seen.add(line)
        if not self._file.committed:
            self.commit()
        data = (line + "\n").encode("ascii")
        while data:      # a regular file takes it all at once; a pipe might not
            data = data[os.write(self._fd, data):]
        self.written += 1
        return True

    def close(self) -> None:
        self._file.close()


class KeyLogOutput:
    """runner.Output for -k / -m keylog: every KeyLine of the key source, appended to the file."""

    poll_s = 0.2

    def __init__(self, keys, path: str, status):
        self.keys = keys
        self.path = path
        self.writer = KeyLogWriter(path)
        self._status = status
        keys.subscribers.append(lambda line: self.writer.write(line.text()))

    def prepare(self) -> None:
        pass

    def commit(self) -> None:
        self.writer.commit()

    def discard(self) -> None:
        self.writer.discard()

    def attached(self) -> list[str]:
        return self.keys.attached()

    def describe(self) -> str:
        return f"; key log lines go to {'stdout' if self.path == '-' else os.path.abspath(self.path)}"

    def pump(self) -> int:
        return self.keys.deliver()

    def tick(self) -> None:
        pass

    def report(self) -> None:
        if lost := self.keys.new_lost():
            self._status(f"lost {lost} key events: ring buffer full")

    def drain(self) -> None:
        self.keys.drain()

    def finish(self, why: str, stop: list) -> str:
        self.writer.close()
        c, w = self.keys.counters(), self.writer
        return (f"{why}: {w.written} key log lines written ({w.duplicates} duplicates skipped), "
                f"{c['updates']} key updates ({c['unfollowed_updates']} on connections whose handshake "
                f"was not seen); lost {c['lost']} events, {c['read_errors']} unreadable")


def _existing_lines(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            return [ln.decode("ascii", "replace").rstrip("\r\n") for ln in f if ln.strip()]
    except FileNotFoundError:
        return []
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
