// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * OpenSSL plaintext capture.
 *
 * One uprobe/uretprobe pair per attach point (user space picks the points:
 * the internal read/write functions when their code was analysed, else the
 * four exported SSL_read{,_ex}/SSL_write{,_ex}); the cookie says direction
 * and where the byte count lives. The entry saves the arguments per thread;
 * syscall tracepoints fired inside the call record the socket fd (this
 * kernel has no kprobes); the return copies exactly the bytes transferred
 * into the ring buffer, in chunks of at most CHUNK_MAX.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "tlstap.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";


#include "scope.h"
#include "conn.h"
#include "ring.h"
#include "emit.h"


/* An SSL call in progress on a thread. */
struct active_call {
	__u64 ssl;
	__u64 buf;
	__u64 out_ptr;      /* size_t* holding the byte count, 0 if the return value is */
	__u64 sp;           /* stack pointer at entry: tells nesting from a stale entry */
	__s32 fd;           /* first socket fd used by a syscall inside the call, -1 none */
	__u8 dir;
	__u8 depth;         /* nested probed calls (api placement: SSL_read -> SSL_read_ex) */
	__u8 live;          /* a call is in progress (task storage outlives calls) */
	__u8 iov;           /* buf is an NSPR PRIOVec array (PR_Writev), not the bytes */
};

/* Task-local storage: a pointer away from the task, cheaper than a hash
 * lookup keyed by pid_tgid on every probe hit and syscall. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct active_call);
} active SEC(".maps");

static __always_inline struct active_call *current_call(__u64 create)
{
	return bpf_task_storage_get(&active, bpf_get_current_task_btf(), 0, create);
}

/* Thread -> SSL* whose call saw no socket syscall: apps on memory BIOs
 * (node's TLSWrap) move the ciphertext right after the call, so the thread's
 * next socket syscall names the connection. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u64);
} pending SEC(".maps");

struct ssl_key {
	__u32 tgid;
	__u32 _pad;
	__u64 ssl;
};

/* What we last learnt about an SSL*'s socket; serves reads answered from
 * OpenSSL's own buffer, which make no syscall. */
struct conn_info {
	__u64 sk;           /* struct sock*, to notice a reused fd number */
	__s32 fd;
	__u32 _pad;
	struct conn_tuple tuple;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ssl_key);
	__type(value, struct conn_info);
} conns SEC(".maps");




static __always_inline __u64 arg_n(struct pt_regs *ctx, __u32 n)
{
	/* Load every candidate at its fixed ctx offset first: a switch on n
	 * lets clang compute the offset, which the verifier rejects for ctx. */
	__u64 a[5] = { PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx),
		       PT_REGS_PARM4(ctx), PT_REGS_PARM5(ctx) };
	return n < 5 ? a[n] : 0;
}

/* Entry of a probed call. take = 0: a call that is not to be captured (NSPR
 * I/O on a file or plain socket), still counted as nested when inside a live
 * call, so that its return does not end the outer one. */
static __always_inline int rw_enter_common(struct pt_regs *ctx, bool take, __u8 iov)
{
	__u64 cookie = bpf_get_attach_cookie(ctx);
	__u32 out = (cookie >> COOKIE_OUT_SHIFT) & 0xff;
	__u64 sp = PT_REGS_SP(ctx);

	struct active_call *a = current_call(take ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
	if (!a)
		return 0;
	if (a->live && sp < a->sp) {  /* deeper on the same stack: nested call */
		a->depth++;
		return 0;
	}
	if (!take) {
		/* not nested, so a live call here is stale (its return was never
		 * seen): without this, this call's return would end it */
		a->live = 0;
		return 0;
	}
	a->ssl = PT_REGS_PARM1(ctx);
	a->buf = PT_REGS_PARM2(ctx);
	a->out_ptr = out == COOKIE_RET_IS_COUNT ? 0 : arg_n(ctx, out);
	a->sp = sp;
	a->fd = -1;
	a->dir = cookie & COOKIE_DIR_MASK;
	a->depth = 0;
	a->live = 1;
	a->iov = iov;
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(ssl_rw_enter)
{
	if (!wanted(bpf_get_current_pid_tgid()))
		return 0;
	return rw_enter_common(ctx, true, 0);
}


/* A read/write-family syscall: if it runs inside a probed SSL call and uses
 * a socket, that socket is the call's connection. */
static __always_inline int on_io_syscall(int fd)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	if (cfg.target_tgid && (__u32)(pid_tgid >> 32) != cfg.target_tgid)
		return 0;
	if (fd < 0)
		return 0;
	struct active_call *a = current_call(0);
	if (a && !a->live)
		a = NULL;
	__u64 ssl;
	if (a) {
		if (a->fd >= 0)
			return 0;
		ssl = a->ssl;
	} else {
		__u64 *p = bpf_map_lookup_elem(&pending, &pid_tgid);
		if (!p)
			return 0;
		ssl = *p;
	}
	struct sock *sk = fd_to_sock(fd);
	if (!sk)
		return 0;
	if (a)
		a->fd = fd;
	else
		bpf_map_delete_elem(&pending, &pid_tgid);
	struct ssl_key k = { .tgid = pid_tgid >> 32, .ssl = ssl };
	struct conn_info *ci = bpf_map_lookup_elem(&conns, &k);
	if (ci && ci->fd == fd && ci->sk == (__u64)sk)
		return 0;
	struct conn_info n = { .sk = (__u64)sk, .fd = fd };
	read_tuple(sk, &n.tuple);
	bpf_map_update_elem(&conns, &k, &n, BPF_ANY);
	return 0;
}

#define IO_SYSCALL(name)                                                   \
	SEC("tracepoint/syscalls/sys_enter_" #name)                        \
	int sys_enter_##name(struct trace_event_raw_sys_enter *ctx)        \
	{                                                                  \
		return on_io_syscall((int)ctx->args[0]);                   \
	}

IO_SYSCALL(read)
IO_SYSCALL(write)
IO_SYSCALL(readv)
IO_SYSCALL(writev)
IO_SYSCALL(recvfrom)
IO_SYSCALL(sendto)
IO_SYSCALL(recvmsg)
IO_SYSCALL(sendmsg)

/* The same as one program on the raw sys_enter tracepoint: no per-syscall
 * perf trace buffer, so every other process's read/write pays a few ns, not
 * ~165 ns as with the eight syscalls/sys_enter_* above (user space uses
 * those only where this does not attach). */
#if defined(__TARGET_ARCH_x86)
#define NR_READ 0
#define NR_WRITE 1
#define NR_READV 19
#define NR_WRITEV 20
#define NR_SENDTO 44
#define NR_RECVFROM 45
#define NR_SENDMSG 46
#define NR_RECVMSG 47
#define SYSCALL_ARG1(regs) ((regs)->di)
#elif defined(__TARGET_ARCH_arm64)
#define NR_READ 63
#define NR_WRITE 64
#define NR_READV 65
#define NR_WRITEV 66
#define NR_SENDTO 206
#define NR_RECVFROM 207
#define NR_SENDMSG 211
#define NR_RECVMSG 212
#define SYSCALL_ARG1(regs) ((regs)->orig_x0)
#endif

#ifdef NR_READ
SEC("tp_btf/sys_enter")
int BPF_PROG(sys_enter_io, struct pt_regs *regs, long id)
{
	switch (id) {
	case NR_READ: case NR_WRITE: case NR_READV: case NR_WRITEV:
	case NR_SENDTO: case NR_RECVFROM: case NR_SENDMSG: case NR_RECVMSG:
		return on_io_syscall((int)SYSCALL_ARG1(regs));
	}
	return 0;
}
#endif


static __always_inline int ssl_rw_exit_common(struct pt_regs *ctx, long ret, bool direct)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct active_call *a = current_call(0);
	if (!a || !a->live)
		return 0;
	if (a->depth) {
		a->depth--;
		return 0;
	}
	struct active_call c = *a;
	a->live = 0;
	struct ssl_key k = { .tgid = pid_tgid >> 32, .ssl = c.ssl };
	if (c.dir == DIR_HANDSHAKE) {
		/* The syscalls inside named the socket (conns), so the first read,
		 * often served from what the handshake buffered, is attributed. On
		 * memory BIOs the thread's next socket syscall will do it. */
		if (c.fd < 0 && !bpf_map_lookup_elem(&conns, &k))
			bpf_map_update_elem(&pending, &pid_tgid, &c.ssl, BPF_ANY);
		return 0;
	}

	__u64 n = 0;
	if (c.out_ptr) {
		if ((int)ret <= 0)
			return 0;
		bpf_probe_read_user(&n, sizeof(n), (void *)c.out_ptr);
	} else {
		if ((int)ret <= 0)
			return 0;
		n = (int)ret;
	}
	if (!n)
		return 0;

	struct emit_ctx e;
	if (!call_header(&e, pid_tgid, c.dir, c.ssl, n, c.fd))
		return 0;

	struct conn_info *ci = bpf_map_lookup_elem(&conns, &k);
	if (ci) {
		e.ev.tuple = ci->tuple;
		if (c.fd < 0) {
			e.ev.fd = ci->fd;
			e.ev.flags = DF_FD_CACHED;
		}
	} else {
		__builtin_memset(&e.ev.tuple, 0, sizeof(e.ev.tuple));
		if (c.fd < 0)
			bpf_map_update_elem(&pending, &pid_tgid, &c.ssl, BPF_ANY);
	}

	e.buf = c.buf;
	e.captured = n;
	e.first = 1;
	e.iov = c.iov;
	emit_call(&e, direct);
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(ssl_rw_exit, long ret)
{
	return ssl_rw_exit_common(ctx, ret, true);
}

SEC("uretprobe")
int BPF_KRETPROBE(ssl_rw_exit_copy, long ret)
{
	return ssl_rw_exit_common(ctx, ret, false);
}

/* The SSL* is about to be freed: its address may come back for another
 * connection, so forget what we knew. */
SEC("uprobe")
int BPF_KPROBE(ssl_free_enter, void *ssl)
{
	struct ssl_key k = { .tgid = bpf_get_current_pid_tgid() >> 32, .ssl = (__u64)ssl };
	bpf_map_delete_elem(&conns, &k);
	return 0;
}

/* ---- NSPR (NSS) ------------------------------------------------------------
 * PR_Read/PR_Write/PR_Recv/PR_Send take (PRFileDesc *fd, buf, amount) and
 * return the byte count, like SSL_read/SSL_write; but they serve every NSPR
 * descriptor: files, pipes, plain sockets. Only an fd whose layer stack holds
 * NSS's SSL layer carries TLS plaintext, so the entry checks that first.
 *
 * NSS pushes its layer with ssl_PushIOLayer: the layer's methods are
 * PR_DESC_LAYERED, its secret is the sslSocket, and sslSocket's first member
 * (ss->fd) points back at a descriptor of the stack: the top one (the pointer
 * the application holds and passes here) when pushed, the SSL layer's own
 * once NSS has looked the socket up (ssl_FindSocket resets it, since a layer
 * pushed later swaps the contents of the top descriptor). NSPR's own
 * descriptors have identity PR_NSPR_IO_LAYER (0) and a PRFilePrivate secret
 * that starts with a state word, never such a pointer. The SSL layer's
 * identity number is assigned at run time (PR_GetUniqueIdentity), so it
 * cannot be compared directly. Layers an application pushes above SSL are
 * walked down (a few levels): their PR_Read reaches the SSL layer through
 * lower->methods, not through the exported PR_Read, so the top fd is the one
 * call to capture.
 */
struct pr_filedesc {            /* PRFileDesc (prio.h), unchanged since NSPR 4.0 */
	__u64 methods;
	__u64 secret;
	__u64 lower;
	__u64 higher;
	__u64 dtor;
	__s32 identity;
};

#define PR_DESC_LAYERED 4       /* PRIOMethods.file_type (the struct's first member) */
#define NSPR_LAYERS_MAX 4

static __always_inline bool nspr_has_ssl_layer(__u64 top)
{
	__u64 fd = top;
	for (int i = 0; i < NSPR_LAYERS_MAX && fd; i++) {
		struct pr_filedesc d;
		if (bpf_probe_read_user(&d, sizeof(d), (void *)fd))
			return false;
		if (d.identity > 0 && d.methods && d.secret) {
			__u32 type = 0;
			__u64 back = 0;
			if (!bpf_probe_read_user(&type, sizeof(type), (void *)d.methods) &&
			    type == PR_DESC_LAYERED &&
			    !bpf_probe_read_user(&back, sizeof(back), (void *)d.secret) &&
			    (back == fd || back == top))
				return true;
		}
		fd = d.lower;
	}
	return false;
}

SEC("uprobe")
int BPF_KPROBE(nspr_rw_enter)
{
	if (!wanted(bpf_get_current_pid_tgid()))
		return 0;
	return rw_enter_common(ctx, nspr_has_ssl_layer(PT_REGS_PARM1(ctx)), 0);
}

/* PR_Writev(fd, const PRIOVec *iov, PRInt32 iov_size, timeout): the return
 * says how many bytes, the exit walks the vectors (emit_iov_cb). */
SEC("uprobe")
int BPF_KPROBE(nspr_writev_enter)
{
	if (!wanted(bpf_get_current_pid_tgid()))
		return 0;
	return rw_enter_common(ctx, nspr_has_ssl_layer(PT_REGS_PARM1(ctx)), 1);
}
