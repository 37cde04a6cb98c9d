/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Ring-buffer submission shared by every object: when to wake the reader,
 * and why a reservation failed.
 *
 * A failed reservation is a lost record. Most often the reader is behind and
 * the ring is full (raise --mapsize); a failure with the ring far from full
 * means something else, and is counted apart so that it shows. That is how
 * tlstap's reader was caught writing consumer_pos non-atomically (it read as
 * ~0 for an instant: libbpf/ringbuf.py); since Linux 6.15 the ring's lock, a
 * resilient spinlock that can give up, would show there too. */
#ifndef TLSTAP_RING_H
#define TLSTAP_RING_H

enum ring_status {
	RING_OK = 0,
	RING_FULL = -1,         /* no room: the reader is behind */
	RING_ROOM = -2,         /* failed although the ring had room */
};

#define RING_WAKE_GAP_NS 1000000ULL

/* When this object last forced a wakeup (racy across CPUs, which only costs
 * an extra wakeup); in a section of its own, which tests read. */
static volatile __u64 ring_woken_ns SEC(".data.ring_wake");

/* Wake the reader only once the ring is an eighth full, and then at most once
 * a millisecond. A wakeup costs the traced thread an irq_work, which on a VM is
 * a self-IPI and an exit, and pulls the reader onto its CPU (wake-affine); the
 * reader polls on a short timer while data flows, so a wakeup only matters when
 * it sleeps. Forced on every record past the eighth, a 1 GB/s flow into an
 * 8 MiB ring (1 MiB: two of the reader's 2 ms naps) cost nginx 25% of its
 * requests. */
static __always_inline __u64 ring_wakeup(void *ring)
{
	__u64 avail = bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA);
	__u64 size = bpf_ringbuf_query(ring, BPF_RB_RING_SIZE);
	if (avail < size / 8)
		return BPF_RB_NO_WAKEUP;
	__u64 now = bpf_ktime_get_ns();
	if (now - ring_woken_ns < RING_WAKE_GAP_NS)
		return BPF_RB_NO_WAKEUP;
	ring_woken_ns = now;
	return BPF_RB_FORCE_WAKEUP;
}

/* After a failure: RING_FULL, or RING_ROOM when the record would have fitted
 * with an eighth of the ring to spare (what other CPUs reserve meanwhile). */
static __always_inline int ring_why(void *ring, __u64 size)
{
	__u64 ring_size = bpf_ringbuf_query(ring, BPF_RB_RING_SIZE);
	return bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA) + size + ring_size / 8 <= ring_size ?
	       RING_ROOM : RING_FULL;
}

/* bpf_ringbuf_reserve_dynptr; *dp is usable when RING_OK. */
static __always_inline int ring_reserve_dynptr(void *ring, __u32 size, struct bpf_dynptr *dp)
{
	if (!bpf_ringbuf_reserve_dynptr(ring, size, 0, dp))
		return RING_OK;
	bpf_ringbuf_discard_dynptr(dp, 0);
	return ring_why(ring, size);
}

static __always_inline int ring_output(void *ring, void *data, __u32 size)
{
	if (!bpf_ringbuf_output(ring, data, size, ring_wakeup(ring)))
		return RING_OK;
	return ring_why(ring, size);
}

#endif
