// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Packet loss for tests/kernel/test_wire_source.py, where netem is not built into the kernel:
 * drops one IPv4 TCP segment carrying data in DROP_ONE_IN (given with -D at build time), at
 * random, so that TCP retransmits. Segments without data (SYN, bare ACKs, FIN) pass: losing
 * them only adds timeouts, not retransmitted bytes. Loaded with `tc filter add dev IF ingress
 * bpf da obj random_drop.bpf.o sec classifier`.
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
int random_drop(struct __sk_buff *skb)
{
	struct iphdr ip;
	struct tcphdr tcp;

	if (skb->protocol != bpf_htons(ETH_P_IP) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.protocol != IPPROTO_TCP ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + ip.ihl * 4, &tcp, sizeof(tcp)))
		return TC_ACT_OK;
	if (bpf_ntohs(ip.tot_len) <= ip.ihl * 4 + tcp.doff * 4)
		return TC_ACT_OK;
	return bpf_get_prandom_u32() % DROP_ONE_IN == 0 ? TC_ACT_SHOT : TC_ACT_OK;
}
