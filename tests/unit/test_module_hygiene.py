"""Structure rules the code review enforces, checked on the source (ast): no module uses a
private name of another module, and each shared fact is defined in one place."""
from __future__ import annotations

import ast
import re
from pathlib import Path

TREE = Path(__file__).resolve().parents[2]
ROOT = TREE / "src" / "tlstap"
#: underscore names of the standard library that are its public API
STDLIB_PUBLIC = {"os._exit", "ctypes._SimpleCData"}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield path, parts, ast.parse(path.read_text(), str(path))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _package(parts: tuple[str, ...], path: Path) -> tuple[str, ...]:
    return parts if path.name == "__init__.py" else parts[:-1]


def _absolute(node: ast.ImportFrom, package: tuple[str, ...]) -> tuple[str, ...]:
    base = package[:len(package) - node.level + 1] if node.level else ()
    return base + tuple((node.module or "").split(".")) if node.module else base


def _crossing(target: tuple[str, ...], package: tuple[str, ...]) -> str | None:
    """The first private component of dotted name `target` that `package` is not inside of
    (a package's private module is for that package's own modules)."""
    for i, part in enumerate(target):
        if _private(part) and package[:i] != target[:i]:
            return ".".join(target[:i + 1])
    return None


def _defined_here(tree: ast.Module) -> set[str]:
    """Names a module defines itself: functions, classes, names and attributes it assigns."""
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            names.add(n.attr)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
    return names


def private_uses() -> list[str]:
    bad = []
    for path, parts, tree in _modules():
        package = _package(parts, path)
        own = _defined_here(tree)
        where = path.relative_to(ROOT.parent)
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom):
                target = _absolute(n, package)
                if target[:1] != ("tlstap",):
                    continue
                crossing = _crossing(target, package)
                if crossing:
                    bad.append(f"{where}:{n.lineno}: imports from {crossing}")
                for a in n.names:
                    if _private(a.name) and _crossing(target + (a.name,), package):
                        bad.append(f"{where}:{n.lineno}: imports {'.'.join(target)}.{a.name}")
            elif isinstance(n, ast.Import):
                for a in n.names:
                    target = tuple(a.name.split("."))
                    if target[:1] == ("tlstap",) and _crossing(target, package):
                        bad.append(f"{where}:{n.lineno}: imports {a.name}")
            elif isinstance(n, ast.Attribute) and _private(n.attr) and n.attr not in own:
                base = ast.unparse(n.value)
                if f"{base}.{n.attr}" not in STDLIB_PUBLIC:
                    bad.append(f"{where}:{n.lineno}: uses {base}.{n.attr}, private to another module")
    return bad


def test_no_module_uses_private_names_of_another():
    assert private_uses() == []


def _literal_constants() -> dict[tuple[str, str], list[str]]:
    """(NAME, repr(value)) -> modules that assign that literal to that public name."""
    out: dict[tuple[str, str], list[str]] = {}
    for path, _parts, tree in _modules():
        for n in tree.body:
            if not isinstance(n, ast.Assign):
                continue
            for target in n.targets:
                pairs = [(target, n.value)]
                if isinstance(target, ast.Tuple) and isinstance(n.value, ast.Tuple):
                    pairs = list(zip(target.elts, n.value.elts))
                for t, v in pairs:
                    if isinstance(t, ast.Name) and t.id.isupper() and not _private(t.id):
                        try:
                            value = ast.literal_eval(v)
                        except ValueError:
                            continue
                        out.setdefault((t.id, repr(value)), []).append(str(path.relative_to(ROOT.parent)))
    return out


def test_each_constant_is_defined_once():
    """A constant two modules define alike (LINKTYPE_*, CAP_*, ...) is one fact: one defines it,
    the other imports it."""
    twice = {k: v for k, v in _literal_constants().items() if len(v) > 1}
    assert twice == {}


def _clock_offsets() -> list[str]:
    """Functions that read both the monotonic clock (bpf_ktime_get_ns) and the wall clock:
    each computes the offset between them."""
    mono, wall = {"monotonic_ns", "CLOCK_MONOTONIC"}, {"time_ns", "CLOCK_REALTIME"}
    out = []
    for path, _parts, tree in _modules():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                used = {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)}
                if used & mono and used & wall:
                    out.append(f"{path.relative_to(ROOT.parent)}:{fn.name}")
    return out


def test_wall_clock_offset_is_computed_in_one_place():
    assert _clock_offsets() == ["tlstap/events.py:wall_clock_offset_ns"]


BPF = TREE / "bpf"


def _bpf_sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(BPF.glob("*.[ch]")) if p.name != "vmlinux.h"}


def test_bpf_macros_are_defined_in_one_file():
    """AF_INET, S_IFSOCK, ...: one header says them, the objects include it (an #if/#elif pair
    of one file, per architecture, is fine)."""
    where: dict[str, set[str]] = {}
    for name, text in _bpf_sources().items():
        for m in re.finditer(r"^#define\s+(\w+)", text, re.M):
            where.setdefault(m.group(1), set()).add(name)
    assert {k: sorted(v) for k, v in where.items() if len(v) > 1} == {}


def test_socket_of_an_fd_and_its_tuple_are_read_in_conn_h_only():
    """The fd -> struct sock walk and the 4-tuple read are conn.h's (openssl, gotls and packets
    objects share them): no object reads the fd table or the socket's addresses itself."""
    readers = {name for name, text in _bpf_sources().items()
               if re.search(r"\bfdt\b|skc_rcv_saddr|skc_v6_rcv_saddr|private_data", text)}
    assert readers == {"conn.h"}
