"""tlstap bash / tlstap zsh against real interactive shells on pseudo-terminals: what is typed
comes out as typed, with the tty, the uid and the status the shell itself shows ($? in its
prompt)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import termios
import time

import pytest

from tests.conftest import need_tool
from tests.kernel.tap import Tap, run_tlstap, tlstap_exe

SHELLS = ["bash", "zsh"]
#: each shell's prompt shows $? (bash expands PS1, zsh has %?), so the test reads the status the
#: shell reports; PS2 marks continuation lines
PROMPTS = {"bash": b"PS1='<$?>P1> ' PS2='P2> '", "zsh": b"PS1='<%?>P1> ' PS2='P2> '"}
PROMPT = re.compile(rb"<(\d+)>P1> ")
TIMEOUT = 15
NOBODY = 65534


class PtyShell:
    """An interactive shell (no rc files) on a pseudo-terminal of its own, which is its
    controlling terminal."""

    def __init__(self, shell: str, uid: int | None = None):
        self.shell = shell
        self.master, slave = os.openpty()
        self.tty = os.ttyname(slave)
        argv = ["bash", "--norc", "--noprofile", "-i"] if shell == "bash" else ["zsh", "-f", "-i"]
        env = {"PATH": os.environ["PATH"], "TERM": "xterm", "HOME": "/nonexistent", "LANG": "C.UTF-8"}
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0), user=uid)
        os.close(slave)
        self.pid = self.proc.pid
        self._buf = b""
        self.type(PROMPTS[shell])

    def _prompt(self) -> int:
        """Read the terminal until the next primary prompt; the status it shows."""
        end = time.monotonic() + TIMEOUT
        while (m := PROMPT.search(self._buf)) is None:
            left = end - time.monotonic()
            assert left > 0, f"{self.shell} showed no prompt; its terminal: {self._buf[-500:]!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:            # EIO: the shell is gone
                    chunk = b""
                assert chunk, f"{self.shell} ended; its terminal: {self._buf[-500:]!r}"
                self._buf += chunk
        self._buf = self._buf[m.end():]
        return int(m.group(1))

    def type(self, keys: bytes) -> int:
        """Type keys (lines end with Enter) and wait for the shell's next prompt; the status it
        shows."""
        os.write(self.master, keys + b"\r")
        return self._prompt()

    def start(self, keys: bytes, child: str) -> None:
        """Type a command line that runs `child` and return once it runs (the line was read)."""
        os.write(self.master, keys + b"\r")
        end = time.monotonic() + TIMEOUT
        while not self._has_child(child):
            assert time.monotonic() < end, f"{self.shell} did not start {child}"
            time.sleep(0.05)

    def _has_child(self, name: str) -> bool:
        with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
            kids = f.read().split()
        for k in kids:
            with contextlib.suppress(OSError), open(f"/proc/{k}/comm") as f:
                if f.read().strip() == name:
                    return True
        return False

    def exit(self) -> int:
        os.write(self.master, b"exit 3\r")
        return self.proc.wait(TIMEOUT)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def shells():
    """shells(name) -> a PtyShell, killed at teardown."""
    started = []

    def start(name: str, uid: int | None = None) -> PtyShell:
        need_tool(name)
        started.append(PtyShell(name, uid))
        return started[-1]
    yield start
    for s in started:
        s.close()


class ShellTap(Tap):
    def __init__(self, tmp_path, shell: str, *args: str, fmt: str = "json"):
        out = str(tmp_path / f"{shell}-{time.monotonic_ns()}.{'jsonl' if fmt == 'json' else 'txt'}")
        self._setup(out, [tlstap_exe(), shell, "--format", fmt, "-o", out, *args])

    def commands(self) -> list[dict]:
        return [r for r in self.records() if r["type"] in SHELLS]

    def text(self) -> str:
        with open(self.out, encoding="utf-8") as f:
            return f.read()


#: (keys typed, the command line the shell read): a failing command, UTF-8 (ř is a byte zsh
#: stores metafied), a control character entered with Ctrl-V, a command over three lines, a
#: status of its own, a builtin that reads a line itself (not a command), a nested parser
TYPED = [
    (b"false", "false"),
    ("echo hé Příliš ✓".encode(), "echo hé Příliš ✓"),
    (b"echo 'a\x16\x01b' | od -c", "echo 'a\x01b' | od -c"),
    (b"for i in 1 2\rdo echo $i\rdone", "for i in 1 2\ndo echo $i\ndone"),
    (b"(exit 7)", "(exit 7)"),
    (b"eval 'false; true'", "eval 'false; true'"),
    (b"nosuchcommand-tlstap", "nosuchcommand-tlstap"),
    (b": " + b"x" * 9000, ": " + "x" * 9000),          # longer than a record's line (SHELL_LINE_MAX)
]
#: a line a builtin reads (bash: read -e uses readline; zsh: vared uses zle) is no command
READS = {"bash": (b"read -e x\rnot a command", "read -e x"), "zsh": (b"vared -c x\rnot a command", "vared -c x")}


@pytest.mark.parametrize("shell", SHELLS)
def test_commands_as_typed(tmp_path, shells, shell):
    """Each command line comes out exactly as typed, once, with the shell's pid, tty, uid and
    the status its next prompt shows; the line a builtin reads is not a command. The shell
    waits at its prompt when tlstap starts, as a user's would."""
    sh = shells(shell)
    typed = TYPED + [READS[shell]]
    with ShellTap(tmp_path, shell, "--pid", str(sh.pid)) as tap:
        statuses = [sh.type(keys) for keys, _ in typed]
    assert statuses[0] == 1 and statuses[4] == 7 and statuses[6] == 127, statuses
    got = tap.commands()
    assert [r["text"] for r in got] == [text for _, text in typed]
    assert [r["status"] for r in got] == statuses
    for r in got:
        assert (r["type"], r["pid"], r["uid"], r["comm"]) == (shell, sh.pid, os.getuid(), shell)
        assert "/dev/" + r["tty"] == sh.tty
    summary = tap.summary()
    assert (summary["events"], summary["written"], summary["lost"]) == (len(typed), len(typed), 0)


@pytest.mark.parametrize("shell", SHELLS)
def test_errnumber_and_pid_scope(tmp_path, shells, shell):
    """--errnumber N: only commands whose status is N; --pid: another shell of the same
    binary is not reported; text output: one line per command, control characters escaped."""
    sh, other = shells(shell), shells(shell)
    with ShellTap(tmp_path, shell, "--pid", str(sh.pid), "--errnumber", "1", fmt="text") as tap:
        statuses = [sh.type(k) for k in (b"false", b"true", b"(exit 2)", b"test 1 = 2", b"echo '\x16\x1b[31m'; false")]
        assert other.type(b"false") == 1
    assert statuses == [1, 0, 2, 1, 1]
    lines = tap.text().splitlines()
    assert len(lines) == 3, lines
    tty = sh.tty.removeprefix("/dev/")
    for line, cmd in zip(lines, ("false", "test 1 = 2", "echo '\\x1b[31m'; false")):
        assert re.fullmatch(rf"\S+Z {shell} pid={sh.pid} uid={os.getuid()} comm={shell} tty={tty} status=1: "
                            + re.escape(cmd), line), line
    assert "\x1b" not in tap.text()


@pytest.mark.parametrize("shell", SHELLS)
def test_all_shells_and_exit(tmp_path, shells, shell):
    """Without --pid every shell is seen (each with its own tty); a command that ends its shell
    (exit) has no status, and is written once the shell is gone; one still running when tlstap
    stops is written then, with no status. --uid: a shell of another user is not seen."""
    a, b, c, d = shells(shell), shells(shell), shells(shell, NOBODY), shells(shell)
    script = tmp_path / "script"
    script.write_text("true\nfalse\ntrue\n")
    with ShellTap(tmp_path, shell, "--uid", str(os.getuid())) as tap:
        assert c.type(b"true") == 0
        subprocess.run([shell, str(script)], check=True, timeout=TIMEOUT)   # a script reads no command line
        assert a.type(b"true") == 0
        assert b.type(b"(exit 4)") == 4
        assert a.exit() == 3
        assert b.type(b"false") == 1
        # tlstap sees within a second or so that the shell is gone (no prompt will close the line)
        end = time.monotonic() + 10
        while not [r for r in tap.commands() if r["text"] == "exit 3"]:
            assert time.monotonic() < end, "the command that ended the shell was not written while tlstap ran"
            time.sleep(0.1)
        b.start(b"sleep 30", "sleep")
    got = [(r["pid"], r["tty"], r["text"], r["status"]) for r in tap.commands() if r["pid"] in (a.pid, b.pid, c.pid)]
    ta, tb = (s.tty.removeprefix("/dev/") for s in (a, b))
    assert sorted(got) == sorted([(a.pid, ta, "true", 0), (b.pid, tb, "(exit 4)", 4), (a.pid, ta, "exit 3", None),
                                  (b.pid, tb, "false", 1), (b.pid, tb, "sleep 30", None)])
    assert tap.summary()["prompts"] == 3       # after a: true, b: (exit 4), false; none of the script's
    with ShellTap(tmp_path, shell, "--uid", str(NOBODY)) as tap:
        assert c.type(b"false") == 1
        assert d.type(b"true") == 0
    assert [(r["pid"], r["uid"], r["text"], r["status"]) for r in tap.commands()] == [(c.pid, NOBODY, "false", 1)]


def test_refused_commands(tmp_path):
    """Bad input: one line naming what is wrong, a non-zero exit, and -o's file as it was."""
    out = tmp_path / "keep.txt"
    out.write_text("before\n")
    os.chmod(out, 0o644)
    ls = shutil.which("ls")
    cases = [
        (["bash", "--bash", ls], rf"{re.escape(os.path.realpath(ls))}: no readline_internal_teardown, .*not a bash"),
        (["zsh", "--zsh", shutil.which("bash")], r"\S*bash: no zleentry, execselect, lastval: not a zsh"),
        (["bash", "--pid", "999999999"], r"--pid 999999999: no such process"),
        (["bash", "--errnumber", "256"], r"--errnumber 256: an exit status is 0 to 255"),
        (["bash", "--bash", str(tmp_path / "nope")], r"--bash .*/nope: no such file"),
        (["bash", "--pid", str(os.getpid()), "--bash", shutil.which("bash")], rf"--pid {os.getpid()} runs .*, not "),
    ]
    for args, rx in cases:
        r = run_tlstap(*args, "-o", str(out))
        assert r.returncode != 0 and len(r.stderr.splitlines()) == 1, (args, r.stderr)
        assert re.match(r"tlstap: " + rx, r.stderr), (args, r.stderr)
        assert out.read_text() == "before\n" and (os.stat(out).st_mode & 0o777) == 0o644
    r = run_tlstap("bash", "-o", str(tmp_path / "no-such-dir" / "x"))
    assert r.returncode == 2 and r.stderr.startswith("tlstap: cannot write ") and len(r.stderr.splitlines()) == 1


def test_json_lines_and_file_mode(tmp_path, shells):
    """-o FILE is 0600 and every line is a JSON object: the commands, then the summary."""
    sh = shells("bash")
    with ShellTap(tmp_path, "bash", "--pid", str(sh.pid)) as tap:
        sh.type(b"true")
    assert os.stat(tap.out).st_mode & 0o777 == 0o600
    with open(tap.out) as f:
        types = [json.loads(line)["type"] for line in f]
    assert types == ["bash", "summary"]
