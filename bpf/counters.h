/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* An object's counters: a per-CPU array of __u64 indexed by the object's
 * counter enum (tlstap.h, shell.h, dbaudit.h), which user space sums over the
 * CPUs (Map.counter_sums in libbpf/object.py). Per-CPU, so a probe counts without an
 * atomic or a shared cache line. One definition for every object; each names
 * its own map, since user space reads the counters by the map's name. */
#ifndef TLSTAP_COUNTERS_H
#define TLSTAP_COUNTERS_H

#define DEFINE_COUNTERS(map, entries)					\
	struct {							\
		__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);		\
		__uint(max_entries, entries);				\
		__type(key, __u32);					\
		__type(value, __u64);					\
	} map SEC(".maps");						\
									\
	static __always_inline void count_n(__u32 idx, __u64 n)	\
	{								\
		__u64 *v = bpf_map_lookup_elem(&map, &idx);		\
		if (v)							\
			*v += n;					\
	}								\
									\
	static __always_inline void count(__u32 idx)			\
	{								\
		count_n(idx, 1);					\
	}

#endif
