/* What the database audit objects (mysqld.bpf.c, postgres.bpf.c) share besides their ABI
 * (dbaudit.h): the ring, its counters, and how a record's used bytes go to it. Include after
 * tlstap.h, dbaudit.h and ring.h. */
#ifndef TLSTAP_DBAUDIT_MAPS_H
#define TLSTAP_DBAUDIT_MAPS_H

#include "counters.h"

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

DEFINE_COUNTERS(counters, DCNT_MAX)

/* Bytes of a text of n bytes in a record, in a form the verifier can bound: the mask on an
 * opaque copy, which the compiler cannot drop for what it knows of n. */
static __always_inline __u32 text_size(__u32 n)
{
	if (n >= DB_QUERY_MAX)
		return DB_QUERY_MAX;
	asm volatile("" : "+r"(n));
	return n & (DB_QUERY_MAX - 1);
}

/* The record's first `size` bytes to the ring; the reader is woken in batches (ring.h): its
 * poll timer picks up a quiet ring. */
static __always_inline void submit(void *record, __u32 size)
{
	if (ring_output(&events, record, size) == RING_OK)
		count(DCNT_EVENTS);
	else
		count(DCNT_LOST);
}

#endif
