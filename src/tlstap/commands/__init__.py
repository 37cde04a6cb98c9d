"""The commands: each module adds its subparsers (add_parsers) and runs from args.func. The CLI
imports this package, never the other way round."""
from __future__ import annotations


def add_parsers(sub) -> None:
    from . import bench, capture, doctor
    capture.add_parsers(sub)
    doctor.add_parsers(sub)
    bench.add_parsers(sub)
    from . import db
    db.add_parsers(sub)
