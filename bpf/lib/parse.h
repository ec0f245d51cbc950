/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Packet parsing: Ethernet or no link header (L3 devices), IPv4, IPv6, TCP, UDP. Every
 * access is bounds-checked; what cannot be parsed is reported as such, and the verdict
 * program decides what that means for the packet (a job's packet fails closed). */
#ifndef RINGFENCE_PARSE_H
#define RINGFENCE_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "../abi.h"

#ifndef barrier_var
#define barrier_var(var) asm volatile("" : "+r"(var))
#endif

#define RF_TCP_FIN 0x01
#define RF_TCP_SYN 0x02
#define RF_TCP_RST 0x04
#define RF_TCP_ACK 0x10
#define RF_TCP_URG 0x20

struct pkt {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;      /* host order; 0 when there is no L4 header */
	__u16 dport;
	__u32 payload;    /* offset of the L4 payload (UDP/TCP), 0 when unknown */
	__u32 l3_len;     /* bytes from the IP header to the end of the packet */
	__u8 proto;       /* IPPROTO_*; for IPv6 the first next-header we did not skip */
	__u8 tcp_flags;
	__u8 family;      /* 4 or 6 */
	__u8 fragment;    /* part of a fragmented datagram */
	__u8 later_frag;  /* not the first fragment: no L4 header at all */
	__u8 l3_off;      /* where the IP header starts: 14 after Ethernet, 0 on L3 devices */
	/* Set by the verdict program, not the parser: the packet came in on the host side of an
	 * interface job's link (TC ingress), so what ringfence answers in the job's place goes
	 * back out of that device, not into its ingress. */
	__u8 rx;
	__u16 l4_len;     /* UDP: the length field minus its header; TCP: segment payload bytes */
	__u32 l4_off;     /* offset of the TCP/UDP header */
	__u32 dns_off;    /* where the DNS message starts (after TCP's 2-byte length prefix) */
	__u32 dns_len;
	/* Set by the verdict program: the verdict_gen read before its job was looked up, which
	 * a flow kept with its socket is stamped with (what was the tail padding). */
	__u32 gen;
} __attribute__((aligned(8)));

static __always_inline void v4_mapped(__u8 *dst, __be32 a)
{
	__builtin_memset(dst, 0, 10);
	dst[10] = 0xff;
	dst[11] = 0xff;
	__builtin_memcpy(dst + 12, &a, 4);
}

/* parse_pkt results. */
enum {
	RF_PARSE_OK = 0,
	RF_PARSE_NOT_IP = 1, /* an Ethernet frame that carries no IP (ARP, LLDP...) */
	RF_PARSE_BAD = -1,   /* IP that cannot be read far enough to judge, or an unknown link type */
};

/* Reads the packet that starts `l2` bytes into the frame: RF_L2_ETHER (14) for Ethernet and
 * loopback, RF_L2_NONE (0) for L3 devices (tun, WireGuard, PPP) and for the cgroup hook,
 * where the data starts at the IP header. Fills p as far as it can read, also on failure
 * (a packet that fails has its addresses when they were readable, for the report). A TCP or
 * UDP header that is cut is a failure: without ports the packet cannot be judged. */
static __always_inline int parse_pkt(struct __sk_buff *skb, struct pkt *p, __u32 l2)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 l4, ver;
	__u8 *l3;

	if (l2 == RF_L2_ETHER) {
		struct ethhdr *eth = data;

		if ((void *)(eth + 1) > data_end)
			return RF_PARSE_BAD;
		if (eth->h_proto == bpf_htons(ETH_P_IP))
			ver = 4;
		else if (eth->h_proto == bpf_htons(ETH_P_IPV6))
			ver = 6;
		else
			return RF_PARSE_NOT_IP;
		l3 = (void *)(eth + 1);
		if ((void *)(l3 + 1) > data_end || (*l3 >> 4) != ver)
			return RF_PARSE_BAD;
	} else if (l2 == RF_L2_NONE) {
		/* No link header says what follows: the IP version nibble does (a tun device
		 * carries IP only; anything else is unparsed). */
		l3 = data;
		if ((void *)(l3 + 1) > data_end)
			return RF_PARSE_BAD;
		ver = *l3 >> 4;
	} else {
		return RF_PARSE_BAD;
	}
	p->l3_off = l2;

	if (ver == 4) {
		struct iphdr *ip = (void *)l3;
		__u32 ihl;

		if ((void *)(ip + 1) > data_end)
			return RF_PARSE_BAD;
		ihl = ip->ihl * 4;
		p->family = 4;
		p->proto = ip->protocol;
		v4_mapped(p->saddr, ip->saddr);
		v4_mapped(p->daddr, ip->daddr);
		if (ihl < sizeof(*ip))
			return RF_PARSE_BAD;
		p->l3_len = skb->len - l2;
		if (ip->frag_off & bpf_htons(0x3fff)) {
			p->fragment = 1;
			if (ip->frag_off & bpf_htons(0x1fff))
				p->later_frag = 1;
		}
		l4 = l2 + ihl;
	} else if (ver == 6) {
		struct ipv6hdr *ip6 = (void *)l3;

		if ((void *)(ip6 + 1) > data_end)
			return RF_PARSE_BAD;
		p->family = 6;
		p->proto = ip6->nexthdr;
		__builtin_memcpy(p->saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->daddr, &ip6->daddr, 16);
		p->l3_len = skb->len - l2;
		l4 = l2 + sizeof(*ip6);
		/* Extension headers other than a fragment header are rare on egress of
		 * TCP/UDP; a fragment header is followed here so fragments are known. */
		if (p->proto == IPPROTO_FRAGMENT) {
			struct frag_hdr {
				__u8 nexthdr;
				__u8 reserved;
				__be16 frag_off;
				__be32 id;
			} *fh = (void *)(ip6 + 1);

			if ((void *)(fh + 1) > data_end)
				return RF_PARSE_BAD;
			p->fragment = 1;
			p->proto = fh->nexthdr;
			if (fh->frag_off & bpf_htons(0xfff8))
				p->later_frag = 1;
			l4 += sizeof(*fh);
		}
	} else {
		return RF_PARSE_BAD;
	}

	if (p->later_frag)
		return RF_PARSE_OK;

	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = data + l4;

		if ((void *)(tcp + 1) > data_end || tcp->doff < 5)
			return RF_PARSE_BAD;
		p->sport = bpf_ntohs(tcp->source);
		p->dport = bpf_ntohs(tcp->dest);
		p->tcp_flags = ((__u8 *)tcp)[13];
		p->payload = l4 + tcp->doff * 4;
		p->l4_off = l4;
		p->l4_len = skb->len > p->payload ? skb->len - p->payload : 0;
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *udp = data + l4;

		if ((void *)(udp + 1) > data_end)
			return RF_PARSE_BAD;
		p->sport = bpf_ntohs(udp->source);
		p->dport = bpf_ntohs(udp->dest);
		p->payload = l4 + sizeof(*udp);
		p->l4_off = l4;
		p->l4_len = bpf_ntohs(udp->len) >= sizeof(*udp) ? bpf_ntohs(udp->len) - sizeof(*udp) : 0;
	}
	return RF_PARSE_OK;
}

static __always_inline int addr_is_v4(const __u8 *a)
{
	return a[10] == 0xff && a[11] == 0xff && !*(__u64 *)a && !*(__u16 *)(a + 8);
}

static __always_inline int is_loopback(const __u8 *a)
{
	if (addr_is_v4(a))
		return a[12] == 127;
	/* ::1 */
	return !*(__u64 *)a && !*(__u32 *)(a + 8) && !*(__u16 *)(a + 12) && a[14] == 0 && a[15] == 1;
}

/* Link-local and cloud metadata: 169.254.0.0/16, fe80::/10, fd00:ec2::254. */
static __always_inline int is_metadata(const __u8 *a)
{
	if (addr_is_v4(a))
		return a[12] == 169 && a[13] == 254;
	if (a[0] == 0xfe && (a[1] & 0xc0) == 0x80)
		return 1;
	return a[0] == 0xfd && a[1] == 0x00 && a[2] == 0x0e && a[3] == 0xc2 && !*(__u32 *)(a + 4) &&
	       !*(__u32 *)(a + 8) && !*(__u16 *)(a + 12) && a[14] == 0x02 && a[15] == 0x54;
}

/* Addresses a DNS answer must never open (only a static policy entry does): this host, the
 * link, metadata services, multicast and reserved space. v4: 0.0.0.0/8, 127/8, 169.254/16,
 * 224/4 and 240/4 (broadcast included); v6: ::, ::1, fe80::/10, ff00::/8, fd00:ec2::254;
 * and the special v4 ranges embedded in NAT64's 64:ff9b::/96. IPv4-mapped AAAA answers are
 * already in the v4 form here (addresses are stored mapped). Private ranges are not
 * special: internal mirrors and cloud endpoints legitimately resolve to them. */
static __always_inline int v4_special(const __u8 *a)
{
	return a[12] == 0 || a[12] == 127 || (a[12] == 169 && a[13] == 254) || a[12] >= 224;
}

static __always_inline int is_special_answer(const __u8 *a)
{
	if (addr_is_v4(a))
		return v4_special(a);
	/* 64:ff9b::/96 */
	if (a[0] == 0 && a[1] == 0x64 && a[2] == 0xff && a[3] == 0x9b && !*(__u32 *)(a + 4) &&
	    !*(__u32 *)(a + 8))
		return v4_special(a);
	/* :: and ::1 */
	if (!*(__u64 *)a && !*(__u32 *)(a + 8) && !*(__u16 *)(a + 12) && a[14] == 0 && a[15] <= 1)
		return 1;
	if (a[0] == 0xff)
		return 1;
	return is_metadata(a);
}

#endif
