/* The key objects' (keylog.bpf.c, nss_keys.bpf.c) ring of struct key_event and their
 * counters: one definition, since sources/keys.py reads both objects alike. */
#ifndef TLSTAP_KEY_MAPS_H
#define TLSTAP_KEY_MAPS_H

#include "counters.h"

/* Records are reserved as void*, so nothing else would put struct key_event
 * in the object's BTF, which tests/abi checks abi.py against. */
struct key_event *key_event_btf __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);   /* ~1300 events: handshakes are rare */
} key_events SEC(".maps");

DEFINE_COUNTERS(key_counters, KCNT_MAX)

/* A filled record goes to the reader at once (a key log line should appear
 * as soon as its secret exists); one whose user memory could not be read
 * (read_failed) is counted and dropped, never sent half-filled. */
static __always_inline void send_key(struct key_event *e, bool read_failed)
{
	if (read_failed) {
		count(KCNT_READ_ERRORS);
		bpf_ringbuf_discard(e, 0);
		return;
	}
	count(KCNT_SECRETS);
	bpf_ringbuf_submit(e, 0);
}

#endif
