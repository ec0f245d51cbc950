/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The XDP pre-judge of interface jobs, on the host side of a job's link (a container's veth,
 * a microVM's tap), next to the TC programs, which stay and still judge everything it lets
 * through. What the job sends enters the host there as ingress, and XDP sees it before
 * TC does (on a tap, before an skb exists).
 *
 * Safe by construction: it drops only what rf_ingress would drop too, and passes everything
 * else on to TC unchanged:
 * - a packet of a flow already cached as blocked in `flows`;
 * - the first packet of a new plain TCP/UDP flow (IPv4 without options, IPv6 without
 *   extension headers, not a fragment, not DNS, not loopback, not a SYN-ACK) that judge()
 *   blocks and no allowed-inbound peer explains: cached as blocked and reported here, once,
 *   with the event TC would have sent (rf_backstop pre-judges a cgroup job's packets the
 *   same way).
 * What it does not take on it cannot get wrong: DNS (queries are filtered and answered
 * REFUSED by TC), allowed and audited flows (TC caches and reports them), SYN-ACKs (TC
 * turns a refused one into a RST), fragments, options, ARP, neighbour discovery and
 * anything it cannot parse. A mistake here can only drop more, never let more through.
 *
 * Included from ringfence.bpf.c after the verdict helpers it shares (judge, inbound_allows,
 * host_side).
 */
#ifndef RINGFENCE_XDP_H
#define RINGFENCE_XDP_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "abi.h"
#include "maps.h"
#include "lib/common.h"
#include "lib/parse.h"

/* Reads a plain TCP or UDP packet of the frame into p (addresses mapped as parse_pkt maps
 * them, ports in host order). Returns 0 for such a packet, -1 for anything else, which
 * goes on to TC. */
static __always_inline int xdp_parse(struct xdp_md *ctx, struct pkt *p, __u32 l2)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *l3, ver;
	__u32 l4;

	/* The offsets are constants on each path (never the map's value): the verifier bounds
	 * every packet access by them. */
	if (l2 == RF_L2_ETHER) {
		struct ethhdr *eth = data;

		if ((void *)(eth + 1) > data_end)
			return -1;
		if (eth->h_proto == bpf_htons(ETH_P_IP))
			ver = 4;
		else if (eth->h_proto == bpf_htons(ETH_P_IPV6))
			ver = 6;
		else
			return -1;
		l3 = (void *)(eth + 1);
		l2 = sizeof(*eth);
	} else if (l2 == RF_L2_NONE) {
		l3 = data;
		if ((void *)(l3 + 1) > data_end)
			return -1;
		ver = *l3 >> 4;
		l2 = 0;
	} else {
		return -1;
	}
	if (ver == 4) {
		struct iphdr *ip = (void *)l3;

		if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl != 5 ||
		    (ip->frag_off & bpf_htons(0x3fff)))
			return -1;
		p->family = 4;
		p->proto = ip->protocol;
		v4_mapped(p->saddr, ip->saddr);
		v4_mapped(p->daddr, ip->daddr);
		l4 = l2 + sizeof(*ip);
	} else if (ver == 6) {
		struct ipv6hdr *ip6 = (void *)l3;

		if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
			return -1;
		p->family = 6;
		p->proto = ip6->nexthdr;
		__builtin_memcpy(p->saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->daddr, &ip6->daddr, 16);
		l4 = l2 + sizeof(*ip6);
	} else {
		return -1;
	}
	p->l3_off = l2;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = data + l4;

		if ((void *)(tcp + 1) > data_end || tcp->doff < 5)
			return -1;
		p->sport = bpf_ntohs(tcp->source);
		p->dport = bpf_ntohs(tcp->dest);
		p->tcp_flags = ((__u8 *)tcp)[13];
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *udp = data + l4;

		if ((void *)(udp + 1) > data_end)
			return -1;
		p->sport = bpf_ntohs(udp->source);
		p->dport = bpf_ntohs(udp->dest);
	} else {
		return -1;
	}
	p->l4_off = l4;
	return 0;
}

/* The flow event rf_ingress sends for a new blocked flow of an interface job, field for
 * field: a packet from a job's link has no socket on the host (crossing the veth orphaned
 * it; a tap's is new), so TC's has cgroup 0, no process and the device it came in on. */
static __always_inline void xdp_emit_blocked(const struct rf_job *job, const struct pkt *p,
					     __u64 now, __u8 reason, __u32 ifindex)
{
	struct rf_flow_event *e;

	if (!config.emit_events)
		return;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(RF_CNT_RINGBUF_DROP);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->hdr.type = RF_EVENT_FLOW;
	e->hdr.job_id = job->job_id;
	e->hdr.ts_ns = now;
	e->ifindex = ifindex;
	__builtin_memcpy(e->saddr, p->saddr, 16);
	__builtin_memcpy(e->daddr, p->daddr, 16);
	e->sport = p->sport;
	e->dport = p->dport;
	e->proto = p->proto;
	e->verdict = RF_VERDICT_BLOCKED;
	e->reason = reason;
	e->direction = RF_DIR_OUTBOUND;
	bpf_ringbuf_submit(e, ringbuf_flags(0));
}

SEC("xdp")
int rf_xdp(struct xdp_md *ctx)
{
	__u32 ifindex = ctx->ingress_ifindex, *l2, l2v = RF_L2_ETHER;
	struct rf_flow_key fk = {};
	struct rf_flow_val fv = {}, *cached;
	struct pkt p = {};
	struct rf_job *job;
	__u8 verdict, reason = RF_REASON_ALLOWED;
	__u64 now;

	if (!have_ifjobs)
		return XDP_PASS;
	/* Only a job's own packets, on the host side of its link. */
	job = bpf_map_lookup_elem(&ifjobs, &ifindex);
	if (!host_side(job))
		return XDP_PASS;
	/* The link header as TC reads it (link_hdr_len): looked up only once some attached
	 * device is not Ethernet. */
	if (have_l3_devs) {
		l2 = bpf_map_lookup_elem(&devices, &ifindex);
		l2v = l2 ? *l2 : RF_L2_ETHER;
	}
	if (xdp_parse(ctx, &p, l2v))
		return XDP_PASS;
	/* DNS (filtered, answered REFUSED by TC), loopback (always allowed) and the job's
	 * SYN-ACKs (TC answers a refused one with a RST) are TC's alone. */
	if (p.dport == 53 || is_loopback(p.daddr) || is_syn_ack(&p))
		return XDP_PASS;

	__builtin_memcpy(fk.daddr, p.daddr, 16);
	fk.job_id = job->job_id;
	fk.sport = p.sport;
	fk.dport = p.dport;
	fk.proto = p.proto;
	now = bpf_ktime_get_boot_ns();
	cached = config.always_judge ? NULL : bpf_map_lookup_elem(&flows, &fk);
	if (cached) {
		if (cached->verdict != RF_VERDICT_BLOCKED)
			return XDP_PASS;
		/* As TC does: a live blocked flow keeps its entry fresh. */
		if (now - cached->last_ns > RF_SEC)
			cached->last_ns = now;
		count(RF_CNT_BLOCKED);
		return XDP_DROP;
	}
	verdict = judge(job, &p, now, &reason);
	/* As in rf_ingress: a job answering a peer allowed inbound is not blocked. */
	if (verdict != RF_VERDICT_BLOCKED ||
	    ((p.proto == IPPROTO_UDP || !(p.tcp_flags & RF_TCP_SYN)) && inbound_allows(job, &p)))
		return XDP_PASS;
	fv.first_ns = now;
	fv.last_ns = now;
	fv.verdict = verdict;
	fv.reason = reason;
	bpf_map_update_elem(&flows, &fk, &fv, BPF_ANY);
	count(RF_CNT_NEW_FLOWS);
	count(RF_CNT_BLOCKED);
	xdp_emit_blocked(job, &p, now, reason, ifindex);
	return XDP_DROP;
}

#endif
