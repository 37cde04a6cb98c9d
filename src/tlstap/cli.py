"""Command line: eCapture's subcommands and flags, with tlstap's additions.

    tlstap tls [--pid PID] [--uid UID] [--libssl PATH] [-m text] [--format text|json] [-o FILE]
    tlstap tls -m keylog [-k FILE] [--pid PID] ...
    tlstap tls -o out.txt -k keys.log -i lo -w cap.pcapng     outputs combine

The commands live in commands/ and add their own subparsers; this module only parses and
turns errors into one line and an exit code.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import LoadError, TlstapError


def build_parser() -> argparse.ArgumentParser:
    from .commands import add_parsers
    ap = argparse.ArgumentParser(prog="tlstap", description="Capture TLS plaintext from running processes with eBPF.")
    ap.add_argument("--version", action="version", version=f"tlstap {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except LoadError as e:
        print(f"tlstap: {e}", file=sys.stderr)
        if e.log and os.environ.get("TLSTAP_DEBUG"):
            print(e.log, file=sys.stderr)
        return e.exit_code
    except TlstapError as e:
        print(f"tlstap: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
