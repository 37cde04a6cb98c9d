// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * MariaDB query audit: every command a connection's thread runs goes through
 *   bool dispatch_command(enum enum_server_command command, THD *thd,
 *                         char *packet, uint packet_length, bool blocking)
 * whose packet is the command's payload (for COM_QUERY the query text, not
 * NUL-terminated). The entry probe copies it out at once: the connection's
 * network buffer that holds it is reused for the reply. The return probe
 * reads how the statement ended from THD's diagnostics area, which the next
 * command resets. THD member offsets come from the binary (audit/mysqld.py).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "tlstap.h"
#include "dbaudit.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#include "scope.h"
#include "ring.h"
#include "dbaudit_maps.h"

/* protocol command bytes (the client/server protocol, stable) we report */
#define COM_INIT_DB 2
#define COM_QUERY 3
#define COM_STMT_PREPARE 22

const volatile struct mysqld_layout layout SEC(".rodata.layout") = {
	.thread_id = NO_OFF, .db = NO_OFF, .stmt_da = NO_OFF,
	.sql_errno = NO_OFF, .status = NO_OFF,
};

struct mysqld_event *mysqld_event_btf __attribute__((unused));

/* where a record is built: the ring gets only the bytes used */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mysqld_event);
} scratch SEC(".maps");

/* thread -> THD of the command it runs (entry to return) */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u64);
} running SEC(".maps");

/* The scratch record, its head filled; NULL only if the map lookup fails. */
static __always_inline struct mysqld_event *start(__u8 kind, __u64 id)
{
	__u32 zero = 0;
	struct mysqld_event *e = bpf_map_lookup_elem(&scratch, &zero);
	if (!e)
		return NULL;
	e->kind = kind;
	e->retval = 0;
	e->command = 0;
	e->ts_ns = bpf_ktime_get_ns();
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->query_len = 0;
	e->conn_id = 0;
	e->da_status = 0;
	e->sql_errno = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->db[0] = 0;
	return e;
}

SEC("uprobe")
int BPF_KPROBE(dispatch_enter, __u64 command, void *thd, const char *packet, __u64 len)
{
	__u32 cmd = (__u32)command;
	if (cmd != COM_QUERY && cmd != COM_INIT_DB && cmd != COM_STMT_PREPARE)
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	if (!wanted(id))
		return 0;
	struct mysqld_event *e = start(MYSQLD_QUERY, id);
	if (!e)
		return 0;
	e->command = cmd;
	e->query_len = (__u32)len;
	__u32 n = (__u32)len;
	/* two constant bounds the verifier can follow (a clamped n it loses) */
	long err = n >= DB_QUERY_MAX ? bpf_probe_read_user(e->query, DB_QUERY_MAX, packet) :
				       bpf_probe_read_user(e->query, n & (DB_QUERY_MAX - 1), packet);
	if (err) {
		count(DCNT_READ_ERRORS);
		return 0;
	}
	if (layout.thread_id != NO_OFF)
		bpf_probe_read_user(&e->conn_id, sizeof(e->conn_id), thd + layout.thread_id);
	if (layout.db != NO_OFF) {
		const char *db = NULL;
		if (!bpf_probe_read_user(&db, sizeof(db), thd + layout.db) && db)
			bpf_probe_read_user_str(e->db, sizeof(e->db), db);
	}
	__u64 t = (__u64)thd;
	bpf_map_update_elem(&running, &id, &t, BPF_ANY);
	submit(e, offsetof(struct mysqld_event, query) + text_size(n));
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(dispatch_exit, long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u64 *thdp = bpf_map_lookup_elem(&running, &id);
	if (!thdp)
		return 0;
	void *thd = (void *)*thdp;
	bpf_map_delete_elem(&running, &id);
	struct mysqld_event *e = start(MYSQLD_DONE, id);
	if (!e)
		return 0;
	e->retval = ret & 1;
	if (layout.stmt_da != NO_OFF) {
		void *da = NULL;
		if (bpf_probe_read_user(&da, sizeof(da), thd + layout.stmt_da) || !da) {
			count(DCNT_READ_ERRORS);
		} else {
			if (layout.status != NO_OFF)
				bpf_probe_read_user(&e->da_status, sizeof(e->da_status), da + layout.status);
			if (layout.sql_errno != NO_OFF)
				bpf_probe_read_user(&e->sql_errno, sizeof(e->sql_errno), da + layout.sql_errno);
		}
	}
	submit(e, offsetof(struct mysqld_event, db));   /* the head: no db or query */
	return 0;
}
