// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * An empty uprobe program: what a probe costs before any work is done in it.
 * `python -m tlstap.probes.floor` (tlstap bench's `probes` configuration) puts
 * it on the sites text mode uses, to measure the floor under text mode's cost.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("uprobe")
int noop(void *ctx)
{
	return 0;
}
