/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Packet parsing: Ethernet, IPv4, IPv6, TCP, UDP. Every access is bounds-checked;
 * what cannot be parsed is reported as such and never dropped for being odd. */
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

#ifndef barrier_var
#define barrier_var(var) asm volatile("" : "+r"(var))
#endif

#define RF_TCP_FIN 0x01
#define RF_TCP_SYN 0x02
#define RF_TCP_RST 0x04
#define RF_TCP_ACK 0x10

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
	__u8 _pad[1];
	__u16 l4_len;     /* UDP: the length field minus its header; TCP: segment payload bytes */
	__u32 l4_off;     /* offset of the TCP/UDP header */
	__u32 dns_off;    /* where the DNS message starts (after TCP's 2-byte length prefix) */
	__u32 dns_len;
} __attribute__((aligned(8)));

static __always_inline void v4_mapped(__u8 *dst, __be32 a)
{
	__builtin_memset(dst, 0, 10);
	dst[10] = 0xff;
	dst[11] = 0xff;
	__builtin_memcpy(dst + 12, &a, 4);
}

/* Returns 0 when the packet is IPv4/IPv6 and p is filled, -1 otherwise. */
static __always_inline int parse_pkt(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 l4;

	if ((void *)(eth + 1) > data_end)
		return -1;

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		__u32 ihl;

		if ((void *)(ip + 1) > data_end || ip->version != 4)
			return -1;
		ihl = ip->ihl * 4;
		if (ihl < sizeof(*ip))
			return -1;
		p->family = 4;
		p->proto = ip->protocol;
		v4_mapped(p->saddr, ip->saddr);
		v4_mapped(p->daddr, ip->daddr);
		p->l3_len = skb->len - sizeof(*eth);
		if (ip->frag_off & bpf_htons(0x3fff)) {
			p->fragment = 1;
			if (ip->frag_off & bpf_htons(0x1fff))
				p->later_frag = 1;
		}
		l4 = sizeof(*eth) + ihl;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		p->family = 6;
		p->proto = ip6->nexthdr;
		__builtin_memcpy(p->saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->daddr, &ip6->daddr, 16);
		p->l3_len = skb->len - sizeof(*eth);
		l4 = sizeof(*eth) + sizeof(*ip6);
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
				return 0;
			p->fragment = 1;
			p->proto = fh->nexthdr;
			if (fh->frag_off & bpf_htons(0xfff8))
				p->later_frag = 1;
			l4 += sizeof(*fh);
		}
	} else {
		return -1;
	}

	if (p->later_frag)
		return 0;

	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = data + l4;

		if ((void *)(tcp + 1) > data_end)
			return 0;
		p->sport = bpf_ntohs(tcp->source);
		p->dport = bpf_ntohs(tcp->dest);
		p->tcp_flags = ((__u8 *)tcp)[13];
		p->payload = l4 + tcp->doff * 4;
		p->l4_off = l4;
		p->l4_len = skb->len > p->payload ? skb->len - p->payload : 0;
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *udp = data + l4;

		if ((void *)(udp + 1) > data_end)
			return 0;
		p->sport = bpf_ntohs(udp->source);
		p->dport = bpf_ntohs(udp->dest);
		p->payload = l4 + sizeof(*udp);
		p->l4_off = l4;
		p->l4_len = bpf_ntohs(udp->len) >= sizeof(*udp) ? bpf_ntohs(udp->len) - sizeof(*udp) : 0;
	}
	return 0;
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

#endif
