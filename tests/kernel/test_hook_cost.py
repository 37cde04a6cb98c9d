"""scripts/hook_cost.py (issue 17: TC against cgroup_skb) measures what it says and undoes what it does.

A short phase of each condition: the target pair's 1 KiB ping-pong is captured as the
segments it really carries, the other pair's as nothing; the hooks run where the script says (TC once per loopback packet,
cgroup_skb at the root at both ends, on the scoped cgroup for the target's socket only).
After it: no scratch cgroup, no child process, BPF statistics back as they were.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "hook_cost.py"
N = 300


def _load():
    spec = importlib.util.spec_from_file_location("hook_cost", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _runs(row: dict, names: tuple[str, ...]) -> float:
    return sum(row.get(n + ".cnt", 0) for n in names)


def _children() -> list[str]:
    me = str(os.getpid())
    return [p for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == me]


def _ppid(pid: str) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[1]
    except OSError:
        return None


def test_hook_cost_counts_the_scope_and_leaves_nothing(monkeypatch):
    hc = _load()
    monkeypatch.setattr(hc, "PHASES", ((1024, N),))
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        stats_before = f.read()
    tc = tuple(v[1] for v in hc.TC_PROGRAMS.values())
    cg_out = tuple(v[1] for v in hc.CG_PROGRAMS.values())
    cg_in = tuple(v[0] for v in hc.CG_PROGRAMS.values())
    with hc.Bench() as bench:
        cg_dir = bench.cg_dir
        assert os.path.isdir(cg_dir)
        rows = {cond: {r["pair"]: r for r in bench.run(cond)} for cond in hc.CONDS}
    none = rows.pop("none")
    assert none["target"]["client"] > 0 and "packets" not in none["target"]
    for cond, r in rows.items():
        t, o = r["target"], r["other"]
        # what the target's connection carried: the phase's header, then N requests and N responses
        # in one segment each (TCP_NODELAY); -m pcapng's filter "tcp" keeps pure ACKs as well
        sent = 1 + 2 * N
        got = round(t["packets"] * N)
        assert got == sent or (cond == "tc lo" and sent < got < sent + N // 10), (cond, got)
        assert (t["lost"], o["packets"]) == (0, 0), cond
        # other loopback traffic of the host may run the programs too: at least, not exactly
        if cond.startswith("tc"):
            assert _runs(t, tc) >= 2 and _runs(o, tc) >= 2, cond
        elif cond == "cg root":
            assert _runs(o, cg_out) >= 2 and _runs(o, cg_in) >= 2, cond
        else:
            assert _runs(t, cg_out) >= 1 and _runs(t, cg_in) >= 1, cond
            assert _runs(o, cg_out + cg_in) < 0.05, cond     # a stray delayed ACK of the idle target at most
    assert not os.path.exists(cg_dir)
    assert _children() == []
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        assert f.read() == stats_before
