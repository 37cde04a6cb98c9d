"""The commands: each module adds its subparsers (add_parsers) and runs from args.func. The CLI
imports this package, never the other way round."""
from __future__ import annotations


def add_parsers(sub) -> None:
    from . import bench, capture, detect, doctor, shell
    capture.add_parsers(sub)
    doctor.add_parsers(sub)
    bench.add_parsers(sub)
    detect.add_parsers(sub)
    shell.add_parsers(sub)
