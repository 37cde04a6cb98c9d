"""Sinks receive events; the capture loop owns them and calls flush()/close()."""
from __future__ import annotations

from typing import BinaryIO

from ..events import Lost, TlsData


class Sink:
    def __init__(self, out: BinaryIO):
        self.out = out

    def on_data(self, ev: TlsData) -> None:
        raise NotImplementedError

    def on_lost(self, ev: Lost) -> None:
        """Losses also go to stderr (the CLI does that); sinks may record them too."""

    def on_summary(self, counters: dict[str, int], line: str) -> None:
        """The last record: the capture's counters (names as in abi.Counter, lower case)."""

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        self.out.flush()
        if self.out.fileno() > 2:
            self.out.close()
