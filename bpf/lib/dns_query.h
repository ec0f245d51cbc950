/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Egress: DNS queries from a job to a configured resolver, over UDP or TCP. */
#ifndef RINGFENCE_LIB_DNS_QUERY_H
#define RINGFENCE_LIB_DNS_QUERY_H

#include <linux/pkt_cls.h>

#include "../abi.h"
#include "dns_emit.h"
#include "dns_judge.h"
#include "dns_refuse.h"
#include "dns_tcp.h"
#include "parse.h"
#include "scratch.h"

/* Makes the packet hold its own copy of the payload before it is judged. Bytes in page
 * fragments may be the job's own memory (vmsplice + splice, MSG_ZEROCOPY): a verdict on
 * them would hold only until the job rewrites the page, and the resolver reads the page
 * later. bpf_skb_pull_data of the whole length copies every fragment into the packet's head
 * and releases the fragments (a clone gets a head of its own first). Only nonlinear packets
 * pay for it. Offsets stay valid; packet pointers do not (none are used after this).
 * Returns 0 when the packet owns its bytes. */
static __always_inline int own_payload(struct __sk_buff *skb)
{
	if (skb->len <= skb->data_end - skb->data)
		return 0;
	return bpf_skb_pull_data(skb, skb->len) ? -1 : 0;
}

/* A UDP query: the datagram is one message. */
static __always_inline int dns_udp_query(struct __sk_buff *skb, struct pkt *p,
					 const struct rf_job *job, struct rf_scratch *s)
{
	__u32 len = p->l4_len;
	int v;

	/* A fragment: the name is in the first one, but the message is never whole here (TC
	 * runs before reassembly). Too short for a header: not a message at all. UDP_SEGMENT
	 * (GSO): the device cuts the datagram into several after this verdict, each a message
	 * of its own the resolver reads; judged as one it would pass all but the first
	 * unread. A payload that cannot be copied into the packet (own_payload) is not judged
	 * either. */
	if (p->fragment || len < 12 || skb->gso_size || skb->gso_segs > 1 || own_payload(skb))
		goto raw;
	p->dns_off = p->payload;
	p->dns_len = len;
	s->msglen = len;
	if (len > RF_DNS_BUF)
		len = RF_DNS_BUF; /* judge_query refuses it by msglen; the copy shows its start */
	barrier_var(len);
	if (len < 12 || len > RF_DNS_BUF || bpf_skb_load_bytes(skb, p->payload, s->buf, len))
		goto raw; /* the UDP length says more than the packet holds */
	s->len = len;
	v = judge_query(s, job->job_id);
	if (v == RF_Q_ALLOWED || (v == RF_Q_DENIED && !s->enforce))
		remember_query(s);
	if (v == RF_Q_ALLOWED)
		return TC_ACT_UNSPEC;
	if (!s->enforce) {
		report_query(skb, s, job->job_id, p->daddr, v == RF_Q_UNJUDGED ? RF_DNS_UNJUDGED : 0);
		return TC_ACT_UNSPEC;
	}
	report_query(skb, s, job->job_id, p->daddr,
		     RF_DNS_REFUSED | (v == RF_Q_UNJUDGED ? RF_DNS_UNJUDGED : 0));
	return refuse_query(skb, p);
raw:
	load_raw(skb, s, p->payload);
	report_query(skb, s, job->job_id, p->daddr, RF_DNS_UNJUDGED);
	return s->enforce ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

/* Egress, DNS from a job to a configured resolver (UDP or TCP). Allowed queries are
 * remembered so that only their answers bind; what is not allowed or cannot be judged is
 * reported, and in block mode with query filtering refused or dropped. Returns the TC action. */
static __always_inline int dns_query(struct __sk_buff *skb, struct pkt *p, const struct rf_job *job,
				     __u64 cgid)
{
	struct rf_scratch *s = get_scratch();
	int enforce = job->mode == RF_MODE_BLOCK && job->dns_filter;

	if (!s)
		return enforce ? TC_ACT_SHOT : TC_ACT_UNSPEC;
	s->enforce = enforce;
	s->cgroup_id = cgid;
	__builtin_memset(&s->qk, 0, sizeof(s->qk));
	__builtin_memset(&s->qv, 0, sizeof(s->qv));
	__builtin_memcpy(s->qk.server, p->daddr, 16);
	s->qk.client_port = p->sport;
	s->qv.job_id = job->job_id;
	s->qv.bind_seen = job->mode == RF_MODE_AUDIT;
	s->qv.at_link = p->rx;
	if (p->proto == IPPROTO_TCP) {
		int rc;

		/* s->lost on entry: the segment's bytes are not the packet's own (own_payload). */
		s->lost = own_payload(skb) ? 1 : 0;
		rc = dns_tcp_query(skb, p);

		if (rc == RF_ACT_REFUSE)
			return refuse_tcp_query(skb, p);
		if (rc == RF_ACT_RESET)
			return reset_tcp_stream(skb, p);
		return rc;
	}
	return dns_udp_query(skb, p, job, s);
}

#endif
