/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* The ring buffer of data_event records and how one read/write call is
 * emitted into it (chunks of CHUNK_MAX, one copy when the kernel allows).
 * Shared by openssl.bpf.c and gotls.bpf.c; include after `cfg`, scope.h and
 * ring.h. */
#ifndef TLSTAP_EMIT_H
#define TLSTAP_EMIT_H

#include "counters.h"

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20);   /* resized by --mapsize before load */
} events SEC(".maps");

DEFINE_COUNTERS(counters, CNT_MAX)

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

/* Reads user memory straight into a ring-buffer reservation (6.16+). Weak:
 * on older kernels libbpf leaves it unresolved and user space loads
 * ssl_rw_exit_copy instead of ssl_rw_exit (sources/probe.py picks one). */
extern int bpf_probe_read_user_dynptr(struct bpf_dynptr *dptr, __u32 off, __u32 size,
				      const void *unsafe_ptr) __ksym __weak;

struct emit_ctx {
	struct data_event ev;   /* header of the call's records; offset/len/flags per chunk */
	__u64 buf;
	__u64 captured;
	__u32 first;            /* chunk index of bpf_loop's index 0 */
	__u32 iov;              /* buf is an NSPR PRIOVec array (PR_Writev), not the bytes */
	__u64 iov_off;          /* PR_Writev: call offset of the current vector */
	__u64 iov_src;          /* its address */
	__u64 iov_len;          /* its length, as far as captured */
};

/* Counts one record's fate from the ring_status of its submission. */
static __always_inline void count_ring(int st, __u32 len)
{
	if (st < 0) {
		count(CNT_LOST_RECORDS);
		count_n(CNT_LOST_BYTES, len);
		if (st == RING_ROOM)
			count(CNT_LOST_ROOM);
	} else {
		count(CNT_RECORDS);
		count_n(CNT_BYTES, len);
	}
}

/* The header all records of one call share (offset, len and flags are per
 * chunk; the caller sets the tuple). False if the sequence map is unreadable.
 * Every field is set (no memset: this is the hot path). */
static __always_inline bool call_header(struct emit_ctx *e, __u64 pid_tgid, __u8 dir, __u64 conn,
					__u64 conn_id, __u64 total, __s32 fd)
{
	__u32 zero = 0;
	__u64 *seq = bpf_map_lookup_elem(&call_seq, &zero);
	if (!seq)
		return false;
	e->ev.kind = REC_DATA;
	e->ev.flags = 0;
	e->ev._pad0 = 0;
	e->ev.len = 0;
	e->ev.offset = 0;
	e->ev.dir = dir;
	e->ev.ts_ns = bpf_ktime_get_ns();
	e->ev.ssl = conn;
	e->ev.conn_id = conn_id;
	e->ev.call_id = ((__u64)bpf_get_smp_processor_id() << 48) | (*seq)++;
	e->ev.total = total;
	e->ev.pid = pid_tgid >> 32;
	e->ev.tid = (__u32)pid_tgid;
	e->ev.uid = (__u32)bpf_get_current_uid_gid();
	e->ev.fd = fd;
	bpf_get_current_comm(e->ev.comm, sizeof(e->ev.comm));
	return true;
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
		count(CNT_READ_ERRORS);
		__builtin_memset(s->data, 0, 8);
	}
	count_ring(ring_output(&events, s, sizeof(struct data_event) + len), len);
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
	int st = ring_reserve_dynptr(&events, sizeof(struct data_event) + len, &dp);
	if (st < 0) {
		count_ring(st, len);
		return 0;
	}
	if (bpf_probe_read_user_dynptr(&dp, sizeof(struct data_event), len, (void *)(e->buf + e->ev.offset))) {
		/* page not present: the record must not show stale ring bytes */
		bpf_ringbuf_discard_dynptr(&dp, 0);
		return emit_chunk_copy(i, e);
	}
	bpf_dynptr_write(&dp, 0, &e->ev, sizeof(struct data_event), 0);
	bpf_ringbuf_submit_dynptr(&dp, ring_wakeup(&events));
	count_ring(st, len);
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
		count(CNT_READ_ERRORS);
		__builtin_memset(s->data, 0, 8);
	}
	count_ring(ring_output(&events, s, sizeof(struct data_event) + len), len);
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

/* Emit one call's records: e->ev filled (total = bytes transferred), e->buf
 * the user buffer (e->iov: a PRIOVec array), e->captured = e->ev.total,
 * e->first = 1. */
static __always_inline void emit_call(struct emit_ctx *e, bool direct)
{
	count(CNT_CALLS);
	if (e->ev.total > cfg.max_payload) {
		e->captured = cfg.max_payload;
		count(CNT_TRUNC_CALLS);
		count_n(CNT_TRUNC_BYTES, e->ev.total - cfg.max_payload);
	}
	if (e->captured == 0) {   /* cap 0: still say the call happened */
		e->ev.flags |= DF_FIRST | DF_LAST;
		count_ring(ring_output(&events, &e->ev, sizeof(struct data_event)), 0);
		return;
	}
	if (e->iov) {
		e->iov_off = 0;
		bpf_loop(NSPR_IOV_MAX, emit_iov_cb, e, 0);
		return;
	}
	/* the common single-chunk call needs no loop */
	if (direct)
		emit_chunk_direct(0, e);
	else
		emit_chunk_copy(0, e);
	if (e->captured > CHUNK_MAX)
		bpf_loop(CHUNKS_MAX - 1, direct ? (void *)emit_chunk_direct_cb : (void *)emit_chunk_copy_cb, e, 0);
}

#endif
