/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* DNS messages copied to the agent for the audit trail (rf_dns_event + the bytes): a
 * parsed message from scratch, a raw TCP segment of a split answer, or the raw bytes of
 * something without message boundaries to go by. */
#ifndef RINGFENCE_LIB_DNS_EMIT_H
#define RINGFENCE_LIB_DNS_EMIT_H

#include "../abi.h"
#include "../maps.h"
#include "common.h"
#include "parse.h"
#include "scratch.h"
#include "sender.h"

/* Sends the DNS message in scratch to the ring buffer behind an rf_dns_event header.
 * `skb`: the query's packet, to name its sender by (NULL for answers: they have none). */
static __always_inline void emit_dns_copy(struct rf_scratch *s, __u32 job_id, const __u8 *server,
					  struct __sk_buff *skb)
{
	__u32 len = s->len;

	if (!config.emit_events)
		return;
	s->ev.hdr.type = RF_EVENT_DNS;
	s->ev.hdr.job_id = job_id;
	s->ev.hdr.ts_ns = bpf_ktime_get_boot_ns();
	/* Word by word: a byte-wise copy of an address of unknown alignment keeps 16 registers
	 * live, and the spills cost the stack of the frames that inline this. */
	{
		__u64 w0, w1;

		__builtin_memcpy(&w0, server, 8);
		barrier_var(w0);
		__builtin_memcpy(s->ev.server, &w0, 8);
		__builtin_memcpy(&w1, server + 8, 8);
		barrier_var(w1);
		__builtin_memcpy(s->ev.server + 8, &w1, 8);
	}
	s->ev.bound = s->bound;
	s->ev.flags = s->flags;
	s->ev.cgroup_id = 0;
	s->ev.pid = 0;
	s->ev.ifindex = 0;
	__builtin_memset(s->ev.comm, 0, sizeof(s->ev.comm));
	if (s->flags & RF_DNS_QUERY) {
		s->ev.cgroup_id = s->cgroup_id;
		s->ev.ifindex = skb ? skb->ingress_ifindex : 0;
		sender_of(skb, s->cgroup_id, RF_SENDER_TC, &s->ev.pid, s->ev.comm);
	}
	barrier_var(len);
	if (len > RF_DNS_BUF)
		return;
	s->ev.len = len;
	s->ev._pad2 = 0;
	if (!(s->flags & RF_DNS_TCP_SEGMENT)) {
		s->ev.seq = 0;
		s->ev.client_port = 0;
	}
	/* Segments of a split TCP answer wait for the agent to bind them: wake it now. */
	if (bpf_ringbuf_output(&events, &s->ev, sizeof(s->ev) + len,
			       ringbuf_flags(s->flags & RF_DNS_TCP_SEGMENT)))
		count(RF_CNT_RINGBUF_DROP);
}

/* Copies one raw TCP segment of a split DNS answer to the agent. */
static __always_inline void copy_segment(struct __sk_buff *skb, struct pkt *p, __u32 job_id,
					 __u32 flags)
{
	struct rf_scratch *s = get_scratch();
	__u32 len = p->l4_len, seq;

	if (!s || bpf_skb_load_bytes(skb, p->l4_off + 4, &seq, 4))
		return;
	if (len > RF_DNS_BUF)
		len = RF_DNS_BUF; /* the agent sees the gap and gives up on this answer */
	/* The size must be provably >= 1. clang compiles `len < 1` to `len == 0`, from which the
	 * 6.1 verifier learns no lower bound; a range check on len - 1 then +1 gives [1, 4096]. */
	if (!len)
		return;
	len -= 1;
	barrier_var(len);
	if (len > RF_DNS_BUF - 1)
		return;
	len += 1;
	if (bpf_skb_load_bytes(skb, p->payload, s->buf, len))
		return;
	s->len = len;
	s->bound = 0;
	s->flags = RF_DNS_TCP | RF_DNS_TCP_SEGMENT | flags;
	s->ev.seq = bpf_ntohl(seq);
	s->ev.client_port = p->dport;
	emit_dns_copy(s, job_id, p->saddr, NULL);
}

/* Up to RF_DNS_BUF bytes of the packet from `off`, as the copy of something that has no
 * message boundaries to go by (a fragment, a segment of a stream that was lost track of). */
static __always_inline void load_raw(struct __sk_buff *skb, struct rf_scratch *s, __u32 off)
{
	__u32 len = skb->len > off ? skb->len - off : 0;

	s->len = 0;
	if (len > RF_DNS_BUF)
		len = RF_DNS_BUF;
	if (!len)
		return;
	/* [1, RF_DNS_BUF], provably (see copy_segment) */
	len -= 1;
	barrier_var(len);
	if (len > RF_DNS_BUF - 1)
		return;
	len += 1;
	if (bpf_skb_load_bytes(skb, off, s->buf, len))
		return;
	s->len = len;
}

#endif
