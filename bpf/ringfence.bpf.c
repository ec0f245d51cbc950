// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * ringfence dataplane: one TC program on egress judges every new flow of a job, one on
 * ingress parses DNS answers and binds their addresses before the socket sees them.
 *
 * Return codes work for both attach paths: TC_ACT_UNSPEC (-1) is TCX_NEXT and "next
 * filter" for clsact, so ringfence never ends the chain for traffic it allows — other
 * programs on the device still get their say. Only a block returns TC_ACT_SHOT.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "abi.h"
#include "maps.h"
#include "parse.h"
#include "dns.h"

/* Bit n set: some job's cgroup sits at level n of the hierarchy. Written by the agent as
 * jobs come and go, so the ancestor walk only asks about levels that can match. */
volatile __u32 job_levels = 0;
/* Set once any job is keyed by interface: saves the lookup for everyone else. */
volatile __u32 have_ifjobs = 0;

/* Keep the event types in BTF for the skeleton (see abi.h). */
struct rf_flow_event _rf_flow_event = {};
struct rf_dns_event _rf_dns_event = {};
enum rf_limits _rf_limits = 0;
enum rf_verdict _rf_verdict = 0;
enum rf_reason _rf_reason = 0;
enum rf_mode _rf_mode = 0;
enum rf_event_type _rf_event_type = 0;
enum rf_addr_flags _rf_addr_flags = 0;
enum rf_dns_flags _rf_dns_flags = 0;
enum rf_counter _rf_counter = 0;
enum rf_direction _rf_direction = 0;

#define RF_SEC 1000000000ULL

static __always_inline int is_dns(const struct pkt *p)
{
	return p->proto == IPPROTO_UDP || p->proto == IPPROTO_TCP;
}

static __always_inline struct rf_job *find_job(struct __sk_buff *skb, __u64 *cgid)
{
	__u64 id = bpf_skb_cgroup_id(skb);
	struct rf_job *j;
	__u32 levels;

	if (have_ifjobs) {
		__u32 ifindex = skb->ifindex;

		j = bpf_map_lookup_elem(&ifjobs, &ifindex);
		if (j) {
			*cgid = id;
			return j;
		}
	}
	if (!id)
		return NULL;
	*cgid = id;
	j = bpf_map_lookup_elem(&jobs, &id);
	if (j)
		return j;
	levels = job_levels;
	for (int l = 0; l < RF_JOB_LEVELS; l++) {
		if (!(levels >> l))
			break;
		if (!(levels & (1U << l)))
			continue;
		__u64 a = bpf_skb_ancestor_cgroup_id(skb, l);

		if (!a)
			break;
		j = bpf_map_lookup_elem(&jobs, &a);
		if (j)
			return j;
	}
	return NULL;
}

static __always_inline __u8 deny(const struct rf_job *job, int direct)
{
	if (job->mode == RF_MODE_BLOCK)
		return RF_VERDICT_BLOCKED;
	if (direct && job->direct_ip == RF_MODE_BLOCK)
		return RF_VERDICT_BLOCKED;
	return RF_VERDICT_AUDITED;
}

/* A segment to port 53 of a connection whose SYN no flow remembers (it predates the job, or
 * its flow was evicted) is judged like a new flow: to a resolver, dns_query then finds no
 * stream to follow and refuses to pass what it cannot judge; to anything else, it is DNS to
 * a server that is not a resolver. */
static __always_inline int dns_stream_unknown(const struct pkt *p, int dns)
{
	return dns && !(p->tcp_flags & RF_TCP_SYN);
}

static __always_inline int is_resolver(const struct rf_job *job, const __u8 *addr)
{
	struct rf_resolver_key rk = {};

	rk.job_id = job->job_id;
	__builtin_memcpy(rk.addr, addr, 16);
	return bpf_map_lookup_elem(&resolvers, &rk) != NULL;
}

static __always_inline __u8 judge(const struct rf_job *job, struct pkt *p, __u64 now, __u8 *reason)
{
	struct rf_lpm_key key = {};
	struct rf_addr_val *v;

	if (is_dns(p) && p->dport == 53) {
		if (is_resolver(job, p->daddr)) {
			*reason = RF_REASON_ALLOWED;
			return RF_VERDICT_ALLOWED;
		}
		*reason = RF_REASON_DNS_RESOLVER;
		return deny(job, 1);
	}

	key.prefixlen = RF_LPM_FULL;
	key.job_id = job->job_id;
	__builtin_memcpy(key.addr, p->daddr, 16);
	v = bpf_map_lookup_elem(&allow, &key);
	if (v) {
		if (ports_has(&v->ports, p->dport)) {
			v->last_used_ns = now;
			*reason = RF_REASON_ALLOWED;
			return RF_VERDICT_ALLOWED;
		}
		*reason = RF_REASON_NOT_ALLOWED;
		return deny(job, 0);
	}
	if (is_metadata(p->daddr)) {
		*reason = RF_REASON_METADATA;
		return RF_VERDICT_BLOCKED;
	}
	*reason = RF_REASON_DIRECT_IP;
	return deny(job, 1);
}

static __always_inline void emit_flow(const struct rf_job *job, __u64 cgid, struct pkt *p,
				      __u64 now, __u8 verdict, __u8 reason)
{
	struct rf_flow_event *e;

	if (!emit_events)
		return;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(RF_CNT_RINGBUF_DROP);
		return;
	}
	e->hdr.type = RF_EVENT_FLOW;
	e->hdr.job_id = job->job_id;
	e->hdr.ts_ns = now;
	e->cgroup_id = cgid;
	/* The first packet of a flow is sent from the process that opened it (connect(),
	 * sendmsg()); a retransmit from a timer has no process, which the agent tells by
	 * checking the pid against the job's cgroup. */
	e->_pad = 0;
	/* A packet sent from a timer (a retransmit) runs in whatever task was current: the
	 * pid is only kept when the current task is in the socket's cgroup, so the agent never
	 * has to check /proc per event. */
	if (have_task_helpers && bpf_get_current_cgroup_id() == cgid) {
		e->pid = bpf_get_current_pid_tgid() >> 32;
		bpf_get_current_comm(e->comm, sizeof(e->comm));
	} else {
		e->pid = 0;
		__builtin_memset(e->comm, 0, sizeof(e->comm));
	}
	__builtin_memcpy(e->saddr, p->saddr, 16);
	__builtin_memcpy(e->daddr, p->daddr, 16);
	e->sport = p->sport;
	e->dport = p->dport;
	e->proto = p->proto;
	e->verdict = verdict;
	e->reason = reason;
	e->direction = RF_DIR_OUTBOUND;
	bpf_ringbuf_submit(e, ringbuf_flags(0));
}

SEC("tc")
int rf_egress(struct __sk_buff *skb)
{
	struct rf_flow_key fk = {};
	struct rf_flow_val fv = {}, *cached;
	struct pkt p = {};
	struct rf_job *job;
	__u64 cgid = 0, now;
	__u8 verdict, reason = RF_REASON_ALLOWED;
	int dns;

	job = find_job(skb, &cgid);
	if (!job)
		return TC_ACT_UNSPEC;
	if (parse_pkt(skb, &p))
		return TC_ACT_UNSPEC;
	/* Every path that lets a DNS query pass ends at the one `query:` below: dns_query() is
	 * large, and each inlined copy would be verified again. */
	dns = is_dns(&p) && p.dport == 53;
	/* Loopback is always allowed, except DNS: a local stub or cache (systemd-resolved on
	 * 127.0.0.53 and 127.0.0.54, dnsmasq) sends names on upstream, so port 53 on any loopback
	 * address is DNS like any other — only configured resolvers receive it, every message
	 * filtered. ringfence always attaches to lo for this. */
	if (!dns && is_loopback(p.daddr))
		return TC_ACT_UNSPEC;

	__builtin_memcpy(fk.daddr, p.daddr, 16);
	fk.job_id = job->job_id;
	fk.sport = p.sport;
	fk.dport = p.dport;
	fk.proto = p.proto;
	now = bpf_ktime_get_boot_ns();

	cached = always_judge ? NULL : bpf_map_lookup_elem(&flows, &fk);
	if (cached) {
		/* Established path: the verdict was made on the first packet. Touch the entry
		 * at most once a second so live flows keep their learned address alive. */
		if (now - cached->last_ns > RF_SEC) {
			cached->last_ns = now;
			if (cached->verdict != RF_VERDICT_BLOCKED) {
				struct rf_lpm_key key = {};
				struct rf_addr_val *v;

				key.prefixlen = RF_LPM_FULL;
				key.job_id = job->job_id;
				__builtin_memcpy(key.addr, p.daddr, 16);
				v = bpf_map_lookup_elem(&allow, &key);
				if (v)
					v->last_used_ns = now;
			}
		}
		if (cached->verdict == RF_VERDICT_BLOCKED) {
			count(RF_CNT_BLOCKED);
			return TC_ACT_SHOT;
		}
		if (dns && cached->verdict == RF_VERDICT_ALLOWED)
			goto query;
		return TC_ACT_UNSPEC;
	}

	/* Only the first packet of an outbound connection opens a flow. A TCP segment without
	 * SYN (or a SYN-ACK: an inbound connection) cannot open one: a dropped SYN means there
	 * is no connection to continue, and replies to inbound connections must pass. */
	if (p.proto == IPPROTO_TCP && (!(p.tcp_flags & RF_TCP_SYN) || (p.tcp_flags & RF_TCP_ACK)) &&
	    !always_judge && !dns_stream_unknown(&p, dns))
		return TC_ACT_UNSPEC;
	/* A later fragment has no ports: judge it by address like its first fragment was. */

	verdict = judge(job, &p, now, &reason);
	fv.first_ns = now;
	fv.last_ns = now;
	fv.verdict = verdict;
	fv.reason = reason;
	bpf_map_update_elem(&flows, &fk, &fv, BPF_ANY);
	count(RF_CNT_NEW_FLOWS);
	emit_flow(job, cgid, &p, now, verdict, reason);

	if (verdict == RF_VERDICT_BLOCKED) {
		count(RF_CNT_BLOCKED);
		return TC_ACT_SHOT;
	}
	count(verdict == RF_VERDICT_AUDITED ? RF_CNT_AUDITED : RF_CNT_ALLOWED);
	if (!dns || verdict != RF_VERDICT_ALLOWED)
		return TC_ACT_UNSPEC;
query:
	return dns_query(skb, &p, job, cgid);
}

SEC("tc")
int rf_ingress(struct __sk_buff *skb)
{
	struct pkt p = {};

	if (parse_pkt(skb, &p))
		return TC_ACT_UNSPEC;
	if (is_dns(&p) && p.sport == 53)
		dns_answer(skb, &p);
	return TC_ACT_UNSPEC;
}

/* The baseline for benchmarks: what an attached program costs before it does anything. */
SEC("tc")
int rf_empty(struct __sk_buff *skb)
{
	return TC_ACT_UNSPEC;
}

/* The process-level watch (ptrace and friends): tracepoint programs, attached separately. */
#include "guard.h"
struct rf_guard_event _rf_guard_event = {};
enum rf_guard_kind _rf_guard_kind = 0;

char LICENSE[] SEC("license") = "Dual BSD/GPL";
