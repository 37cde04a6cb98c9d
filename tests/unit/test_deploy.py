"""deploy/: the Kubernetes DaemonSet and the systemd unit use only what tlstap has.

Every flag is parsed by tlstap's own parser (tlstap.cli.build_parser) and the combination
is checked by the capture command's own rules (capture.choose_outputs); every host path is
one tlstap's code uses (preflight's constants and its cgroup v2 lookup) and exists here; the
capabilities are the ones tlstap's code names (preflight.CAP_*). Nothing is listed twice: a
flag renamed in the CLI makes this test fail.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess

import pytest

yaml = pytest.importorskip("yaml")   # pyproject's test extra

from tests.conftest import needs  # noqa: E402
from tlstap import cli, preflight  # noqa: E402
from tlstap.commands import capture  # noqa: E402
from tlstap.sizes import parse_size  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "deploy")
K8S = os.path.join(ROOT, "kubernetes")
UNIT = os.path.join(ROOT, "systemd", "tlstap.service")
ENV_FILE = os.path.join(ROOT, "systemd", "tlstap.env")


# ---- reading the files ------------------------------------------------------------------------

def k8s_docs() -> dict[str, dict]:
    """kind -> document, over every YAML file of deploy/kubernetes."""
    out = {}
    for name in sorted(os.listdir(K8S)):
        if name.endswith((".yaml", ".yml")):
            with open(os.path.join(K8S, name)) as f:
                for doc in yaml.safe_load_all(f):
                    if doc:
                        assert doc["kind"] not in out, f"two {doc['kind']} documents"
                        out[doc["kind"]] = doc
    return out


def container() -> dict:
    (c,) = k8s_docs()["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    return c


def unit_file(path: str = UNIT) -> dict[str, list[tuple[str, str]]]:
    """section -> [(key, value)] of a systemd unit (keys may repeat; comments and blanks skipped)."""
    out: dict[str, list[tuple[str, str]]] = {}
    section = None
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line.strip("[]")
                out.setdefault(section, [])
                continue
            assert section and "=" in line, f"{path}:{n}: not a key=value line: {line!r}"
            k, v = line.split("=", 1)
            out[section].append((k.strip(), v.strip()))
    return out


def unit_value(unit: dict, key: str, section: str = "Service") -> str | None:
    vals = [v for k, v in unit[section] if k == key]
    return vals[-1] if vals else None


def env_file(path: str = ENV_FILE) -> dict[str, str]:
    out = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                k, v = line.split("=", 1)
                out[k] = v
    return out


def k8s_argv() -> list[str]:
    """The container's args with $(VAR) replaced as the kubelet does, from the ConfigMap."""
    c = container()
    cm = k8s_docs()["ConfigMap"]["data"]
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == k8s_docs()["ConfigMap"]["metadata"]["name"]
            assert ref["key"] in cm, f"ConfigMap has no key {ref['key']}"
            env[e["name"]] = cm[ref["key"]]
    argv = []
    for a in c["args"]:
        for var in re.findall(r"\$\((\w+)\)", str(a)):
            assert var in env, f"args use $({var}), which the container's env does not define"
        argv.append(re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], str(a)))
    return argv


def unit_argv() -> list[str]:
    """ExecStart's arguments (after the program) expanded as systemd does: ${VAR} is one word,
    $VAR is split on white space."""
    env = env_file()
    words = shlex.split(unit_value(unit_file(), "ExecStart"))
    out = []
    for w in words[1:]:
        m = re.fullmatch(r"\$(\w+)", w)
        if m:
            assert m[1] in env, f"ExecStart uses ${m[1]}, not in {ENV_FILE}"
            out += env[m[1]].split()
            continue
        for var in re.findall(r"\$\{(\w+)\}", w):
            assert var in env, f"ExecStart uses ${{{var}}}, not in {ENV_FILE}"
        out.append(re.sub(r"\$\{(\w+)\}", lambda mm: env[mm[1]], w))
    return out


def parse_with_cli(argv: list[str]):
    """tlstap's own parser, then the capture command's own checks of the combination."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = cli.build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"tlstap {' '.join(argv)}: the CLI refuses it: {err.getvalue().strip().splitlines()[-1]}")
    capture.choose_outputs(argv[0], args)      # raises UsageError (one line) on a bad combination
    return args


def flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


#: what tlstap's code knows as host paths: BTF (preflight.BTF_PATH's directory), tracefs
#: (preflight.TRACEFS_DIRS) and the cgroup v2 root, found the way the wire source finds it
def tlstap_host_paths() -> list[str]:
    paths = [os.path.dirname(preflight.BTF_PATH), *preflight.TRACEFS_DIRS]
    root = preflight.cgroup2_root()
    if root:
        paths.append(root)
    return paths


def documented_caps() -> set[str]:
    return {n for n in dir(preflight) if n.startswith("CAP_")}


def k8s_quantity(q: str) -> int:
    """'1Gi' -> 1073741824 (binary suffixes only)."""
    return parse_size(q + "B" if q.endswith("i") else q, "quantity")


# ---- Kubernetes ---------------------------------------------------------------------------------

def test_manifests_parse():
    docs = k8s_docs()
    assert set(docs) >= {"DaemonSet", "ConfigMap"}
    ds = docs["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    tmpl = ds["spec"]["template"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= tmpl["metadata"]["labels"].items()
    assert "REPLACE-ME" in container()["image"]          # a placeholder, clearly marked


def test_daemonset_flags_exist_in_the_cli():
    argv = k8s_argv()
    assert argv[0] in capture.COMMANDS
    args = parse_with_cli(argv)
    assert args.export and args.metrics_addr and args.spool_dir


def test_daemonset_host_paths_are_tlstaps_and_exist():
    spec = k8s_docs()["DaemonSet"]["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    known = tlstap_host_paths()
    mounts = {m["name"]: m for m in container()["volumeMounts"]}
    host = [v for v in vols.values() if "hostPath" in v]
    assert host
    for v in host:
        p = v["hostPath"]["path"]
        assert any(k == p or k.startswith(p.rstrip("/") + "/") for k in known), \
            f"hostPath {p} is none of tlstap's paths {known}"
        assert os.path.isdir(p), f"hostPath {p} does not exist on this machine"
        m = mounts[v["name"]]
        assert m["mountPath"] == p, "tlstap looks for these at the host's own paths"
        assert m.get("readOnly") is True, f"{p}: mounted writable"
    assert {os.path.dirname(preflight.BTF_PATH), preflight.TRACEFS_DIRS[0]} <= \
        {v["hostPath"]["path"] for v in host}
    assert spec["hostPID"] is True and not spec.get("hostNetwork")


def test_daemonset_privileges():
    sc = container()["securityContext"]
    caps = sc["capabilities"]
    assert caps["drop"] == ["ALL"]
    added = {"CAP_" + c for c in caps["add"]}
    assert added <= documented_caps(), f"capabilities tlstap does not document: {added - documented_caps()}"
    assert {"CAP_SYS_ADMIN", "CAP_SYS_PTRACE"} <= added     # uprobes; other users' /proc/PID/maps
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"


def test_daemonset_spool_is_a_sized_volume():
    c = container()
    argv = k8s_argv()
    spool = flag_value(argv, "--spool-dir")
    (m,) = [m for m in c["volumeMounts"] if m["mountPath"] == spool]
    vols = {v["name"]: v for v in k8s_docs()["DaemonSet"]["spec"]["template"]["spec"]["volumes"]}
    ed = vols[m["name"]]["emptyDir"]
    need = parse_size(flag_value(argv, "--spool-max"), "--spool-max") + \
        parse_size(flag_value(argv, "--export-spool"), "--export-spool")
    assert k8s_quantity(ed["sizeLimit"]) >= need
    res = c["resources"]
    assert k8s_quantity(res["limits"]["memory"]) >= k8s_quantity(res["requests"]["memory"])


def test_daemonset_metrics_port_matches():
    c = container()
    port = int(flag_value(k8s_argv(), "--metrics-addr").rpartition(":")[2])
    (p,) = [p for p in c["ports"] if p["name"] == "metrics"]
    assert p["containerPort"] == port
    ann = k8s_docs()["DaemonSet"]["spec"]["template"]["metadata"]["annotations"]
    assert int(ann["prometheus.io/port"]) == port and ann["prometheus.io/path"] == "/metrics"
    for probe in ("livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/metrics" and get["port"] in ("metrics", port)


# ---- systemd ------------------------------------------------------------------------------------

def test_unit_flags_exist_in_the_cli():
    argv = unit_argv()
    assert argv[0] in capture.COMMANDS
    args = parse_with_cli(argv)
    assert args.export and args.metrics_addr and args.spool_dir


def test_unit_hardening():
    u = unit_file()
    v = lambda k: unit_value(u, k)  # noqa: E731
    assert v("Type") == "simple" and v("KillSignal") == "SIGINT" and v("Restart") == "on-failure"
    assert v("NoNewPrivileges") == "yes" and v("ProtectSystem") == "strict"
    assert v("PrivateTmp") == "yes" and v("ProtectHome") == "yes"
    assert int(v("TimeoutStopSec").rstrip("s")) >= 60          # the decoder's backlog at exit
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        caps = set(v(key).split())
        assert caps <= documented_caps(), f"{key}: {caps - documented_caps()}"
    spool = flag_value(unit_argv(), "--spool-dir")
    writable = (v("ReadWritePaths") or "").split() + [f"/var/cache/{d}" for d in (v("CacheDirectory") or "").split()]
    assert spool in writable, f"--spool-dir {spool} is read-only under ProtectSystem=strict"
    assert v("EnvironmentFile").lstrip("-") == "/etc/tlstap/tlstap.env"


@needs(shutil.which("systemd-analyze"), "systemd-analyze (apt-get install systemd)")
def test_unit_verifies(tmp_path):
    """systemd's own parser; ExecStart pointed at this machine's tlstap (the unit names the
    pip-installed /usr/local/bin/tlstap)."""
    exe = shutil.which("tlstap") or os.path.join(os.path.dirname(os.path.realpath(shutil.which("python3"))),
                                                 "tlstap")
    text = open(UNIT).read().replace("/usr/local/bin/tlstap", exe if os.path.exists(exe) else "/bin/true")
    (tmp_path / "tlstap.service").write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "tlstap.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "tlstap.service" not in r.stderr, r.stderr
