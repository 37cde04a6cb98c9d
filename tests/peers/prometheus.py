"""The real Prometheus server (Debian's `prometheus` package) scraping targets on loopback.

    with Prometheus(["127.0.0.1:9464"], tmp_path) as prom:
        prom.wait_scrapes(2)                      # two scrapes of every target after now
        prom.query('sum(http_server_request_duration_seconds_count)')

It runs on a free loopback port with a private TSDB directory, scrapes every `interval`, and
is stopped (and its directory removed) on leaving the block. Waits are bounded; the scrape
itself is the sync point: wait_scrapes() returns once every target has been scraped
(successfully) after the call, so what a query sees is at least what the targets showed then.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

from ._common import free_port, stop_process, tail, wait_for

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def have_prometheus() -> bool:
    return Path(PROMETHEUS).exists()


def _epoch(rfc3339: str) -> float:
    """Prometheus's RFC 3339 times (nanoseconds, "Z" or an offset) -> seconds since the epoch."""
    m = re.fullmatch(r"(.{19})(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", rfc3339)
    if not m:
        return 0.0
    base = datetime.fromisoformat(m.group(1) + (m.group(3) if m.group(3) != "Z" else "+00:00"))
    return base.timestamp() + float("0." + (m.group(2) or "0"))


class Prometheus:
    def __init__(self, targets: list[str], tmp_dir=None, interval: str = "1s", start_timeout: float = 30):
        self.targets, self.interval, self.start_timeout = list(targets), interval, start_timeout
        self.tmp_dir = tmp_dir
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def __enter__(self) -> "Prometheus":
        self._tmp = tempfile.TemporaryDirectory(prefix="prometheus-", dir=self.tmp_dir)
        d = Path(self._tmp.name)
        (d / "prometheus.yml").write_text(json.dumps({        # YAML is a superset of JSON
            "global": {"scrape_interval": self.interval, "scrape_timeout": self.interval,
                       "evaluation_interval": self.interval},
            "scrape_configs": [{"job_name": "tlstap", "static_configs": [{"targets": self.targets}]}]}))
        self._err = d / "stderr"
        try:
            for _ in range(5):              # free_port is racy: retry on a lost race
                self.port = free_port()
                if self._start(d):
                    return self
            raise RuntimeError(f"prometheus did not start\n{tail(self._err)}")
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _start(self, d: Path) -> bool:
        with open(self._err, "ab") as err:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)

        def ready():
            if self.proc.poll() is not None:
                return "exited"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    return r.status == 200 and "up"
            except OSError:
                return False
        if wait_for(ready, self.start_timeout, "prometheus to be ready", interval=0.1) == "up":
            return True
        self.proc = None
        return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _get(self, path: str, **params) -> dict:
        q = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{q}", timeout=10) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """An instant query's result: [{"metric": {labels}, "value": [ts, "text"]}, ...]."""
        return self._get("/api/v1/query", query=promql)["result"]

    def value(self, promql: str) -> float | None:
        """The single value of a query that gives one series (None: no series)."""
        r = self.query(promql)
        if not r:
            return None
        assert len(r) == 1, f"{promql} gave {len(r)} series: {r}"
        return float(r[0]["value"][1])

    def series(self, match: str) -> list[dict]:
        """The label sets of the series `match` selects (their values not included)."""
        return self._get("/api/v1/series", **{"match[]": match})

    def targets_state(self) -> list[dict]:
        return self._get("/api/v1/targets")["activeTargets"]

    def wait_scrapes(self, n: int = 1, timeout: float = 20) -> None:
        """Until every target has been scraped successfully n times, each scrape begun after
        this call."""
        start = time.time()
        seen: dict[str, set[float]] = {t: set() for t in self.targets}

        def done():
            for t in self.targets_state():
                inst = t["labels"]["instance"]
                at = _epoch(t["lastScrape"])
                if inst in seen and t["health"] == "up" and at > start:
                    seen[inst].add(at)
            return all(len(v) >= n for v in seen.values())
        try:
            wait_for(done, timeout, f"{n} scrapes of {self.targets}", interval=0.1)
        except TimeoutError:
            raise AssertionError(f"no {n} successful scrapes of {self.targets} in {timeout}s: "
                                 f"{self.targets_state()}\n{tail(self._err)}") from None

    def __exit__(self, *exc) -> None:
        try:
            if self.proc is not None:
                stop_process(self.proc, timeout=10)
                self.proc = None
        finally:
            self._tmp.cleanup()
