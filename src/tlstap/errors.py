"""The few exception types tlstap raises. Each message is one line a user can act on."""
from __future__ import annotations


class TlstapError(Exception):
    """Base class: the CLI prints str(exc) on one line and exits non-zero."""

    exit_code = 1


class UsageError(TlstapError):
    """Bad flags or arguments."""

    exit_code = 2


class EnvironmentProblem(TlstapError):
    """The host cannot run tlstap as asked (privileges, BTF, mounts)."""

    exit_code = 3


class AttachError(TlstapError):
    """A probe could not be attached."""

    exit_code = 4


class LoadError(TlstapError):
    """The kernel refused a BPF object; .log holds libbpf's full output."""

    exit_code = 4

    def __init__(self, msg: str, log: str = ""):
        super().__init__(msg)
        self.log = log
