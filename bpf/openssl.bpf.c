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

struct ssl_key {
	__u32 tgid;
	__u32 _pad;
	__u64 ssl;
};

/* What we know of the connection an SSL* serves now. The entry is made at the
 * first call seen for the SSL* and deleted when it is freed, so an address
 * that comes back for another connection starts a new generation (conn_id);
 * so does another socket under the same SSL*. The socket is filled in only
 * when proven: a socket syscall made inside one of its calls, or its
 * handshake's hello seen going out on that socket (hello_socks). It serves
 * the calls that make no syscall (reads answered from OpenSSL's buffer). */
struct conn_info {
	__u64 conn_id;      /* generation: bpf_ktime_get_ns() when it began */
	__u64 sk;           /* struct sock*, 0 = socket not proven (yet) */
	__u64 ino;          /* the socket's inode number: sk alone may be a reused slab slot */
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

/* k's entry, made (a new generation) when there is none; NULL only if the
 * map refuses. */
static __always_inline struct conn_info *conn_get(struct ssl_key *k)
{
	struct conn_info *ci = bpf_map_lookup_elem(&conns, k);
	if (ci)
		return ci;
	struct conn_info n = { .conn_id = bpf_ktime_get_ns(), .fd = -1 };
	bpf_map_update_elem(&conns, k, &n, BPF_NOEXIST);
	return bpf_map_lookup_elem(&conns, k);
}

/* Memory BIOs (Python's SSLObject, node's TLSWrap): the application moves the
 * ciphertext between the BIOs and its sockets itself, outside SSL calls, so
 * no syscall inside a call names the socket, and the thread's next socket
 * syscall may well be another connection's (one thread, many connections).
 * The proof used instead: the ClientHello (ServerHello) that a client
 * (server) writes to its socket carries the 32 random bytes its SSL object
 * keeps in s3.client_random (s3.server_random, the 32 bytes below). Write
 * syscalls of threads that have made SSL calls note (tgid, hello type,
 * random) -> socket; a call on an SSL* whose socket is not known reads its
 * own random (offsets in the cookie) and looks it up. */
#define TLS_HANDSHAKE 0x16
#define HS_CLIENT_HELLO 1
#define HS_SERVER_HELLO 2

struct hello_key {
	__u32 tgid;
	__u32 type;         /* HS_CLIENT_HELLO, HS_SERVER_HELLO */
	__u8 random[32];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct hello_key);
	__type(value, struct conn_info);
} hello_socks SEC(".maps");

/* A write of len bytes at buf to fd: note the hello it may carry. */
static __always_inline void note_hello(__u32 tgid, int fd, __u64 buf, __u64 len)
{
	/* record header (5), handshake header (4), legacy_version (2), random (32) */
	__u8 h[43];
	if (len < sizeof(h) || bpf_probe_read_user(h, sizeof(h), (void *)buf))
		return;
	if (h[0] != TLS_HANDSHAKE || h[1] != 3 || (h[5] != HS_CLIENT_HELLO && h[5] != HS_SERVER_HELLO) ||
	    h[9] != 3)
		return;
	/* A HelloRetryRequest is a ServerHello whose "random" is a constant
	 * (RFC 8446 4.1.3): it names no connection; the real ServerHello follows. */
	if (h[5] == HS_SERVER_HELLO && h[11] == 0xcf && h[12] == 0x21 && h[13] == 0xad && h[14] == 0x74)
		return;
	struct conn_info v = { .fd = fd };
	struct sock *sk = fd_to_sock(fd, &v.ino);
	if (!sk)
		return;
	v.sk = (__u64)sk;
	read_tuple(sk, &v.tuple);
	struct hello_key hk = { .tgid = tgid, .type = h[5] };
	__builtin_memcpy(hk.random, &h[11], sizeof(hk.random));
	/* the first socket the hello goes out on is its connection's (a relay
	 * copying it on in the same process comes second) */
	bpf_map_update_elem(&hello_socks, &hk, &v, BPF_NOEXIST);
}

/* k's socket is not known: prove it by the hello its handshake sent, when
 * the build's layout is known (cookie). Updates k's entry. */
static __always_inline void prove_by_hello(__u64 cookie, struct ssl_key *k, struct conn_info *ci)
{
	__u32 random_off = (cookie >> COOKIE_RANDOM_SHIFT) & 0xffff;
	__u32 server_off = (cookie >> COOKIE_SERVER_SHIFT) & 0xffff;
	if (random_off == COOKIE_NO_OFF || server_off == COOKIE_NO_OFF)
		return;
	int server = 0;
	if (bpf_probe_read_user(&server, sizeof(server), (void *)(k->ssl + server_off)))
		return;
	struct hello_key hk = { .tgid = k->tgid, .type = server ? HS_SERVER_HELLO : HS_CLIENT_HELLO };
	if (bpf_probe_read_user(hk.random, sizeof(hk.random),
				(void *)(k->ssl + random_off - (server ? 32 : 0))))
		return;
	struct conn_info *v = bpf_map_lookup_elem(&hello_socks, &hk);
	if (!v)
		return;
	struct conn_info n = *v;
	n.conn_id = ci->conn_id;
	bpf_map_update_elem(&conns, k, &n, BPF_ANY);
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


/* What a write-family syscall sends, for note_hello: write/sendto(fd, buf,
 * len, ...), writev(fd, iov, n), sendmsg(fd, msg, ...) with msg->msg_iov at
 * offset 16; only the first buffer (a hello starts what a client or server
 * sends). WBUF_NONE: a read. */
#define WBUF_NONE 0
#define WBUF_PLAIN 1
#define WBUF_IOV 2
#define WBUF_MSG 3

struct wbuf {
	__u64 base;
	__u64 len;
};

static __always_inline bool write_buf(int kind, __u64 arg2, __u64 arg3, struct wbuf *w)
{
	if (kind == WBUF_PLAIN) {
		w->base = arg2;
		w->len = arg3;
		return true;
	}
	__u64 iov = arg2;
	if (kind == WBUF_MSG && bpf_probe_read_user(&iov, sizeof(iov), (void *)(arg2 + 16)))
		return false;
	return !bpf_probe_read_user(w, sizeof(*w), (void *)iov);   /* iov[0] */
}

/* A read/write-family syscall: if it runs inside a probed SSL call and uses
 * a socket, that socket is the call's connection. Outside calls, a write by a
 * thread that has made SSL calls may carry a hello (note_hello). */
static __always_inline int on_io_syscall(int fd, int wkind, __u64 arg2, __u64 arg3)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	if (cfg.target_tgid && (__u32)(pid_tgid >> 32) != cfg.target_tgid)
		return 0;
	if (fd < 0)
		return 0;
	struct active_call *a = current_call(0);
	if (!a)
		return 0;
	if (!a->live) {
		struct wbuf w;
		if (wkind != WBUF_NONE && write_buf(wkind, arg2, arg3, &w))
			note_hello(pid_tgid >> 32, fd, w.base, w.len);
		return 0;
	}
	if (a->fd >= 0)
		return 0;
	__u64 ino = 0;
	struct sock *sk = fd_to_sock(fd, &ino);
	if (!sk)
		return 0;
	a->fd = fd;
	struct ssl_key k = { .tgid = pid_tgid >> 32, .ssl = a->ssl };
	struct conn_info *ci = conn_get(&k);
	if (!ci || (ci->fd == fd && ci->sk == (__u64)sk && ci->ino == ino))
		return 0;
	struct conn_info n = { .conn_id = ci->conn_id, .sk = (__u64)sk, .ino = ino, .fd = fd };
	if (ci->sk && (ci->sk != (__u64)sk || ci->ino != ino))
		n.conn_id = bpf_ktime_get_ns();   /* another socket: another connection */
	read_tuple(sk, &n.tuple);
	bpf_map_update_elem(&conns, &k, &n, BPF_ANY);
	return 0;
}

#define IO_SYSCALL(name, wkind)                                            \
	SEC("tracepoint/syscalls/sys_enter_" #name)                        \
	int sys_enter_##name(struct trace_event_raw_sys_enter *ctx)        \
	{                                                                  \
		return on_io_syscall((int)ctx->args[0], wkind, ctx->args[1], ctx->args[2]); \
	}

IO_SYSCALL(read, WBUF_NONE)
IO_SYSCALL(write, WBUF_PLAIN)
IO_SYSCALL(readv, WBUF_NONE)
IO_SYSCALL(writev, WBUF_IOV)
IO_SYSCALL(recvfrom, WBUF_NONE)
IO_SYSCALL(sendto, WBUF_PLAIN)
IO_SYSCALL(recvmsg, WBUF_NONE)
IO_SYSCALL(sendmsg, WBUF_MSG)

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
#define SYSCALL_ARG2(regs) ((regs)->si)
#define SYSCALL_ARG3(regs) ((regs)->dx)
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
#define SYSCALL_ARG2(regs) ((regs)->regs[1])
#define SYSCALL_ARG3(regs) ((regs)->regs[2])
#endif

#ifdef NR_READ
SEC("tp_btf/sys_enter")
int BPF_PROG(sys_enter_io, struct pt_regs *regs, long id)
{
	switch (id) {
	case NR_READ: case NR_READV: case NR_RECVFROM: case NR_RECVMSG:
		return on_io_syscall((int)SYSCALL_ARG1(regs), WBUF_NONE, 0, 0);
	case NR_WRITE: case NR_SENDTO:
		return on_io_syscall((int)SYSCALL_ARG1(regs), WBUF_PLAIN, SYSCALL_ARG2(regs), SYSCALL_ARG3(regs));
	case NR_WRITEV:
		return on_io_syscall((int)SYSCALL_ARG1(regs), WBUF_IOV, SYSCALL_ARG2(regs), 0);
	case NR_SENDMSG:
		return on_io_syscall((int)SYSCALL_ARG1(regs), WBUF_MSG, SYSCALL_ARG2(regs), 0);
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
	struct conn_info *ci = conn_get(&k);
	if (ci && !ci->sk) {
		/* no socket syscall inside any of its calls so far: a memory BIO */
		prove_by_hello(bpf_get_attach_cookie(ctx), &k, ci);
		ci = bpf_map_lookup_elem(&conns, &k);
	}
	if (c.dir == DIR_HANDSHAKE)
		return 0;   /* no data: it named the socket (syscalls) and began the generation */

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
	if (!call_header(&e, pid_tgid, c.dir, c.ssl, ci ? ci->conn_id : 0, n, c.fd))
		return 0;
	if (ci && ci->sk) {
		e.ev.tuple = ci->tuple;
		if (c.fd < 0) {
			e.ev.fd = ci->fd;
			e.ev.flags = DF_FD_CACHED;
		}
	} else {
		__builtin_memset(&e.ev.tuple, 0, sizeof(e.ev.tuple));
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
 * connection, so forget what we knew; its next call starts a new generation. */
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
