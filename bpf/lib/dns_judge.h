/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* One query message judged against the job's names, remembered (so that only its answer
 * binds) or reported. */
#ifndef RINGFENCE_LIB_DNS_JUDGE_H
#define RINGFENCE_LIB_DNS_JUDGE_H

#include "../abi.h"
#include "../maps.h"
#include "common.h"
#include "dns_emit.h"
#include "dns_question.h"
#include "scratch.h"

/* The rule: a query reaches a resolver only if every question of every message was parsed
 * and allowed. What cannot be judged is refused (where a REFUSED answer can be made cleanly)
 * or dropped in block mode with query filtering, and reported in every mode. */
enum rf_query_verdict {
	RF_Q_ALLOWED = 0,  /* its one question was parsed and is allowed */
	RF_Q_DENIED = 1,   /* its question names something the policy does not allow */
	RF_Q_UNJUDGED = 2, /* not a plain query the kernel could read whole */
};

/* Judges the message whose first s->len bytes are in buf (s->msglen bytes in all). Only a
 * plain query is judged: QR=0, opcode QUERY, exactly one question, and no answer or authority
 * records — a query never carries them (IXFR's SOA in the authority section is the exception,
 * and refusing it is the safe side), and a resolver might act on them. The additional section
 * (EDNS OPT, TSIG) is not read: a resolver never sends it on as a name. */
static __always_inline int judge_query(struct rf_scratch *s, __u32 job_id)
{
	if (s->msglen < 12 || s->msglen > RF_DNS_BUF || s->len < 12)
		return RF_Q_UNJUDGED;
	if ((buf_at(s, 2) & 0xf8) || buf16(s, 4) != 1 || buf16(s, 6) || buf16(s, 8))
		return RF_Q_UNJUDGED;
	/* Bad labels, a name ending in a compression pointer, a question cut short. */
	if (parse_question(s))
		return RF_Q_UNJUDGED;
	count(RF_CNT_DNS_QUERIES);
	s->job_id = job_id;
	s->matched = 0;
	s->bound = 0;
	__builtin_memset(&s->ports, 0, sizeof(s->ports));
	bpf_loop(RF_LABELS_MAX, match_cb, NULL, 0);
	return s->matched ? RF_Q_ALLOWED : RF_Q_DENIED;
}

/* Remembers a judged query (server, client port, id, name hash): only its answer binds.
 * s->qk.server, s->qk.client_port and s->qv.job_id/bind_seen were set for the packet. */
static __always_inline void remember_query(struct rf_scratch *s)
{
	s->qk.txid = buf16(s, 0);
	s->qv.name_hash = s->hash;
	s->qv.sent_ns = bpf_ktime_get_boot_ns();
	bpf_map_update_elem(&queries, &s->qk, &s->qv, BPF_ANY);
}

/* The copy of a query that was not allowed (or not judged) for the audit trail. */
static __always_inline void report_query(struct __sk_buff *skb, struct rf_scratch *s, __u32 job_id,
					 const __u8 *server, __u32 flags)
{
	if (flags & RF_DNS_UNJUDGED)
		count(RF_CNT_DNS_UNJUDGED);
	s->flags = RF_DNS_QUERY | flags;
	s->bound = 0;
	emit_dns_copy(s, job_id, server, skb);
}

#endif
