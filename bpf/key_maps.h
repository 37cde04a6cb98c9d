/* The key objects' (keylog.bpf.c, nss_keys.bpf.c) ring of struct key_event and their
 * counters: one definition, since sources/keys.py reads both objects alike. */
#ifndef TLSTAP_KEY_MAPS_H
#define TLSTAP_KEY_MAPS_H

/* Records are reserved as void*, so nothing else would put struct key_event
 * in the object's BTF, which tests/abi checks abi.py against. */
struct key_event *key_event_btf __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);   /* ~1300 events: handshakes are rare */
} key_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KCNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} key_counters SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&key_counters, &idx);
	if (v)
		*v += 1;
}

#endif
