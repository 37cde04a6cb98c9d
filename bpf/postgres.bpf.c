// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * PostgreSQL query audit. A backend process serves one connection; what it
 * runs is told by functions the server exports (its static exec_*_message
 * functions are inlined into PostgresMain in Debian's build):
 *   PostgresMain(dbname, username)        once per backend: who and where
 *   pq_getbyte() (return)                 the type of each frontend message
 *   pgstat_report_activity(state, text)   a statement starts (text: the
 *                                         simple query, or the prepared
 *                                         statement's text at Parse, Bind
 *                                         and Execute), or the backend goes
 *                                         idle (text NULL)
 *   EndCommand(qc, ...)                   a command completed: tag and rows
 *   EmitErrorReport()                     an error (or notice) is sent: its
 *                                         SQLSTATE, from errordata[]
 * User space pairs them per backend (audit/postgres.py). --pid of the
 * postmaster covers its backends: the scope test walks up the parents.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "tlstap.h"
#include "dbaudit.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#include "scope.h"
#include "ring.h"
#include "dbaudit_maps.h"

const volatile struct pg_layout layout SEC(".rodata.layout") = {
	.tag_stride = 0,
};

struct pg_event *pg_event_btf __attribute__((unused));
struct pg_activity *pg_activity_btf __attribute__((unused));

/* where a record is built: the ring gets only the bytes used (a statement's
 * text is mostly far shorter than DB_QUERY_MAX) */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pg_activity);
} scratch SEC(".maps");

/* backend -> type of the frontend message it is processing */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u8);
} message SEC(".maps");

/* --pid P means P and its descendants: the postmaster forks a backend per
 * connection (and its workers), which then has a tgid of its own. */
static __always_inline bool descends_from_target(void)
{
	struct task_struct *t = (struct task_struct *)bpf_get_current_task();
#pragma unroll
	for (int i = 0; i < PG_ANCESTRY_MAX; i++) {
		t = BPF_CORE_READ(t, real_parent);
		if (!t)
			return false;
		__u32 p = BPF_CORE_READ(t, tgid);
		if (p == cfg.target_tgid)
			return true;
		if (p <= 1)
			return false;
	}
	return false;
}

static __always_inline bool in_scope(__u64 id)
{
	if (cfg.target_tgid && (__u32)(id >> 32) != cfg.target_tgid && descends_from_target())
		id = (__u64)cfg.target_tgid << 32;   /* then only uid and cgroup remain */
	return wanted(id);
}

static __always_inline void fill(struct pg_event *e, __u8 kind, __u64 id)
{
	__u32 pid = id >> 32;
	__u8 *msg = bpf_map_lookup_elem(&message, &pid);
	e->kind = kind;
	e->msg = msg ? *msg : 0;
	e->has_text = 0;
	e->_pad0 = 0;
	e->text_len = 0;
	e->ts_ns = bpf_ktime_get_ns();
	e->pid = pid;
	e->tid = (__u32)id;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->sqlstate = 0;
	e->rows = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->name[0] = 0;
	e->db[0] = 0;
}

static __always_inline struct pg_activity *start(__u8 kind, __u64 id)
{
	__u32 zero = 0;
	struct pg_activity *a = bpf_map_lookup_elem(&scratch, &zero);
	if (a)
		fill(&a->e, kind, id);
	return a;
}

SEC("uprobe")
int BPF_KPROBE(postgres_main, const char *dbname, const char *username)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (!in_scope(id))
		return 0;
	struct pg_activity *a = start(PG_SESSION, id);
	if (!a)
		return 0;
	bpf_probe_read_user_str(a->e.name, sizeof(a->e.name), username);
	bpf_probe_read_user_str(a->e.db, sizeof(a->e.db), dbname);
	submit(a, sizeof(a->e));
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(getbyte_exit, int c)
{
	if (c < 'A' || c > 'z')      /* EOF, or not a message type */
		return 0;
	__u32 pid = bpf_get_current_pid_tgid() >> 32;
	__u8 m = c;
	bpf_map_update_elem(&message, &pid, &m, BPF_ANY);
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(report_activity, __u64 state, const char *text)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (!in_scope(id))
		return 0;
	struct pg_activity *a = start(PG_ACTIVITY, id);
	if (!a)
		return 0;
	if (!text) {
		submit(a, sizeof(a->e));
		return 0;
	}
	int n = bpf_probe_read_user_str(a->text, sizeof(a->text), text);
	if (n <= 0) {
		count(DCNT_READ_ERRORS);
		n = 1;
		a->text[0] = 0;
	}
	a->e.has_text = 1;
	/* a full buffer: the text was cut (or was exactly DB_QUERY_MAX - 1 long) */
	a->e.text_len = n == sizeof(a->text) ? DB_QUERY_MAX : n - 1;
	submit(a, sizeof(a->e) + text_size(n));
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(end_command, const void *qc)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (!in_scope(id))
		return 0;
	struct pg_activity *a = start(PG_END, id);
	if (!a)
		return 0;
	struct pg_event *e = &a->e;
	__u32 tag = 0;
	const char *name = NULL;
	void *table = (void *)(bpf_get_func_ip(ctx) + layout.tag_table);
	if (bpf_probe_read_user(&tag, sizeof(tag), qc + layout.qc_tag) ||
	    bpf_probe_read_user(&e->rows, sizeof(e->rows), qc + layout.qc_rows) ||
	    tag >= 4096 ||
	    bpf_probe_read_user(&name, sizeof(name), table + (__u64)tag * layout.tag_stride) ||
	    bpf_probe_read_user_str(e->name, PG_TAG_MAX, name) < 0)
		count(DCNT_READ_ERRORS);
	submit(a, sizeof(*e));
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(emit_error)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (!in_scope(id))
		return 0;
	__u64 ip = bpf_get_func_ip(ctx);
	int depth = -1;
	if (bpf_probe_read_user(&depth, sizeof(depth), (void *)(ip + layout.errordata_depth)) ||
	    depth < 0 || depth >= 16)      /* ERRORDATA_STACK_SIZE is 5 */
		return 0;
	__u32 code = 0;
	void *ed = (void *)(ip + layout.errordata) + (__u64)depth * layout.errordata_stride;
	if (bpf_probe_read_user(&code, sizeof(code), ed + layout.sqlerrcode)) {
		count(DCNT_READ_ERRORS);
		return 0;
	}
	/* classes 00, 01, 02 (success, warning, no data) are not errors; the
	 * first character is the low six bits, the second the next six, '0' = 0 */
	if ((code & 0x3f) == 0 && ((code >> 6) & 0x3f) <= 2)
		return 0;
	struct pg_activity *a = start(PG_ERROR, id);
	if (!a)
		return 0;
	a->e.sqlstate = code;
	submit(a, sizeof(a->e));
	return 0;
}
