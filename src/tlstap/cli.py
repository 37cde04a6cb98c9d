"""Command line: eCapture's subcommands and flags, with tlstap's additions.

    tlstap tls [--pid PID] [--uid UID] [--libssl PATH] [-m text] [--format text|json] [-o FILE]
    tlstap tls -m keylog [-k FILE] [--pid PID] ...
"""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import time

from . import __version__
from .errors import LoadError, TlstapError, UsageError
from .sizes import DEFAULT_SPOOL_MAX, RING_MAX, format_size, next_pow2, parse_size

EPILOG_TLS = """examples:
  tlstap tls                                  every process using the system libssl
  tlstap tls --pid 1234 --format json -o cap.jsonl
  tlstap tls --libssl /usr/bin/node           a statically linked binary
  tlstap tls --uid 33 --hex
  tlstap tls -m keylog -k keys.log            TLS secrets (NSS key log) of every handshake
"""

MODES = ("text", "keylog", "key", "pcap", "pcapng")
DEFAULT_KEYLOG = "tlstap_masterkey.log"
DEFAULT_PCAPNG = "tlstap.pcapng"
MAX_PAYLOAD_DEFAULT = "1M"


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scope (applied in the kernel)")
    g.add_argument("-p", "--pid", type=int, help="only this process (probes are installed in it alone)")
    g.add_argument("-u", "--uid", type=int, help="only processes of this user id")
    g.add_argument("--cgroup", "--cgroup_path", dest="cgroup", metavar="PATH",
                   help="only processes in this cgroup v2 directory")
    g = p.add_argument_group("output")
    g.add_argument("-m", "--model", "--mode", dest="mode", choices=MODES, default="text",
                   help="text (default), keylog, pcapng")
    g.add_argument("--format", choices=("text", "json"), default="text",
                   help="text: header line + plaintext; json: one object per line (README: JSON output)")
    g.add_argument("-o", "--output", metavar="FILE", default="-", help="write records here (created 0600)")
    g.add_argument("--hex", action="store_true", help="hexdump every payload")
    g.add_argument("--raw", action="store_true",
                   help="text/json: one record per SSL call, no HTTP decoding (the cheapest path)")
    g.add_argument("--max-body", default="64K", metavar="SIZE",
                   help="HTTP: body bytes kept and shown per message (default 64K)")
    g.add_argument("--headers-only", action="store_true", help="HTTP: show no bodies")
    g.add_argument("--reorder-lag", "--perf-reorder-lag-ms", dest="reorder_lag", type=float, default=100,
                   metavar="MS", help="hold calls this long to put the CPUs' events in kernel-time order "
                                      "before decoding (default 100)")
    g = p.add_argument_group("transport")
    g.add_argument("--mapsize", metavar="SIZE",
                   help="ring buffer size, rounded up to a power of two; a bare number is KiB "
                        f"like eCapture's (default 8M; 64M with -m pcapng; at most {format_size(RING_MAX)}, "
                        f"the kernel's largest)")
    g.add_argument("--max-payload", default=MAX_PAYLOAD_DEFAULT, metavar="SIZE",
                   help="bytes captured per read/write call; the rest is reported as truncated (default 1M)")
    g.add_argument("--spool-max", default=DEFAULT_SPOOL_MAX, metavar="SIZE",
                   help="text/json: most captured bytes waiting for the decoder process, which runs at "
                        "idle priority so that a busy host's CPU goes to its services first; beyond this "
                        f"records are dropped and counted (default {DEFAULT_SPOOL_MAX}; README: Decoding off the hot path)")
    g.add_argument("--spool-dir", metavar="DIR",
                   help="where the (unlinked, 0600) spool file lives (default $TMPDIR or /tmp)")
    g.add_argument("-k", "--keylogfile", metavar="FILE",
                   help=f"-m keylog: append NSS key log lines here (created 0600; '-' for stdout; "
                        f"default {DEFAULT_KEYLOG})")
    g.add_argument("-w", "--pcapfile", metavar="FILE",
                   help=f"-m pcapng: write packets and TLS secrets here (created 0600; default {DEFAULT_PCAPNG})")
    g.add_argument("-i", "--ifname", metavar="IFACE", help="-m pcapng: the interface to capture on (required)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tlstap", description="Capture TLS plaintext from running processes with eBPF.")
    ap.add_argument("--version", action="version", version=f"tlstap {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    tls = sub.add_parser("tls", aliases=["openssl"],
                         help=f"OpenSSL (shared libssl or static binaries): {modes_text('tls')}",
                         epilog=EPILOG_TLS, formatter_class=argparse.RawDescriptionHelpFormatter)
    tls.add_argument("--libssl", action="append", metavar="PATH", default=[],
                     help="libssl.so or a static executable exporting SSL_* (repeatable); "
                          "default: the process's own (--pid) or the system's (ld.so cache)")
    _add_common(tls)
    tls.add_argument("filter", nargs="*", metavar="FILTER",
                     help="-m pcapng: tcpdump-style packet filter applied in the kernel, e.g. tcp port 443 "
                          "(README: supported subset)")
    tls.set_defaults(func=run_tls)
    gn = sub.add_parser("gnutls", help=f"GnuTLS (libgnutls.so.30): {modes_text('gnutls')}",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    gn.add_argument("--gnutls", dest="libssl", action="append", metavar="PATH", default=[],
                    help="libgnutls.so* or an executable exporting gnutls_record_send (repeatable); "
                         "default: the process's own (--pid) or the system's (ld.so cache)")
    _add_common(gn)
    gn.add_argument("filter", nargs="*", metavar="FILTER", help="-m pcapng: as for tlstap tls")
    gn.set_defaults(func=run_gnutls)
    ns = sub.add_parser("nss", help=f"NSS/NSPR (libnspr4.so): {modes_text('nss')}",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ns.add_argument("--nspr", dest="libssl", action="append", metavar="PATH", default=[],
                    help="libnspr4.so, or any library or executable exporting PR_Read and PR_Write (Firefox "
                         "folds NSPR into its libnss3.so) (repeatable); "
                         "default: the process's own (--pid) or the system's (ld.so cache)")
    _add_common(ns)
    ns.set_defaults(func=run_nss, filter=[])
    go = sub.add_parser("gotls", help=f"Go crypto/tls executables (1.17+): {modes_text('gotls')}",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    go.add_argument("--elfpath", "-e", dest="libssl", action="append", metavar="PATH", default=[],
                    help="the Go executable (stripped and PIE builds too); default with --pid: the "
                         "process's own (/proc/PID/exe)")
    _add_common(go)
    go.add_argument("filter", nargs="*", metavar="FILTER", help="-m pcapng: as for tlstap tls")
    go.set_defaults(func=run_gotls)
    from .commands.bench import add_bench_parser
    from .commands.doctor import add_doctor_parser
    add_doctor_parser(sub)
    add_bench_parser(sub)
    return ap


def _status(msg: str) -> None:
    print(f"tlstap: {msg}", file=sys.stderr, flush=True)


def _check_pid(pid: int) -> None:
    if pid <= 0 or not os.path.exists(f"/proc/{pid}"):
        raise UsageError(f"--pid {pid}: no such process")


def _cgroup_id(path: str) -> int:
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "cgroup.procs")):
        raise UsageError(f"--cgroup {path}: not a cgroup v2 directory")
    return os.stat(path).st_ino   # a cgroup v2 id is its directory's inode number


def _capture_config(args, default_mapsize: str = "8M"):
    """Every flag the captures share, checked: errors name the flag."""
    from .sources.probe import CaptureConfig
    text = args.mapsize or default_mapsize
    asked = parse_size(text, "--mapsize", bare_unit=1024)
    if not asked:
        raise UsageError(f"--mapsize {text}: a ring buffer needs at least 4K (sizes are rounded up to a "
                         f"power of two)")
    mapsize = next_pow2(max(4096, asked))
    if mapsize > RING_MAX:
        rounded = f" (rounded up to a power of two: {format_size(mapsize)})" if mapsize != asked else ""
        raise UsageError(f"--mapsize {text}{rounded}: the kernel's largest BPF ring buffer is "
                         f"{format_size(RING_MAX)} (its size is a 32-bit power of two)")
    max_payload = parse_size(args.max_payload, "--max-payload")
    if not max_payload:
        raise UsageError(f"--max-payload {args.max_payload}: at least 1 byte per call")
    if args.pid is not None:
        _check_pid(args.pid)
    return CaptureConfig(pid=args.pid, uid=args.uid, max_payload=max_payload, mapsize=mapsize,
                         libssl=args.libssl, cgroup_id=_cgroup_id(args.cgroup) if args.cgroup else None)


def _check_payload_fits(args, cfg) -> None:
    """Text mode: one call's capture must fit in the ring buffer; the error names the flag given."""
    if cfg.max_payload < cfg.mapsize:
        return
    if args.mapsize and args.max_payload == MAX_PAYLOAD_DEFAULT:
        raise UsageError(f"--mapsize {args.mapsize}: smaller than one call's capture (--max-payload "
                         f"{args.max_payload}); raise it above {format_size(cfg.max_payload)} or lower --max-payload")
    raise UsageError(f"--max-payload {args.max_payload}: must be smaller than --mapsize "
                     f"({format_size(cfg.mapsize)}): one call must fit in the ring buffer")


def _scope(cfg) -> str:
    scope = f"pid {cfg.pid}" if cfg.pid else "all processes"
    if cfg.uid is not None:
        scope += f", uid {cfg.uid}"
    return scope


def _yield_to_the_workload() -> None:
    """SCHED_BATCH for this thread and the threads and processes it starts from here on:
    the same CPU share as before, but its wakeups (a ring buffer read every few ms) no longer
    preempt the traced server mid-slice. In the shared kit's 64 KiB pcapng runs (10 rounds
    interleaved) nginx kept ~3% more requests/s."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):     # not Linux, or a seccomp profile that forbids it
        pass


def _stop_flag() -> list:
    """SIGINT and SIGTERM end the capture loop cleanly (the list fills with the signal)."""
    stop = []
    def on_signal(signum, _frame):
        stop.append(signum)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


def _capture_loop(cap, cfg, stop: list, every_second, every_poll=None, step=None) -> str:
    """Poll (step(timeout), default cap.poll) until a signal, the --pid process exits or the
    output closes; why it ended."""
    last_tick = time.monotonic()
    step = step or cap.poll
    try:
        while not stop:
            step(0.05 if every_poll else 0.2)
            if every_poll:
                every_poll()
            now = time.monotonic()
            if now - last_tick >= 1.0:
                last_tick = now
                every_second()
                if cfg.pid and not os.path.exists(f"/proc/{cfg.pid}"):
                    return f"process {cfg.pid} exited"
    except BrokenPipeError:
        return "output closed"
    return "interrupted"


def _dispatch(command: str, args) -> int:
    modes = COMMANDS[command]
    mode = MODE_ALIASES.get(args.mode, args.mode)
    if mode not in modes:
        raise UsageError(f"tlstap {command}: only {', '.join('-m ' + m for m in modes)} in this version")
    if mode != "pcapng" and args.filter:
        raise UsageError(f"a packet filter ({' '.join(args.filter)}) only applies to -m pcapng")
    return modes[mode](args)


def run_tls(args) -> int:
    """`tlstap tls`: OpenSSL (shared libssl or static binaries)."""
    return _dispatch("tls", args)


def run_gnutls(args) -> int:
    """`tlstap gnutls`: `tlstap tls`'s modes on GnuTLS's functions."""
    return _dispatch("gnutls", args)


def run_nss(args) -> int:
    """`tlstap nss`: the text mode of `tlstap tls` on NSPR."""
    return _dispatch("nss", args)


def run_gotls(args) -> int:
    """`tlstap gotls`: Go crypto/tls plaintext, secrets, or packets and secrets."""
    if not args.libssl and args.pid is None:
        raise UsageError("tlstap gotls needs --elfpath PATH (a Go executable) or --pid PID")
    return _dispatch("gotls", args)


def _ring_why(recs: int, room: int) -> tuple[str, str]:
    """Why the ring buffer refused records (for the `lost` record, for the status line):
    full, or a reservation failed with room free (ring.h: not a matter of --mapsize)."""
    from .events import RING_FULL, RING_ROOM
    if not room:
        return RING_FULL, f"{RING_FULL}; raise --mapsize"
    if room == recs:
        return RING_ROOM, f"{RING_ROOM} (not a matter of --mapsize)"
    return RING_FULL, f"{recs - room} for {RING_FULL}; raise --mapsize; {room} refused with room free"


def run_text(args, make_capture=None) -> int:
    """Text mode. make_capture(cfg, on_data): the library's capture (default OpenSSL's
    OpenSSLCapture). This process captures and spools; a forked decoder process decodes and
    writes (spool.py says why).

    Order: every flag checked and the libraries analysed first; then the output is opened
    (refused if unwritable) but left as it was until the probes are attached (OutputFile):
    a refused command changes no file of the user's."""
    from . import preflight
    from .sources.probe import OpenSSLCapture
    from .sinks.files import OutputFile
    from .spool import SpoolPipeline
    from .decode.pipeline import TextPipeline

    cfg = _capture_config(args)
    _check_payload_fits(args, cfg)
    max_body = parse_size(args.max_body, "--max-body")
    spool_max = parse_size(args.spool_max, "--spool-max")
    if spool_max < 2 * cfg.mapsize:
        if args.mapsize and args.spool_max == DEFAULT_SPOOL_MAX:
            raise UsageError(f"--mapsize {args.mapsize}: the decoder backlog (--spool-max, {DEFAULT_SPOOL_MAX}) "
                             f"must hold twice the ring; give --spool-max {format_size(2 * cfg.mapsize)}")
        raise UsageError(f"--spool-max {args.spool_max}: must be at least twice --mapsize "
                         f"({format_size(2 * cfg.mapsize)})")
    if args.reorder_lag < 0:
        raise UsageError(f"--reorder-lag {args.reorder_lag:g}: must be >= 0")
    if args.spool_dir and not os.access(args.spool_dir, os.W_OK | os.X_OK):
        raise UsageError(f"--spool-dir {args.spool_dir}: not a writable directory")
    preflight.check_all()
    cap = (make_capture or OpenSSLCapture)(cfg, None)
    cap.resolve()
    output = OutputFile(args.output)
    # the decoder process writes through this; it only closes it at exit: the fd is also
    # the capturing side's, for commit() or discard()
    out = sys.stdout.buffer if output.is_stdout else os.fdopen(output.fd, "wb", buffering=1 << 20,
                                                                closefd=False)

    def make_decoder():        # runs in the decoder process
        return TextPipeline(out, args.format, args.hex, args.raw, args.headers_only,
                            int(args.reorder_lag * 1e6), max_body, cfg.max_payload,
                            summary_in_output=args.format == "json" or args.output != "-")

    _yield_to_the_workload()
    stop = _stop_flag()
    t0 = time.monotonic()
    sys.stdout.flush()
    try:
        spool = SpoolPipeline(make_decoder, spool_max, args.spool_dir)
    except BaseException:
        output.discard()
        raise
    try:
        with cap:
            cap.start()
            if cap.load_note:
                _status(cap.load_note)
            output.commit()
            output.close()         # the decoder process holds its own descriptor
            for t in cap.targets:
                sites = ", ".join(f"{s.symbol}({s.first_insn})" for s in t.sites if s.role in ("read", "write"))
                _status(f"attached {t.path} ({t.version or 'version unknown'}): {t.placement} probes on {sites}")
                if t.placement != "internal":
                    _status(f"  note: {t.reason}")
            _status(f"ready in {time.monotonic() - t0:.2f}s: {len(cap.links)} probes, {_scope(cfg)}, "
                    f"ring buffer {cfg.mapsize >> 10} KiB, max payload {cfg.max_payload} bytes per call; "
                    f"Ctrl-C to stop")

            def report_losses():
                """New losses into the output (a `lost` record) and onto stderr."""
                recs, nbytes, room = cap.new_losses()
                if recs:
                    why, told = _ring_why(recs, room)
                    _status(f"lost {recs} records ({nbytes} bytes): {told}")
                    spool.report_lost(recs, nbytes, why)
                recs, nbytes = spool.new_drops()
                if recs:
                    _status(f"dropped {recs} records ({nbytes} bytes): decoder backlog full; "
                            f"raise --spool-max or give the host CPU")

            def every_second():
                report_losses()
                if not spool.alive():
                    raise _DecoderGone()

            try:
                why = _capture_loop(cap, cfg, stop, every_second, spool.notify,
                                    step=lambda timeout: cap.spool(spool.put, timeout))
            except _DecoderGone:
                why = "output closed"
            cap.detach_probes()
            cap.drain_to(spool.put)
            report_losses()        # those of the last second too: every loss is in the output
            c = cap.counters()
    except BaseException:
        spool.abort()
        output.discard()
        raise
    c["backlog_dropped_records"], c["backlog_dropped_bytes"] = spool.dropped
    c["lost_records"] += spool.dropped[0]
    c["lost_bytes"] += spool.dropped[1]
    backlog = f", {spool.dropped[0]} of them for want of decoder backlog room" if spool.dropped[0] else ""
    summary = (f"{why}: {c['calls']} calls, {c['records']} records, {c['bytes']} bytes captured; "
               f"truncated {c['trunc_calls']} calls ({c['trunc_bytes']} bytes over --max-payload); "
               f"lost {c['lost_records']} records ({c['lost_bytes']} bytes){backlog}")
    told = []

    def waiting(seconds, backlog_bytes):
        if seconds > 1 and not told:
            told.append(1)
            _status(f"decoding the last {backlog_bytes >> 20} MiB captured; Ctrl-C again to write it undecoded")

    code = spool.end(c, summary, stop, waiting)
    _status(summary)
    if code:
        raise TlstapError(f"the decoder process failed (exit status {code}); the output may be incomplete")
    return 0


class _DecoderGone(Exception):
    """The decoder process ended during the capture (its output was closed)."""


def run_keylog(args, make_capture=None, describe=None) -> int:
    """-m keylog: NSS key log lines appended to -k FILE as handshakes complete.
    make_capture(cfg, on_line): the library's key capture (default OpenSSL's KeyLogCapture);
    describe(target): its status line per target, where the OpenSSL-style line does not fit.
    The file is left as it was until the probes are attached (as in run_text)."""
    from . import preflight
    from .sources.keys import KeyLogCapture
    from .sinks.keylogfile import KeyLogWriter

    cfg = _capture_config(args)
    preflight.check_all()
    path = args.keylogfile or DEFAULT_KEYLOG
    writer = None
    cap = (make_capture or KeyLogCapture)(cfg, lambda line: writer.write(line.text()))
    cap.resolve()
    writer = KeyLogWriter(path)
    try:
        _yield_to_the_workload()
        stop = _stop_flag()
        t0 = time.monotonic()
        with cap:
            cap.start()
            writer.commit()
            for t in cap.targets:
                if describe:
                    _status(describe(t))
                    continue
                if t.update_key is not None:
                    upd = f", tls13_update_key({t.update_key_insn})"
                elif t.server_off is None:
                    upd = ""         # the library logs nothing at a key update (GnuTLS): neither do we
                else:
                    upd = " (key updates not followed: tls13_update_key not found)"
                server = f", server flag at +{t.server_off:#x}" if t.server_off is not None else ""
                _status(f"attached {t.path} ({t.version or 'version unknown'}): "
                        f"{t.log_secret_name}({t.log_secret_insn}){upd}; client_random at "
                        f"+{t.client_random_off:#x}{server}")
            where = "stdout" if path == "-" else os.path.abspath(path)
            _status(f"ready in {time.monotonic() - t0:.2f}s: {len(cap.links)} probes, {_scope(cfg)}; "
                    f"key log lines go to {where}; Ctrl-C to stop")
            lost_seen = [0]

            def report_losses():
                lost = cap.counters()["lost"]
                if lost > lost_seen[0]:
                    _status(f"lost {lost - lost_seen[0]} key events: ring buffer full")
                    lost_seen[0] = lost

            why = _capture_loop(cap, cfg, stop, report_losses)
            cap.detach_probes()
            cap.drain()
            report_losses()        # those of the last second too
            c = cap.counters()
    except BaseException:
        writer.discard()
        raise
    writer.close()
    summary = (f"{why}: {writer.written} key log lines written ({writer.duplicates} duplicates skipped), "
               f"{c['updates']} key updates ({c['unfollowed_updates']} on connections whose handshake "
               f"was not seen); lost {c['lost']} events, {c['read_errors']} unreadable")
    _status(summary)
    return 0


def run_pcapng(args, make_keys=None, describe=None) -> int:
    """-m pcapng: packets of -i IFACE plus the TLS secrets that decrypt them, in one file.
    make_keys/describe: as run_keylog's make_capture/describe. The interface, the filter and
    the libraries are checked before the file is opened; PcapngCapture leaves it as it was
    unless start() succeeds."""
    from . import preflight
    from .sources.packets import Interface
    from .sinks.pcapng_capture import PcapngCapture
    from .sources.pktfilter import compile_filter

    if not args.ifname:
        raise UsageError("-m pcapng needs -i IFACE (e.g. -i lo)")
    # 64 KiB loopback segments at ~600 MB/s fill 8 MiB in 13 ms: give the reader slack
    cfg = _capture_config(args, default_mapsize="64M")
    compile_filter(" ".join(args.filter))
    Interface.lookup(args.ifname)
    preflight.check_all()
    path = args.pcapfile or DEFAULT_PCAPNG
    _yield_to_the_workload()
    stop = _stop_flag()

    t0 = time.monotonic()
    cap = PcapngCapture(cfg, args.ifname, " ".join(args.filter), path, make_keys=make_keys,
                        native=os.environ.get("TLSTAP_NATIVE_EPB", "1") != "0")
    with cap:
        cap.start()
        if note := cap.packets.fallback_note():
            _status(note)
        for t in cap.targets:
            if describe:
                _status(describe(t))
                continue
            _status(f"attached {t.path} ({t.version or 'version unknown'}): {t.log_secret_name}"
                    f"({t.log_secret_insn}) for TLS secrets")
        iface = cap.interface
        filt = " ".join(args.filter) or "no filter"
        _status(f"ready in {time.monotonic() - t0:.2f}s: {len(cap.links)} probes, {_scope(cfg)}; "
                f"packets of {iface.name} ({filt}) and secrets go to {os.path.abspath(path)}; Ctrl-C to stop")

        def report_losses():
            """New losses onto stderr; the file counts them in the next packet's EPB
            (epb_dropcount) and in the statistics block at close (isb_ifdrop)."""
            lost, room = cap.new_losses()
            if lost:
                _status(f"lost {lost} packets: {_ring_why(lost, room)[1]}")

        why = _capture_loop(cap, cfg, stop, report_losses)
        cap.detach_probes()
        cap.drain()
        report_losses()            # those of the last second too
        c = cap.counters()
    summary = (f"{why}: {cap.packets_written} packets ({c['packet_bytes']} bytes) and "
               f"{cap.secrets_written} TLS secrets written; {c['packet_filtered']} packets left out by the "
               f"filter or scope, {c['packet_truncated']} cut at the snap length; lost {c['packet_lost']} "
               f"packets, {c['key_lost']} key events")
    _status(summary)
    return 0


# ---- what each command does, by -m mode ---------------------------------------------------

def _gnutls_text(args) -> int:
    from .sources.probe import OpenSSLCapture
    from .probes import gnutls
    return run_text(args, make_capture=functools.partial(OpenSSLCapture, find=gnutls.find_targets,
                                                         hint="--gnutls PATH"))


def _gnutls_keys():
    from .sources.keys import KeyLogCapture
    from .probes import gnutls_keys
    return functools.partial(KeyLogCapture, find=gnutls_keys.find_keys)


def _nss_text(args) -> int:
    """NSPR's PR_Read/PR_Write/PR_Recv/PR_Send, taken only on descriptors carrying NSS's SSL layer."""
    from .sources.probe import OpenSSLCapture
    from .probes import nss
    return run_text(args, make_capture=functools.partial(OpenSSLCapture, find=nss.find_targets,
                                                         hint="--nspr PATH"))


def _go(name: str):
    from .sources import gotls as gocapture
    return getattr(gocapture, name)


def _go_describe(t) -> str:
    return f"attached {t.describe()}"


#: eCapture's other names for the modes
MODE_ALIASES = {"key": "keylog", "pcap": "pcapng"}

#: command -> {mode: run(args)}: the dispatch runs through it, and the commands' help and
#: `tlstap doctor` say from it what each library can do, so none of them can disagree.
COMMANDS = {
    "tls": {"text": run_text, "keylog": run_keylog, "pcapng": run_pcapng},
    "gnutls": {"text": _gnutls_text,
               "keylog": lambda a: run_keylog(a, make_capture=_gnutls_keys()),
               "pcapng": lambda a: run_pcapng(a, make_keys=_gnutls_keys())},
    "nss": {"text": _nss_text},
    "gotls": {"text": lambda a: run_text(a, make_capture=_go("GoTlsCapture")),
              "keylog": lambda a: run_keylog(a, make_capture=_go("GoKeyLogCapture"), describe=_go_describe),
              "pcapng": lambda a: run_pcapng(a, make_keys=_go("GoKeyLogCapture"), describe=_go_describe)},
}


def modes_text(command: str) -> str:
    """'text, keylog and pcapng modes': what `tlstap COMMAND -m` takes, for help and doctor."""
    m = list(COMMANDS[command])
    return (f"{', '.join(m[:-1])} and {m[-1]} modes" if len(m) > 1 else f"{m[0]} mode")


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
