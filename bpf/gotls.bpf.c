// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Go crypto/tls plaintext capture: (*tls.Conn).Read and (*tls.Conn).Write.
 *
 * Go (1.17+, amd64) passes arguments in registers (ABIInternal): for
 * Read/Write(b []byte) (int, error), RAX = c *tls.Conn, RBX = b.ptr,
 * RCX = b.len, and at return RAX = n. R14 always holds the running
 * goroutine's g.
 *
 * Why not uretprobes: a uretprobe overwrites the return address on the
 * stack, and Go copies goroutine stacks when they grow (and the runtime
 * checks return addresses in tracebacks), so a hijacked return address
 * crashes the program. User space instead attaches go_rw_ret at every RET
 * instruction of the function body (from the pclntab extent + disassembly).
 *
 * Why key by (tgid, g) and not by thread: a Read that parks waiting for
 * data resumes on whatever thread the scheduler picks, so the thread at
 * the RET is often not the one at the entry; the goroutine is the same.
 *
 * Which connection: not from syscalls as for OpenSSL (a syscall tracepoint
 * knows the thread, not the goroutine, and a Read served from bytes already
 * decrypted makes none), but from the Conn itself: tls.Conn.conn (offset
 * 0) is a net.Conn interface whose data word points to a *net.TCPConn,
 * whose first field is *netFD, which starts with poll.FD{fdmu (16 bytes),
 * Sysfd int}. That layout is the same in every Go release with the
 * register ABI (checked in the 1.19 and 1.27 sources). The fd is only
 * trusted when the kernel says it is a socket of this process (fd_to_sock).
 * A tls.Conn over another net.Conn type (net.Pipe, a wrapper) mostly gets
 * no 4-tuple; its words could by chance lead to a live socket's number, as
 * the interface's type word is not checked against *net.TCPConn's itab.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "tlstap.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Offsets along tls.Conn -> net.Conn data -> *netFD -> Sysfd (see above). */
#define GO_CONN_DATA 8       /* tls.Conn.conn: the interface's data word */
#define GO_NETFD 0           /* net.TCPConn{conn{fd *netFD}} */
#define GO_SYSFD 16          /* netFD.pfd (poll.FD): fdmu (16 bytes), then Sysfd */

#include "scope.h"
#include "conn.h"
#include "ring.h"
#include "emit.h"

#if defined(__TARGET_ARCH_x86)

struct go_key {
	__u32 tgid;
	__u32 _pad;
	__u64 g;
};

/* A Read/Write in progress on a goroutine. */
struct go_call {
	__u64 conn;         /* *tls.Conn */
	__u64 buf;
	__u8 dir;
};

/* LRU: a goroutine that never returns (the program exits, a panic unwinds)
 * must not fill the map for good. One entry per goroutine: a tls.Conn layered
 * over another tls.Conn (TLS inside TLS) on one goroutine is not supported. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct go_key);
	__type(value, struct go_call);
} go_calls SEC(".maps");

/* The connection a *tls.Conn serves: its generation and socket. Go frees a
 * Conn by garbage collection, which no probe sees, so an address that comes
 * back for another connection is told apart by its socket: another socket
 * (struct sock and inode) under the same address is another connection. */
struct go_conn {
	__u64 conn_id;      /* generation: bpf_ktime_get_ns() when it began */
	__u64 sk;           /* 0: no socket seen yet */
	__u64 ino;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct go_key);     /* .g holds the *tls.Conn */
	__type(value, struct go_conn);
} go_conns SEC(".maps");

static __always_inline __u64 go_conn_id(__u32 tgid, __u64 conn, struct sock *sk, __u64 ino)
{
	struct go_key k = { .tgid = tgid, .g = conn };
	struct go_conn *gc = bpf_map_lookup_elem(&go_conns, &k);
	if (gc && (!sk || (gc->sk == (__u64)sk && gc->ino == ino)))
		return gc->conn_id;
	struct go_conn n = { .conn_id = bpf_ktime_get_ns(), .sk = (__u64)sk, .ino = ino };
	if (gc && !gc->sk)
		n.conn_id = gc->conn_id;    /* its first socket: the same connection */
	bpf_map_update_elem(&go_conns, &k, &n, BPF_ANY);
	return n.conn_id;
}

SEC("uprobe")
int BPF_KPROBE(go_rw_enter)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	if (!wanted(pid_tgid))
		return 0;
	/* the morestack path jumps back to the entry: a second hit with the
	 * same arguments just overwrites the first */
	struct go_key k = { .tgid = pid_tgid >> 32, .g = ctx->r14 };
	struct go_call c = { .conn = ctx->ax, .buf = ctx->bx,
			     .dir = bpf_get_attach_cookie(ctx) & COOKIE_DIR_MASK };
	bpf_map_update_elem(&go_calls, &k, &c, BPF_ANY);
	return 0;
}

/* The socket fd under a *tls.Conn, or -1 (see the comment at the top). */
static __always_inline int conn_fd(__u64 conn)
{
	__u64 data = 0, netfd = 0;
	__s64 fd = -1;
	if (bpf_probe_read_user(&data, sizeof(data), (void *)(conn + GO_CONN_DATA)) || !data)
		return -1;
	if (bpf_probe_read_user(&netfd, sizeof(netfd), (void *)(data + GO_NETFD)) || !netfd)
		return -1;
	if (bpf_probe_read_user(&fd, sizeof(fd), (void *)(netfd + GO_SYSFD)))
		return -1;
	return fd >= 0 && fd < (1 << 30) ? (int)fd : -1;
}

static __always_inline int go_rw_ret_common(struct pt_regs *ctx, bool direct)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u64 cookie = bpf_get_attach_cookie(ctx);
	struct go_key k = { .tgid = pid_tgid >> 32, .g = ctx->r14 };
	struct go_call *p = bpf_map_lookup_elem(&go_calls, &k);
	struct go_call c;
	if (p) {
		c = *p;
		bpf_map_delete_elem(&go_calls, &k);
		if (c.dir != (cookie & COOKIE_DIR_MASK))
			return 0;   /* another function's call on this goroutine: not ours */
	} else if ((cookie & COOKIE_GO_SPILLED) && wanted(pid_tgid)) {
		/* entry not seen (the Read was blocked when the capture began):
		 * at the RET, [rsp] is the return address and [rsp+8], [rsp+16]
		 * the spill slots where this function stored c and b.ptr */
		__u64 spill[2];
		if (bpf_probe_read_user(spill, sizeof(spill), (void *)(PT_REGS_SP(ctx) + 8)))
			return 0;
		c.conn = spill[0];
		c.buf = spill[1];
		c.dir = cookie & COOKIE_DIR_MASK;
	} else {
		return 0;
	}
	__s64 n = (__s64)ctx->ax;
	if (n <= 0)
		return 0;

	int fd = conn_fd(c.conn);
	__u64 ino = 0;
	struct sock *sk = fd >= 0 ? fd_to_sock(fd, &ino) : NULL;
	struct emit_ctx e;
	if (!call_header(&e, pid_tgid, c.dir, c.conn, go_conn_id(pid_tgid >> 32, c.conn, sk, ino), n, -1))
		return 0;
	__builtin_memset(&e.ev.tuple, 0, sizeof(e.ev.tuple));
	if (sk) {
		e.ev.fd = fd;
		read_tuple(sk, &e.ev.tuple);
	}
	e.buf = c.buf;
	e.captured = n;
	e.first = 1;
	e.iov = 0;
	emit_call(&e, direct);
	return 0;
}

/* Attached at each RET of Read/Write (cookie: the direction), not as a uretprobe. */
SEC("uprobe")
int BPF_KPROBE(go_rw_ret)
{
	return go_rw_ret_common(ctx, true);
}

SEC("uprobe")
int BPF_KPROBE(go_rw_ret_copy)
{
	return go_rw_ret_common(ctx, false);
}

#endif
