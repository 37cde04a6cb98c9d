// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * tlstap bash / tlstap zsh: the command lines a user enters, and $?.
 *
 * A shell reads a command's lines from its line editor (bash: readline,
 * statically linked, whose readline_internal_teardown returns the line; zsh:
 * its zle module's zleread, whose zlegetline returns it) and, before it
 * reads the next command, it has the exit status of the last one in a global
 * (bash: last_command_exit_value, zsh: lastval).
 * So three probes (zsh needs one more, for zle's context):
 *   *_read_enter / zsh_line_enter   the editor's last step starts, for a
 *                command's line (not `read -e`, select's reply, vared):
 *                remember the thread
 *   read_return  that step's return value is the line: SHELL_LINE records
 *   prompt       the shell starts reading its next command: SHELL_PROMPT
 *                with the status global's value, which closes the lines
 *                since the last one (user space groups them)
 * The globals are read at the probe's ip plus an offset user space found in
 * the binary (struct shell_config): nothing about the shell's layout here.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "tlstap.h"
#include "shell.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#include "scope.h"
#include "counters.h"

const volatile struct shell_config scfg SEC(".rodata.shell") = {};

/* Records are reserved as void*: this puts struct shell_event in the BTF,
 * which tests check the Python mirror against. */
struct shell_event *shell_event_btf __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1024 * 1024);   /* ~250 lines: people type slowly */
} shell_events SEC(".maps");

DEFINE_COUNTERS(shell_counters, SCNT_MAX)

/* threads inside a read of a command line (entry seen, return not yet);
 * LRU: a shell killed while reading leaves nothing that fills the map */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} reading SEC(".maps");

/* zsh: the context of the zleread() each thread is in */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __s32);
} zle_context SEC(".maps");

/* shells (tgid) that read a command line since their last prompt: only
 * their prompts are sent, not those of the bash scripts on the host, whose
 * parser calls parse_command() before each of their commands too */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} typed SEC(".maps");

/* An int global of the traced shell at the probe's ip + off. */
static __always_inline int read_global(struct pt_regs *ctx, __s64 off, __s32 *out)
{
	return bpf_probe_read_user(out, sizeof(*out), (void *)(PT_REGS_IP(ctx) + off));
}

static __always_inline void fill(struct shell_event *e, __u64 id, __u8 kind)
{
	struct task_struct *t = bpf_get_current_task_btf();

	e->kind = kind;
	e->flags = 0;
	e->len = 0;
	e->status = 0;
	e->ts_ns = bpf_ktime_get_ns();
	e->start_ns = BPF_CORE_READ(t, group_leader, start_boottime);
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->_pad = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	struct tty_struct *tty = BPF_CORE_READ(t, signal, tty);
	e->tty[0] = 0;
	if (tty)
		bpf_core_read_str(e->tty, sizeof(e->tty), &tty->name);
}

/* Did the shell read a command line since its last prompt? (Forgets it.) */
static __always_inline bool typed_since(__u64 id)
{
	__u32 tgid = id >> 32;
	return bpf_map_delete_elem(&typed, &tgid) == 0;
}

/* A prompt record with the exit status ($?) the shell holds at this point, or
 * a counted read error when the status cannot be read. */
static __always_inline void prompt(struct pt_regs *ctx, __u64 id)
{
	__s32 status = 0;
	if (read_global(ctx, scfg.status_off, &status)) {
		count(SCNT_READ_ERRORS);
		return;
	}
	struct shell_event *e = bpf_ringbuf_reserve(&shell_events, offsetof(struct shell_event, line), 0);
	if (!e) {
		count(SCNT_LOST);
		return;
	}
	fill(e, id, SHELL_PROMPT);
	e->status = status;
	count(SCNT_PROMPTS);
	bpf_ringbuf_submit(e, 0);
}

static __always_inline void start_read(void)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u8 one = 1;
	bpf_map_update_elem(&reading, &tid, &one, BPF_ANY);
}

/* bash: parse_command(), which reader_loop calls before each command, and
 * parse_and_execute (eval, source, PROMPT_COMMAND) calls nested: only the
 * top level's is a prompt. */
SEC("uprobe")
int BPF_KPROBE(bash_prompt)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (!wanted(id))
		return 0;
	__s32 nested = 0;
	if (read_global(ctx, scfg.nest_off, &nested)) {
		count(SCNT_READ_ERRORS);
		return 0;
	}
	if (nested || !typed_since(id))
		return 0;
	prompt(ctx, id);
	return 0;
}

/* bash: readline_internal_teardown(eof), readline's last step; `read -e`
 * reads with readline too, inside a builtin. */
SEC("uprobe")
int BPF_KPROBE(bash_read_enter)
{
	if (!wanted(bpf_get_current_pid_tgid()))
		return 0;
	__s32 busy = 0;
	if (read_global(ctx, scfg.busy_off, &busy)) {
		count(SCNT_READ_ERRORS);
		return 0;
	}
	if (!busy)
		start_read();
	return 0;
}

/* zsh: zleentry(cmd, char **lp, char **rp, int flags, int context), in the
 * zsh binary, variadic after cmd: on x86-64 the va_args arrive in rsi, rdx,
 * rcx, r8. A command's first line (start_ctx) is read once zsh has shown PS1:
 * $? is final there. */
SEC("uprobe")
int BPF_KPROBE(zsh_prompt, int cmd, void *lp, void *rp, int flags, int context)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (cmd != scfg.read_cmd || context != scfg.start_ctx || !wanted(id) || !typed_since(id))
		return 0;
	prompt(ctx, id);
	return 0;
}

/* zsh's zle module: zleread(lp, rp, flags, context, init, finish) edits a
 * line; remember its context for the zlegetline() that returns the line. */
SEC("uprobe")
int BPF_KPROBE(zsh_read_enter, void *lp, void *rp, int flags, int context)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (!wanted(id))
		return 0;
	__u32 tid = (__u32)id;
	__s32 c = context;
	bpf_map_update_elem(&zle_context, &tid, &c, BPF_ANY);
	return 0;
}

/* zleread's last step is zlegetline(NULL, NULL), the edited line with a
 * "\n" appended (user space drops the one without: an aborted line). Its
 * entry comes after the user pressed Enter, so a zsh that was waiting at its
 * prompt when the probes were attached is seen too; a context not seen is
 * taken for a command's. */
SEC("uprobe")
int BPF_KPROBE(zsh_line_enter, void *ll, void *cs)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (ll || cs || !wanted(id))
		return 0;
	__u32 tid = (__u32)id;
	__s32 *c = bpf_map_lookup_elem(&zle_context, &tid);
	if (c && (*c == scfg.select_ctx || *c == scfg.vared_ctx))
		return 0;
	start_read();
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(read_return, const char *line)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id;
	if (!bpf_map_lookup_elem(&reading, &tid))
		return 0;
	bpf_map_delete_elem(&reading, &tid);
	if (!line)              /* end of input (Ctrl-D) */
		return 0;
	__u32 tgid = id >> 32;
	__u8 one = 1;
	bpf_map_update_elem(&typed, &tgid, &one, BPF_ANY);
	count(SCNT_LINES);
	for (int i = 0; i < SHELL_CHUNKS_MAX; i++) {
		struct shell_event *e = bpf_ringbuf_reserve(&shell_events, sizeof(*e), 0);
		if (!e) {
			count(SCNT_LOST);
			return 0;
		}
		fill(e, id, SHELL_LINE);
		long n = bpf_probe_read_user_str(e->line, SHELL_LINE_MAX, line + i * (SHELL_LINE_MAX - 1));
		if (n <= 0) {
			count(SCNT_READ_ERRORS);
			bpf_ringbuf_discard(e, 0);
			return 0;
		}
		__u8 flags = 0;
		if (n == SHELL_LINE_MAX)     /* no NUL within this record: the line goes on */
			flags = i == SHELL_CHUNKS_MAX - 1 ? SF_TRUNCATED : SF_MORE;
		e->len = n - 1;
		e->flags = flags;
		bpf_ringbuf_submit(e, 0);
		if (!(flags & SF_MORE))
			break;
	}
	return 0;
}
