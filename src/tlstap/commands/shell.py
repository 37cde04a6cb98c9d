"""`tlstap bash` and `tlstap zsh` (eCapture's audit modules): each command line users enter
at an interactive shell, with pid, uid, tty and its exit status ($?)."""
from __future__ import annotations

import argparse
import os

from ..errors import UsageError

EPILOG = """examples:
  tlstap {shell}                          every interactive {shell} on the host
  tlstap {shell} --pid 1234 --format json -o cmds.jsonl
  tlstap {shell} --errnumber 127          only commands that were not found ($? 127)
  tlstap {shell} --uid 1000
A command is written when it ends (the shell's next prompt); one still running when the shell
exits or tlstap stops is written with no status.
"""

SHELLS = ("bash", "zsh")


def add_parsers(sub) -> None:
    for shell in SHELLS:
        p = sub.add_parser(shell, help=f"audit: the command lines entered at interactive {shell} shells, "
                                       f"with tty and exit status",
                           epilog=EPILOG.format(shell=shell), formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument(f"--{shell}", dest="shell_path", metavar="PATH",
                       help=f"the {shell} executable (default: the one --pid runs, else `which {shell}`)")
        p.add_argument("-e", "--errnumber", type=int, metavar="N",
                       help="only commands whose exit status ($?) is N, 0-255 (default: every command; "
                            "unlike eCapture's default of 128, 128 here means status 128)")
        g = p.add_argument_group("scope (applied in the kernel)")
        g.add_argument("-p", "--pid", type=int, help=f"only this {shell} process (probes are installed in it alone)")
        g.add_argument("-u", "--uid", type=int, help="only shells of this user id")
        g = p.add_argument_group("output")
        g.add_argument("--format", choices=("text", "json"), default="text",
                       help="text: one line per command; json: one object per line, then a summary")
        g.add_argument("-o", "--output", metavar="FILE", default="-",
                       help="write here (created 0600; default stdout)")
        p.set_defaults(func=lambda a, shell=shell: run(shell, a))


def run(shell: str, args) -> int:
    """Check the flags, find the probes in the shell binary, then capture (runner.py)."""
    from .. import preflight, runner
    from ..audit.output import AuditOutput
    from ..audit.shell import ShellCapture, shell_path
    from ..sources.base import CaptureConfig
    if args.pid is not None and (args.pid <= 0 or not os.path.exists(f"/proc/{args.pid}")):
        raise UsageError(f"--pid {args.pid}: no such process")
    if args.uid is not None and not 0 <= args.uid < 0xFFFFFFFF:
        raise UsageError(f"--uid {args.uid}: not a user id")
    if args.errnumber is not None and not 0 <= args.errnumber <= 255:
        raise UsageError(f"--errnumber {args.errnumber}: an exit status is 0 to 255")
    cfg = CaptureConfig(pid=args.pid, uid=args.uid)
    source = ShellCapture(cfg, shell, shell_path(shell, args.shell_path, args.pid), args.errnumber)
    source.resolve()
    preflight.check_all()
    scope = f"pid {cfg.pid}" if cfg.pid else "all processes"
    if cfg.uid is not None:
        scope += f", uid {cfg.uid}"
    return runner.run([source], [lambda: AuditOutput(source, args.output, args.format, runner.status)],
                      cfg.pid, scope)
