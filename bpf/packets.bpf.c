// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Packet capture for pcapng output: TC programs on one interface.
 *
 * Each packet that passes the filter (struct pkt_config, compiled from
 * tcpdump syntax by sources/pktfilter.py) and the --pid/--uid/--cgroup scope becomes
 * one ring-buffer record: struct packet_event, then up to snaplen bytes from
 * the link-layer header on. The programs never drop or change a packet: they
 * only read the skb and always return TC_ACT_UNSPEC (= TCX_NEXT): no verdict,
 * so whatever runs after them decides as if they were not there (the next
 * tcx program, the clsact filters; with none, the packet goes on). TC_ACT_OK
 * would end the classification at them and disable the filters of others.
 *
 * Attribution. A packet names no process, so connect(), accept() and
 * listen() (syscall tracepoints: they fire once per connection, never per
 * packet) record the socket's 4-tuple and its owner in sock_owner, and the
 * port of a listening socket in listeners. TC looks the packet's tuple up as
 * seen by the sender (local = source) and by the receiver (local =
 * destination). Gaps and how they are covered:
 *  - a client's SYN leaves before connect() returns: the egress program
 *    records it from the current task, which sends the SYN from connect();
 *  - a server's handshake and the first data arrive before accept(): the
 *    listener's owner is used until the accepted socket is known;
 *  - connections older than the capture: user space seeds both maps from
 *    /proc/net/tcp* and /proc/PID/fd.
 * TCP_CLOSE (tracepoint sock/inet_sock_set_state) marks an entry closed; it
 * stays valid for TIME_WAIT's 60 s so the last ACKs are attributed, and a
 * new connect/accept of the same tuple replaces it. Both maps are LRU, for
 * UDP "connections" that never close.
 *
 * The same code runs as cgroup_skb programs for the wire source (sources/wire.py):
 * attached to a cgroup (the root one when unscoped), they see every packet of
 * the sockets in it on any interface and in any network namespace, from the
 * IP header on (link_hdr_len 0), an egress one before GSO splits it. They
 * return 1 (no verdict of theirs: cgroup programs AND their verdicts, and 1
 * changes nothing).
 *
 * Copy. With bpf_dynptr_from_skb + bpf_dynptr_copy (6.14+) the packet is
 * copied once, skb -> ring reservation of the exact size (tc_*); else through
 * a per-CPU scratch slot, skb -> scratch -> ring (tc_*_copy). User space
 * loads one pair.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "tlstap.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define EINPROGRESS 115
#define TC_ACT_UNSPEC -1            /* = TCX_NEXT: no verdict, see the top */
#define P_IP 0x0800
#define P_IPV6 0x86DD
#define P_ARP 0x0806
#define P_RARP 0x8035
#define IPPROTO_FRAG 44
#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10
#define CG_PASS 1                   /* cgroup_skb: no verdict of ours, see the top */
#define CLOSE_GRACE_NS (60ULL * 1000000000ULL)   /* TCP_TIMEWAIT_LEN */

#include "scope.h"   /* cfg: the scope, tested against each packet's owner below */
#include "conn.h"
#include "ring.h"
#include "counters.h"

const volatile struct pkt_config pcfg SEC(".rodata.pkt") = {
	.link_hdr_len = 14,
	.snaplen = PKT_CAP_MAX,
};

/* Records are written as bytes: nothing else would put these in the BTF
 * that tests/abi checks abi.py against. */
struct packet_event *packet_event_btf __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20);   /* resized by --mapsize before load */
} packets SEC(".maps");

DEFINE_COUNTERS(pkt_counters, PCNT_MAX)

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct conn_tuple);
	__type(value, struct sock_entry);
} sock_owner SEC(".maps");

/* TCP port -> owner of the listening socket (one per port: two processes
 * listening on one port with different addresses share the entry). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct sock_entry);
} listeners SEC(".maps");

/* Socket -> tgid of the process that last sent or received on it: the owner
 * sock_owner has for it, so a send/recv by that process costs this lookup and
 * a compare, nothing more. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u32);
} io_tgid SEC(".maps");

/* Thread -> fd of a connect()/listen() in progress. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __s32);
} pending_fd SEC(".maps");

struct scratch {
	struct packet_event ev;
	__u8 data[PKT_CAP_MAX];
};

/* One slot per CPU in copy mode (max_entries set to the CPU count before
 * load; a PERCPU_ARRAY value cannot exceed 32 KiB). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} pkt_scratch SEC(".maps");

extern int bpf_dynptr_from_skb(struct __sk_buff *s, __u64 flags, struct bpf_dynptr *ptr__uninit) __ksym __weak;
extern int bpf_dynptr_copy(struct bpf_dynptr *dst_ptr, __u32 dst_off, struct bpf_dynptr *src_ptr,
			   __u32 src_off, __u32 size) __ksym __weak;

/* ---- owners: filled on connect/accept/listen ------------------------------ */

/* An IPv4 connection on an AF_INET6 socket has v4-mapped addresses
 * (::ffff:a.b.c.d): key it as the IPv4 packets show it. */
static __always_inline void unmap_v4(struct conn_tuple *t)
{
	__u64 *l = (__u64 *)t->laddr, *r = (__u64 *)t->raddr;
	if (t->family != AF_INET6 || l[0] || r[0] ||
	    ((__u32 *)t->laddr)[2] != bpf_htonl(0xffff) || ((__u32 *)t->raddr)[2] != bpf_htonl(0xffff))
		return;
	t->family = AF_INET;
	((__u32 *)t->laddr)[0] = ((__u32 *)t->laddr)[3];
	((__u32 *)t->raddr)[0] = ((__u32 *)t->raddr)[3];
	((__u32 *)t->laddr)[3] = 0;
	((__u32 *)t->raddr)[3] = 0;
	l[1] = 0;
	r[1] = 0;
}

/* The sock_owner key of an IPv4/IPv6 socket (rport 0 if unconnected); false
 * for other families and sockets without a local port (read_tuple would take
 * a closed socket's released port from inet_sport: no owner to record then). */
static __always_inline bool sk_tuple(struct sock *sk, struct conn_tuple *t)
{
	if (!BPF_CORE_READ(sk, __sk_common.skc_num))
		return false;
	read_tuple(sk, t);
	if (t->family != AF_INET && t->family != AF_INET6)
		return false;
	unmap_v4(t);
	return true;
}

static __always_inline void current_owner(struct sock_entry *e)
{
	__u64 id = bpf_get_current_pid_tgid();
	e->owner.pid = id >> 32;
	e->owner.uid = (__u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(e->owner.comm, sizeof(e->owner.comm));
	e->owner.fd = -1;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->closed_ns = 0;
}

/* current_owner() of another task. */
static __always_inline void task_owner(struct task_struct *task, struct sock_entry *e)
{
	__builtin_memset(e, 0, sizeof(*e));
	e->owner.pid = BPF_CORE_READ(task, tgid);
	e->owner.uid = BPF_CORE_READ(task, cred, uid.val);
	BPF_CORE_READ_STR_INTO(&e->owner.comm, task, comm);
	e->owner.fd = -1;
	e->cgroup_id = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
}

enum fd_event { FD_CONNECTED, FD_ACCEPTED, FD_LISTENING };

/* The socket behind fd of the current task now has its tuple (connect,
 * accept) or its port (listen): remember who owns it. */
static __always_inline void record_fd(int fd, enum fd_event ev)
{
	__u64 ino;
	struct sock *sk = fd_to_sock(fd, &ino);
	struct conn_tuple t = {};
	if (!sk || !sk_tuple(sk, &t))
		return;
	struct sock_entry e;
	current_owner(&e);
	e.owner.fd = fd;
	__u32 port = t.lport;
	if (ev == FD_LISTENING) {
		bpf_map_update_elem(&listeners, &port, &e, BPF_ANY);
		return;
	}
	bpf_map_update_elem(&sock_owner, &t, &e, BPF_ANY);
	/* Connections not yet accepted are named after the port's listener: the
	 * process that accepts from it (a pre-forked worker), not the one that
	 * called listen() and may never touch a connection. */
	struct sock_entry *l;
	if (ev == FD_ACCEPTED && (l = bpf_map_lookup_elem(&listeners, &port)) && l->owner.pid != e.owner.pid)
		bpf_map_update_elem(&listeners, &port, &e, BPF_EXIST);
}

static __always_inline int save_fd(long fd)
{
	__u64 id = bpf_get_current_pid_tgid();
	__s32 v = fd;
	bpf_map_update_elem(&pending_fd, &id, &v, BPF_ANY);
	return 0;
}

static __always_inline int take_fd(__s32 *fd)
{
	__u64 id = bpf_get_current_pid_tgid();
	__s32 *v = bpf_map_lookup_elem(&pending_fd, &id);
	if (!v)
		return -1;
	*fd = *v;
	bpf_map_delete_elem(&pending_fd, &id);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_connect")
int sys_enter_connect(struct trace_event_raw_sys_enter *ctx)
{
	return save_fd(ctx->args[0]);
}

/* The tuple is set when connect() returns 0, and also on -EINPROGRESS: the
 * port is chosen and the SYN sent before a non-blocking connect returns. */
SEC("tracepoint/syscalls/sys_exit_connect")
int sys_exit_connect(struct trace_event_raw_sys_exit *ctx)
{
	__s32 fd;
	if (take_fd(&fd))
		return 0;
	if (ctx->ret == 0 || ctx->ret == -EINPROGRESS)
		record_fd(fd, FD_CONNECTED);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_listen")
int sys_enter_listen(struct trace_event_raw_sys_enter *ctx)
{
	return save_fd(ctx->args[0]);
}

SEC("tracepoint/syscalls/sys_exit_listen")
int sys_exit_listen(struct trace_event_raw_sys_exit *ctx)
{
	__s32 fd;
	if (take_fd(&fd))
		return 0;
	if (ctx->ret == 0)
		record_fd(fd, FD_LISTENING);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_accept4")
int sys_exit_accept4(struct trace_event_raw_sys_exit *ctx)
{
	if (ctx->ret >= 0)
		record_fd(ctx->ret, FD_ACCEPTED);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_accept")
int sys_exit_accept(struct trace_event_raw_sys_exit *ctx)
{
	if (ctx->ret >= 0)
		record_fd(ctx->ret, FD_ACCEPTED);
	return 0;
}

SEC("tracepoint/sock/inet_sock_set_state")
int inet_sock_set_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (ctx->newstate != TCP_CLOSE)
		return 0;
	if (ctx->oldstate == TCP_LISTEN) {
		__u32 port = ctx->sport;
		bpf_map_delete_elem(&listeners, &port);
		return 0;
	}
	struct conn_tuple t = {};
	t.family = ctx->family;
	t.lport = ctx->sport;
	t.rport = ctx->dport;
	/* arrays in ctx: the verifier wants constant offsets from ctx, memcpy may not keep them */
	if (t.family == AF_INET) {
		bpf_probe_read_kernel(t.laddr, 4, ctx->saddr);
		bpf_probe_read_kernel(t.raddr, 4, ctx->daddr);
	} else if (t.family == AF_INET6) {
		bpf_probe_read_kernel(t.laddr, 16, ctx->saddr_v6);
		bpf_probe_read_kernel(t.raddr, 16, ctx->daddr_v6);
		unmap_v4(&t);
	} else {
		return 0;
	}
	struct sock_entry *e = bpf_map_lookup_elem(&sock_owner, &t);
	if (e && !e->closed_ns)
		e->closed_ns = bpf_ktime_get_ns();
	return 0;
}

/* ---- owners: taken over by the process that does the I/O ------------------ */

/* A connection changes hands when a server forks a child to serve it, passes
 * it to a worker (SCM_RIGHTS) or shares it in a pool: its owner is the process
 * that sends and receives on it, so every send and recv on the host compares
 * the caller with the socket's last one (io_tgid) and moves the sock_owner
 * entry when they differ. These tracepoints fire in sock_sendmsg/sock_recvmsg
 * (read, write, send*, recv*, io_uring) after the call: the packet a new
 * owner's first call sends, or waits for, is not yet its own; fork + close is
 * handed over at the close (sys_enter_close) for that. io_tgid does not see
 * that hand-over: a parent that kept a second descriptor of the connection
 * gets it back only after the child's next call. */
static __always_inline int note_io(struct sock *sk)
{
	__u16 family = sk->__sk_common.skc_family;
	if (family != AF_INET && family != AF_INET6)
		return 0;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 *last = bpf_sk_storage_get(&io_tgid, sk, 0, 0);
	if (last && *last == tgid)
		return 0;
	struct conn_tuple t = {};
	if (sk_tuple(sk, &t) && t.rport) {
		struct sock_entry *e = bpf_map_lookup_elem(&sock_owner, &t);
		if (!e || e->owner.pid != tgid) {
			/* a new value, not fields changed in place: TC reads it meanwhile */
			struct sock_entry n;
			current_owner(&n);
			if (e)
				n.closed_ns = e->closed_ns;
			bpf_map_update_elem(&sock_owner, &t, &n, BPF_ANY);
		}
	}
	if (!last)
		last = bpf_sk_storage_get(&io_tgid, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (last)
		*last = tgid;
	return 0;
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(sock_send_length, struct sock *sk, int ret, int flags)
{
	return note_io(sk);
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(sock_recv_length, struct sock *sk, int ret, int flags)
{
	return note_io(sk);
}

/* Children looked at, newest first, when an owner closes a connection. */
#define CLOSE_CHILDREN_MAX 16

/* Fork + close (PostgreSQL, inetd-style servers): the parent accepts, forks a
 * child that serves the connection and closes its own descriptor. The client
 * may be sending before the child's first recv returns, so the child takes
 * over at that close: the owner closes a connection's descriptor that a child
 * holds too (same number, same file: what fork copied). */
static __always_inline int on_close(int fd)
{
	struct task_struct *task = bpf_get_current_task_btf();
	/* no child, nothing to hand over: most close() calls stop here, after a
	 * load; the rest costs a process with children ~60 ns more per close() */
	struct list_head *head = &task->children;
	if (task->children.prev == head)
		return 0;
	struct file *f = task_fd_file(task, fd);
	__u64 ino;
	struct sock *sk = file_sock(f, &ino);
	struct conn_tuple t = {};
	if (!sk || !sk_tuple(sk, &t) || !t.rport)
		return 0;
	struct sock_entry *e = bpf_map_lookup_elem(&sock_owner, &t);
	if (!e || e->owner.pid != bpf_get_current_pid_tgid() >> 32)
		return 0;
	/* the children of this thread (those of its other threads are on theirs) */
	struct list_head *pos = BPF_CORE_READ(task, children.prev);
	for (int i = 0; i < CLOSE_CHILDREN_MAX && pos && pos != head; i++) {
		struct task_struct *child = bpf_rdonly_cast((void *)pos - bpf_core_field_offset(struct task_struct, sibling),
							   bpf_core_type_id_kernel(struct task_struct));
		if (task_fd_file(child, fd) == f) {
			struct sock_entry n;
			task_owner(child, &n);
			n.owner.fd = fd;          /* what fork copied: the same number */
			n.closed_ns = e->closed_ns;
			bpf_map_update_elem(&sock_owner, &t, &n, BPF_ANY);
			break;
		}
		pos = BPF_CORE_READ(child, sibling.prev);
	}
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_close")
int sys_enter_close(struct trace_event_raw_sys_enter *ctx)
{
	return on_close(ctx->args[0]);
}

/* ---- packets --------------------------------------------------------------- */

/* What the filter and the owner lookup need from the headers. */
struct pkt_info {
	__u16 proto;        /* skb->protocol, host order */
	__u8 ipver;         /* 4, 6; 0: not IP */
	__u8 l4;            /* IP protocol / IPv6 next header */
	__u8 l4_frag;       /* IPv6: next header after a fragment header */
	__u8 fam;           /* addresses below: 4 (IPv4, ARP), 6; 0 none */
	__u8 has_ports;     /* TCP/UDP/SCTP header (first fragment) */
	__u8 tcp_flags;
	__u8 tcp_data;      /* the TCP segment carries payload */
	__u16 data_off;     /* where it starts */
	__u16 sport, dport;
	__u64 saddr[2], daddr[2];
};

/* Headers are read with bpf_skb_load_bytes: at ingress they may still sit in
 * page fragments, where direct packet access cannot reach. */
static __always_inline void parse(struct __sk_buff *skb, struct pkt_info *p)
{
	__u32 off = pcfg.link_hdr_len;
	p->proto = bpf_ntohs(skb->protocol);
	if (p->proto == P_IP) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)))
			return;
		p->ipver = 4;
		p->fam = 4;
		p->l4 = ip.protocol;
		p->saddr[0] = ip.saddr;
		p->daddr[0] = ip.daddr;
		if (bpf_ntohs(ip.frag_off) & 0x1fff)   /* no L4 header in a later fragment */
			return;
		off += ip.ihl * 4;
	} else if (p->proto == P_IPV6) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)))
			return;
		p->ipver = 6;
		p->fam = 6;
		p->l4 = ip6.nexthdr;
		__builtin_memcpy(p->saddr, &ip6.saddr, 16);
		__builtin_memcpy(p->daddr, &ip6.daddr, 16);
		off += sizeof(ip6);
		if (p->l4 == IPPROTO_FRAG) {    /* as libpcap: protocol yes, ports no */
			bpf_skb_load_bytes(skb, off, &p->l4_frag, 1);
			return;
		}
	} else if (p->proto == P_ARP || p->proto == P_RARP) {
		/* libpcap's offsets: Ethernet/IPv4 ARP, sender IP at 14, target at 24 */
		__u32 a[4];     /* bytes 12-27: sender IP at 14-17, target IP at 24-27 */
		if (bpf_skb_load_bytes(skb, off + 12, a, sizeof(a)))
			return;
		p->fam = 4;
		p->saddr[0] = (__u32)(a[0] >> 16 | a[1] << 16);   /* little-endian loads */
		p->daddr[0] = a[3];
		return;
	} else {
		return;
	}
	if (p->l4 != IPPROTO_TCP && p->l4 != IPPROTO_UDP && p->l4 != IPPROTO_SCTP)
		return;
	__u16 ports[2];
	if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)))
		return;
	p->has_ports = 1;
	p->sport = bpf_ntohs(ports[0]);
	p->dport = bpf_ntohs(ports[1]);
	if (p->l4 == IPPROTO_TCP) {
		__u8 doff_flags[2];
		if (bpf_skb_load_bytes(skb, off + 12, doff_flags, 2))
			return;
		p->tcp_flags = doff_flags[1];
		p->data_off = off + (doff_flags[0] >> 4) * 4;
		p->tcp_data = skb->len > p->data_off;
	}
}

static __always_inline bool addr_match(const volatile struct pf_term *t, const __u64 *a)
{
	return (a[0] & t->mask[0]) == t->addr[0] && (a[1] & t->mask[1]) == t->addr[1];
}

static __always_inline bool term_match(const volatile struct pf_term *t, const struct pkt_info *p, __u32 len)
{
	bool s, d;
	switch (t->kind) {
	case PF_ETHERTYPE:
		return p->proto == t->lo;
	case PF_PROTO:
		/* libpcap's ip6 proto also looks behind a fragment header */
		return p->ipver && (!t->family || t->family == p->ipver) &&
		       (p->l4 == t->lo || (p->l4 == IPPROTO_FRAG && p->ipver == 6 && p->l4_frag == t->lo));
	case PF_PORT:
		if (!p->has_ports)
			return false;
		s = p->sport >= t->lo && p->sport <= t->hi;
		d = p->dport >= t->lo && p->dport <= t->hi;
		break;
	case PF_NET:
		if (p->fam != t->family)
			return false;
		s = addr_match(t, p->saddr);
		d = addr_match(t, p->daddr);
		break;
	case PF_LEN:
		return len >= t->addr[0] && len <= t->addr[1];
	default:
		return false;
	}
	if (t->flags & PF_BOTH)
		return s && d;
	return ((t->flags & PF_SRC) && s) || ((t->flags & PF_DST) && d);
}

/* The clause and term counts are .rodata constants: the verifier knows them
 * and drops the unused iterations, so the loop costs what the filter uses. */
static __always_inline bool filter_match(const struct pkt_info *p, __u32 len)
{
	if (!pcfg.nclauses)
		return true;
#pragma unroll
	for (int c = 0; c < PF_CLAUSES_MAX; c++) {
		if (c >= pcfg.nclauses)
			break;
		bool all = true;
#pragma unroll
		for (int i = 0; i < PF_TERMS_MAX; i++) {
			if (i >= pcfg.clauses[c].nterms)
				break;
			const volatile struct pf_term *t = &pcfg.clauses[c].terms[i];
			if (term_match(t, p, len) == !!(t->flags & PF_NOT)) {   /* false after negation */
				all = false;
				break;
			}
		}
		if (all)
			return true;
	}
	return false;
}

/* Owner of the socket at the packet's source (sender) or destination. */
static __always_inline struct sock_entry *owner_of(const struct pkt_info *p, bool sender)
{
	struct conn_tuple k = {};
	k.family = p->fam == 4 ? AF_INET : AF_INET6;
	if (sender) {
		k.lport = p->sport;
		k.rport = p->dport;
		__builtin_memcpy(k.laddr, p->saddr, 16);
		__builtin_memcpy(k.raddr, p->daddr, 16);
	} else {
		k.lport = p->dport;
		k.rport = p->sport;
		__builtin_memcpy(k.laddr, p->daddr, 16);
		__builtin_memcpy(k.raddr, p->saddr, 16);
	}
	struct sock_entry *e = bpf_map_lookup_elem(&sock_owner, &k);
	/* the clock is read for closed sockets only: on this VM each read was ~5% of
	 * the program's cost per packet, and the packet is stamped later anyway */
	if (e && e->closed_ns && bpf_ktime_get_ns() - e->closed_ns > CLOSE_GRACE_NS) {
		bpf_map_delete_elem(&sock_owner, &k);
		e = NULL;
	}
	if (e || p->l4 != IPPROTO_TCP)
		return e;
	/* a client's SYN is sent from connect(), by the task that owns the socket */
	if (sender && (p->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN) {
		struct sock_entry n;
		current_owner(&n);
		bpf_map_update_elem(&sock_owner, &k, &n, BPF_NOEXIST);
		return bpf_map_lookup_elem(&sock_owner, &k);
	}
	__u32 port = k.lport;
	return bpf_map_lookup_elem(&listeners, &port);
}

static __always_inline bool in_scope(const struct sock_entry *e)
{
	if (!e)
		return false;
	if (cfg.target_tgid && e->owner.pid != cfg.target_tgid)
		return false;
	if (cfg.target_uid != (__u32)-1 && e->owner.uid != cfg.target_uid)
		return false;
	if (cfg.target_cgroup && e->cgroup_id != cfg.target_cgroup)
		return false;
	return true;
}

/* The wire source decrypts TLS connections: what a socket carries is decided
 * by its first data segment, in either direction (a TLS connection opens with
 * the client's handshake record: 0x16 0x03). A socket whose first data is
 * anything else gives that one segment (the decoder names a TLS connection
 * older than the capture from it) and nothing more, so a host's other TCP
 * traffic (databases, plain HTTP, bulk copies) is never copied. */
enum wire_kind { WIRE_UNKNOWN, WIRE_TLS, WIRE_SKIP };

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u8);
} wire_kind SEC(".maps");

static __always_inline bool wire_segment(const struct pkt_info *p)
{
	return p->l4 == IPPROTO_TCP && p->has_ports &&
	       (p->tcp_data || p->tcp_flags & (TCPF_SYN | TCPF_FIN | TCPF_RST));
}

static __always_inline bool wire_tls(struct __sk_buff *skb, const struct pkt_info *p)
{
	struct bpf_sock *sk = skb->sk;
	if (!sk || !(sk = bpf_sk_fullsock(sk)))
		return true;
	__u8 *kind = bpf_sk_storage_get(&wire_kind, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!kind)
		return true;
	if (*kind != WIRE_UNKNOWN)
		return *kind == WIRE_TLS;
	if (!p->tcp_data)
		return true;          /* the SYNs: the decoder learns the streams' start from them */
	__u8 hdr[2];
	if (bpf_skb_load_bytes(skb, p->data_off, hdr, 2))
		return true;
	*kind = hdr[0] == 0x16 && hdr[1] == 0x03 ? WIRE_TLS : WIRE_SKIP;
	return true;
}

/* Counts a failed submission (ring.h status) as lost; true if it failed. */
static __always_inline bool count_lost(int st)
{
	if (st == RING_OK)
		return false;
	count(PCNT_LOST);
	if (st == RING_ROOM)
		count(PCNT_LOST_ROOM);
	return true;
}

/* Counts a packet whose bytes the skb would not give: lost, and why. */
static __always_inline void count_copy_error(void)
{
	count(PCNT_LOST);
	count(PCNT_COPY_ERRORS);
}

static __always_inline void set_owner(struct sock_owner *dst, const struct sock_entry *e)
{
	if (e)
		*dst = e->owner;
	else
		__builtin_memset(dst, 0, sizeof(*dst));
}

static __always_inline void handle(struct __sk_buff *skb, __u8 dir, bool direct)
{
	struct pkt_info p = {};
	__u32 len = skb->len;
	parse(skb, &p);
	if (!filter_match(&p, len) || (pcfg.wire && !wire_segment(&p))) {
		count(PCNT_FILTERED);
		return;
	}
	struct sock_entry *snd = NULL, *rcv = NULL;
	if (p.has_ports) {
		if (dir == PKT_EGRESS || pcfg.both_local)
			snd = owner_of(&p, true);
		if (dir == PKT_INGRESS || pcfg.both_local)
			rcv = owner_of(&p, false);
	}
	if ((cfg.target_tgid || cfg.target_uid != (__u32)-1 || cfg.target_cgroup) &&
	    !in_scope(snd) && !in_scope(rcv)) {
		count(PCNT_FILTERED);
		return;
	}
	if (pcfg.wire && !wire_tls(skb, &p)) {     /* after the scope: storage for its sockets only */
		count(PCNT_FILTERED);
		return;
	}

	__u32 caplen = len < pcfg.snaplen ? len : pcfg.snaplen;
	if (caplen > PKT_CAP_MAX)
		caplen = PKT_CAP_MAX;
	if (caplen < len)
		count(PCNT_TRUNCATED);

	struct packet_event ev;
	ev.ts_ns = 0;          /* stamped below, once the ring has a place for it */
	ev.ifindex = skb->ifindex;
	ev.len = len;
	ev.caplen = caplen;
	ev.dir = dir;
	ev.flags = 0;
	ev._pad0[0] = ev._pad0[1] = 0;
	if (p.has_ports && p.l4 == IPPROTO_TCP) {
		__u32 port = p.dport;
		if (bpf_map_lookup_elem(&listeners, &port))
			ev.flags |= PKT_F_TO_LISTENER;
	}
	set_owner(&ev.sender, snd);
	set_owner(&ev.receiver, rcv);

	if (direct) {
		struct bpf_dynptr rb, src;
		if (count_lost(ring_reserve_dynptr(&packets, sizeof(ev) + caplen, &rb)))
			return;
		/* stamped once its place in the ring is taken: packets stamped before that
		 * on two CPUs cross in the ring (1 piece in 20 at 64 KiB on lo), and the
		 * reader must then sort them */
		ev.ts_ns = bpf_ktime_get_ns();
		bpf_dynptr_write(&rb, 0, &ev, sizeof(ev), 0);
		if (caplen && (bpf_dynptr_from_skb(skb, 0, &src) ||
			       bpf_dynptr_copy(&rb, sizeof(ev), &src, 0, caplen))) {
			bpf_ringbuf_discard_dynptr(&rb, 0);
			count_copy_error();
			return;
		}
		bpf_ringbuf_submit_dynptr(&rb, ring_wakeup(&packets));
	} else {
		__u32 cpu = bpf_get_smp_processor_id();
		struct scratch *s = bpf_map_lookup_elem(&pkt_scratch, &cpu);
		if (!s)
			return;
		s->ev = ev;
		/* 64 bits and a barrier: the register tested is the one passed (a u32
		 * gets tested on a zero-extended copy the verifier cannot link) */
		__u64 n = caplen;
		asm volatile("" : "+r"(n));
		if (n >= 1 && n <= PKT_CAP_MAX && bpf_skb_load_bytes(skb, 0, s->data, n)) {
			count_copy_error();
			return;
		}
		s->ev.ts_ns = bpf_ktime_get_ns();     /* as late as it can be: see above */
		if (count_lost(ring_output(&packets, s, sizeof(ev) + caplen)))
			return;
	}
	count(PCNT_PACKETS);
	count_n(PCNT_BYTES, caplen);
	return;
}

SEC("tc")
int tc_ingress(struct __sk_buff *skb)
{
	handle(skb, PKT_INGRESS, true);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int tc_ingress_copy(struct __sk_buff *skb)
{
	handle(skb, PKT_INGRESS, false);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int tc_egress(struct __sk_buff *skb)
{
	handle(skb, PKT_EGRESS, true);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int tc_egress_copy(struct __sk_buff *skb)
{
	handle(skb, PKT_EGRESS, false);
	return TC_ACT_UNSPEC;
}

SEC("cgroup_skb/ingress")
int cg_ingress(struct __sk_buff *skb)
{
	handle(skb, PKT_INGRESS, true);
	return CG_PASS;
}

SEC("cgroup_skb/ingress")
int cg_ingress_copy(struct __sk_buff *skb)
{
	handle(skb, PKT_INGRESS, false);
	return CG_PASS;
}

SEC("cgroup_skb/egress")
int cg_egress(struct __sk_buff *skb)
{
	handle(skb, PKT_EGRESS, true);
	return CG_PASS;
}

SEC("cgroup_skb/egress")
int cg_egress_copy(struct __sk_buff *skb)
{
	handle(skb, PKT_EGRESS, false);
	return CG_PASS;
}

