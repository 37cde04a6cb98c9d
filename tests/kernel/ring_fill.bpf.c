// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * A plain ring buffer producer, for tests/kernel/test_ringbuf.py: each
 * BPF_PROG_TEST_RUN puts its frame in the ring as one record, or, when the
 * frame starts with 'D', reserves a record of that size and discards it.
 * `hold` (a sleepable uprobe on hold(src) of a test library) reserves a
 * record and fills it from user memory: while that copy waits for a page
 * (a userfaultfd page the test has not supplied yet), the record is
 * reserved and not committed, its header BUSY, as a producer caught
 * between reserve and submit leaves it.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#define RING_SIZE 16384
#define BODY_MAX 2048
#define HOLD_LEN 64

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, RING_SIZE);
} ring SEC(".maps");

static char body[BODY_MAX];

SEC("tc")
int fill(struct __sk_buff *skb)
{
	__u32 len = skb->len;
	struct bpf_dynptr dp;

	if (len == 0 || len > BODY_MAX || bpf_skb_load_bytes(skb, 0, body, len))
		return TC_ACT_SHOT;
	if (body[0] == 'D') {
		bpf_ringbuf_reserve_dynptr(&ring, len, 0, &dp);
		bpf_ringbuf_discard_dynptr(&dp, 0);
		return TC_ACT_OK;
	}
	return bpf_ringbuf_output(&ring, body, len, 0) ? TC_ACT_SHOT : TC_ACT_OK;
}

SEC("uprobe.s")
int hold(struct pt_regs *ctx)
{
	const void *src = (const void *)PT_REGS_PARM1(ctx);
	char *rec = bpf_ringbuf_reserve(&ring, HOLD_LEN, 0);

	if (!rec)
		return 0;
	if (bpf_copy_from_user(rec, HOLD_LEN, src)) {
		bpf_ringbuf_discard(rec, 0);
		return 0;
	}
	bpf_ringbuf_submit(rec, 0);
	return 0;
}
