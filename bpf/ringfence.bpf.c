// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * ringfence dataplane: one TC program on egress judges every new flow of a job, one on
 * ingress parses DNS answers and binds their addresses before the socket sees them. For a
 * job behind a device (an interface job on the host side of its veth or tap) the directions
 * trade places: its packets come in as ingress and are judged there, its answers leave as
 * egress and bind there.
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
#include "lib/common.h"
#include "lib/parse.h"
#include "lib/ports.h"
/* Answers before queries: the object's subprograms then come in the order they always had. */
#include "lib/dns_answer.h"
#include "lib/dns_query.h"
#include "lib/dns_refuse.h"
#include "lib/sender.h"

/* Bit n set: some job's cgroup sits at level n of the hierarchy. Written by the agent as
 * jobs come and go, so the ancestor walk only asks about levels that can match. */
volatile __u32 job_levels = 0;
/* Set once any job is keyed by interface: saves the lookup for everyone else. */
volatile __u32 have_ifjobs = 0;
/* Set when the daemon has a host default policy: a packet sent by a socket that belongs to
 * no job is judged under it (the `jobs` entry of cgroup id 0, which no cgroup has). */
volatile __u32 have_host_job = 0;
/* Set when forwarded traffic (containers, a job's own namespaces) is judged: see
 * forwarded_job(). */
volatile __u32 have_fwd_job = 0;
/* exec (a host of one job): a socket of a cgroup made after the job's (cgroup ids only grow)
 * belongs to no job yet but is judged under the forwarded-traffic job too — a container the
 * job starts on the host's network sends before its cgroup is claimed. 0: off (the daemon). */
volatile __u64 fwd_after_cgroup = 0;
/* Bumped by the agent whenever a socket's kept verdict may no longer hold: see sk_flows in
 * maps.h. Read once per packet, before the job is looked up, and stamped on what is kept. */
volatile __u32 verdict_gen = 0;
/* Set once some attached interface is not Ethernet: only then does the verdict program look
 * up the link header length of its interface, so the Ethernet hot path stays as it was. */
volatile __u32 have_l3_devs = 0;

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
enum rf_link _rf_link = 0;
enum rf_job_flags _rf_job_flags = 0;

#define RF_SEC 1000000000ULL

/* How often an established flow on the fast path takes the slow path once to keep its
 * flow entry and learned address alive: 1 s at HZ=1000, 4 s at Debian's 250, 10 s at 100 —
 * all well inside the grace a learned address gets after its TTL (30 s by default). */
#define RF_TOUCH_JIFFIES 1000

/* judge_packet's `how`: these flags, and above bit 32 the verdict_gen read before the job
 * was looked up (one word: the verdict path's calls are at the verifier's stack limit). */
enum {
	RF_BY_SOCKET = 1, /* sent by a socket of the job's cgroup (see find_job) */
	RF_RX = 2,        /* came in on the host side of an interface job's link */
};

static __always_inline int is_dns(const struct pkt *p)
{
	return p->proto == IPPROTO_UDP || p->proto == IPPROTO_TCP;
}

static __always_inline int is_syn_ack(const struct pkt *p)
{
	return p->proto == IPPROTO_TCP &&
	       (p->tcp_flags & (RF_TCP_SYN | RF_TCP_ACK)) == (RF_TCP_SYN | RF_TCP_ACK);
}

/* The interface job of the device the packet is on, if any. */
static __always_inline struct rf_job *link_job(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;

	if (!have_ifjobs)
		return NULL;
	return bpf_map_lookup_elem(&ifjobs, &ifindex);
}

static __always_inline int host_side(const struct rf_job *j)
{
	return j && (j->flags & RF_JOB_HOST_SIDE);
}

/* The job a packet belongs to: the interface job `link` of its device (link_job()) when
 * that device's egress is the job's own, else the job of the socket that sent it.
 * RF_BY_SOCKET in *how says it was sent by a socket of the job's cgroup (not only seen on a
 * job's interface, where ARP and neighbour discovery also pass). The host side of an
 * interface job's link is not: what leaves there goes to that job, and is only some other
 * job's when one of its sockets sent it. */
static __always_inline struct rf_job *find_job(struct __sk_buff *skb, struct rf_job *link,
					       __u64 *cgid, __u64 *how)
{
	__u64 id = bpf_skb_cgroup_id(skb);
	struct rf_job *j;
	__u32 levels;

	*how &= ~(__u64)RF_BY_SOCKET;
	if (link && !host_side(link)) {
		*cgid = id;
		return link;
	}
	if (!id)
		return NULL;
	*cgid = id;
	*how |= RF_BY_SOCKET;
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
	if (have_host_job) {
		__u64 host = 0;

		return bpf_map_lookup_elem(&jobs, &host);
	}
	return NULL;
}

/* The skb mark bit set on a packet judged as its job's outbound at the host side of the job's
 * link (rf_ingress). Forwarded on through a bridge and out of an uplink, it is not judged a
 * second time there. A job cannot set it on a forwarded packet: crossing from its namespace
 * into the host's clears the mark (skb_scrub_packet), a tap's packets start with none, and
 * a packet its own socket sends is judged by its socket, never as forwarded. Bit 20: clear
 * of the bits kube-proxy (0x4000, 0x8000), Cilium (0x0f00), Tailscale (0xff0000 is theirs
 * only with 0x40000/0x80000 set) and Istio use. */
#define RF_JUDGED_MARK 0x00100000U

/* The job a forwarded packet is judged under as it leaves through an uplink: a packet
 * that came in on some device (a container's or a namespace's, through NAT) and
 * that no job judged on its way in (no RF_JUDGED_MARK: it came through a link no job
 * claims, or one not attached yet). Leaving through a device that faces containers
 * (inside_devs) it is going *to* one (an answer, a peer's packet) and is not judged. */
static __always_inline struct rf_job *forwarded_job(struct __sk_buff *skb, struct rf_job *link)
{
	__u32 ifindex = skb->ifindex, zero = 0;

	/* A packet a local socket sends leaves with no device it came in on (skb_iif 0): only
	 * a received one has one, forwarded or turned around (which is judged where it was). */
	if (!have_fwd_job || link || !skb->ingress_ifindex || (skb->mark & RF_JUDGED_MARK))
		return NULL;
	if (bpf_map_lookup_elem(&inside_devs, &ifindex))
		return NULL;
	return bpf_map_lookup_elem(&fwd_job, &zero);
}

static __always_inline __u8 deny(const struct rf_job *job, int direct)
{
	if (job->mode == RF_MODE_BLOCK)
		return RF_VERDICT_BLOCKED;
	if (direct && job->direct_ip == RF_MODE_BLOCK)
		return RF_VERDICT_BLOCKED;
	return RF_VERDICT_AUDITED;
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
	v = allow_lookup(&key);
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

/* May the peer (the packet's destination) be connected to the job's local port (its
 * source port)? The allowed-inbound trie holds the union of ports of covering prefixes in
 * each entry, so the longest match decides. */
static __always_inline int inbound_allows(const struct rf_job *job, const struct pkt *p)
{
	struct rf_lpm_key key = {};
	struct rf_ports *ports;

	key.prefixlen = RF_LPM_FULL;
	key.job_id = job->job_id;
	__builtin_memcpy(key.addr, p->daddr, 16);
	ports = bpf_map_lookup_elem(&inbound, &key);
	return ports && ports_has(ports, p->sport);
}

/* `task` (RF_SENDER_*, a constant at each call site) and `skb` (NULL where there is none)
 * say how the sender is found: see sender_of in lib/sender.h. */
static __always_inline void emit_flow(const struct rf_job *job, __u64 cgid, struct pkt *p,
				      __u64 now, __u8 verdict, __u8 reason, __u8 direction,
				      int task, struct __sk_buff *skb)
{
	struct rf_flow_event *e;

	if (!config.emit_events)
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
	/* 0 for a packet a socket sent (ingress_ifindex is 0 on the way out). */
	e->ifindex = skb ? skb->ingress_ifindex : 0;
	/* The first packet of a flow is sent from the process that opened it (connect(),
	 * sendmsg()) where the kernel lets TC ask; elsewhere, and for packets sent from a timer,
	 * the socket's owner names it. The agent never has to check /proc to tell. */
	sender_of(skb, cgid, task, &e->pid, e->comm);
	__builtin_memcpy(e->saddr, p->saddr, 16);
	__builtin_memcpy(e->daddr, p->daddr, 16);
	e->sport = p->sport;
	e->dport = p->dport;
	e->proto = p->proto;
	e->verdict = verdict;
	e->reason = reason;
	e->direction = direction;
	bpf_ringbuf_submit(e, ringbuf_flags(0));
}

/* A job's packet that could not be parsed: in block mode dropped, in audit mode passed;
 * reported either way, once per (job, destination, protocol) as far as they could be read:
 * the flow cache remembers it under a key no parsed flow has (`_pad[0]` set), so a stream
 * of such packets is one event, not one per packet. Returns the TC action. */
static __always_inline int unparsed(const struct rf_job *job, __u64 cgid, struct pkt *p, int task,
				    struct __sk_buff *skb)
{
	struct rf_flow_key fk = {};
	struct rf_flow_val fv = {}, *cached;
	__u64 now = bpf_ktime_get_boot_ns();
	__u8 verdict;

	__builtin_memcpy(fk.daddr, p->daddr, 16);
	fk.job_id = job->job_id;
	fk.proto = p->proto;
	fk._pad[0] = 1;
	cached = bpf_map_lookup_elem(&flows, &fk);
	if (cached) {
		verdict = cached->verdict;
	} else {
		verdict = deny(job, 0);
		fv.first_ns = now;
		fv.last_ns = now;
		fv.verdict = verdict;
		fv.reason = RF_REASON_UNPARSED;
		bpf_map_update_elem(&flows, &fk, &fv, BPF_ANY);
		count(RF_CNT_UNPARSED);
		emit_flow(job, cgid, p, now, verdict, RF_REASON_UNPARSED, RF_DIR_OUTBOUND, task, skb);
	}
	if (verdict == RF_VERDICT_BLOCKED) {
		count(RF_CNT_BLOCKED);
		return TC_ACT_SHOT;
	}
	return TC_ACT_UNSPEC;
}

/* The link header length of the interface the packet is on (see `devices`). */
static __always_inline __u32 link_hdr_len(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex, *l2;

	if (!have_l3_devs)
		return RF_L2_ETHER;
	l2 = bpf_map_lookup_elem(&devices, &ifindex);
	return l2 ? *l2 : RF_L2_ETHER;
}

/* A refused SYN-ACK goes out as the RST|ACK a closed port answers with, so that which ports
 * the job listens on cannot be read by an unlisted peer (silence for a listening port, a RST
 * for a closed one would be a covert channel). Only the flags and the window change (the
 * kernel's RST advertises a zero window); the sequence number is kept and the ACK already
 * covers the peer's SYN, so the peer's connect() fails with ECONNREFUSED as on a closed
 * port. The options of the SYN-ACK stay (see the report: an observer of the raw segment can
 * still tell). Returns the TC action: pass the rewritten segment, or drop if the rewrite
 * failed. */
static __always_inline int refuse_syn_ack(struct __sk_buff *skb, const struct pkt *p)
{
	__u32 off = p->l4_off + 12, csum = p->l4_off + offsetof(struct tcphdr, check);
	__be16 w[2], n[2];

	if (bpf_skb_load_bytes(skb, off, w, sizeof(w)))
		return TC_ACT_SHOT;
	/* The data offset kept (the high nibble), the flags become RST|ACK. */
	n[0] = bpf_htons((bpf_ntohs(w[0]) & 0xf000) | RF_TCP_RST | RF_TCP_ACK);
	n[1] = 0;
	if (bpf_l4_csum_replace(skb, csum, w[0], n[0], sizeof(__be16)) ||
	    bpf_l4_csum_replace(skb, csum, w[1], n[1], sizeof(__be16)) ||
	    bpf_skb_store_bytes(skb, off, n, sizeof(n), 0))
		return TC_ACT_SHOT;
	return TC_ACT_UNSPEC;
}

/* Whether an interface job's packet is IPv6 neighbour discovery (router and neighbour
 * solicitations and advertisements), which like ARP carries no job data and must pass for
 * the link to work. Only what cannot leave the link: hop limit 255 (RFC 4861), whole (not a
 * fragment), and to a link-local or link-scope multicast address, or to an address of this
 * host (a neighbour probe of the host's global address) — never one the host would route on.
 * A subprogram: the lookup's 64 bytes stay off the verdict path's stack. */
static __noinline int is_neighbour_discovery(struct __sk_buff *skb, const struct pkt *p)
{
	struct bpf_fib_lookup fib = {};
	__u8 hop, type;

	if (p->family != 6 || p->proto != IPPROTO_ICMPV6 || p->fragment)
		return 0;
	if (bpf_skb_load_bytes(skb, p->l3_off + 7, &hop, 1) || hop != 255 ||
	    bpf_skb_load_bytes(skb, p->l3_off + 40, &type, 1) || type < 133 || type > 136)
		return 0;
	/* fe80::/10, ff02::/16 */
	if ((p->daddr[0] == 0xfe && (p->daddr[1] & 0xc0) == 0x80) ||
	    (p->daddr[0] == 0xff && p->daddr[1] == 0x02))
		return 1;
	/* Wider multicast scopes are never neighbour discovery (and a multicast router would
	 * forward them). */
	if (p->daddr[0] == 0xff)
		return 0;
	fib.family = 10; /* AF_INET6 */
	fib.ifindex = skb->ifindex;
	fib.l4_protocol = IPPROTO_ICMPV6;
	__builtin_memcpy(fib.ipv6_src, p->saddr, 16);
	__builtin_memcpy(fib.ipv6_dst, p->daddr, 16);
	/* Not forwarded: local (or anycast, multicast) on this host. */
	return bpf_fib_lookup(skb, &fib, sizeof(fib), 0) == BPF_FIB_LKUP_RET_NOT_FWDED;
}

#ifndef barrier
#define barrier() asm volatile("" ::: "memory")
#endif

/* The sequence word of a kept flow (see struct rf_sk_flow), read so that the reads after it
 * are not done before it and those before it not after it: plain loads on x86-64, whose
 * loads stay in order (and a compiler barrier), an atomic read (a full barrier) elsewhere. */
static __always_inline __u32 seq_read(__u32 *seq)
{
	__u32 v;

	barrier();
#ifdef RF_LOADS_IN_ORDER
	v = *(volatile __u32 *)seq;
#else
	v = __sync_fetch_and_add(seq, 0);
#endif
	barrier();
	return v;
}

/* The flow kept with the socket a packet was sent from; `create` makes an empty one. The
 * helper itself finds nothing for what is not a full socket (a request or time-wait
 * socket): asking bpf_sk_fullsock() first would only cost a call. */
static __always_inline struct rf_sk_flow *sk_flow_of(struct __sk_buff *skb, int create)
{
	struct bpf_sock *sk = skb->sk;

	if (!sk)
		return NULL;
	return bpf_sk_storage_get(&sk_flows, sk, 0, create ? BPF_SK_STORAGE_GET_F_CREATE : 0);
}

/* The established fast path, before any job or flow lookup: 1 when the packet is of the
 * flow its socket last sent on (the same destination, ports and protocol, read from the
 * packet itself, leaving by the same device), kept under the current verdict_gen and judged
 * allowed or audited then. `touch`: every RF_TOUCH_JIFFIES the flow takes the slow path
 * once, which keeps its flow entry and learned address alive (jiffies, which the verifier
 * inlines to one load: the coarse clock cost 15-20 ns a packet here, more than all the
 * rest). It reads only the common shape, plain IPv4 or IPv6 then TCP or UDP; any other
 * (options, extension headers, fragments, a short header) misses and the slow path judges
 * it as before. Written here rather than with parse_pkt, whose zeroed struct pkt
 * alone pushed the verdict path's calls over the verifier's 512-byte stack and cost more
 * than the rest. Inline: a call was a measurable part of ~13 ns (bench/run, established). */
static __always_inline int kept_flow(struct __sk_buff *skb, __u32 l2, int touch)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct rf_sk_flow *f;
	__be16 *ports;
	__u32 l4, seq;
	__u8 proto;

	if (config.always_judge || (l2 != RF_L2_ETHER && l2 != RF_L2_NONE))
		return 0;
	f = sk_flow_of(skb, 0);
	if (!f)
		return 0;
	seq = seq_read(&f->seq);
	if ((seq & 1) || f->gen != verdict_gen || f->ifindex != skb->ifindex)
		return 0;
	if (touch && bpf_jiffies64() - f->touched > RF_TOUCH_JIFFIES)
		return 0;
	if (l2 == RF_L2_ETHER) {
		struct ethhdr *eth = data;

		if ((void *)(eth + 1) > data_end ||
		    eth->h_proto != bpf_htons(f->family == 4 ? ETH_P_IP : ETH_P_IPV6))
			return 0;
	}
	if (f->family == 4) {
		struct iphdr *ip = data + l2;

		if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl != 5 ||
		    (ip->frag_off & bpf_htons(0x3fff)) || ip->daddr != *(__be32 *)(f->daddr + 12))
			return 0;
		proto = ip->protocol;
		l4 = l2 + sizeof(*ip);
	} else {
		struct ipv6hdr *ip6 = data + l2;

		if ((void *)(ip6 + 1) > data_end || ip6->version != 6 ||
		    *(__u64 *)&ip6->daddr != *(__u64 *)f->daddr ||
		    *((__u64 *)&ip6->daddr + 1) != *(__u64 *)(f->daddr + 8))
			return 0;
		proto = ip6->nexthdr;
		l4 = l2 + sizeof(*ip6);
	}
	if (proto != f->proto)
		return 0;
	ports = data + l4;
	if (proto == IPPROTO_TCP) {
		struct tcphdr *tcp = data + l4;

		if ((void *)(tcp + 1) > data_end || tcp->doff < 5)
			return 0;
	} else if ((void *)(ports + 4) > data_end) { /* a whole UDP header */
		return 0;
	}
	if (ports[0] != f->sport || ports[1] != f->dport)
		return 0;
	/* Every field read was one writer's: no write began or ended in between. */
	return seq_read(&f->seq) == seq;
}

/* Keeps the flow of an allowed or audited packet with its socket (see kept_flow). Never
 * DNS: queries are all filtered (to port 53) and answers all read (from it). */
static __always_inline void keep_flow(struct __sk_buff *skb, const struct pkt *p)
{
	struct rf_sk_flow *f;
	__u32 seq;

	if (config.always_judge || p->sport == 53 || p->dport == 53 || p->fragment ||
	    (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP))
		return;
	f = sk_flow_of(skb, 1);
	if (!f)
		return;
	/* The writer's side of the seqlock: taken (odd) or left to the writer that has it. */
	seq = f->seq;
	if ((seq & 1) || __sync_val_compare_and_swap(&f->seq, seq, seq + 1) != seq)
		return;
	barrier();
	__builtin_memcpy(f->daddr, p->daddr, 16);
	f->ifindex = skb->ifindex;
	f->sport = bpf_htons(p->sport);
	f->dport = bpf_htons(p->dport);
	f->proto = p->proto;
	f->family = p->family;
	f->touched = bpf_jiffies64();
	f->gen = p->gen;
	barrier();
	/* Even again, after every store (an atomic: a full barrier on every architecture). */
	__sync_fetch_and_add(&f->seq, 1);
}

/* The verdict path for a packet the job sends: on TC egress for a job keyed by cgroup (and
 * for the BPF_PROG_TEST_RUN tables), on TC ingress of the host side of an interface job's link
 * (`rx`). The flow cache, the judge, DNS queries, the job's SYN-ACKs; what cannot be parsed
 * fails closed. Returns the TC action.
 * A real subprogram: each program calls it from one place, so the verifier walks it once per
 * program, and its stack frame is its own. */
static __noinline int judge_packet(struct __sk_buff *skb, struct rf_job *job, __u64 cgid,
				   __u64 how)
{
	__u8 rx = !!(how & RF_RX);
	struct rf_flow_key fk = {};
	struct rf_flow_val fv = {}, *cached;
	struct pkt p = {};
	__u64 now;
	__u8 verdict, reason = RF_REASON_ALLOWED, direction = RF_DIR_OUTBOUND;
	int dns, rc;
	__u32 l2;

	l2 = link_hdr_len(skb);
	rc = parse_pkt(skb, &p, l2);
	/* Headers outside the linear part of the buffer are pulled in and read again (rare:
	 * local senders put headers in the head). */
	if (rc == RF_PARSE_BAD && skb->len > skb->data_end - skb->data &&
	    !bpf_skb_pull_data(skb, skb->len < 128 ? skb->len : 128)) {
		__builtin_memset(&p, 0, sizeof(p));
		/* A fresh skb pointer for clang: it must not reuse a `skb + offsetof(data_end)`
		 * it computed before, which the verifier refuses (modified ctx pointer). */
		barrier_var(skb);
		rc = parse_pkt(skb, &p, l2);
	}
	if (rc != RF_PARSE_OK) {
		/* ARP of a job keyed by interface carries no job data. Nothing else that is not
		 * IP passes unjudged: a second VLAN tag (the kernel takes only the outer one off
		 * before TC), MPLS, PPPoE or an 802.3 frame from a job with a raw socket would be
		 * forwarded on by a bridge, unread. */
		if (rc == RF_PARSE_NOT_IP && !(how & RF_BY_SOCKET) &&
		    skb->protocol == bpf_htons(ETH_P_ARP))
			return TC_ACT_UNSPEC;
		return unparsed(job, cgid, &p, RF_SENDER_TC, skb);
	}
	p.rx = rx;
	p.gen = how >> 32;
	/* Nor does the job's IPv6 neighbour discovery, which is IP. */
	if (rx && is_neighbour_discovery(skb, &p))
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

	/* always_judge (benchmarks) skips the lookup: paying it (and dropping its answer) would
	 * take 8 more bytes of this frame, which the verdict chain has not got (see README of
	 * bench/: the new-flow row leaves this lookup out). */
	cached = config.always_judge ? NULL : bpf_map_lookup_elem(&flows, &fk);
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
				v = allow_lookup(&key);
				if (v)
					v->last_used_ns = now;
			}
		}
		if (cached->verdict == RF_VERDICT_BLOCKED) {
			count(RF_CNT_BLOCKED);
			/* A retransmitted SYN-ACK of a refused connection: a RST like the first. */
			if (cached->reason == RF_REASON_INBOUND && is_syn_ack(&p))
				return refuse_syn_ack(skb, &p);
			return TC_ACT_SHOT;
		}
		if (dns && cached->verdict == RF_VERDICT_ALLOWED)
			goto query;
		if (!dns && !rx)
			keep_flow(skb, &p);
		return TC_ACT_UNSPEC;
	}

	if (is_syn_ack(&p)) {
		/* The job's SYN-ACK: a peer is connecting to a socket the job listens on. Judged
		 * here, before the handshake completes: dropped, the peer never connects. */
		direction = RF_DIR_INBOUND;
		count(RF_CNT_INBOUND);
		if (inbound_allows(job, &p)) {
			verdict = RF_VERDICT_ALLOWED;
		} else {
			reason = RF_REASON_INBOUND;
			verdict = deny(job, 0);
		}
	} else {
		/* A SYN opens an outbound connection. A TCP segment without SYN and without a
		 * cached flow belongs to a connection whose first packet was not judged here (its
		 * cache entry was evicted, its SYN-ACK was sent without a socket under SYN
		 * cookies, or it was opened before a device was watched): it is judged now, as
		 * outbound or as an allowed inbound connection, never passed. UDP has no
		 * handshake: a datagram from the job's port to a peer allowed inbound on that
		 * port is the job answering it. */
		verdict = judge(job, &p, now, &reason);
		if (verdict != RF_VERDICT_ALLOWED &&
		    (p.proto == IPPROTO_UDP ||
		     (p.proto == IPPROTO_TCP && !(p.tcp_flags & RF_TCP_SYN))) &&
		    inbound_allows(job, &p)) {
			verdict = RF_VERDICT_ALLOWED;
			reason = RF_REASON_ALLOWED;
			direction = RF_DIR_INBOUND;
		}
	}
	fv.first_ns = now;
	fv.last_ns = now;
	fv.verdict = verdict;
	fv.reason = reason;
	bpf_map_update_elem(&flows, &fk, &fv, BPF_ANY);
	count(RF_CNT_NEW_FLOWS);
	emit_flow(job, cgid, &p, now, verdict, reason, direction, RF_SENDER_TC, skb);

	if (verdict == RF_VERDICT_BLOCKED) {
		count(RF_CNT_BLOCKED);
		if (direction == RF_DIR_INBOUND && reason == RF_REASON_INBOUND)
			return refuse_syn_ack(skb, &p);
		return TC_ACT_SHOT;
	}
	count(verdict == RF_VERDICT_AUDITED ? RF_CNT_AUDITED : RF_CNT_ALLOWED);
	if (!dns) {
		if (!rx)
			keep_flow(skb, &p);
		return TC_ACT_UNSPEC;
	}
	if (verdict != RF_VERDICT_ALLOWED)
		return TC_ACT_UNSPEC;
query:
	return dns_query(skb, &p, job, cgid);
}

/* DNS answers, read where they bind (see binds_here): at ingress (for jobs keyed by cgroup),
 * and at egress of an interface job's host-side device (at_link: to job `link_job`). A
 * subprogram so that its frame is not under the verdict path's. Never drops. */
static __noinline int read_answer(struct __sk_buff *skb, int at_link, __u32 link_job)
{
	struct pkt p = {};

	/* What ringfence itself turned around holds the job's bytes: never an answer. */
	if (rf_turned(skb))
		return 0;
	if (parse_pkt(skb, &p, link_hdr_len(skb)))
		return 0;
	if (is_dns(&p) && p.sport == 53)
		dns_answer(skb, &p, at_link, link_job);
	return 0;
}

SEC("tc")
int rf_egress(struct __sk_buff *skb)
{
	struct rf_job *link, *job;
	__u64 cgid = 0, how;

	/* An established flow of a socket: its kept verdict, no lookup (see sk_flows). Before
	 * the device's interface job: no DNS answer (from port 53) is ever kept, so none
	 * leaving the host side of a job's link skips read_answer. */
	if (kept_flow(skb, link_hdr_len(skb), 1))
		return TC_ACT_UNSPEC;
	/* The generation, read before any lookup: see invalidate_kept in src/kernel/dataplane.rs.
	 * (One function, no subprogram for the slow path: 6.1 rounds every frame up to 32
	 * bytes, and the verdict path's chain of calls is at the 512-byte limit.) */
	how = (__u64)verdict_gen << 32;
	link = link_job(skb);

	if (host_side(link)) {
		/* The host side of an interface job's link: what leaves here goes to the job. What
		 * came in through this same device is the job's own, judged at ingress (a reply
		 * ringfence turned around, or a packet the host routed back out): not an answer,
		 * nor anyone's outbound. Forwarded packets (answers, peers) have no socket and pass
		 * on after the answers are read; a local socket's packet is its job's outbound. */
		if (skb->ingress_ifindex == skb->ifindex)
			return TC_ACT_UNSPEC;
		read_answer(skb, 1, link->job_id);
	}
	job = find_job(skb, link, &cgid, &how);
	/* Left open: a SYN-ACK sent under SYN cookies (the job's listen queue full) has no
	 * socket, so no cgroup, and is not placed here: it passes unjudged. bpf_sk_cgroup_id()
	 * of the listener, which would place it, is not callable from TC. */
	if (!job)
		job = forwarded_job(skb, link);
	if (!job && (how & RF_BY_SOCKET) && fwd_after_cgroup && cgid > fwd_after_cgroup && have_fwd_job) {
		__u32 zero = 0;

		job = bpf_map_lookup_elem(&fwd_job, &zero);
	}
	if (!job)
		return TC_ACT_UNSPEC;
	return judge_packet(skb, job, cgid, how);
}

SEC("tc")
int rf_ingress(struct __sk_buff *skb)
{
	struct rf_job *link;

	if (rf_turned(skb))
		return TC_ACT_UNSPEC;
	/* The host side of an interface job's link: what comes in is the job's outbound, judged
	 * as rf_egress judges a cgroup's (a mark cannot come with it: crossing from the job's
	 * namespace clears it, and a tap's packets are new). */
	link = link_job(skb);
	if (host_side(link)) {
		int rc = judge_packet(skb, link, bpf_skb_cgroup_id(skb), RF_RX);

		/* Judged: not again under the forwarded-traffic job on its way out. */
		if (rc == TC_ACT_UNSPEC)
			skb->mark |= RF_JUDGED_MARK;
		return rc;
	}
	read_answer(skb, 0, 0);
	return TC_ACT_UNSPEC;
}

/* The backstop, on the job's cgroup. It runs before routing's neighbour step (ARP,
 * neighbour discovery), which TC egress comes after: a packet to an on-link address the job
 * chose makes the kernel put that address on the link in an ARP request or a neighbour
 * solicitation even when TC drops the packet itself. So the backstop pre-judges:
 * - a packet leaving through an interface the TC programs are not attached to (one that
 *   appeared a moment ago and is not attached yet, or one left out with --interface) is
 *   unparsed as far as the verdict program is concerned: dropped in block mode, reported in
 *   both;
 * - on a watched interface, a packet of a flow already judged blocked is dropped here, and a
 *   new flow judge() blocks is dropped, cached as blocked and reported here (TC then never
 *   sees it, so it is reported once). Everything else goes on to TC as before, which caches
 *   and reports allowed and audited flows and filters DNS to resolvers. A SYN-ACK goes on to
 *   TC too: its peer sent a SYN, so it is resolved already, and TC answers a refused one
 *   with a RST.
 * Loopback (ifindex 1 in every namespace) stays on the host. Returns 1 to let the packet go,
 * 0 to drop it. */
SEC("cgroup_skb/egress")
int rf_backstop(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct rf_flow_key fk = {};
	struct rf_flow_val fv = {}, *cached;
	struct pkt p = {};
	struct rf_job *job;
	__u64 cgid = 0, now;
	__u8 verdict, reason = RF_REASON_ALLOWED;
	__u64 how = 0;
	int rc;

	if (ifindex == 1)
		return 1;
	/* A flow TC let through and kept with its socket, on this device (see sk_flows). */
	if (kept_flow(skb, RF_L2_NONE, 0))
		return 1;
	job = find_job(skb, link_job(skb), &cgid, &how);
	if (!job)
		return 1;
	/* At this hook the packet starts at its IP header. */
	rc = parse_pkt(skb, &p, RF_L2_NONE);
	if (!bpf_map_lookup_elem(&devices, &ifindex)) {
		__u64 *peer = bpf_map_lookup_elem(&peer_devs, &ifindex);

		/* The far end of one of this job's links, in the namespace behind it: judged at
		 * the link's host side. (An index here is not the namespace's own, so an unwatched
		 * host device of the same index is let on too, for this job only.) */
		if (peer && (*peer >> 32) == job->job_id)
			return 1;
		return unparsed(job, cgid, &p, RF_SENDER_SOCKET, skb) == TC_ACT_SHOT ? 0 : 1;
	}
	/* What cannot be parsed here (headers beyond the linear part, which only TC can pull
	 * in) is judged by TC as before. */
	if (rc != RF_PARSE_OK || is_syn_ack(&p) || is_loopback(p.daddr))
		return 1;

	__builtin_memcpy(fk.daddr, p.daddr, 16);
	fk.job_id = job->job_id;
	fk.sport = p.sport;
	fk.dport = p.dport;
	fk.proto = p.proto;
	cached = config.always_judge ? NULL : bpf_map_lookup_elem(&flows, &fk);
	if (cached) {
		if (cached->verdict != RF_VERDICT_BLOCKED)
			return 1;
		count(RF_CNT_BLOCKED);
		return 0;
	}
	now = bpf_ktime_get_boot_ns();
	verdict = judge(job, &p, now, &reason);
	/* As in rf_egress: a job answering a peer allowed inbound is not blocked. */
	if (verdict != RF_VERDICT_BLOCKED ||
	    ((p.proto == IPPROTO_UDP || (p.proto == IPPROTO_TCP && !(p.tcp_flags & RF_TCP_SYN))) &&
	     inbound_allows(job, &p)))
		return 1;
	fv.first_ns = now;
	fv.last_ns = now;
	fv.verdict = verdict;
	fv.reason = reason;
	bpf_map_update_elem(&flows, &fk, &fv, BPF_ANY);
	count(RF_CNT_NEW_FLOWS);
	count(RF_CNT_BLOCKED);
	emit_flow(job, cgid, &p, now, verdict, reason, RF_DIR_OUTBOUND, RF_SENDER_SOCKET, skb);
	return 0;
}

/* The baseline for benchmarks: what an attached program costs before it does anything. */
SEC("tc")
int rf_empty(struct __sk_buff *skb)
{
	return TC_ACT_UNSPEC;
}

/* The XDP pre-judge of interface jobs: drops early what rf_ingress would drop. */
#include "xdp.h"

#include "sockopt.h"

/* Who owns each socket of a job: cgroup socket hooks, attached with the backstop. */
#include "sockowner.h"
struct rf_sock_owner _rf_sock_owner = {};

/* The process-level watch (ptrace and friends): tracepoint programs, attached separately. */
#include "guard.h"
struct rf_guard_event _rf_guard_event = {};
enum rf_guard_kind _rf_guard_kind = 0;

char LICENSE[] SEC("license") = "Dual BSD/GPL";
