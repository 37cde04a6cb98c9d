"""`tlstap bench`: its parsers and report on fixed input, then short real runs.

The real runs start the command as a subprocess (private nginx, wrk, tlstap on loopback)
and check what it produced and what it left behind; they assert no timing, only that the
numbers are sane (RPS > 0, positive ratios), so they run in CI like every kernel test.
About 100 s in all.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.conftest import needs
from tlstap.commands import bench, bench_report
from tlstap.errors import UsageError

from .tap import tlstap_exe

# ---- fixed input --------------------------------------------------------------------------

TEXT_ERR = """\
tlstap: attached /proc/5027/root/usr/lib/x86_64-linux-gnu/libssl.so.3 (OpenSSL 3.0.19): internal probes on x
tlstap: ready in 0.15s: 8 probes, pid 5027, ring buffer 8192 KiB, max payload 1048576 bytes per call; Ctrl-C to stop
tlstap: lost 10228 records (117200915 bytes): ring buffer full; raise --mapsize
tlstap: interrupted: 345258 calls, 321984 records, 3516904133 bytes captured; truncated 2 calls (9 bytes over \
--max-payload); lost 23274 records (271496815 bytes)
"""
KEYLOG_ERR = """\
tlstap: ready in 0.07s: 2 probes, pid 5027; key log lines go to /x.keylog; Ctrl-C to stop
tlstap: interrupted: 80 key log lines written (0 duplicates skipped), 0 key updates (0 on connections whose \
handshake was not seen); lost 1 events, 2 unreadable
"""
PCAPNG_ERR = """\
tlstap: ready in 0.17s: 9 probes, pid 5027; packets of lo (no filter) and secrets go to /x.pcapng; Ctrl-C to stop
tlstap: process 5027 exited: 627197 packets (469027138 bytes) and 80 TLS secrets written; 0 packets left out by \
the filter or scope, 3 cut at the snap length; lost 4 packets, 5 key events
"""
EXPORT_ERR = TEXT_ERR + """\
tlstap: export: 131797 events to nats://127.0.0.1:4222/tlstap.bench: 131790 acknowledged (2 duplicates \
ignored); 7 dropped (queue full 5, shutdown 2); exporter CPU 3.32s (25.19 ms per 1000 events)
"""
WRK_OUT = """\
Running 2s test @ https://127.0.0.1:8443/1k
  1 threads and 16 connections
  Latency Distribution
     50%  205.00us
     99%  579.00us
  592133 requests in 8.10s, 721.69MB read
Requests/sec:  73102.97
Transfer/sec:     89.10MB
TLSTAP_BENCH requests=592133 duration_us=8100000 bytes=756760000 errors=3 status_errors=1 p50=205.0 p90=243.0 \
p99=579.0 p999=2410.5 max=12000.0
"""


def test_parse_summary_lines():
    t = bench.parse_summary("text", TEXT_ERR)
    assert (t["events"], t["event_bytes"], t["truncated"], t["lost"]) == (321984, 3516904133, 2, 23274)
    assert t["summary_line"].startswith("tlstap: interrupted: 345258 calls")
    assert bench.parse_summary("raw", TEXT_ERR)["lost"] == 23274
    k = bench.parse_summary("keylog", KEYLOG_ERR)
    assert (k["events"], k["lost"]) == (80, 3)
    p = bench.parse_summary("pcapng", PCAPNG_ERR)
    assert (p["events"], p["event_bytes"], p["truncated"], p["lost"]) == (627197, 469027138, 3, 9)
    # killed before its summary: unknown, not zero
    assert bench.parse_summary("text", TEXT_ERR.rsplit("tlstap: interrupted", 1)[0])["lost"] is None
    # --compare commands: only their loss reports
    assert bench.parse_summary("bpftrace", "Attaching 4 probes...\nLost 12 events\nLost 3 events\n")["lost"] == 15
    assert bench.parse_summary("bpftrace", "Attaching 4 probes...\n")["lost"] is None


def test_parse_export_line():
    e = bench.parse_export(EXPORT_ERR)
    assert (e["export_events"], e["export_acked"], e["export_dups"], e["export_dropped"]) == (131797, 131790, 2, 7)
    assert e["export_drop_reasons"] == "queue full 5, shutdown 2"
    assert (e["export_cpu_s"], e["export_ms_per_1k"]) == (3.32, 25.19)
    # no exporter line (killed, or not exporting): unknown, not zero
    assert set(bench.parse_export(TEXT_ERR).values()) == {None}
    assert bench.parse_summary("text-export", EXPORT_ERR)["events"] == 321984      # the capture's own line
    assert bench.count_samples("# HELP x y\n# TYPE x counter\nx 1\ny{a=\"b\"} 2\n\n") == 2


def test_parse_wrk():
    w = bench.parse_wrk(WRK_OUT)
    assert w["rps"] == pytest.approx(73102.97)
    assert (w["requests"], w["errors"], w["status_errors"]) == (592133, 3, 1)
    assert (w["p50_us"], w["p90_us"], w["p99_us"], w["p999_us"]) == (205.0, 243.0, 579.0, 2410.5)
    assert bench.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n").get("rps") is None


def test_parse_sizes_and_configs():
    assert bench.parse_sizes("1k, 64K,1m,1k") == [("1k", 1024), ("64k", 65536), ("1m", 1 << 20)]
    for bad in ("", "x", "0", "2g"):
        with pytest.raises(UsageError):
            bench.parse_sizes(bad)
    cfgs = bench.build_configs("base,keylog,base", ["bpftrace -e 'x'", "bpftrace -e 'y'", "sh -c 'z'"])
    assert [c.name for c in cfgs] == ["base", "keylog", "bpftrace", "bpftrace2", "sh"]
    assert cfgs[1].argv(["T"], 42, "/w/o.keylog") == ["T", "tls", "-m", "keylog", "--pid", "42", "-k", "/w/o.keylog"]
    assert cfgs[2].argv(["T"], 42, "/w/o") == ["/bin/sh", "-c", "bpftrace -e 'x'"]
    assert bench.build_configs("", ["cat {pid} > {out}"])[0].argv([], 7, "/w/a b")[-1] == "cat 7 > '/w/a b'"
    (probes,) = bench.build_configs("probes", [])
    assert probes.argv(["T"], 9, "/w/o")[-1].endswith("-m tlstap.probes.floor --pid 9 --module tls")
    (raw,) = bench.build_configs("raw", [], module="gnutls")        # --module: another capture subcommand
    assert raw.argv(["T"], 5, "/w/o") == ["T", "gnutls", "--pid", "5", "--raw", "-o", "/w/o"]
    exp, met = bench.build_configs("text-export,text-metrics", [], spool_max="2G")
    assert exp.exports and not exp.serves_metrics and met.serves_metrics and not met.exports
    assert exp.argv(["T"], 5, "/w/o", {"nats_port": 4222}) == \
        ["T", "tls", "--pid", "5", "-o", "/w/o", "--export", "nats://127.0.0.1:4222/tlstap.bench", "--spool-max", "2G"]
    assert met.argv(["T"], 5, "/w/o", {"metrics_port": 9464})[-3:] == ["127.0.0.1:9464", "--spool-max", "2G"]
    with pytest.raises(UsageError, match="unknown configuration 'txt'"):
        bench.build_configs("base,txt", [])


def _run(rnd, size, config, rps, p99=1000.0, lost=0, error=None):
    return {"round": rnd, "size": size, "config": config, "rps": rps, "requests": int(rps * 8), "p50_us": p99 / 3,
            "p90_us": p99 / 2, "p99_us": p99, "p999_us": p99 * 2, "target_cpu_pct": 99.0,
            "tool_cpu_pct": None if config == "base" else 30.0, "tool_cpu_s": None if config == "base" else 2.0,
            "events": None if config == "base" else int(rps * 16), "lost": None if config == "base" else lost,
            "tool_rss_kib": None if config == "base" else 60000, "tool_startup_s": None if config == "base" else 0.5,
            "error": error}


def test_report_pair_and_export_bars():
    """text-export and text-metrics are held to within 0.02 of text's ratio, both shown; the
    exporter's dropped events and a missing exit line fail its bar."""
    runs = []
    for r, (b, t, e, m) in enumerate([(100, 70, 69, 60), (100, 72, 71, 62)], 1):
        runs += [_run(r, "1k", "base", b), _run(r, "1k", "text", t),
                 dict(_run(r, "1k", "text-export", e), export_events=1000, export_acked=1000, export_dropped=0,
                      export_ms_per_1k=20.0, stream_msgs=1000, nats_cpu_pct=3.0),
                 _run(r, "1k", "text-metrics", m)]
    runs += [_run(1, "64k", "base", 50), dict(_run(1, "64k", "text-export", 40), export_events=10,
                                               export_acked=8, export_dropped=2, export_ms_per_1k=30.0)]
    rows = bench_report.summarize(runs)
    bars = {b.bar: b for b in bench_report.bars(rows)}
    ok = bars["text-export within 0.02 of text at 1k (issue 18)"]
    assert ok.status == "MET" and ok.value == "text-export 0.70, text 0.71: -0.01"
    assert bars["text-metrics within 0.02 of text at 1k (our own bar)"].status == "NOT MET"
    assert bars["text-export within 0.02 of text at 64k (issue 18)"].status == "not measured"
    assert bars["export: nothing dropped"].status == "NOT MET" and "text-export@64k: 2" in bars["export: nothing dropped"].value
    text = bench_report.render_text(rows, list(bars.values()))
    assert "export text-export at 1k: 1,000 events, 1,000 acknowledged (1,000 in the stream), 0 dropped; " \
           "exporter CPU 20.00 ms per 1000 events" in text
    # a run without the exporter's line: unknown, so NOT MET
    runs[2]["export_events"] = runs[2]["export_dropped"] = None
    unknown = [b for b in bench_report.bars(bench_report.summarize(runs)) if b.bar == "export: nothing dropped"][0]
    assert unknown.status == "NOT MET" and "without the exporter's line" in unknown.value


def test_report_ratios_and_bars(tmp_path):
    runs = []
    for r, (b1, t1, k1, b64, t64, p64) in enumerate([(100, 70, 99, 50, 40, 41), (110, 66, 105, 40, 30, 30),
                                                     (90, 63, 88, 45, 36, 36)], 1):
        runs += [_run(r, "1k", "base", b1), _run(r, "1k", "text", t1), _run(r, "1k", "keylog", k1),
                 _run(r, "64k", "base", b64), _run(r, "64k", "text", t64, lost=5 if r == 2 else 0),
                 _run(r, "64k", "pcapng", p64)]
    runs.append(dict(_run(3, "64k", "keylog", 1, error="keylog exited (rc 3) before it was ready: no"), rps=None))
    rows = bench_report.summarize(runs)
    by = {(r["size"], r["config"]): r for r in rows}
    # median of the same-round ratios, not the ratio of medians
    assert by[("1k", "text")]["rps_ratio"] == pytest.approx(0.70)          # 0.70, 0.60, 0.70
    assert by[("1k", "text")]["rps_ratio_of_medians"] == pytest.approx(66 / 100)
    assert by[("1k", "keylog")]["rps_ratio"] == pytest.approx(0.978, abs=1e-3)
    assert by[("64k", "text")]["lost"] == 5
    assert by[("64k", "keylog")]["runs"] == 0 and by[("64k", "keylog")]["failed_runs"] == 1
    assert by[("1k", "base")]["rps_ratio"] == 1.0
    status = {b.bar: b.status for b in bench_report.bars(rows)}
    assert status == {"text >= 0.75 at 1k": "NOT MET", "text >= 0.85 at 64k": "NOT MET",
                      "text-wire >= 0.75 at 1k": "not measured", "text-wire >= 0.85 at 64k": "not measured",
                      "keylog >= 0.97 at 1k": "MET", "keylog >= 0.97 at 64k": "not measured",
                      "pcapng >= 0.80 at 64k": "MET", "zero lost events": "NOT MET"}
    text = bench_report.render_text(rows, bench_report.bars(rows))
    assert "NOT MET" in text and "not measured" in text
    md = bench_report.render_markdown({"args": {}, "commands": {"text": "tlstap tls --pid {pid} -o {out}"}},
                                      rows, bench_report.bars(rows), runs)
    assert "| 1k | text | 3 |" in md and "**NOT MET**" in md
    bench_report.write_plot(str(tmp_path / "p.png"), rows)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a run without a readable summary makes the lost bar NOT MET, never MET
    runs2 = [_run(1, "1k", "base", 100), _run(1, "1k", "keylog", 99, lost=None)]
    zero = [b for b in bench_report.bars(bench_report.summarize(runs2)) if b.bar == "zero lost events"][0]
    assert zero.status == "NOT MET" and "without a readable summary" in zero.value


# ---- the real command -------------------------------------------------------------------------

needs_load = needs(shutil.which("wrk") and shutil.which("nginx") and os.geteuid() == 0, "needs wrk, nginx and root")


def bench_cmd() -> list[str]:
    """`tlstap bench` once the CLI has the subcommand; the module's own entry point before."""
    exe = tlstap_exe()
    if exe and subprocess.run([exe, "bench", "--help"], capture_output=True).returncode == 0:
        return [exe, "bench"]
    return [sys.executable, "-m", "tlstap.cli", "bench"]


def leftovers(marker: str = "tlstap-bench-") -> list[str]:
    """Processes of any bench run: their command lines name the private directory (marker: a
    test's own --workdir, where other benches may run on this machine at the same time)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "tlstap-bench-" in cmd and marker in cmd:
                out.append(f"{d}: {cmd}")
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode not in (0, None), r
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("tlstap: ") and needle in lines[0], lines[0]


@needs_load
def test_short_run(tmp_path):
    js, md, png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    r = subprocess.run(bench_cmd() + ["--duration", "2", "--rounds", "1", "--sizes", "1k", "--configs", "base,keylog,probes",
                                      "--warmup", "1", "--json", str(js), "--markdown", str(md), "--plot", str(png)],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    doc = json.loads(js.read_text())
    runs = {x["config"]: x for x in doc["runs"]}
    assert set(runs) == {"base", "keylog", "probes"}   # probes: empty programs, seen by bpftool
    for x in runs.values():
        assert x["error"] is None, x
        assert x["rps"] > 0 and x["requests"] > 0
        assert 0 < x["p50_us"] <= x["p99_us"] <= x["p999_us"]
        assert x["target_cpu_pct"] > 0
    k = runs["keylog"]
    assert k["tool_startup_s"] > 0 and k["tool_ready_s"] is not None and k["tool_rss_kib"] > 1000
    assert k["lost"] == 0 and k["events"] >= 1   # wrk's 16 handshakes log secrets
    assert k["summary_line"] and k["stop"] == "INT"
    row = {x["config"]: x for x in doc["summary"]}["keylog"]
    # a ratio, not a performance assertion: a 2 s round on a loaded CI box can land anywhere
    assert row["rps_ratio"] > 0 and row["rps_ratio"] == row["rps_ratio"]
    assert doc["meta"]["wrk_private_ssl"] is True and doc["meta"]["complete"] is True
    assert {b["bar"] for b in doc["bars"]} >= {"keylog >= 0.97 at 1k", "zero lost events"}
    assert "| 1k | keylog |" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "keylog" in r.stdout and "bar " in r.stdout
    # nothing left behind: not nginx, wrk or tlstap, nor the work directory
    assert not [p for p in doc["meta"]["started_pids"] if alive(p)]
    assert not leftovers()


def nats_servers(workdir: str) -> list[int]:
    """nats-server processes of benches run in workdir."""
    out = []
    for d in (x for x in os.listdir("/proc") if x.isdigit()):
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) == b"nats-server" and any(os.fsencode(workdir) + b"/tlstap-bench-" in a
                                                             for a in argv):
            out.append(int(d))
    return out


@needs_load
@needs(shutil.which("nats-server"), "nats-server (apt-get install nats-server)")
def test_export_run(tmp_path):
    """text and text-export in one short run: the bench's own nats-server comes and goes (at
    idle priority, seen while it runs), and the exporter's line at exit is in the JSON report."""
    js = tmp_path / "b.json"
    work = tempfile.mkdtemp(prefix="bench-test-")   # nginx's worker (nobody) must reach it
    os.chmod(work, 0o755)
    p = subprocess.Popen(bench_cmd() + ["--duration", "2", "--rounds", "1", "--sizes", "1k", "--configs",
                                        "base,text,text-export", "--warmup", "0", "--workdir", work,
                                        "--json", str(js)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = None
    try:
        deadline = time.monotonic() + 60
        while seen is None and p.poll() is None and time.monotonic() < deadline:
            pids = nats_servers(work)
            if pids:
                seen = (pids[0], os.sched_getscheduler(pids[0]), os.getpriority(os.PRIO_PROCESS, pids[0]))
            time.sleep(0.05)
        out, err = p.communicate(timeout=400)     # text configurations decode their backlog at exit
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            p.communicate(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    assert p.returncode == 0, err[-3000:]
    assert seen, "the bench never ran a nats-server"
    assert seen[1] == os.SCHED_IDLE and seen[2] == 19
    doc = json.loads(js.read_text())
    nats = doc["meta"]["nats"]
    assert nats["pid"] == seen[0] and nats["pid"] in doc["meta"]["started_pids"] and not alive(nats["pid"])
    runs = {r["config"]: r for r in doc["runs"]}
    e = runs["text-export"]
    assert e["error"] is None, e
    assert e["export_events"] > 0 and e["export_acked"] == e["export_events"] == e["stream_msgs"]
    assert e["export_dropped"] == 0 and e["export_ms_per_1k"] is not None and e["export_cpu_s"] is not None
    assert runs["text"]["export_events"] is None            # only the exporting configuration has them
    row = {r["config"]: r for r in doc["summary"]}["text-export"]
    assert row["export_events"] == e["export_events"] and row["export_ms_per_1k"] == e["export_ms_per_1k"]
    bars = {b["bar"]: b for b in doc["bars"]}
    assert bars["text-export within 0.02 of text at 1k (issue 18)"]["status"] in ("MET", "NOT MET")
    assert bars["export: nothing dropped"]["status"] == "MET"
    assert "export text-export at 1k:" in out
    assert not nats_servers(work) and not leftovers(work)


@needs_load
def test_missing_nats_server_is_one_line(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("wrk", "nginx"):
        os.symlink(shutil.which(tool), bindir / tool)
    env = dict(os.environ, PATH=str(bindir))     # wrk and nginx, but no nats-server
    r = subprocess.run(bench_cmd() + ["--configs", "base,text-export", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=30, env=env)
    one_line_error(r, "nats-server not found (apt-get install nats-server)")
    assert not leftovers(str(tmp_path)) and os.listdir(tmp_path) == ["bin"]    # refused before anything started


def _start_bench(configs: str, duration: int):
    """A one-round 1k bench of `configs` in the background: (its work directory, the process)."""
    work = tempfile.mkdtemp(prefix="bench-test-")   # nginx's worker (nobody) must reach it: not under tmp_path
    os.chmod(work, 0o755)
    p = subprocess.Popen(bench_cmd() + ["--duration", str(duration), "--rounds", "1", "--sizes", "1k",
                                        "--configs", configs, "--warmup", "0", "--workdir", work],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return work, p


@needs_load
def test_interrupt_stops_everything(tmp_path):
    work, p = _start_bench("keylog", 5)
    try:
        deadline = time.monotonic() + 30
        while not any(" wrk " in l or "/wrk " in l for l in leftovers()):   # the tool is ready, wrk is loading
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "the bench never started wrk"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=40)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        left = os.listdir(work)
        shutil.rmtree(work, ignore_errors=True)
    assert p.returncode == 130, err
    assert "interrupted" in err
    assert not leftovers()
    assert not left   # the private directory is gone


@needs_load
def test_bad_input_is_one_line(tmp_path):
    me = str(os.getpid())
    one_line_error(subprocess.run(bench_cmd() + ["--url", "https://127.0.0.1:1/x", "--pid", me],
                                  capture_output=True, text=True, timeout=30), "--url https://127.0.0.1:1/x")
    one_line_error(subprocess.run(bench_cmd() + ["--url", "https://10.255.255.1/", "--pid", me],
                                  capture_output=True, text=True, timeout=30), "not a loopback address")
    one_line_error(subprocess.run(bench_cmd() + ["--url", "http://127.0.0.1/", "--pid", me],
                                  capture_output=True, text=True, timeout=30), "https")
    one_line_error(subprocess.run(bench_cmd() + ["--url", "https://127.0.0.1/"], capture_output=True, text=True,
                                  timeout=30), "--url and --pid go together")
    one_line_error(subprocess.run(bench_cmd() + ["--configs", "base,txt"], capture_output=True, text=True,
                                  timeout=30), "unknown configuration")
    one_line_error(subprocess.run(bench_cmd() + ["--json", str(tmp_path / "no" / "b.json")], capture_output=True,
                                  text=True, timeout=30), "not writable")
    one_line_error(subprocess.run(bench_cmd() + ["--configs", "base", "--workdir", str(tmp_path)],   # 0700 parent
                                  capture_output=True, text=True, timeout=30), "cannot enter")
    env = dict(os.environ, PATH=str(tmp_path))   # no wrk on PATH
    one_line_error(subprocess.run(bench_cmd() + ["--configs", "base"], capture_output=True, text=True, timeout=30,
                                  env=env), "wrk not found")
    assert not leftovers()


@needs_load
def test_processes_placed_as_in_the_kit(tmp_path):
    """The kit starts the tool and wrk as background jobs of its script: one session, hence one
    autogroup, while nginx (a daemon) has its own; nginx's worker on the first CPU, wrk on the
    second, the tool and its decoder unpinned; the tool's own scheduling class (SCHED_BATCH)
    untouched. Spawned in sessions of their own, the tool and its SCHED_IDLE decoder formed an
    autogroup that the scheduler weighed like nginx's: text mode took half of nginx's CPU.

    Checked on what the bench read of its processes while wrk loaded nginx (its JSON's
    placement), by pid. A process of the root autogroup (a session no setsid ever started: CI's
    tests run in one) has an empty /proc/PID/autogroup; this test's own /proc scan once took
    that for a process gone, and so never saw the bench's wrk or tool in CI."""
    js = tmp_path / "b.json"
    p = subprocess.Popen(bench_cmd() + ["--duration", "2", "--rounds", "1", "--sizes", "1k", "--configs", "text",
                                        "--warmup", "0", "--json", str(js)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        err = p.communicate(timeout=300)[1]
    finally:
        if p.poll() is None:          # Ctrl-C first: a killed bench would leave its nginx
            p.send_signal(signal.SIGINT)
            p.communicate(timeout=60)
    assert p.returncode == 0, err
    (run,) = [x for x in json.loads(js.read_text())["runs"] if x["config"] == "text"]
    where = run["placement"]
    me, n, w, t = (where[k] for k in ("bench", "target", "wrk", "tool"))
    assert me and n and w and t, where
    assert (me["pid"], n["comm"], w["comm"]) == (p.pid, "nginx", "wrk"), where   # wrk itself, not taskset
    assert w["ppid"] == t["ppid"] == me["pid"], where
    (d,) = [x for x in where["tool_family"] if x["ppid"] == t["pid"]]    # the decoder
    assert t["sid"] == w["sid"] == me["sid"] != n["sid"], where
    assert t["autogroup"] == w["autogroup"] == me["autogroup"], where
    if n["autogroup"] is not None:
        assert n["autogroup"] != t["autogroup"], where
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        assert n["cpus"] == [cpus[0]] and w["cpus"] == [cpus[1]], where
    # the tool's own choices stay its own: capture SCHED_BATCH, decoder wherever tlstap puts it, unpinned
    assert t["cpus"] == d["cpus"] == cpus, where
    assert t["policy"] == "SCHED_BATCH" and d["policy"] in ("SCHED_IDLE", "SCHED_OTHER"), where
    assert not leftovers()


@needs_load
def test_a_child_that_left_the_group_is_counted_and_stopped():
    """A tool's child in a session of its own (how a process gets an autogroup of its own) is
    outside the process group the bench signals: it is still found (by its parent) and stopped."""
    marker = f"{os.getpid() % 1000}.{time.monotonic_ns() % 1000:03d}7"
    cmd = (f"setsid sleep {marker} & exec {shlex.quote(sys.executable)} -m tlstap.probes.floor --pid {{pid}} "
           f"--module tls")
    r = subprocess.run(bench_cmd() + ["--duration", "2", "--rounds", "1", "--sizes", "1k", "--configs", "base",
                                      "--warmup", "0", "--compare", cmd], capture_output=True, text=True, timeout=120)
    left = []
    for d in (x for x in os.listdir("/proc") if x.isdigit()):
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if f.read().split(b"\0")[:2] == [b"sleep", marker.encode()]:
                    left.append(int(d))
        except OSError:
            pass
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert r.returncode == 0, r.stderr
    assert not left, "the setsid child outlived the bench"
    assert not leftovers()
