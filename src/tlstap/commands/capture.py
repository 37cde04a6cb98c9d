"""The capture commands (`tlstap tls|gnutls|nss|gotls`): flags -> sources and outputs -> runner.

Which outputs a capture writes: each one named by its flag (-o text, -k key log, -w/-i pcapng),
plus the one -m names; -m alone picks one, as in eCapture (default text). They combine: one
set of probes feeds all of them. Every flag takes effect or the command is refused: a flag
for an output that is not written is an error, not a silent no-op.

    tlstap tls -o out.txt -k keys.log -i lo -w cap.pcapng     the three at once

Two more leave the host: --metrics-addr (Prometheus /metrics) and --export (NATS JetStream).
They, like the text output, take the plaintext's decoded HTTP exchanges: any of the three runs
the decoder process; the text output is written only when asked (or when nothing else is).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import UsageError
from ..sizes import DEFAULT_SPOOL_MAX, RING_MAX, format_size, next_pow2, parse_size

EPILOG_TLS = """examples:
  tlstap tls                                  every process using the system libssl
  tlstap tls --pid 1234 --format json -o cap.jsonl
  tlstap tls --libssl /usr/bin/node           a statically linked binary
  tlstap tls --uid 33 --hex
  tlstap tls -m keylog -k keys.log            TLS secrets (NSS key log) of every handshake
  tlstap tls -i lo -w cap.pcapng tcp port 443 packets + secrets: Wireshark decrypts them
  tlstap tls -o out.txt -k keys.log -i lo -w cap.pcapng    all three from one set of probes
  tlstap tls --metrics-addr :9464 --export nats://127.0.0.1:4222/tlstap.http
                                              Prometheus metrics and a JetStream event stream, redacted
"""

#: -m's values: eCapture's, with its other names for two of them
MODES = ("text", "keylog", "key", "pcap", "pcapng")
MODE_ALIASES = {"key": "keylog", "pcap": "pcapng"}
DEFAULT_KEYLOG = "tlstap_masterkey.log"
DEFAULT_PCAPNG = "tlstap.pcapng"
#: text output's flags and their defaults (None in the parser: given or not is what matters)
TEXT_DEFAULTS = {"format": "text", "hex": False, "raw": False, "max_body": "64K", "headers_only": False,
                 "reorder_lag": 100.0, "max_payload": "1M", "spool_max": DEFAULT_SPOOL_MAX, "spool_dir": None,
                 "source": None}
#: text output's plaintext sources (README: Sources of plaintext)
SOURCES = ("wire", "probe")
RING_DEFAULT, RING_DEFAULT_PACKETS = "8M", "64M"
#: the flags of the outputs that leave the host, and their defaults (None: not given)
METRICS_DEFAULTS = {"metrics_peer": False, "metrics_route": [], "metrics_max_series": 1000}
EXPORT_DEFAULTS = {"export_bodies": "0", "export_queue": "64M", "export_spool": "1G"}
#: the text flags that shape only the local output (the others shape the decoding all outputs share)
LOCAL_TEXT_FLAGS = ("format", "hex", "headers_only")


# ---- what each library can do ------------------------------------------------------------

def _openssl_text(cfg):
    from ..sources.probe import OpenSSLCapture
    return OpenSSLCapture(cfg, None)


def _openssl_keys(cfg):
    from ..sources.keys import KeyLogCapture
    return KeyLogCapture(cfg)


def _gnutls_text(cfg):
    from ..probes import gnutls
    from ..sources.probe import OpenSSLCapture
    return OpenSSLCapture(cfg, None, find=gnutls.find_targets, hint="--gnutls PATH")


def _gnutls_keys(cfg):
    from ..probes import gnutls_keys
    from ..sources.keys import KeyLogCapture
    return KeyLogCapture(cfg, find=gnutls_keys.find_keys)


def _nss_text(cfg):
    """NSPR's PR_Read/PR_Write/PR_Recv/PR_Send, taken only on descriptors carrying NSS's SSL layer."""
    from ..probes import nss
    from ..sources.probe import OpenSSLCapture
    return OpenSSLCapture(cfg, None, find=nss.find_targets, hint="--nspr PATH")


def _nss_keys(cfg):
    from ..sources.nss_keys import NssKeyLogCapture
    return NssKeyLogCapture(cfg)


def _go_text(cfg):
    from ..sources.gotls import GoTlsCapture
    return GoTlsCapture(cfg, None)


def _go_keys(cfg):
    from ..sources.gotls import GoKeyLogCapture
    return GoKeyLogCapture(cfg)


@dataclass(frozen=True)
class Library:
    """A capture command's library: how to build its plaintext source and its key source
    (None: not in this version). Packets need no library; pcapng needs the keys."""
    text: Callable | None
    keys: Callable | None

    def outputs(self) -> list[str]:
        return [m for m, ok in (("text", self.text), ("keylog", self.keys), ("pcapng", self.keys)) if ok]


#: command -> its library. Dispatch, the commands' help and `tlstap doctor` all read this table,
#: so none of them can disagree about what a command does.
LIBRARIES = {
    "tls": Library(_openssl_text, _openssl_keys),
    "gnutls": Library(_gnutls_text, _gnutls_keys),
    "nss": Library(_nss_text, _nss_keys),
    "gotls": Library(_go_text, _go_keys),
}
COMMANDS = tuple(LIBRARIES)


def modes_text(command: str) -> str:
    """'text, keylog and pcapng modes': what `tlstap COMMAND -m` takes, for help and doctor."""
    m = LIBRARIES[command].outputs()
    return f"{', '.join(m[:-1])} and {m[-1]} modes" if len(m) > 1 else f"{m[0]} mode"


# ---- the parser ----------------------------------------------------------------------------

def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scope (applied in the kernel)")
    g.add_argument("-p", "--pid", type=int, help="only this process (probes are installed in it alone)")
    g.add_argument("-u", "--uid", type=int, help="only processes of this user id")
    g.add_argument("--cgroup", "--cgroup_path", dest="cgroup", metavar="PATH",
                   help="only processes in this cgroup v2 directory")
    g = p.add_argument_group("outputs (any mix of -o, -k, -w in one capture)")
    g.add_argument("-m", "--model", "--mode", dest="mode", choices=MODES,
                   help="the output when no -o/-k/-w names one: text (default), keylog, pcapng; "
                        "with them, one more")
    g.add_argument("-o", "--output", metavar="FILE",
                   help="text output: write records here (created 0600; default stdout)")
    g.add_argument("-k", "--keylogfile", metavar="FILE",
                   help=f"key log output: append NSS key log lines here (created 0600; '-' for stdout; "
                        f"default with -m keylog: {DEFAULT_KEYLOG})")
    g.add_argument("-w", "--pcapfile", metavar="FILE",
                   help=f"pcapng output: packets of -i and the TLS secrets that decrypt them (created "
                        f"0600; default {DEFAULT_PCAPNG})")
    g.add_argument("-i", "--ifname", metavar="IFACE", help="pcapng output: the interface to capture on")
    g = p.add_argument_group("text output")
    g.add_argument("--format", choices=("text", "json"),
                   help="text: header line + plaintext; json: one object per line (README: JSON output)")
    g.add_argument("--source", choices=SOURCES,
                   help="where plaintext comes from: wire = the connection's packets, decrypted here with the "
                        "secrets of its handshake (the traced process pays no probe per read/write call); "
                        "probe = uprobes on the library's read/write calls. Default: wire where the command "
                        "has a key probe (tls, gnutls, gotls), else probe")
    g.add_argument("--hex", action="store_true", default=None, help="hexdump every payload")
    g.add_argument("--raw", action="store_true", default=None,
                   help="one record per SSL call, no HTTP decoding (the cheapest path)")
    g.add_argument("--max-body", metavar="SIZE", help="HTTP: body bytes kept and shown per message (default 64K)")
    g.add_argument("--headers-only", action="store_true", default=None, help="HTTP: show no bodies")
    g.add_argument("--reorder-lag", "--perf-reorder-lag-ms", dest="reorder_lag", type=float,
                   metavar="MS", help="hold calls this long to put the CPUs' events in kernel-time order "
                                      "before decoding (default 100)")
    g.add_argument("--max-payload", metavar="SIZE",
                   help="bytes captured per read/write call; the rest is reported as truncated (default 1M)")
    g.add_argument("--spool-max", metavar="SIZE",
                   help="most captured bytes waiting for the decoder process, which runs at "
                        "idle priority so that a busy host's CPU goes to its services first; beyond this "
                        f"records are dropped and counted (default {DEFAULT_SPOOL_MAX}; README: Decoding off the hot path)")
    g.add_argument("--spool-dir", metavar="DIR",
                   help="where the (unlinked, 0600) spool file lives (default $TMPDIR or /tmp)")
    g = p.add_argument_group("beyond this host (README: Prometheus metrics, Exporting to NATS JetStream, "
                             "Redaction)")
    g.add_argument("--metrics-addr", metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (':PORT': every address): "
                        "HTTP traffic of the decoded exchanges and tlstap's own health")
    g.add_argument("--metrics-peer", action="store_true", default=None,
                   help="metrics: label HTTP series with the peer address too (more series)")
    g.add_argument("--metrics-route", action="append", metavar="PATTERN",
                   help="metrics: a route pattern such as /users/{id}/orders (repeatable); paths no pattern "
                        "matches are templated (numeric, UUID and hex segments become {id})")
    g.add_argument("--metrics-max-series", type=int, metavar="N",
                   help="metrics: most label sets per metric; beyond it series go to the overflow value and "
                        f"are counted (default {METRICS_DEFAULTS['metrics_max_series']})")
    g.add_argument("--export", metavar="URL",
                   help="publish one JSON object per HTTP exchange (and per raw record) to NATS JetStream: "
                        "nats://HOST:PORT[,HOST:PORT...]/SUBJECT; a stream must hold SUBJECT; always redacted")
    g.add_argument("--export-bodies", metavar="SIZE",
                   help="export: bytes of each body exported (default 0: none)")
    g.add_argument("--export-queue", metavar="SIZE",
                   help=f"export: bytes held in memory while the server is slow or away "
                        f"(default {EXPORT_DEFAULTS['export_queue']}); then --export-spool")
    g.add_argument("--export-spool", metavar="SIZE",
                   help=f"export: bytes queued on disk (in --spool-dir) beyond the memory queue; beyond "
                        f"both, events are dropped and counted (default {EXPORT_DEFAULTS['export_spool']})")
    g.add_argument("--redact", action="store_true", default=None,
                   help="apply the export's redaction to the text output too: credential header values and "
                        "query parameters become REDACTED, bodies are left out unless --max-body is given")
    g.add_argument("--redact-header", action="append", metavar="NAME",
                   help="one more header whose value is redacted (repeatable)")
    g.add_argument("--redact-query", action="append", metavar="NAME",
                   help="one more query parameter whose value is redacted (repeatable)")
    g = p.add_argument_group("transport")
    g.add_argument("--mapsize", metavar="SIZE",
                   help="ring buffer size, rounded up to a power of two; a bare number is KiB "
                        f"like eCapture's (default {RING_DEFAULT}; {RING_DEFAULT_PACKETS} for the packet ring of "
                        f"-w; at most {format_size(RING_MAX)}, the kernel's largest)")


def add_parsers(sub) -> None:
    tls = sub.add_parser("tls", aliases=["openssl"],
                         help=f"OpenSSL (shared libssl or static binaries): {modes_text('tls')}",
                         epilog=EPILOG_TLS, formatter_class=argparse.RawDescriptionHelpFormatter)
    tls.add_argument("--libssl", action="append", metavar="PATH", default=[],
                     help="libssl.so or a static executable exporting SSL_* (repeatable); "
                          "default: the process's own (--pid) or the system's (ld.so cache)")
    _add_common(tls)
    tls.add_argument("filter", nargs="*", metavar="FILTER",
                     help="pcapng output: tcpdump-style packet filter applied in the kernel, e.g. tcp port 443 "
                          "(README: supported subset)")
    tls.set_defaults(func=lambda a: run("tls", a))
    gn = sub.add_parser("gnutls", help=f"GnuTLS (libgnutls.so.30): {modes_text('gnutls')}",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    gn.add_argument("--gnutls", dest="libssl", action="append", metavar="PATH", default=[],
                    help="libgnutls.so* or an executable exporting gnutls_record_send (repeatable); "
                         "default: the process's own (--pid) or the system's (ld.so cache)")
    _add_common(gn)
    gn.add_argument("filter", nargs="*", metavar="FILTER", help="pcapng output: as for tlstap tls")
    gn.set_defaults(func=lambda a: run("gnutls", a))
    ns = sub.add_parser("nss", help=f"NSS/NSPR (libnspr4.so): {modes_text('nss')}",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ns.add_argument("--nspr", dest="libssl", action="append", metavar="PATH", default=[],
                    help="libnspr4.so, or any library or executable exporting PR_Read and PR_Write (Firefox "
                         "folds NSPR into its libnss3.so) (repeatable); "
                         "default: the process's own (--pid) or the system's (ld.so cache)")
    _add_common(ns)
    ns.add_argument("filter", nargs="*", metavar="FILTER", help="pcapng output: as for tlstap tls")
    ns.set_defaults(func=lambda a: run("nss", a))
    go = sub.add_parser("gotls", help=f"Go crypto/tls executables (1.17+): {modes_text('gotls')}",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    go.add_argument("--elfpath", "-e", dest="libssl", action="append", metavar="PATH", default=[],
                    help="the Go executable (stripped and PIE builds too); default with --pid: the "
                         "process's own (/proc/PID/exe)")
    _add_common(go)
    go.add_argument("filter", nargs="*", metavar="FILTER", help="pcapng output: as for tlstap tls")
    go.set_defaults(func=lambda a: run("gotls", a))


# ---- flags -> what to run ------------------------------------------------------------------

def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def choose_outputs(command: str, args) -> list[str]:
    """The outputs to write, in a fixed order (text, keylog, pcapng); every output flag given
    and every flag of an output not written is checked here."""
    mode = MODE_ALIASES.get(args.mode, args.mode)
    want = {"text": args.output is not None or mode == "text",
            "keylog": args.keylogfile is not None or mode == "keylog",
            "pcapng": args.pcapfile is not None or args.ifname is not None or mode == "pcapng",
            "metrics": args.metrics_addr is not None,
            "export": args.export is not None}
    if not any(want.values()):
        want["text"] = True
    have = LIBRARIES[command].outputs() + ["metrics", "export"]
    if (want["metrics"] or want["export"]) and "text" not in have:
        raise UsageError(f"tlstap {command}: --metrics-addr and --export need plaintext, which this command "
                         f"does not capture in this version")
    _check_remote_flags(args, want)
    for out, on in want.items():
        if on and out not in have:
            raise UsageError(f"tlstap {command}: only {', '.join('-m ' + m for m in have)} in this version")
    if want["pcapng"] and not args.ifname:
        raise UsageError(("-m pcapng" if mode == "pcapng" else f"-w {args.pcapfile}")
                         + " needs -i IFACE (e.g. -i lo)")
    if args.filter and not want["pcapng"]:
        raise UsageError(f"a packet filter ({' '.join(args.filter)}) only applies to -m pcapng (or -i IFACE)")
    decode = want["text"] or want["metrics"] or want["export"]
    if not want["text"]:
        local = LOCAL_TEXT_FLAGS if decode else TEXT_DEFAULTS
        given = [_flag(k) for k in local if getattr(args, k) is not None]
        if given:
            raise UsageError(f"{given[0]} is a text output flag, and this command writes no text "
                             f"(add -o FILE or -m text)")
    args.max_body_given = args.max_body is not None
    for k, v in TEXT_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    paths = [p for p, on in ((args.output or "-", want["text"]), (args.keylogfile or DEFAULT_KEYLOG, want["keylog"]),
                             (args.pcapfile or DEFAULT_PCAPNG, want["pcapng"])) if on]
    real = [p if p == "-" else os.path.realpath(p) for p in paths]
    for i, p in enumerate(real):
        if p in real[:i]:
            raise UsageError(f"{'stdout' if p == '-' else paths[i]}: two outputs cannot share one file")
    return [o for o, on in want.items() if on]


def _check_remote_flags(args, want: dict) -> None:
    """The metrics, export and redaction flags: each one applies to an output written."""
    for table, on, flag in ((METRICS_DEFAULTS, want["metrics"], "--metrics-addr"),
                            (EXPORT_DEFAULTS, want["export"], "--export")):
        given = [_flag(k) for k in table if getattr(args, k) is not None]
        if given and not on:
            raise UsageError(f"{given[0]} applies to {flag}, which is not given")
        for k, v in table.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    if args.redact and not want["text"]:
        raise UsageError("--redact applies to the text output (-o FILE or -m text); what --export sends "
                         "is always redacted")
    for k in ("redact_header", "redact_query"):
        if getattr(args, k) and not (want["export"] or args.redact):
            raise UsageError(f"{_flag(k)} applies to --export, and with --redact to the text output")
    if args.metrics_max_series is not None and args.metrics_max_series < 1:
        raise UsageError(f"--metrics-max-series {args.metrics_max_series}: at least 1")


def capture_config(args, default_mapsize: str = RING_DEFAULT):
    """The flags every source shares, checked: errors name the flag."""
    from ..sources.base import CaptureConfig
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
    if args.pid is not None and (args.pid <= 0 or not os.path.exists(f"/proc/{args.pid}")):
        raise UsageError(f"--pid {args.pid}: no such process")
    return CaptureConfig(pid=args.pid, uid=args.uid, max_payload=max_payload, mapsize=mapsize,
                         libssl=args.libssl, cgroup_id=_cgroup_id(args.cgroup) if args.cgroup else None)


def _cgroup_id(path: str) -> int:
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "cgroup.procs")):
        raise UsageError(f"--cgroup {path}: not a cgroup v2 directory")
    return os.stat(path).st_ino   # a cgroup v2 id is its directory's inode number


def _check_text_flags(args, cfg, source: str) -> tuple[int, int]:
    """The text output's sizes, checked against the ring: (max_body, spool_max). A call's capture
    must fit in the probe source's ring; the wire source's holds packets (and caps pieces)."""
    if source == "probe" and cfg.max_payload >= cfg.mapsize:
        if args.mapsize and args.max_payload == TEXT_DEFAULTS["max_payload"]:
            raise UsageError(f"--mapsize {args.mapsize}: smaller than one call's capture (--max-payload "
                             f"{args.max_payload}); raise it above {format_size(cfg.max_payload)} or lower --max-payload")
        raise UsageError(f"--max-payload {args.max_payload}: must be smaller than --mapsize "
                         f"({format_size(cfg.mapsize)}): one call must fit in the ring buffer")
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
    return max_body, spool_max


def _scope(cfg) -> str:
    scope = f"pid {cfg.pid}" if cfg.pid else "all processes"
    if cfg.uid is not None:
        scope += f", uid {cfg.uid}"
    return scope


def run(command: str, args) -> int:
    """Check every flag, analyse the libraries, check the interface and filter, then open the
    outputs (left as they were until the probes are attached) and hand over to the runner."""
    from .. import preflight, runner
    if command == "gotls" and not args.libssl and args.pid is None:
        raise UsageError("tlstap gotls needs --elfpath PATH (a Go executable) or --pid PID")
    lib = LIBRARIES[command]
    outputs = choose_outputs(command, args)
    packets = "pcapng" in outputs
    decode = bool({"text", "metrics", "export"} & set(outputs))
    cfg = capture_config(args)
    source = _text_source(command, args) if decode else None
    text_sizes = _check_text_flags(args, cfg, source) if decode else None
    pkt_cfg = capture_config(args, RING_DEFAULT_PACKETS) if packets else None
    remote = _check_remote(args, outputs)
    preflight.check_all()

    wire_cfg = capture_config(args, RING_DEFAULT_PACKETS) if source == "wire" else None
    if wire_cfg is not None:
        from ..sources.packets import MIN_RING
        if wire_cfg.mapsize < MIN_RING:
            raise UsageError(f"--mapsize {args.mapsize}: the wire source's packet ring needs at least "
                             f"{format_size(MIN_RING)} (whole 64 KiB segments in flight)")

    sources, probe, keys, pkt = [], None, None, None
    if source == "probe":
        probe = lib.text(cfg)
        probe.resolve()
        sources.append(probe)
    if "keylog" in outputs or packets or source == "wire":
        from ..sources.keys import KEY_RING_MAX
        big = pkt_cfg or wire_cfg
        key_cfg = dataclasses.replace(cfg, mapsize=min(big.mapsize, KEY_RING_MAX)) if big else cfg
        keys = lib.keys(key_cfg)
        keys.resolve()
        sources.append(keys)
    if source == "wire":
        from ..sources.wire import WireCapture
        probe = WireCapture(wire_cfg, keys, args.cgroup)
        sources.append(probe)
    if packets:
        from ..sources.packets import Interface, PacketCapture
        pkt = PacketCapture(pkt_cfg, args.ifname, " ".join(args.filter), None)   # compiles the filter
        Interface.lookup(args.ifname)
        sources.append(pkt)

    opens = []
    text_out = []
    if probe is not None:
        why = _SOURCE_WHY[source, bool(args.source)].format(cmd=command)
        local = (args.output or "-") if "text" in outputs else None

        def open_text():
            text_out.append(_text_output(args, probe, text_sizes, runner.status, source, why, local, remote))
            return text_out[0]
        opens.append(open_text)
    if "keylog" in outputs:
        from ..sinks.keylogfile import KeyLogOutput
        opens.append(lambda: KeyLogOutput(keys, args.keylogfile or DEFAULT_KEYLOG, runner.status))
    if packets:
        from ..sinks.pcapng_output import PcapngOutput
        native = os.environ.get("TLSTAP_NATIVE_EPB", "1") != "0"
        opens.append(lambda: PcapngOutput(pkt, keys, args.pcapfile or DEFAULT_PCAPNG, runner.status,
                                          native=native))
    if args.redact and ("keylog" in outputs or packets):
        runner.status("--redact: applies to the text output; the key log and pcapng hold the TLS secrets "
                      "themselves, which decrypt every header")
    if args.raw and ("metrics" in outputs or "export" in outputs):
        runner.status("--raw: no HTTP exchange is decoded, so the metrics hold tlstap's health only and "
                      "--export sends raw records")
    if "metrics" in outputs:
        from ..metrics.server import MetricsOutput
        opens.append(lambda: MetricsOutput(args.metrics_addr, sources, text_out[0] if text_out else None,
                                           runner.status))
    return runner.run(sources, opens, cfg.pid, _scope(cfg))


@dataclass
class Remote:
    """What the decoder process needs to build the sinks that leave the host."""
    export: object = None            #: export.nats.Target
    capture_id: str = ""
    metrics: bool = False


def _check_remote(args, outputs: list[str]) -> Remote:
    """Check the metrics address and the export target (reachable, a stream holds the subject)
    before any file is touched; make the private directory where the decoder process leaves
    its metrics snapshot for the capture process to serve (before the decoder is forked)."""
    r = Remote()
    if "metrics" in outputs:
        from ..metrics import server
        server.check_addr(args.metrics_addr)
        r.metrics = True
    if "export" in outputs:
        from ..export import nats
        for k in ("export_bodies", "export_queue", "export_spool"):
            parse_size(getattr(args, k), _flag(k))
        try:
            r.export = nats.parse_url(args.export)
        except nats.ExportTargetError as e:
            raise UsageError(f"--export: {e}") from None
        try:
            nats.check_target(r.export)
        except nats.ExportTargetError as e:
            from ..errors import EnvironmentProblem
            raise EnvironmentProblem(f"--export: {e}") from None
        r.capture_id = f"{os.getpid()}.{time.time_ns()}"
    if r.metrics:
        from ..metrics import server
        server.prepare_multiprocess()
    return r


#: (source, chosen by --source) -> the status line saying which source runs, and why
_SOURCE_WHY = {
    ("wire", False): "text from the wire (the default for tlstap {cmd}): packets and the handshake's secrets, "
                     "decrypted by tlstap; the traced process pays no probe per call (--source probe: uprobes "
                     "on its read/write calls)",
    ("wire", True): "text from the wire (--source wire): packets and the handshake's secrets, decrypted by tlstap",
    ("probe", False): "text from probes on the read/write calls (tlstap {cmd} has no key probe for --source wire)",
    ("probe", True): "text from probes on the read/write calls (--source probe)",
}


def _text_source(command: str, args) -> str:
    """--source, checked, or the default: wire where the library has a key probe."""
    has_keys = LIBRARIES[command].keys is not None
    if args.source == "wire" and not has_keys:
        raise UsageError(f"--source wire: tlstap {command} has no key probe in this version; use --source probe")
    return args.source or ("wire" if has_keys else "probe")


def _text_output(args, probe, sizes: tuple[int, int], status, source: str, why: str, path: str | None,
                 remote: Remote):
    """The decoder's output: the local text (path; None: none) and the sinks that leave the host."""
    from ..decode.pipeline import TextPipeline
    from ..sinks.textfile import TextOutput
    max_body, spool_max = sizes
    cfg = probe.cfg

    def make_pipeline(out):        # runs in the decoder process
        from ..decode.redact import RedactingSink, Redactor
        redactor = Redactor(args.redact_header or (), args.redact_query or ())
        extras = []
        if remote.metrics:
            from ..metrics.route import RouteTemplater
            from ..metrics.traffic import TrafficMetrics
            extras.append(TrafficMetrics(RouteTemplater(args.metrics_route), peer=bool(args.metrics_peer),
                                         max_series=args.metrics_max_series))
        if remote.export is not None:
            from ..sinks.export import ExportSink
            extras.append(RedactingSink(ExportSink(
                remote.export, parse_size(args.export_bodies, "--export-bodies"),
                parse_size(args.export_queue, "--export-queue"), parse_size(args.export_spool, "--export-spool"),
                args.spool_dir, status, remote.capture_id), redactor))
        headers_only = args.headers_only or bool(args.redact and not args.max_body_given)
        return TextPipeline(out, args.format, args.hex, args.raw, headers_only,
                            int(args.reorder_lag * 1e6), max_body, cfg.max_payload,
                            summary_in_output=args.format == "json" or path not in ("-", None), source=source,
                            extras=extras, redactor=redactor if args.redact else None)
    return TextOutput(probe, path, make_pipeline, spool_max, args.spool_dir, status, source_note=why)
