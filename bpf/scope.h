/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* The capture scope (--pid, --uid, --cgroup), tested in the kernel so events
 * of other processes never reach the ring buffer, and the read-only config
 * that holds it. Every object includes this once; user space sets all of cfg
 * before load (sources/base.py: set_scope), so these are only fallbacks. */
#ifndef TLSTAP_SCOPE_H
#define TLSTAP_SCOPE_H

const volatile struct config cfg = {
	.target_tgid = 0,
	.target_uid = (__u32)-1,
	.max_payload = 1 << 20, /* objects that emit no payload ignore it */
	.target_cgroup = 0,
};

static __always_inline bool wanted(__u64 pid_tgid)
{
	if (cfg.target_tgid && (__u32)(pid_tgid >> 32) != cfg.target_tgid)
		return false;
	if (cfg.target_uid != (__u32)-1 &&
	    (__u32)bpf_get_current_uid_gid() != cfg.target_uid)
		return false;
	if (cfg.target_cgroup && bpf_get_current_cgroup_id() != cfg.target_cgroup)
		return false;
	return true;
}

#endif
