"""CommandGrouper (records in, commands out) and the zsh/tty decoding it uses."""
import ctypes

from tlstap.audit.shell import (SF_MORE, SF_TRUNCATED, SHELL_LINE_MAX, CommandGrouper, ShellEvent, ShellKind,
                                tty_name, unmetafy)


def rec(kind, pid=10, start=5, data=b"", flags=0, status=0, tty=b"pts7"):
    e = ShellEvent(kind=kind, flags=flags, len=len(data), status=status, ts_ns=1, start_ns=start, pid=pid, tid=pid,
                   uid=1000, comm=b"bash", tty=tty)
    ctypes.memmove(ctypes.addressof(e) + ShellEvent.line.offset, data, len(data))
    return e


def line(data, **kw):
    return rec(ShellKind.SHELL_LINE, data=data, **kw)


def prompt(status, **kw):
    return rec(ShellKind.SHELL_PROMPT, status=status, **kw)


def test_lines_until_the_next_prompt_are_one_command():
    g = CommandGrouper(zsh=False)
    assert g.feed(prompt(0)) is None                  # the shell's first prompt: nothing pending
    assert g.feed(line(b"for i in 1 2")) is None
    assert g.feed(line(b"do echo $i; done")) is None
    c = g.feed(prompt(3))
    assert (c.text, c.status, c.tty, c.pid, c.uid, c.comm, c.truncated) == \
        ("for i in 1 2\ndo echo $i; done", 3, "pts/7", 10, 1000, "bash", False)
    assert g.feed(line(b"   ")) is None and g.feed(prompt(0)) is None     # Enter on blanks: no command


def test_chunks_and_truncation():
    g = CommandGrouper(zsh=False)
    part = b"x" * (SHELL_LINE_MAX - 1)
    g.feed(line(part, flags=SF_MORE))
    g.feed(line(b"yz"))
    assert g.feed(prompt(0)).text == "x" * (SHELL_LINE_MAX - 1) + "yz"
    g.feed(line(part, flags=SF_TRUNCATED))
    assert g.feed(prompt(0)).truncated


def test_shells_apart_by_pid_and_start_time():
    """A reused pid is another shell: its prompt does not close the dead one's lines."""
    g = CommandGrouper(zsh=False)
    g.feed(line(b"old", start=1))
    g.feed(line(b"other", pid=11))
    assert g.feed(prompt(0, start=2)) is None
    assert g.feed(prompt(4, pid=11)).text == "other"
    assert g.close((10, 1), None).text == "old"


def test_zsh_lines_unmetafied_and_aborted_dropped():
    g = CommandGrouper(zsh=True)
    g.feed(line(b"echo P\xc5\x83\xb9\n"))           # zsh stores 0x99 as Meta, 0x99 ^ 0x20
    assert g.feed(prompt(0)).text == "echo P\u0159"
    g.feed(line(b"half typed"))                      # Ctrl-C: zleread returns no "\n" line
    assert g.feed(prompt(130)) is None


def test_unmetafy_and_tty_names():
    assert unmetafy(b"a\x83\x20b") == b"a\x00b"
    assert unmetafy(b"plain \xc3\xa9") == b"plain \xc3\xa9"
    assert tty_name(b"pts12\0junk") == "pts/12"
    assert tty_name(b"tty1") == "tty1" and tty_name(b"") == ""
