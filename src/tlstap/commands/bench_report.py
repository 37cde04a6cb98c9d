"""`tlstap bench` results: medians, ratios, the bars, and their renderings.

No I/O here except writing the files asked for; everything takes the list of run records
that `tlstap.commands.bench` produces (one dict per wrk run, keys documented in `RUN_FIELDS`).

Rules:

1. A ratio compares a configuration with the baseline of the *same round and size*
   (`rps_ratio` is the median of those per-round ratios). `rps_ratio_of_medians` is the
   shared kit's way (`../shared/bench/analyze.py`: median RPS over median base RPS); both
   are kept so the two methods can be compared.
2. A bar is MET, NOT MET, or "not measured" (configuration or size not run, or no
   baseline): a missing measurement never passes.
3. Lost events: a tlstap run whose summary line could not be read counts as unknown, and
   makes the "zero lost" bar NOT MET, since a loss could hide there. The same holds for the
   exporter's line at exit and its dropped events.
4. A pair bar compares two configurations of the same bench run (same rounds, interleaved):
   an output that leaves the host must not move the traced server's ratio by more than
   0.02 against the same capture without it (issue 18), at each size where both ran.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass

#: Keys of a run record (bench.Runner.run_one), with units.
RUN_FIELDS = {
    "round": "1-based round number", "size": "size label (1k, 64k) or the URL path",
    "config": "base, text, raw, keylog, pcapng or a --compare name", "url": "the URL wrk loaded",
    "rps": "wrk Requests/sec", "requests": "requests completed", "errors": "wrk socket/status errors",
    "p50_us": "latency percentiles in microseconds (wrk's Lua latency:percentile)",
    "p90_us": "", "p99_us": "", "p999_us": "",
    "target_cpu_pct": "target (nginx worker) %CPU over the load window (/proc/PID/stat deltas)",
    "tool_cpu_pct": "tool %CPU over the same window (with every process it forks)",
    "wrk_cpu_pct": "wrk %CPU over the same window",
    "sys_busy_pct": "all CPUs busy % (/proc/stat)", "steal_pct": "steal % (/proc/stat)",
    "tool_startup_s": "command start to its 'ready in' line (to attached probes for --compare)",
    "tool_ready_s": "the tool's own 'ready in X s'", "tool_rss_kib": "tool peak RSS (VmHWM / ru_maxrss)",
    "tool_cpu_s": "tool CPU seconds from ready to exit (includes draining at exit)",
    "events": "captured events from the tool's summary (text/raw: records; keylog: lines; pcapng: packets)",
    "event_bytes": "captured bytes from the summary", "lost": "lost records/events/packets",
    "truncated": "calls truncated at --max-payload / packets cut at the snap length",
    "out_bytes": "size of the capture file", "summary_line": "the tool's last summary line",
    "output_requests": "text configurations: HTTP requests in the output (every one of wrk's, once its "
                       "decoder has caught up)",
    "export_events": "text-export: events the exporter took (its line at exit)",
    "export_acked": "events the JetStream server acknowledged", "export_dups": "acknowledged as duplicates",
    "export_dropped": "events the exporter dropped", "export_drop_reasons": "why, as the exporter says",
    "export_cpu_s": "the exporter's own CPU seconds", "export_ms_per_1k": "its CPU ms per 1000 events",
    "stream_msgs": "messages in the bench's stream after the run (purged before it)",
    "nats_cpu_pct": "the bench's nats-server %CPU over the load window (idle priority; not in tool_cpu_pct)",
    "metrics_samples": "text-metrics: samples a scrape of /metrics got at the end of the load",
    "stop": "how the tool ended: INT, TERM or KILL", "note": "a warning about the run (e.g. no summary)",
    "error": "why the run failed (it is left out of the medians), else null",
}

#: The acceptance bars: (config, size label, minimum RPS ratio). Issue 6's, and issue 17's for text
#: mode's default source (wire) and its own source.
RATIO_BARS = (("text", "1k", 0.75), ("text", "64k", 0.85), ("text-wire", "1k", 0.75), ("text-wire", "64k", 0.85),
              ("keylog", "1k", 0.97), ("keylog", "64k", 0.97), ("pcapng", "64k", 0.80))
#: Pair bars: (config, the config it is compared with, largest |ratio difference|, whose bar)
PAIR_BARS = (("text-export", "text", 0.02, "issue 18"), ("text-metrics", "text", 0.02, "our own bar"))
#: Configurations that run tlstap (the zero-lost bar applies to them).
TLSTAP_CONFIGS = ("text", "text-probe", "text-wire", "text-export", "text-metrics", "raw", "keylog", "pcapng")

#: Configurations whose runs carry the exporter's numbers
EXPORT_CONFIGS = ("text-export",)

MET, NOT_MET, NOT_MEASURED = "MET", "NOT MET", "not measured"


@dataclass
class Bar:
    bar: str            #: e.g. "text >= 0.60 at 1k"
    status: str         #: MET | NOT MET | not measured
    value: str          #: what was measured, e.g. "0.57"


def median(vals) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def _ok(runs):
    return [r for r in runs if not r.get("error")]


def _div(a, b):
    return a / b if a is not None and b else None


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (size, config), in the order first run: medians and ratios."""
    order: list[tuple[str, str]] = []
    for r in runs:
        if (r["size"], r["config"]) not in order:
            order.append((r["size"], r["config"]))
    base_by_round = {(r["size"], r["round"]): r["rps"] for r in _ok(runs) if r["config"] == "base"}
    rows = []
    for size, cfg in order:
        allg = [r for r in runs if r["size"] == size and r["config"] == cfg]
        g = _ok(allg)
        base = _ok([r for r in runs if r["size"] == size and r["config"] == "base"])
        m = {k: median(r.get(k) for r in g) for k in (
            "rps", "p50_us", "p90_us", "p99_us", "p999_us", "target_cpu_pct", "tool_cpu_pct", "wrk_cpu_pct",
            "steal_pct", "tool_startup_s", "tool_ready_s", "tool_rss_kib", "out_bytes")}
        b = {k: median(r.get(k) for r in base) for k in ("rps", "p50_us", "p99_us", "p999_us")}
        per_round = [_div(r["rps"], base_by_round.get((size, r["round"]))) for r in g]
        per_round = [x for x in per_round if x is not None]
        cpu_req = median(_div((r.get("target_cpu_pct") or 0) / 100 * 1e6, r.get("rps"))
                         if r.get("target_cpu_pct") is not None else None for r in g)
        base_cpu_req = median(_div((r.get("target_cpu_pct") or 0) / 100 * 1e6, r.get("rps"))
                              if r.get("target_cpu_pct") is not None else None for r in base)
        has_tool = cfg != "base"
        lost_vals = [r.get("lost") for r in g] if has_tool else []
        row = {
            "size": size, "config": cfg, "runs": len(g), "failed_runs": len(allg) - len(g),
            "rps": m["rps"], "rps_min": min((r["rps"] for r in g), default=None),
            "rps_max": max((r["rps"] for r in g), default=None),
            "rps_ratio": median(per_round) if cfg != "base" else (1.0 if g else None),
            "rps_ratios_per_round": per_round if cfg != "base" else None,
            "rps_ratio_of_medians": _div(m["rps"], b["rps"]),
            "p50_us": m["p50_us"], "p90_us": m["p90_us"], "p99_us": m["p99_us"], "p999_us": m["p999_us"],
            "p50_ratio": _div(m["p50_us"], b["p50_us"]), "p99_ratio": _div(m["p99_us"], b["p99_us"]),
            "p999_ratio": _div(m["p999_us"], b["p999_us"]),
            "target_cpu_pct": m["target_cpu_pct"], "target_cpu_us_per_req": cpu_req,
            "target_added_us_per_req": (cpu_req - base_cpu_req if has_tool and cpu_req is not None
                                        and base_cpu_req is not None else None),
            "tool_cpu_pct": m["tool_cpu_pct"] if has_tool else None, "wrk_cpu_pct": m["wrk_cpu_pct"],
            "steal_pct": m["steal_pct"],
            "tool_startup_s": m["tool_startup_s"], "tool_ready_s": m["tool_ready_s"],
            "tool_rss_kib": m["tool_rss_kib"],
            "tool_cpu_us_per_event": median(r["tool_cpu_s"] / r["events"] * 1e6
                                            if r.get("tool_cpu_s") is not None and r.get("events") else None
                                            for r in g),
            "events_per_req": median(_div(r.get("events"), r.get("requests")) for r in g),
            "lost": (None if not has_tool or any(v is None for v in lost_vals) else sum(lost_vals)),
            "lost_unknown_runs": sum(v is None for v in lost_vals),
            "truncated": sum(r.get("truncated") or 0 for r in g) if has_tool else None,
            "out_mb": _div(m["out_bytes"], 1e6) if has_tool else None,
            "nats_cpu_pct": median(r.get("nats_cpu_pct") for r in g),
            "metrics_samples": median(r.get("metrics_samples") for r in g),
        }
        exp = [r.get("export_events") for r in g]
        if any(v is not None for v in exp) or cfg in EXPORT_CONFIGS:
            row.update({k: median(r.get(k) for r in g) for k in ("export_events", "export_acked",
                                                                  "export_ms_per_1k", "stream_msgs")})
            drops = [r.get("export_dropped") for r in g]
            row["export_dropped"] = None if any(v is None for v in drops) else sum(drops)
            row["export_unknown_runs"] = sum(v is None for v in exp)
        rows.append(row)
    return rows


def bars(rows: list[dict]) -> list[Bar]:
    """Issue 6's bars against the summary rows."""
    by = {(r["size"], r["config"]): r for r in rows}
    out = []
    for cfg, size, need in RATIO_BARS:
        name = f"{cfg} >= {need:.2f} at {size}"
        r = by.get((size, cfg))
        if r is None or r["rps_ratio"] is None:
            why = "no runs" if r is None else "no baseline or no successful run"
            out.append(Bar(name, NOT_MEASURED, why))
        else:
            out.append(Bar(name, MET if r["rps_ratio"] >= need else NOT_MET, f"{r['rps_ratio']:.2f}"))
    tool_rows = [r for r in rows if r["config"] in TLSTAP_CONFIGS]
    if not tool_rows:
        out.append(Bar("zero lost events", NOT_MEASURED, "no tlstap configuration run"))
    else:
        unknown = sum(r["lost_unknown_runs"] for r in tool_rows)
        lost = {f"{r['config']}@{r['size']}": r["lost"] for r in tool_rows if r["lost"]}
        if unknown:
            out.append(Bar("zero lost events", NOT_MET, f"{unknown} run(s) without a readable summary"))
        elif lost:
            out.append(Bar("zero lost events", NOT_MET, ", ".join(f"{k}: {v:,}" for k, v in lost.items())))
        else:
            out.append(Bar("zero lost events", MET, "0"))
    return out + pair_bars(rows) + export_bars(rows)


def pair_bars(rows: list[dict]) -> list[Bar]:
    """|ratio(a) - ratio(b)| <= limit at each size where `a` ran (rule 4), both ratios shown."""
    by = {(r["size"], r["config"]): r for r in rows}
    out = []
    for a, b, limit, whose in PAIR_BARS:
        for size in dict.fromkeys(r["size"] for r in rows if r["config"] == a):
            name = f"{a} within {limit:.2f} of {b} at {size} ({whose})"
            ra, rb = by[(size, a)]["rps_ratio"], (by.get((size, b)) or {}).get("rps_ratio")
            if ra is None or rb is None:
                out.append(Bar(name, NOT_MEASURED, f"{b} not run" if (size, b) not in by else "no ratio"))
                continue
            diff = ra - rb
            out.append(Bar(name, MET if abs(diff) <= limit else NOT_MET, f"{a} {ra:.2f}, {b} {rb:.2f}: {diff:+.2f}"))
    return out


def export_bars(rows: list[dict]) -> list[Bar]:
    """Nothing dropped by the exporter, in every run of an exporting configuration (rule 3)."""
    exp = [r for r in rows if r["config"] in EXPORT_CONFIGS and r["runs"]]
    if not exp:
        return []
    unknown = sum(r["export_unknown_runs"] for r in exp)
    if unknown:
        return [Bar("export: nothing dropped", NOT_MET, f"{unknown} run(s) without the exporter's line")]
    dropped = {f"{r['config']}@{r['size']}": r["export_dropped"] for r in exp if r["export_dropped"]}
    if dropped:
        return [Bar("export: nothing dropped", NOT_MET, ", ".join(f"{k}: {v:,}" for k, v in dropped.items()))]
    return [Bar("export: nothing dropped", MET, "0")]


def export_lines(rows: list[dict]) -> list[str]:
    """One line per exporting row: what the exporter sent and what it cost."""
    out = []
    for r in rows:
        if r["config"] not in EXPORT_CONFIGS or not r["runs"]:
            continue
        out.append(f"export {r['config']} at {r['size']}: {_f(r['export_events'])} events, "
                   f"{_f(r['export_acked'])} acknowledged ({_f(r['stream_msgs'])} in the stream), "
                   f"{'?' if r['export_dropped'] is None else format(r['export_dropped'], ',')} dropped; "
                   f"exporter CPU {_f(r['export_ms_per_1k'], 2)} ms per 1000 events; nats-server "
                   f"{_f(r['nats_cpu_pct'], 1)}% CPU at idle priority (not in the tool's column)")
    return out


# ---- rendering -----------------------------------------------------------------------------

def _f(v, nd=0, suffix=""):
    return "-" if v is None else f"{v:,.{nd}f}{suffix}"


def _x(v):
    return "-" if v is None else f"{v:.2f}"


COLUMNS = ("size", "config", "runs", "RPS", "ratio", "p50 us", "p99 us", "p99.9 us", "p99 ratio",
           "target %CPU", "tool %CPU", "tool us/event", "events/req", "lost", "RSS MiB", "start-up s")


def table_rows(rows: list[dict]) -> list[tuple[str, ...]]:
    out = []
    for r in rows:
        tool = r["config"] != "base"
        out.append((
            r["size"], r["config"], f"{r['runs']}" + (f" ({r['failed_runs']} failed)" if r["failed_runs"] else ""),
            _f(r["rps"]), _x(r["rps_ratio"]), _f(r["p50_us"]), _f(r["p99_us"]), _f(r["p999_us"]),
            _x(r["p99_ratio"]) if tool else "-", _f(r["target_cpu_pct"]), _f(r["tool_cpu_pct"]),
            _f(r["tool_cpu_us_per_event"], 1), _f(r["events_per_req"], 2),
            ("?" if r["lost_unknown_runs"] else _f(r["lost"])) if tool else "-",
            _f(r["tool_rss_kib"] / 1024 if r["tool_rss_kib"] else None, 1) if tool else "-",
            _f(r["tool_startup_s"], 2) if tool else "-"))
    return out


def render_text(rows: list[dict], bar_list: list[Bar]) -> str:
    body = table_rows(rows)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(COLUMNS)]
    right = set(range(2, len(COLUMNS)))
    fmt = lambda cells: "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    lines = [fmt(COLUMNS), fmt(["-" * w for w in widths])]
    prev = None
    for cells in body:
        if prev is not None and cells[0] != prev:
            lines.append("")
        prev = cells[0]
        lines.append(fmt(cells))
    lines.append("")
    lines.append("ratio: RPS over the same round's baseline (median over rounds); latency from wrk")
    lines.append("")
    if export_lines(rows):
        lines += export_lines(rows) + [""]
    width = max([24] + [len(b.bar) for b in bar_list])
    for b in bar_list:
        lines.append(f"bar {b.bar:<{width}} {b.status:<12} ({b.value})")
    return "\n".join(lines) + "\n"


def render_markdown(meta: dict, rows: list[dict], bar_list: list[Bar], runs: list[dict]) -> str:
    a = meta.get("args", {})
    lines = ["# tlstap bench", ""]
    lines.append(f"{meta.get('started', '')}; {meta.get('host', {}).get('kernel', '')}, "
                 f"{meta.get('host', {}).get('cpus', '?')} CPUs; target: {meta.get('target', {}).get('what', '')}; "
                 f"wrk -t{a.get('threads')} -c{a.get('connections')} -d{a.get('duration')}s; "
                 f"{a.get('rounds')} interleaved rounds; pinned: {meta.get('pinned')}; "
                 f"wrk private libssl: {meta.get('wrk_private_ssl')}"
                 + ("" if meta.get("complete", True) else "; **INTERRUPTED: partial results**"))
    lines.append("")
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for cells in table_rows(rows):
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("*ratio*: requests/s over the baseline of the same round and size, median over rounds. "
                 "*tool us/event*: the tool's CPU from ready to exit per captured event. "
                 "*start-up s*: command start to its `ready in` line.")
    lines.append("")
    for line in export_lines(rows):
        lines.append(f"- {line}")
    if export_lines(rows):
        lines.append("")
    lines.append("| bar | status | measured |")
    lines.append("|---|---|---|")
    for b in bar_list:
        lines.append(f"| {b.bar} | {'**NOT MET**' if b.status == NOT_MET else b.status} | {b.value} |")
    lines.append("")
    lines.append("Commands (`{pid}` = the target, `{out}` = a file in the private work directory):")
    lines.append("")
    for name, cmd in meta.get("commands", {}).items():
        lines.append(f"- `{name}`: `{cmd}`")
    lines.append("")
    lines.append("<details><summary>runs</summary>")
    lines.append("")
    cols = ("round", "size", "config", "rps", "p50_us", "p99_us", "p999_us", "target_cpu_pct", "tool_cpu_pct",
            "events", "lost", "steal_pct", "error")
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in runs:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("-" if v is None else (f"{v:,.1f}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("</details>")
    return "\n".join(lines) + "\n"


def write_json(path: str, meta: dict, rows: list[dict], bar_list: list[Bar], runs: list[dict]) -> None:
    doc = {"meta": meta, "summary": rows, "bars": [asdict(b) for b in bar_list], "runs": runs}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def write_plot(path: str, rows: list[dict]) -> None:
    """Two panels: RPS ratio per configuration and size (with the bars as dashes), p99 latency."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes = list(dict.fromkeys(r["size"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    by = {(r["size"], r["config"]): r for r in rows}
    tools = [c for c in configs if c != "base"]
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    colors = {c: f"C{i}" for i, c in enumerate(configs)}
    need = {(size, cfg): v for cfg, size, v in RATIO_BARS}

    w = 0.8 / max(1, len(tools))
    for i, cfg in enumerate(tools):
        for j, size in enumerate(sizes):
            r = by.get((size, cfg))
            v = r["rps_ratio"] if r else None
            x = j - 0.4 + w * (i + 0.5)
            if v is not None:
                ax1.bar(x, v, w * 0.9, color=colors[cfg], label=cfg if j == 0 or cfg not in
                        ax1.get_legend_handles_labels()[1] else None)
                ax1.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom", fontsize=7)
            if (size, cfg) in need:
                ax1.hlines(need[(size, cfg)], x - w / 2, x + w / 2, colors="black", linestyles="dashed", lw=1.2)
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set_xticks(range(len(sizes)), sizes)
    ax1.set_ylabel("requests/s ratio to baseline (same round)")
    ax1.set_title("Throughput ratio (dashes: bars)")
    ax1.set_ylim(0, max([1.15] + [by[k]["rps_ratio"] * 1.1 for k in by if by[k]["rps_ratio"]]))
    if tools:
        ax1.legend(fontsize=8, loc="lower right")

    w = 0.8 / max(1, len(configs))
    all_ms: list[float] = []
    for i, cfg in enumerate(configs):
        xs, ys = [], []
        for j, size in enumerate(sizes):
            r = by.get((size, cfg))
            if r and r["p99_us"]:
                xs.append(j - 0.4 + w * (i + 0.5))
                ys.append(r["p99_us"] / 1000)
        if xs:
            ax2.bar(xs, ys, w * 0.9, color=colors[cfg], label=cfg)
            for x, y in zip(xs, ys):
                ax2.annotate(f"{y:.2f}", (x, y), ha="center", va="bottom", fontsize=7)
            all_ms.extend(ys)
    ax2.set_xticks(range(len(sizes)), sizes)
    log = bool(all_ms) and max(all_ms) / min(all_ms) > 20   # 1 KiB and 1 MiB side by side
    if log:
        from matplotlib.ticker import ScalarFormatter
        ax2.set_yscale("log")
        ax2.yaxis.set_major_formatter(ScalarFormatter())
    ax2.set_ylabel("p99 latency (ms" + (", log)" if log else ")"))
    ax2.set_title("p99 latency (median over rounds)")
    ax2.legend(fontsize=8)
    fig.savefig(path, dpi=110)
