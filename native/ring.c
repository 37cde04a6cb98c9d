/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Ordered access to a BPF ring buffer's shared words, for src/tlstap/libbpf/ringbuf.py
 * on CPUs whose memory model is weaker than x86-64's (arm64). The kernel's producer
 * publishes a record by a release store of its header (BUSY cleared) and of
 * producer_pos; the reader must load those with acquire, or it may read the record's
 * body before the producer's writes to it are visible. It hands the space back with
 * a release store of consumer_pos, or the producer may reuse the space while the
 * reader's loads from it are still pending. Python has no such loads or stores.
 */
#include <stdint.h>

uint64_t ring_load_acquire64(const uint64_t *p)
{
	return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

uint32_t ring_load_acquire32(const uint32_t *p)
{
	return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

void ring_store_release64(uint64_t *p, uint64_t v)
{
	__atomic_store_n(p, v, __ATOMIC_RELEASE);
}
