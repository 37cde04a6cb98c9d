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

#define AF_INET 2
#define AF_INET6 10
#define S_IFMT 00170000
#define S_IFSOCK 0140000

const volatile struct config cfg = {
	.target_tgid = 0,
	.target_uid = (__u32)-1,
	.max_payload = 1 << 20,
	.target_cgroup = 0,
};

#include "scope.h"

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20);   /* resized by --mapsize before load */
} events SEC(".maps");

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

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct scratch {
	struct data_event ev;
	__u8 data[CHUNK_MAX];
};

/* One slot per CPU (max_entries set to the CPU count before load): a
 * PERCPU_ARRAY value cannot exceed 32 KiB. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch_buf SEC(".maps");

static __always_inline struct scratch *get_scratch(void)
{
	__u32 cpu = bpf_get_smp_processor_id();
	return bpf_map_lookup_elem(&scratch_buf, &cpu);
}

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} call_seq SEC(".maps");

static __always_inline void count(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);
	if (v)
		*v += n;
}


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

/* Fill a conn_tuple from a struct sock (CO-RE: layouts of the running kernel). */
static __always_inline void read_tuple(struct sock *sk, struct conn_tuple *t)
{
	t->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (t->family != AF_INET && t->family != AF_INET6)
		return;
	t->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	if (!t->lport)   /* a closed socket has released its port number (inet_put_port) */
		t->lport = bpf_ntohs(BPF_CORE_READ((struct inet_sock *)sk, inet_sport));
	t->rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (t->family == AF_INET) {
		/* the cast sizes the copy: BPF_CORE_READ_INTO reads sizeof(*dst) */
		BPF_CORE_READ_INTO((__be32 *)t->laddr, sk, __sk_common.skc_rcv_saddr);
		BPF_CORE_READ_INTO((__be32 *)t->raddr, sk, __sk_common.skc_daddr);
	} else {
		BPF_CORE_READ_INTO((struct in6_addr *)t->laddr, sk, __sk_common.skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO((struct in6_addr *)t->raddr, sk, __sk_common.skc_v6_daddr);
	}
}

/* A BTF view of a kernel pointer (6.2+; the verifier makes it a plain move). */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;

/* fd -> struct sock* of the current task, or NULL when fd is not a socket. */
static __always_inline struct sock *fd_to_sock(int fd)
{
	/* Plain loads through the BTF task pointer: the verifier turns them into
	 * fault-safe loads, each far cheaper than a bpf_probe_read_kernel call. */
	struct task_struct *task = bpf_get_current_task_btf();
	struct fdtable *fdt = task->files->fdt;
	if (!fdt || (unsigned int)fd >= fdt->max_fds)
		return NULL;
	struct file *f = NULL;
	bpf_probe_read_kernel(&f, sizeof(f), &fdt->fd[fd]);   /* an index: no BTF walk */
	if (!f)
		return NULL;
	f = bpf_rdonly_cast(f, bpf_core_type_id_kernel(struct file));
	if ((f->f_inode->i_mode & S_IFMT) != S_IFSOCK)
		return NULL;
	struct socket *sock = bpf_rdonly_cast(f->private_data, bpf_core_type_id_kernel(struct socket));
	return sock ? sock->sk : NULL;
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

/* Wake the reader only once the ring is an eighth full: a wakeup per record
 * costs the traced thread an irq_work and pulls the reader onto its CPU
 * (wake-affine). The reader polls on a short timer while data flows. */
static __always_inline __u64 wakeup_flag(void)
{
	__u64 avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	__u64 size = bpf_ringbuf_query(&events, BPF_RB_RING_SIZE);
	return avail >= size / 8 ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

/* Reads user memory straight into a ring-buffer reservation (6.16+). Weak:
 * on older kernels libbpf leaves it unresolved and user space loads
 * ssl_rw_exit_copy instead of ssl_rw_exit (capture.py picks one). */
extern int bpf_probe_read_user_dynptr(struct bpf_dynptr *dptr, __u32 off, __u32 size,
				      const void *unsafe_ptr) __ksym __weak;

struct emit_ctx {
	struct data_event ev;   /* header of the call's records; offset/len/flags per chunk */
	__u64 buf;
	__u64 captured;
	__u32 first;            /* chunk index of bpf_loop's index 0 */
	__u64 iov_off;          /* PR_Writev: call offset of the current vector */
	__u64 iov_src;          /* its address */
	__u64 iov_len;          /* its length, as far as captured */
};

static __always_inline void count_submit(int err, __u32 len)
{
	if (err) {
		count(CNT_LOST_RECORDS, 1);
		count(CNT_LOST_BYTES, len);
	} else {
		count(CNT_RECORDS, 1);
		count(CNT_BYTES, len);
	}
}

/* Sets the per-chunk header fields; returns the chunk length, 0 when done. */
static __always_inline __u32 chunk_header(__u32 i, struct emit_ctx *e)
{
	__u64 off = (__u64)i * CHUNK_MAX;
	if (off >= e->captured)
		return 0;
	__u64 left = e->captured - off;
	__u32 len = left > CHUNK_MAX ? CHUNK_MAX : left;
	e->ev.offset = off;
	e->ev.len = len;
	e->ev.flags = (i == 0 ? DF_FIRST : 0) | (e->ev.flags & DF_FD_CACHED) |
		      (off + len >= e->captured ? DF_LAST : 0);
	return len;
}

/* Two copies: user memory -> per-CPU scratch -> ring. Also the fallback when
 * a direct read fails: bpf_probe_read_user zeroes what it could not read. */
static __noinline int emit_chunk_copy(__u32 i, struct emit_ctx *e)
{
	__u32 len = chunk_header(i, e);
	if (!len || len > CHUNK_MAX)    /* the bound is for the verifier */
		return 1;
	struct scratch *s = get_scratch();
	if (!s)
		return 1;
	s->ev = e->ev;
	if (bpf_probe_read_user(s->data, len, (void *)(e->buf + e->ev.offset))) {
		count(CNT_READ_ERRORS, 1);
		__builtin_memset(s->data, 0, 8);
	}
	count_submit(bpf_ringbuf_output(&events, s, sizeof(struct data_event) + len, wakeup_flag()), len);
	return 0;
}

static long emit_chunk_copy_cb(__u32 i, struct emit_ctx *e)
{
	return emit_chunk_copy(i + e->first, e);
}

/* One copy: user memory straight into a variable-size ring reservation. */
static __noinline int emit_chunk_direct(__u32 i, struct emit_ctx *e)
{
	__u32 len = chunk_header(i, e);
	if (!len || len > CHUNK_MAX)
		return 1;
	struct bpf_dynptr dp;
	if (bpf_ringbuf_reserve_dynptr(&events, sizeof(struct data_event) + len, 0, &dp)) {
		bpf_ringbuf_discard_dynptr(&dp, 0);
		count_submit(1, len);
		return 0;
	}
	if (bpf_probe_read_user_dynptr(&dp, sizeof(struct data_event), len, (void *)(e->buf + e->ev.offset))) {
		/* page not present: the record must not show stale ring bytes */
		bpf_ringbuf_discard_dynptr(&dp, 0);
		return emit_chunk_copy(i, e);
	}
	bpf_dynptr_write(&dp, 0, &e->ev, sizeof(struct data_event), 0);
	bpf_ringbuf_submit_dynptr(&dp, wakeup_flag());
	count_submit(0, len);
	return 0;
}

static long emit_chunk_direct_cb(__u32 i, struct emit_ctx *e)
{
	return emit_chunk_direct(i + e->first, e);
}

/* PR_Writev: the bytes written are spread over the caller's PRIOVec array;
 * they go out as one call whose records follow the vectors in order (the
 * decoder joins records by offset, whatever their lengths). */
struct pr_iovec {               /* PRIOVec (prio.h) */
	__u64 base;
	__s32 len;
	__u32 _pad;
};

#define NSPR_IOV_MAX 16         /* PR_MAX_IOVECTOR_SIZE: PR_Writev refuses more */

/* Global (not static): the verifier checks it once, not once per call site
 * with every range the callers' loop counters can take. */
__noinline int emit_piece(struct emit_ctx *e, __u64 src, __u64 off, __u64 len, bool last)
{
	if (!e || !len || len > CHUNK_MAX)
		return 0;
	struct scratch *s = get_scratch();
	if (!s)
		return 0;
	s->ev = e->ev;
	s->ev.offset = off;
	s->ev.len = len;
	s->ev.flags = (off == 0 ? DF_FIRST : 0) | (e->ev.flags & DF_FD_CACHED) | (last ? DF_LAST : 0);
	if (bpf_probe_read_user(s->data, len, (void *)src)) {
		count(CNT_READ_ERRORS, 1);
		__builtin_memset(s->data, 0, 8);
	}
	count_submit(bpf_ringbuf_output(&events, s, sizeof(struct data_event) + len, wakeup_flag()), len);
	return 0;
}

/* bpf_loop callback: chunk k of the current vector (e->iov_src, e->iov_len,
 * starting at call offset e->iov_off). */
static long emit_iov_chunk_cb(__u32 k, struct emit_ctx *e)
{
	__u64 at = (__u64)k * CHUNK_MAX;
	if (at >= e->iov_len)
		return 1;
	__u64 len = e->iov_len - at;
	if (len > CHUNK_MAX)
		len = CHUNK_MAX;
	__u64 off = e->iov_off + at;
	emit_piece(e, e->iov_src + at, off, len, off + len >= e->captured);
	return 0;
}

/* bpf_loop callback: vector j of the array at e->buf; 1 stops the loop. The
 * chunks of a vector are a nested bpf_loop: a plain loop here makes the
 * verifier walk every length the counters can take. */
static long emit_iov_cb(__u32 j, struct emit_ctx *e)
{
	struct pr_iovec v;
	if (e->iov_off >= e->captured ||
	    bpf_probe_read_user(&v, sizeof(v), (void *)(e->buf + (__u64)j * sizeof(v))))
		return 1;
	if (v.len <= 0)
		return 0;
	e->iov_src = v.base;
	e->iov_len = v.len;
	if (e->iov_len > e->captured - e->iov_off)
		e->iov_len = e->captured - e->iov_off;
	bpf_loop(CHUNKS_MAX, emit_iov_chunk_cb, e, 0);
	e->iov_off += e->iov_len;
	return 0;
}

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

	__u32 zero = 0;
	__u64 *seq = bpf_map_lookup_elem(&call_seq, &zero);
	if (!seq)
		return 0;
	struct emit_ctx e;
	/* every header field is set below (no memset: this is the hot path) */
	e.ev.kind = REC_DATA;
	e.ev.flags = 0;
	e.ev._pad0 = 0;
	e.ev.len = 0;
	e.ev.offset = 0;
	e.ev.dir = c.dir;
	e.ev.ts_ns = bpf_ktime_get_ns();
	e.ev.ssl = c.ssl;
	e.ev.call_id = ((__u64)bpf_get_smp_processor_id() << 48) | (*seq)++;
	e.ev.total = n;
	e.ev.pid = pid_tgid >> 32;
	e.ev.tid = (__u32)pid_tgid;
	e.ev.uid = (__u32)bpf_get_current_uid_gid();
	e.ev.fd = c.fd;
	bpf_get_current_comm(e.ev.comm, sizeof(e.ev.comm));

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
	count(CNT_CALLS, 1);
	if (n > cfg.max_payload) {
		e.captured = cfg.max_payload;
		count(CNT_TRUNC_CALLS, 1);
		count(CNT_TRUNC_BYTES, n - cfg.max_payload);
	}
	if (e.captured == 0) {   /* cap 0: still say the call happened */
		e.ev.flags |= DF_FIRST | DF_LAST;
		count_submit(bpf_ringbuf_output(&events, &e.ev, sizeof(struct data_event), wakeup_flag()), 0);
		return 0;
	}
	if (c.iov) {
		e.iov_off = 0;
		bpf_loop(NSPR_IOV_MAX, emit_iov_cb, &e, 0);
		return 0;
	}
	/* the common single-chunk call needs no loop */
	if (direct)
		emit_chunk_direct(0, &e);
	else
		emit_chunk_copy(0, &e);
	if (e.captured > CHUNK_MAX)
		bpf_loop(CHUNKS_MAX - 1, direct ? (void *)emit_chunk_direct_cb : (void *)emit_chunk_copy_cb, &e, 0);
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
