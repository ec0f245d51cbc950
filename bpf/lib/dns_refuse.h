/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Egress packets turned around to the job: a query answered REFUSED (UDP or TCP) and a TCP
 * segment turned into a RST from the resolver, with the mark that keeps them from ever being
 * read as answers. */
#ifndef RINGFENCE_LIB_DNS_REFUSE_H
#define RINGFENCE_LIB_DNS_REFUSE_H

#include <linux/pkt_cls.h>

#include "../abi.h"
#include "common.h"
#include "parse.h"

/* The mark of every packet ringfence turns around (a query answered REFUSED, a segment
 * turned into a RST): the bytes in it are the job's, written as if they came from the
 * resolver, so nothing that carries it may be read as an answer or as a segment of one.
 * bpf_redirect to the ingress of a device in the same namespace keeps skb->mark (only a
 * crossing into another namespace scrubs it), and so does loopback. A job cannot put this
 * mark on a packet of its own: SO_MARK (and its cmsg) needs CAP_NET_ADMIN or CAP_NET_RAW,
 * and an ingress packet's mark is 0 when TC sees it (netfilter runs later). Whatever else
 * carries the value by chance is only never parsed as DNS: it binds nothing. */
#define RF_TURNED_MARK 0x52460a7bU /* "RF", then arbitrary */

static __always_inline int rf_turned(const struct __sk_buff *skb)
{
	return skb->mark == RF_TURNED_MARK;
}

/* Sends a rewritten reply back to the socket. On a real device: redirect to its ingress.
 * On loopback the packet comes back to this host anyway, and keeps its local route on the
 * way, so it just goes on; redirecting would drop the route and the input lookup would
 * then refuse loopback addresses as martians. */
static __always_inline int turn_around(struct __sk_buff *skb, struct pkt *p)
{
	/* Still the job's bytes (a REFUSED answer echoes its query, a RST keeps its segment):
	 * tagged, so that rf_ingress never reads them as an answer (rf_turned). */
	skb->mark = RF_TURNED_MARK;
	if (is_loopback(p->daddr))
		return TC_ACT_UNSPEC;
	return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}

/* A query's flags word (network order) as a REFUSED answer's: QR and RA set, TC clear. */
static __always_inline __u16 refused_flags(__u16 query_flags)
{
	__u16 f = bpf_ntohs(query_flags);

	return bpf_htons((f & ~0x020fU) | 0x8000U | 0x0080U | 5);
}

/* The refusal helpers are real subprograms (__noinline): their buffers then live in their
 * own stack frame, not in the egress program's, which must stay under 512 bytes together
 * with the deepest bpf_loop callback. */

/* Makes the packet come from where it was going: MACs, IP addresses and the first four L4
 * bytes (the ports) trade places. No checksum changes: ones' complement sums commute. */
static __noinline int swap_endpoints(struct __sk_buff *skb, struct pkt *p)
{
	/* l3_off: 0 on L3 devices (tun, WireGuard), which have no MACs to swap. */
	__u32 l3 = p->l3_off == ETH_HLEN ? ETH_HLEN : 0;
	__u32 src = p->family == 4 ? l3 + 12 : l3 + 8;
	__u32 dst = p->family == 4 ? l3 + 16 : l3 + 24;
	__u8 mac[12], swapped_mac[12], a[16], b[16];
	__u16 ports[2], swapped[2];

	if ((l3 && bpf_skb_load_bytes(skb, 0, mac, 12)) ||
	    bpf_skb_load_bytes(skb, p->l4_off, ports, 4))
		return -1;
	if (p->family == 4) {
		if (bpf_skb_load_bytes(skb, src, a, 4) || bpf_skb_load_bytes(skb, dst, b, 4) ||
		    bpf_skb_store_bytes(skb, src, b, 4, 0) || bpf_skb_store_bytes(skb, dst, a, 4, 0))
			return -1;
	} else {
		if (bpf_skb_load_bytes(skb, src, a, 16) || bpf_skb_load_bytes(skb, dst, b, 16) ||
		    bpf_skb_store_bytes(skb, src, b, 16, 0) || bpf_skb_store_bytes(skb, dst, a, 16, 0))
			return -1;
	}
	swapped[0] = ports[1];
	swapped[1] = ports[0];
	__builtin_memcpy(swapped_mac, mac + 6, 6);
	__builtin_memcpy(swapped_mac + 6, mac, 6);
	if (bpf_skb_store_bytes(skb, p->l4_off, swapped, 4, 0) ||
	    (l3 && bpf_skb_store_bytes(skb, 0, swapped_mac, 12, 0)))
		return -1;
	return 0;
}

/* Turns the query in the packet into a REFUSED answer from the resolver and hands it to
 * the device's ingress: the application gets its answer at once and the name never
 * leaves the host. Swapping addresses and ports leaves every checksum as it was (ones'
 * complement sums commute); only the flags word changes, and bpf_l4_csum_replace knows
 * what to do with it whether the checksum is complete or left to offload. */
static __noinline int refuse_query(struct __sk_buff *skb, struct pkt *p)
{
	__u16 oldf, newf;
	__u32 udp = p->l4_off;

	if (bpf_skb_load_bytes(skb, p->dns_off + 2, &oldf, 2))
		return TC_ACT_SHOT;
	newf = refused_flags(oldf);
	if (swap_endpoints(skb, p))
		return TC_ACT_SHOT;
	{
		__u16 csum;

		if (bpf_skb_load_bytes(skb, udp + 6, &csum, 2))
			return TC_ACT_SHOT;
		/* IPv4 may send UDP without a checksum (0): then there is nothing to fix. */
		if ((csum || p->family == 6) &&
		    bpf_l4_csum_replace(skb, udp + 6, oldf, newf, 2))
			return TC_ACT_SHOT;
	}
	if (bpf_skb_store_bytes(skb, p->dns_off + 2, &newf, 2, 0))
		return TC_ACT_SHOT;
	count(RF_CNT_DNS_REFUSED);
	return turn_around(skb, p);
}

/* The same over TCP: the query segment becomes the server's reply segment. Its sequence
 * number is what the client acknowledged of the server, its acknowledgment covers the
 * query, and the timestamp option's two values trade places so PAWS accepts it. The
 * message keeps its length (a REFUSED answer echoes the question), so only the flags
 * word, seq, ack and TCP flags change in the checksum. */
static __noinline int refuse_tcp_query(struct __sk_buff *skb, struct pkt *p)
{
	__u32 l4 = p->l4_off, seq, ack, nseq, nack;
	__u16 oldf, newf, oldw, neww;
	__u8 opt[12];

	if (bpf_skb_load_bytes(skb, p->dns_off + 2, &oldf, 2) ||
	    bpf_skb_load_bytes(skb, l4 + 4, &seq, 4) || bpf_skb_load_bytes(skb, l4 + 8, &ack, 4) ||
	    bpf_skb_load_bytes(skb, l4 + 12, &oldw, 2))
		return TC_ACT_SHOT;
	newf = refused_flags(oldf);
	nseq = ack;
	nack = bpf_htonl(bpf_ntohl(seq) + p->l4_len);
	neww = bpf_htons((bpf_ntohs(oldw) & 0xf000) | RF_TCP_ACK | 0x08 /* PSH */);
	if (swap_endpoints(skb, p))
		return TC_ACT_SHOT;
	/* Timestamps, in the layout Linux sends: NOP NOP TS(kind 8, len 10) TSval TSecr. */
	if (p->payload >= l4 + 32 && !bpf_skb_load_bytes(skb, l4 + 20, opt, 12) && opt[0] == 1 &&
	    opt[1] == 1 && opt[2] == 8 && opt[3] == 10) {
		__u8 sw[8];

		__builtin_memcpy(sw, opt + 8, 4);
		__builtin_memcpy(sw + 4, opt + 4, 4);
		if (bpf_skb_store_bytes(skb, l4 + 24, sw, 8, 0))
			return TC_ACT_SHOT;
	}
	if (bpf_l4_csum_replace(skb, l4 + 16, seq, nseq, 4) ||
	    bpf_l4_csum_replace(skb, l4 + 16, ack, nack, 4) ||
	    bpf_l4_csum_replace(skb, l4 + 16, oldw, neww, 2) ||
	    bpf_l4_csum_replace(skb, l4 + 16, oldf, newf, 2))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, l4 + 4, &nseq, 4, 0) ||
	    bpf_skb_store_bytes(skb, l4 + 8, &nack, 4, 0) ||
	    bpf_skb_store_bytes(skb, l4 + 12, &neww, 2, 0) ||
	    bpf_skb_store_bytes(skb, p->dns_off + 2, &newf, 2, 0))
		return TC_ACT_SHOT;
	count(RF_CNT_DNS_REFUSED);
	return turn_around(skb, p);
}

/* A TCP segment that may not pass becomes a RST from the resolver: the client's socket is
 * reset at once instead of retransmitting the segment for minutes — possibly after the job
 * ended and nothing filters it any more. Its sequence number is what the client acknowledged
 * of the resolver (exactly what a RST must carry to be believed); the payload stays (a RST
 * may carry data, which the socket discards), so only seq, ack and flags change in the
 * checksum. That payload is the job's, dressed as the resolver's: the turnaround tags the
 * packet (RF_TURNED_MARK) and dns_answer reads nothing from a RST, so it is never an answer. A
 * segmentation-offload packet is only dropped: it would have to be cut down first. */
static __noinline int reset_tcp_stream(struct __sk_buff *skb, struct pkt *p)
{
	__u32 l4 = p->l4_off, seq, ack, nseq, nack;
	__u16 oldw, neww;

	if (skb->gso_segs > 1 || bpf_skb_load_bytes(skb, l4 + 4, &seq, 4) ||
	    bpf_skb_load_bytes(skb, l4 + 8, &ack, 4) || bpf_skb_load_bytes(skb, l4 + 12, &oldw, 2))
		return TC_ACT_SHOT;
	nseq = ack;
	nack = bpf_htonl(bpf_ntohl(seq) + (skb->len - p->payload) +
			 ((p->tcp_flags & (RF_TCP_SYN | RF_TCP_FIN)) ? 1 : 0));
	neww = bpf_htons((bpf_ntohs(oldw) & 0xf000) | RF_TCP_RST | RF_TCP_ACK);
	if (swap_endpoints(skb, p))
		return TC_ACT_SHOT;
	if (bpf_l4_csum_replace(skb, l4 + 16, seq, nseq, 4) ||
	    bpf_l4_csum_replace(skb, l4 + 16, ack, nack, 4) ||
	    bpf_l4_csum_replace(skb, l4 + 16, oldw, neww, 2))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, l4 + 4, &nseq, 4, 0) ||
	    bpf_skb_store_bytes(skb, l4 + 8, &nack, 4, 0) ||
	    bpf_skb_store_bytes(skb, l4 + 12, &neww, 2, 0))
		return TC_ACT_SHOT;
	return turn_around(skb, p);
}

#endif
