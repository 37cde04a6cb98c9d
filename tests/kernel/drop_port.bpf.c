// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * A user's own TC filter, for tests/kernel/test_tc_observe.py: drops IPv4 TCP
 * to DROP_PORT (given with -D at build time), lets everything else through.
 * Loaded with `tc filter add dev IF ingress bpf da obj drop_port.bpf.o sec
 * classifier`: this kernel has no act_gact or flower to write it otherwise.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("classifier")
int drop_port(struct __sk_buff *skb)
{
	struct iphdr ip;
	struct tcphdr tcp;

	if (skb->protocol != bpf_htons(ETH_P_IP) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.protocol != IPPROTO_TCP ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + ip.ihl * 4, &tcp, sizeof(tcp)))
		return TC_ACT_OK;
	return tcp.dest == bpf_htons(DROP_PORT) ? TC_ACT_SHOT : TC_ACT_OK;
}
