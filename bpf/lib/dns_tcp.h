/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Egress: TCP DNS streams from a job to a resolver, followed segment by segment so that
 * every message is judged whatever the segmentation (state in `dns_streams`, bpf/maps.h). */
#ifndef RINGFENCE_LIB_DNS_TCP_H
#define RINGFENCE_LIB_DNS_TCP_H

#include <linux/pkt_cls.h>

#include "../abi.h"
#include "../maps.h"
#include "dns_emit.h"
#include "dns_judge.h"
#include "parse.h"
#include "scratch.h"

/* dns_tcp_query's answers when the segment is to be answered REFUSED, or dropped and the
 * client reset (the caller does it: those frames would not fit under this one's). */
#define RF_ACT_REFUSE 0x100
#define RF_ACT_RESET 0x101

struct rf_dns_walk {
	struct __sk_buff *skb;
	struct rf_dns_stream *st;
};

/* One piece of a TCP segment per call: the next message's length prefix (as much of it as
 * the segment holds) and as much of that message as follows it. A message is judged once its
 * first min(length, RF_DNS_HOLD) bytes are in buf — where the caller has put back what earlier
 * segments brought — and, in block mode, the walk stops at the first one not allowed. */
static long tcp_walk_cb(__u32 i, void *ctx)
{
	struct rf_dns_walk *w = ctx;
	struct rf_dns_stream *st = w->st;
	struct rf_scratch *s = get_scratch();
	__u32 got, take;
	__u8 pre[2];
	int v;

	if (!s || s->seg_pos >= s->seg_end)
		return 1;
	if (st->prefix_have < 2) {
		if (st->prefix_have == 0 && s->seg_end - s->seg_pos >= 2) {
			if (bpf_skb_load_bytes(w->skb, s->seg_pos, pre, 2))
				goto lost;
			st->msglen = ((__u16)pre[0] << 8) | pre[1];
			s->seg_pos += 2;
		} else {
			if (bpf_skb_load_bytes(w->skb, s->seg_pos, pre, 1))
				goto lost;
			s->seg_pos += 1;
			if (st->prefix_have == 0) {
				/* The segment ends between the prefix's two bytes. */
				st->prefix0 = pre[0];
				st->prefix_have = 1;
				return 0;
			}
			st->msglen = ((__u16)st->prefix0 << 8) | pre[0];
		}
		st->prefix_have = 2;
		st->got = 0;
		st->judged = 0;
	}
	/* s->msglen: this message's bytes still to come in this segment, then its length. */
	s->msglen = st->msglen - st->got;
	if (s->msglen > s->seg_end - s->seg_pos)
		s->msglen = s->seg_end - s->seg_pos;
	/* s->len: bytes to judge by, min(length, RF_DNS_HOLD). */
	s->len = st->msglen < RF_DNS_HOLD ? st->msglen : RF_DNS_HOLD;
	got = st->got;
	if (got < s->len && s->msglen) {
		take = s->len - got;
		if (take > s->msglen)
			take = s->msglen;
		/* [1, RF_DNS_HOLD] bytes at buf + [0, RF_DNS_HOLD): inside buf, provably. */
		take -= 1;
		barrier_var(take);
		barrier_var(got);
		if (take > RF_DNS_HOLD - 1 || got > RF_DNS_HOLD - 1)
			goto lost;
		if (bpf_skb_load_bytes(w->skb, s->seg_pos, s->buf + got, take + 1))
			goto lost;
	}
	st->got += s->msglen;
	s->seg_pos += s->msglen;
	s->msglen = st->msglen;
	if (!st->judged && st->got >= s->len) {
		st->judged = 1;
		v = judge_query(s, s->qv.job_id);
		if (v == RF_Q_ALLOWED || (v == RF_Q_DENIED && !s->enforce))
			remember_query(s);
		if (v != RF_Q_ALLOWED) {
			if (s->enforce) {
				s->verdict = v;
				return 1;
			}
			report_query(w->skb, s, s->qv.job_id, s->qk.server,
				     RF_DNS_TCP | (v == RF_Q_UNJUDGED ? RF_DNS_UNJUDGED : 0));
		}
	}
	if (st->got >= st->msglen)
		st->prefix_have = 0; /* the next byte starts the next message */
	return 0;
lost:
	s->verdict = RF_Q_UNJUDGED;
	s->lost = 1;
	return 1;
}

/* A TCP segment to a resolver. Each stream is followed from its SYN (next_seq = ISN + 1):
 * a retransmit of bytes already judged passes; new bytes are walked message by message and
 * the segment passes only if every message whose question it completes is allowed (a partial
 * tail is held in the stream's entry and passes: a resolver never acts on an incomplete
 * message). What cannot be followed — a stream whose SYN was not seen, a gap, more than
 * RF_DNS_TCP_STEPS pieces in one segment — cannot be judged. In block mode with query
 * filtering, the first segment not allowed is refused (when it is exactly one whole message)
 * or dropped and the client reset, and the stream is dead from then on: every later segment
 * is dropped (and reset), so the resolver never gets a message whole that the kernel did not
 * allow. Audit mode reports.
 * A global function: the verifier checks it once, not once per path into it (each costs
 * seconds under emulation). The job comes in scratch (dns_query). It returns the TC action,
 * or RF_ACT_REFUSE for the caller to answer the segment REFUSED (refuse_tcp_query's frame
 * would not fit under this one's). */
__noinline int dns_tcp_query(struct __sk_buff *skb, struct pkt *p)
{
	struct rf_dns_walk w = {};
	struct rf_dns_stream *st;
	struct rf_scratch *s = get_scratch();
	__u32 seq;

	/* Newer verifiers take a global function's pointer argument as possibly NULL. */
	if (!s || !p)
		return TC_ACT_SHOT;
	/* Few locals, the rest in scratch: this frame and the walk's sit on the egress
	 * program's stack, under match_cb's. */
	__builtin_memcpy(s->skey.client, p->saddr, 16);
	__builtin_memcpy(s->skey.server, p->daddr, 16);
	s->skey.job_id = s->qv.job_id;
	s->skey.client_port = p->sport;
	s->skey.server_port = p->dport;
	if (bpf_skb_load_bytes(skb, p->l4_off + 4, &seq, 4))
		goto raw;
	seq = bpf_ntohl(seq);
	if ((p->tcp_flags & (RF_TCP_SYN | RF_TCP_ACK)) == RF_TCP_SYN) {
		/* A new connection (or its SYN again): its first byte is ISN + 1. */
		__builtin_memset(&s->stream, 0, sizeof(s->stream));
		s->stream.next_seq = seq + 1;
		bpf_map_update_elem(&dns_streams, &s->skey, &s->stream, BPF_ANY);
		seq += 1; /* data on a SYN (Fast Open) follows it */
	}
	s->seg_end = skb->len > p->payload ? skb->len : 0;
	if (s->seg_end <= p->payload)
		return TC_ACT_UNSPEC; /* an ACK, FIN or RST carries nothing to judge */
	st = bpf_map_lookup_elem(&dns_streams, &s->skey);
	if (!st) {
		/* Its SYN was not seen (the stream predates the job, or its entry was evicted):
		 * where its messages begin is unknown. Remember it as lost so this is said once. */
		__builtin_memset(&s->stream, 0, sizeof(s->stream));
		s->stream.state = s->enforce ? RF_STREAM_DEAD : RF_STREAM_LOST;
		bpf_map_update_elem(&dns_streams, &s->skey, &s->stream, BPF_ANY);
		goto raw;
	}
	if (st->state == RF_STREAM_DEAD)
		return RF_ACT_RESET;
	if (st->state == RF_STREAM_LOST)
		return TC_ACT_UNSPEC;
	/* Urgent data: the byte is in the sequence space walked here, but the resolver's read()
	 * skips it (SO_OOBINLINE is off by default), so the two would frame messages differently
	 * from here on. And bytes that could not be copied into the packet (dns_query) cannot be
	 * judged. Either way the stream is lost. */
	if ((p->tcp_flags & RF_TCP_URG) || s->lost)
		goto lose;
	s->end_seq = seq + (s->seg_end - p->payload);
	if ((__s32)(s->end_seq - st->next_seq) <= 0)
		return TC_ACT_UNSPEC; /* a retransmit of bytes judged already */
	if ((__s32)(seq - st->next_seq) > 0)
		goto lose; /* a gap: bytes this program never saw */
	/* A retransmit may carry new bytes too: the walk starts at the first new one. */
	s->seg_pos = p->payload + (st->next_seq - seq);
	s->boundary = s->seg_pos == p->payload && st->prefix_have == 0;
	s->verdict = RF_Q_ALLOWED;
	s->lost = 0;
	if (st->prefix_have == 2 && st->got < RF_DNS_HOLD && st->got < st->msglen)
		__builtin_memcpy(s->buf, st->hold, RF_DNS_HOLD);
	w.skb = skb;
	w.st = st;
	bpf_loop(RF_DNS_TCP_STEPS, tcp_walk_cb, &w, 0);
	if (s->verdict == RF_Q_ALLOWED && s->seg_pos < s->seg_end) {
		s->verdict = RF_Q_UNJUDGED; /* more pieces than one walk takes */
		s->lost = 1;
	}
	if (s->verdict == RF_Q_ALLOWED) {
		st->next_seq = s->end_seq;
		if (st->prefix_have == 2 && st->got < RF_DNS_HOLD && st->got < st->msglen)
			__builtin_memcpy(st->hold, s->buf, RF_DNS_HOLD);
		return TC_ACT_UNSPEC;
	}
	if (s->lost)
		goto lose;
	/* Block mode: a message not allowed, or not judged. */
	st->state = RF_STREAM_DEAD;
	s->flags = RF_DNS_TCP | (s->verdict == RF_Q_UNJUDGED ? RF_DNS_UNJUDGED : 0);
	if (s->boundary && s->seg_end - p->payload == 2 + (__u32)st->msglen && st->msglen >= 12) {
		/* Exactly one whole message: answer it REFUSED, so the client learns at once. */
		report_query(skb, s, s->qv.job_id, s->qk.server, s->flags | RF_DNS_REFUSED);
		p->dns_off = p->payload + 2;
		p->l4_len = 2 + st->msglen;
		return RF_ACT_REFUSE;
	}
	report_query(skb, s, s->qv.job_id, s->qk.server, s->flags);
	return RF_ACT_RESET;
lose:
	st->state = s->enforce ? RF_STREAM_DEAD : RF_STREAM_LOST;
raw:
	load_raw(skb, s, p->payload);
	report_query(skb, s, s->qv.job_id, s->qk.server, RF_DNS_TCP | RF_DNS_UNJUDGED);
	return s->enforce ? RF_ACT_RESET : TC_ACT_UNSPEC;
}

#endif
