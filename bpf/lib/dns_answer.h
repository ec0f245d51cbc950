/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Ingress: DNS answers to a job's queries. The A/AAAA records of an answer to an allowed
 * name are bound into the job's allow map before the answer reaches the application. */
#ifndef RINGFENCE_LIB_DNS_ANSWER_H
#define RINGFENCE_LIB_DNS_ANSWER_H

#include "../abi.h"
#include "../maps.h"
#include "common.h"
#include "dns_emit.h"
#include "dns_question.h"
#include "parse.h"
#include "ports.h"
#include "scratch.h"

/* One step per call: one label of an owner name, or one record's fixed part and data.
 * Owner names are skipped, never decompressed: a pointer ends the name and must point
 * backwards to at least offset 12, so no loop can be built. */
static long rr_cb(__u32 i, void *ctx)
{
	struct rf_scratch *s = get_scratch();
	__u32 off, rd, rdlen, type, class, ttl, n;
	__u8 l;

	if (!s)
		return 1;
	if (s->rr_left == 0) {
		s->done = 1;
		return 1;
	}
	off = s->off;
	if (s->in_name) {
		if (off >= s->len)
			goto bad;
		l = buf_at(s, off);
		if (l == 0) {
			s->off = off + 1;
			s->in_name = 0;
			return 0;
		}
		if ((l & 0xc0) == 0xc0) {
			__u32 ptr = ((__u32)(l & 0x3f) << 8) | buf_at(s, off + 1);

			if (off + 2 > s->len || ptr < 12 || ptr >= s->rr_start)
				goto bad;
			s->off = off + 2;
			s->in_name = 0;
			return 0;
		}
		if (l > 63 || off + 1 + l - s->rr_start > 255)
			goto bad;
		s->off = off + 1 + l;
		return 0;
	}
	if (off + 10 > s->len)
		goto bad;
	type = buf16(s, off);
	class = buf16(s, off + 2);
	ttl = ((__u32)buf16(s, off + 4) << 16) | buf16(s, off + 6);
	rdlen = buf16(s, off + 8);
	rd = off + 10;
	if (rd + rdlen > s->len)
		goto bad;
	if (type == 1 || type == 28) {
		if (class != 1)
			goto next; /* not IN: nothing to bind */
		if ((type == 1 && rdlen != 4) || (type == 28 && rdlen != 16))
			goto bad;
		n = s->naddrs;
		if (n >= RF_DNS_ADDRS_MAX) {
			s->overflow = 1;
			goto next;
		}
		__u8 *dst = s->addrs[n & (RF_DNS_ADDRS_MAX - 1)];

		barrier_var(rd);
		rd &= RF_BUF_MASK;
		if (type == 1) {
			__builtin_memset(dst, 0, 10);
			dst[10] = 0xff;
			dst[11] = 0xff;
			__builtin_memcpy(dst + 12, s->buf + rd, 4);
		} else {
			__builtin_memcpy(dst, s->buf + rd, 16);
		}
		/* A TTL with the top bit set is treated as 0 (RFC 2181 section 8). */
		s->ttls[n & (RF_DNS_ADDRS_MAX - 1)] = (ttl & 0x80000000) ? 0 : ttl;
		s->naddrs = n + 1;
	}
next:
	s->off = off + 10 + rdlen;
	s->rr_left -= 1;
	s->in_name = 1;
	s->rr_start = s->off;
	return 0;
bad:
	s->err = 1;
	return 1;
}

/* One address per call into the job's host entries (`allow`): refresh in place when the
 * host entry exists (an update would allocate), otherwise insert, inheriting the ports of
 * a covering CIDR (`allow_cidrs`). */
static long bind_cb(__u32 i, void *ctx)
{
	struct rf_scratch *s = get_scratch();
	struct rf_lpm_key key = {};
	struct rf_addr_val *v, *nv;
	__u64 life, exp;
	int allowed;

	if (!s || i >= s->naddrs)
		return 1;
	allowed = s->matched;
	/* An answer never opens this host, the link, metadata or multicast: a name the policy
	 * allows could otherwise be pointed at 169.254.169.254 (DNS rebinding). Not even
	 * RF_ADDR_SEEN is set, so a static entry or the metadata rule alone decides. */
	if (is_special_answer(s->addrs[i & (RF_DNS_ADDRS_MAX - 1)])) {
		s->flags |= RF_DNS_SPECIAL;
		count(RF_CNT_DNS_SPECIAL);
		return 0;
	}
	key.prefixlen = RF_LPM_FULL;
	key.job_id = s->job_id;
	__builtin_memcpy(key.addr, s->addrs[i & (RF_DNS_ADDRS_MAX - 1)], 16);
	life = (__u64)s->ttls[i & (RF_DNS_ADDRS_MAX - 1)] * 1000000000ULL;
	if (life < config.dns_min_ttl_ns)
		life = config.dns_min_ttl_ns;
	exp = s->now + life + config.dns_grace_ns;

	v = allow_lookup(&key);
	if (v && v->prefixlen == RF_LPM_FULL) {
		if (allowed) {
			ports_union(&v->ports, &s->ports);
			v->flags |= RF_ADDR_LEARNED;
			v->name_hash = s->suffix_hash[0];
		} else {
			v->flags |= RF_ADDR_SEEN;
		}
		if (v->expires_ns && exp > v->expires_ns)
			v->expires_ns = exp;
		s->bound += 1;
		return 0;
	}
	nv = &s->nv;
	__builtin_memset(nv, 0, sizeof(*nv));
	if (v) {
		nv->ports = v->ports;
		nv->flags = v->flags & RF_ADDR_STATIC;
	}
	if (allowed) {
		ports_union(&nv->ports, &s->ports);
		nv->flags |= RF_ADDR_LEARNED;
	} else {
		nv->flags |= RF_ADDR_SEEN;
	}
	nv->expires_ns = exp;
	nv->prefixlen = RF_LPM_FULL;
	nv->name_hash = s->suffix_hash[0];
	if (bpf_map_update_elem(&allow, &key, nv, BPF_ANY)) {
		count(RF_CNT_TRIE_FULL);
		s->flags |= RF_DNS_TRIE_FULL;
		return 0;
	}
	s->bound += 1;
	return 0;
}

/* Finds the DNS message in a UDP datagram or a TCP segment (2-byte length prefix).
 * Returns 0 when one whole message is there, 1 for a TCP message that continues in later
 * segments, -1 when there is no message at all (a bare ACK, a runt). */
static __always_inline int dns_locate(struct __sk_buff *skb, struct pkt *p)
{
	__u16 prefix;

	if (p->proto == IPPROTO_UDP) {
		p->dns_off = p->payload;
		p->dns_len = p->l4_len;
		return p->dns_len >= 12 ? 0 : -1;
	}
	if (p->proto != IPPROTO_TCP || p->l4_len < 2 + 12)
		return -1;
	if (bpf_skb_load_bytes(skb, p->payload, &prefix, 2))
		return -1;
	p->dns_off = p->payload + 2;
	p->dns_len = bpf_ntohs(prefix);
	if (p->dns_len < 12)
		return -1;
	/* The first message of the segment; one that is longer than the segment is split. */
	return p->dns_len + 2 > p->l4_len ? 1 : 0;
}

/* Copies the DNS message of the packet into scratch. Returns the scratch or NULL. */
static __always_inline struct rf_scratch *load_dns(struct __sk_buff *skb, struct pkt *p)
{
	struct rf_scratch *s = get_scratch();
	__u32 len = p->dns_len;

	if (!s)
		return NULL;
	s->flags = 0;
	if (len > RF_DNS_BUF) {
		s->flags |= RF_DNS_TRUNCATED;
		len = RF_DNS_BUF;
	}
	barrier_var(len);
	if (len < 12 || len > RF_DNS_BUF)
		return NULL;
	if (bpf_skb_load_bytes(skb, p->dns_off, s->buf, len))
		return NULL;
	s->len = len;
	return s;
}

/* Where an answer to a query binds: an interface job's (at_link) on its way out of that job's
 * device, so once, just before the job reads it, and never for another job; every other
 * job's at ingress. On a routed path an interface job's answer crosses both. */
static __always_inline int binds_here(__u8 q_at_link, __u32 q_job, int at_link, __u32 link_job)
{
	if (at_link)
		return q_at_link && q_job == link_job;
	return !q_at_link;
}

/* An answer from a resolver that matches an outstanding query of a job: at ingress, or
 * (at_link) at egress of the host-side device of interface job `link_job`. Binds the A/AAAA records when the question is allowed,
 * copies the answer to the ring buffer. Never drops: what does not validate binds nothing
 * and passes on to the socket. */
static __always_inline void dns_answer(struct __sk_buff *skb, struct pkt *p, int at_link,
				       __u32 link_job)
{
	struct rf_query_key qk = {};
	struct rf_query_val *q;
	struct rf_scratch *s;
	__u32 an, job_id, bind_seen;
	__u64 qhash;
	__u16 txid;

	int where;

	if (p->fragment) {
		count(RF_CNT_DNS_FRAGMENT);
		return;
	}
	/* A RST's payload is never delivered to the socket (and a RST from ringfence's own
	 * turnaround holds the job's bytes): no answer, nor a piece of one, is read from it. */
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & RF_TCP_RST))
		return;
	if (p->proto == IPPROTO_TCP && p->l4_len) {
		struct rf_stream_key sk = {};
		struct rf_stream_val *sv;

		__builtin_memcpy(sk.server, p->saddr, 16);
		sk.client_port = p->dport;
		sv = bpf_map_lookup_elem(&tcp_streams, &sk);
		if (sv) {
			if (binds_here(sv->at_link, sv->job_id, at_link, link_job))
				copy_segment(skb, p, sv->job_id, 0);
			return;
		}
	}
	where = dns_locate(skb, p);
	if (where < 0)
		return;
	if (where > 0) {
		/* Parsing needs the whole message, which the kernel never holds at once: if it
		 * answers a job's query, its segments go to the agent, which binds it late. */
		struct rf_stream_key sk = {};
		struct rf_stream_val sv = {};
		__u16 id;

		count(RF_CNT_DNS_TCP_SPLIT);
		if (bpf_skb_load_bytes(skb, p->dns_off, &id, 2))
			return;
		__builtin_memcpy(qk.server, p->saddr, 16);
		qk.client_port = p->dport;
		qk.txid = bpf_ntohs(id);
		q = bpf_map_lookup_elem(&queries, &qk);
		if (!q || !binds_here(q->at_link, q->job_id, at_link, link_job))
			return;
		__builtin_memcpy(sk.server, p->saddr, 16);
		sk.client_port = p->dport;
		sv.job_id = q->job_id;
		sv.at_link = q->at_link;
		bpf_map_update_elem(&tcp_streams, &sk, &sv, BPF_ANY);
		copy_segment(skb, p, sv.job_id, RF_DNS_TCP_FIRST);
		return;
	}
	if (p->dns_len > RF_DNS_BUF) {
		count(RF_CNT_DNS_TOO_BIG);
		return;
	}
	s = load_dns(skb, p);
	if (!s)
		return;
	if (p->proto == IPPROTO_TCP)
		s->flags |= RF_DNS_TCP;
	txid = buf16(s, 0);
	__builtin_memcpy(qk.server, p->saddr, 16);
	qk.client_port = p->dport;
	qk.txid = txid;
	q = bpf_map_lookup_elem(&queries, &qk);
	/* Not counted twice on the way: it binds at the other place. */
	if (q && !binds_here(q->at_link, q->job_id, at_link, link_job))
		return;
	count(RF_CNT_DNS_ANSWERS);
	if (!q) {
		count(RF_CNT_DNS_UNMATCHED);
		return;
	}
	job_id = q->job_id;
	qhash = q->name_hash;
	bind_seen = q->bind_seen;

	s->job_id = job_id;
	s->now = bpf_ktime_get_boot_ns();
	s->naddrs = 0;
	s->bound = 0;
	s->overflow = 0;
	s->matched = 0;
	__builtin_memset(&s->ports, 0, sizeof(s->ports));

	/* QR=1, opcode 0, one question, and the name we saw leave. */
	if (!(buf_at(s, 2) & 0x80) || (buf_at(s, 2) & 0x78) || buf16(s, 4) != 1 ||
	    parse_question(s) || s->hash != qhash)
		goto malformed;
	an = buf16(s, 6);
	if (an > RF_DNS_RR_MAX)
		goto malformed;

	bpf_loop(RF_LABELS_MAX, match_cb, NULL, 0);

	/* Validate the whole answer section before inserting anything. */
	s->rr_left = an;
	s->in_name = 1;
	s->rr_start = s->off;
	s->err = 0;
	s->done = 0;
	bpf_loop(RF_DNS_RR_MAX * 8, rr_cb, NULL, 0);
	if (s->err || (!s->done && s->rr_left))
		goto malformed;
	if ((buf_at(s, 3) & 0x0f) == 0 && (s->matched || bind_seen))
		bpf_loop(RF_DNS_ADDRS_MAX, bind_cb, NULL, 0);
	if (s->matched)
		s->flags |= RF_DNS_ALLOWED;
	if (s->overflow) {
		s->flags |= RF_DNS_OVERFLOW;
		count(RF_CNT_DNS_OVERFLOW);
	}
	if (s->bound)
		count(RF_CNT_DNS_BOUND);
	goto out;
malformed:
	count(RF_CNT_DNS_MALFORMED);
	s->flags |= RF_DNS_MALFORMED;
	s->bound = 0;
out:
	emit_dns_copy(s, job_id, p->saddr, NULL);
}

#endif
