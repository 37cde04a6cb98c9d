/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Ring-buffer submission shared by every object: when to wake the reader,
 * and the one retry a failed reservation is worth.
 *
 * Since 6.15 a ring buffer's lock is a resilient spinlock, which gives up
 * (a suspected deadlock, a timeout) instead of spinning on: a reservation can
 * then fail with the ring nearly empty. Measured here, nginx under wrk: a few
 * such failures a minute at 1 KiB, 20-40 per 8 s with -m pcapng at 64 KiB,
 * each a record lost, and the next try at once succeeded every time. A (nearly)
 * full ring is not retried: that only delays the traced thread. */
#ifndef TLSTAP_RING_H
#define TLSTAP_RING_H

enum ring_status {
	RING_OK = 0,
	RING_RETRIED = 1,       /* failed with room free, then succeeded */
	RING_FULL = -1,         /* no room: the reader is behind */
	RING_BUSY = -2,         /* failed twice with room free */
};

/* Wake the reader only once the ring is an eighth full: a wakeup per record
 * costs the traced thread an irq_work and pulls the reader onto its CPU
 * (wake-affine). The reader polls on a short timer while data flows. */
static __always_inline __u64 ring_wakeup(void *ring)
{
	__u64 avail = bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA);
	__u64 size = bpf_ringbuf_query(ring, BPF_RB_RING_SIZE);
	return avail >= size / 8 ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

/* Room for this record with an eighth of the ring to spare (what other CPUs
 * may reserve meanwhile): the failure was the lock's, not the reader's. */
static __always_inline bool ring_had_room(void *ring, __u64 size)
{
	__u64 ring_size = bpf_ringbuf_query(ring, BPF_RB_RING_SIZE);
	return bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA) + size + ring_size / 8 <= ring_size;
}

/* bpf_ringbuf_reserve_dynptr with the retry; *dp is usable when >= 0. */
static __always_inline int ring_reserve_dynptr(void *ring, __u32 size, struct bpf_dynptr *dp)
{
	if (!bpf_ringbuf_reserve_dynptr(ring, size, 0, dp))
		return RING_OK;
	bpf_ringbuf_discard_dynptr(dp, 0);
	if (!ring_had_room(ring, size))
		return RING_FULL;
	if (!bpf_ringbuf_reserve_dynptr(ring, size, 0, dp))
		return RING_RETRIED;
	bpf_ringbuf_discard_dynptr(dp, 0);
	return RING_BUSY;
}

/* bpf_ringbuf_output with the retry. */
static __always_inline int ring_output(void *ring, void *data, __u32 size)
{
	if (!bpf_ringbuf_output(ring, data, size, ring_wakeup(ring)))
		return RING_OK;
	if (!ring_had_room(ring, size))
		return RING_FULL;
	if (!bpf_ringbuf_output(ring, data, size, ring_wakeup(ring)))
		return RING_RETRIED;
	return RING_BUSY;
}

/* bpf_ringbuf_reserve with the retry; NULL on failure, *st says which. */
static __always_inline void *ring_reserve(void *ring, __u32 size, int *st)
{
	void *p = bpf_ringbuf_reserve(ring, size, 0);
	*st = RING_OK;
	if (p)
		return p;
	*st = RING_FULL;
	if (!ring_had_room(ring, size))
		return NULL;
	p = bpf_ringbuf_reserve(ring, size, 0);
	*st = p ? RING_RETRIED : RING_BUSY;
	return p;
}

#endif
