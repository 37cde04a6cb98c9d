"""Where tlstap bash / zsh probe Debian's bash and zsh, found in the binaries themselves: each
offset must land on the function it names and each global offset on the global (pyelftools'
own symbol lookup is the check)."""
import os
import shutil

import pytest

from tests.conftest import need_tool
from tlstap.audit.shell import find_bash, find_zsh
from tlstap.errors import UsageError
from tlstap.probes.elf import ElfImage


def _sym(path, name):
    with ElfImage.open(path) as img:
        for table in (".dynsym", ".symtab"):
            sec = img.elf.get_section_by_name(table)
            for s in (sec.get_symbol_by_name(name) or []) if sec else []:
                if s["st_shndx"] != "SHN_UNDEF":
                    return s["st_value"]
    raise AssertionError(f"{name} not in {path}")


def _probed_vaddr(path, func, offset):
    vaddr = _sym(path, func)
    with ElfImage.open(path) as img:
        foff = img.vaddr_to_offset(vaddr)
    assert offset - foff in (0, 4), f"{func}: probe at +{offset - foff}, not its entry (or past endbr64)"
    return vaddr + offset - foff


def test_bash():
    bash = os.path.realpath(need_tool("bash"))
    t = find_bash(bash)
    with ElfImage.open(bash) as img:
        assert not [n for n in img.needed if "readline" in n]      # Debian links readline in
    by = {(p.program, p.retprobe): p for p in t.probes}
    rl = _probed_vaddr(bash, "readline_internal_teardown", by["bash_read_enter", False].offset)
    assert by["read_return", True].offset == by["bash_read_enter", False].offset
    pc = _probed_vaddr(bash, "parse_command", by["bash_prompt", False].offset)
    assert pc + t.config["status_off"] == _sym(bash, "last_command_exit_value")
    assert pc + t.config["nest_off"] == _sym(bash, "parse_and_execute_level")
    assert rl + t.config["busy_off"] == _sym(bash, "executing_builtin")


def test_zsh():
    zsh = os.path.realpath(need_tool("zsh"))
    t = find_zsh(zsh)
    assert (t.config["read_cmd"], t.config["select_ctx"]) == (1, 2)    # ZLE_CMD_READ, ZLCON_SELECT
    (pr,) = [p for p in t.probes if p.program == "zsh_prompt"]
    zle = {p.path for p in t.probes if p.program != "zsh_prompt"}
    assert len(zle) == 1 and zle.pop().endswith("/zsh/zle.so")
    assert _probed_vaddr(zsh, "zleentry", pr.offset) + t.config["status_off"] == _sym(zsh, "lastval")


def test_not_a_shell():
    with pytest.raises(UsageError, match=r"ls: no readline_internal_teardown, parse_command, .* not a bash"):
        find_bash(os.path.realpath(shutil.which("ls")))
