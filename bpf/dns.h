/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * DNS in the kernel: the question name of queries (egress) and answers (ingress),
 * and the A/AAAA records of answers, bound into the job's allow trie before the
 * answer reaches the application.
 *
 * Verifier notes (see DESIGN.md, "Known facts about in-kernel DNS binding"):
 * - every loop is a bpf_loop callback; loop state lives in the per-CPU scratch
 *   map value, never in a stack context (6.7+ verifies callbacks to convergence);
 * - the payload is copied once into scratch and read there through masks
 *   (`off & (RF_DNS_BUF - 1)`), with `slack` after the buffer so that a masked
 *   offset plus a small fixed read stays inside the map value;
 * - barrier_var() before each mask so clang does not drop a mask it thinks redundant.
 */
#ifndef RINGFENCE_DNS_H
#define RINGFENCE_DNS_H

#include "abi.h"
#include "maps.h"
#include "parse.h"

#define RF_FNV_OFFSET 0xcbf29ce484222325ULL
#define RF_FNV_PRIME 0x100000001b3ULL
#define RF_BUF_MASK (RF_DNS_BUF - 1)

/* Minimum lifetime and grace of a learned address, set by the agent before load. */
const volatile __u64 dns_min_ttl_ns = 0;
const volatile __u64 dns_grace_ns = 30ULL * 1000000000ULL;
/* Benchmarks turn the ring buffer off so a full buffer does not distort the figures. */
const volatile __u8 emit_events = 1;
/* Benchmarks of the new-flow path set this: every packet is judged as if it opened a flow
 * (BPF_PROG_TEST_RUN repeats one frame, which would otherwise hit the flow cache). */
const volatile __u8 always_judge = 0;
/* bpf_get_current_pid_tgid/comm are callable from TC programs only on newer kernels; the
 * agent probes and sets this, and the verifier skips the calls it can prove are dead. */
const volatile __u8 have_task_helpers = 0;
/* The cgroup socket hooks (bpf/sockowner.h) loaded and record socket owners: only then is
 * rf_sock_owner worth a lookup. Set by the agent before load. */
const volatile __u8 have_sock_owner = 0;

struct rf_scratch {
	/* ev and buf are contiguous: one bpf_ringbuf_output() sends the header and the copy. */
	struct rf_dns_event ev;
	__u8 buf[RF_DNS_BUF];
	__u8 slack[64];
	/* The question name, lowercased, right-aligned like rf_name_val.name. */
	__u8 rname[RF_NAME_MAX];
	__u8 rslack[64];
	__u64 suffix_hash[RF_LABELS_MAX]; /* hash of the suffix starting at label i */
	__u8 label_off[RF_LABELS_MAX];    /* offset of label i's length byte in the name */
	__u8 addrs[RF_DNS_ADDRS_MAX][16];
	__u32 ttls[RF_DNS_ADDRS_MAX];
	struct rf_ports ports; /* union of what the question name matched */
	__u64 cgroup_id;       /* of the sender, for query copies */
	struct rf_addr_val nv; /* a new trie value is built here: variable-offset stack writes are refused */
	__u64 hash;
	__u64 now;
	__u32 len;      /* bytes in buf */
	__u32 off;      /* parse cursor */
	__u32 name_len; /* question name, wire format, without the terminating zero */
	__u32 nlabels;
	__s32 cur;      /* label being hashed, right to left */
	__u32 err;
	__u32 done;
	__u32 naddrs;
	__u32 rr_left;
	__u32 in_name;
	__u32 rr_start;
	__u32 job_id;
	__u32 bound;
	__u32 flags;
	__u32 overflow;
	__u32 matched;
	/* Query side (dns_query): the message being judged and the TCP segment being walked. */
	__u32 msglen;   /* the whole message's length; buf holds its first `len` bytes */
	__u32 seg_pos;  /* skb offset of the next byte of the segment to walk */
	__u32 seg_end;
	__u32 verdict;  /* enum rf_query_verdict of the walk */
	__u32 lost;     /* the walk lost the message boundaries: the copy is the raw segment */
	__u32 enforce;  /* block mode with query filtering: what is not allowed does not pass */
	__u32 end_seq;  /* the segment's end in the stream */
	__u32 boundary; /* the segment starts a message */
	/* Keys and values built in map memory rather than on the stack: the egress program, the
	 * TCP walk and its callbacks share one 512-byte stack. */
	struct rf_dns_stream stream; /* a new dns_streams value */
	struct rf_dns_stream_key skey;
	struct rf_query_key qk;
	struct rf_query_val qv;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rf_scratch);
} scratch SEC(".maps");

/* Waking the agent for every record costs a context switch per DNS answer, which on a busy
 * runner lands on the lookup's critical path. Records wait in the ring buffer until a quarter
 * of it is used (or the agent's 10 ms tick drains it); what must not wait forces a wakeup. */
#define RF_WAKE_BYTES (2 << 20)

static __always_inline __u64 ringbuf_flags(int urgent)
{
	if (urgent || bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > RF_WAKE_BYTES)
		return BPF_RB_FORCE_WAKEUP;
	return BPF_RB_NO_WAKEUP;
}

static __always_inline struct rf_scratch *get_scratch(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&scratch, &zero);
}

static __always_inline void count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &idx);

	if (c)
		*c += 1;
}

/* sender_of's `task`: whether, and when, the current task is the sender. */
#define RF_SENDER_SOCKET 0 /* never asked (cgroup_skb: no task helpers there): the socket's owner */
#define RF_SENDER_TC 1     /* TC: the current task where the helpers exist and it is in the socket's cgroup */
#define RF_SENDER_CALLER 2 /* a syscall hook (cgroup/setsockopt): the caller, where the helpers exist */

/* cgroup/setsockopt programs may call bpf_get_current_pid_tgid/comm (probed by the agent). */
const volatile __u8 have_sockopt_task = 0;

/* Who sent `skb` (socket cgroup `cgid`): *pid and comm (16 bytes), zero when unknown.
 * `task` (a constant at each call site, RF_SENDER_*) says whether the current task may be
 * asked: in TC it may on kernels with the task helpers there (have_task_helpers), and it is
 * the sender only when it is in the socket's cgroup (a packet sent from a timer, a
 * retransmit, runs in whatever task was current). Otherwise the socket's owner, as the
 * cgroup socket hooks recorded it, names the process that opened it. Called only where an
 * event is sent, never on the established-flow path. */
static __always_inline void sender_of(struct __sk_buff *skb, __u64 cgid, int task, __u32 *pid,
				      char *comm)
{
	struct rf_sock_owner *o;
	__u64 cookie;

	if ((task == RF_SENDER_TC && have_task_helpers && bpf_get_current_cgroup_id() == cgid) ||
	    (task == RF_SENDER_CALLER && have_sockopt_task)) {
		*pid = bpf_get_current_pid_tgid() >> 32;
		bpf_get_current_comm(comm, 16);
		return;
	}
	if (have_sock_owner && skb) {
		cookie = bpf_get_socket_cookie(skb);
		o = cookie ? bpf_map_lookup_elem(&rf_sock_owner, &cookie) : NULL;
		if (o) {
			*pid = o->tgid;
			__builtin_memcpy(comm, o->comm, 16);
			return;
		}
	}
	*pid = 0;
	__builtin_memset(comm, 0, 16);
}

static __always_inline __u8 buf_at(struct rf_scratch *s, __u32 off)
{
	barrier_var(off);
	return s->buf[off & RF_BUF_MASK];
}

static __always_inline __u16 buf16(struct rf_scratch *s, __u32 off)
{
	return ((__u16)buf_at(s, off) << 8) | buf_at(s, off + 1);
}

/* ---- ports ---------------------------------------------------------------- */

static __always_inline int ports_has(const struct rf_ports *ps, __u16 port)
{
	if (ps->any)
		return 1;
#pragma unroll
	for (int i = 0; i < RF_MAX_PORTS; i++) {
		if (i >= ps->n)
			break;
		if (ps->port[i] == port)
			return 1;
	}
	return 0;
}

static __always_inline int ports_empty(const struct rf_ports *ps)
{
	return !ps->any && !ps->n;
}

/* dst |= src. Fails closed: a port that does not fit is left out (and counted by the caller). */
static __always_inline void ports_union(struct rf_ports *dst, const struct rf_ports *src)
{
	if (src->any) {
		dst->any = 1;
		return;
	}
#pragma unroll
	for (int i = 0; i < RF_MAX_PORTS; i++) {
		if (i >= src->n)
			break;
		__u16 p = src->port[i];

		if (ports_has(dst, p))
			continue;
		__u32 n = dst->n;

		if (n >= RF_MAX_PORTS)
			break;
		barrier_var(n);
		dst->port[n & (RF_MAX_PORTS - 1)] = p;
		dst->n = n + 1;
	}
}

/* ---- question name -------------------------------------------------------- */

/* One label of the question name per call. Compression is not valid in a question. */
static long qname_label_cb(__u32 i, void *ctx)
{
	struct rf_scratch *s = get_scratch();
	__u32 off, rel, n;
	__u8 l;

	if (!s)
		return 1;
	off = s->off;
	if (off >= s->len) {
		s->err = 1;
		return 1;
	}
	l = buf_at(s, off);
	rel = off - 12;
	if (l == 0) {
		s->name_len = rel;
		s->off = off + 1;
		s->done = 1;
		return 1;
	}
	n = s->nlabels;
	/* l > 63 also rejects compression pointers (0xc0) and the reserved 0x40/0x80 forms. */
	if (l > 63 || n >= RF_LABELS_MAX || rel + 1 + l > 254) {
		s->err = 1;
		return 1;
	}
	s->label_off[n & (RF_LABELS_MAX - 1)] = rel;
	s->nlabels = n + 1;
	s->off = off + 1 + l;
	return 0;
}

/* One byte per call, right to left: lowercases into rname and hashes; at each label's
 * length byte the running hash is the hash of that suffix. */
static long qname_hash_cb(__u32 i, void *ctx)
{
	struct rf_scratch *s = get_scratch();
	__u32 pos, nl;
	__s32 cur;
	__u8 b;

	if (!s)
		return 1;
	nl = s->name_len;
	if (i >= nl)
		return 1;
	pos = nl - 1 - i;
	b = buf_at(s, 12 + pos);
	if (b >= 'A' && b <= 'Z')
		b |= 0x20;
	s->rname[(RF_NAME_MAX - nl + pos) & (RF_NAME_MAX - 1)] = b;
	s->hash = (s->hash ^ b) * RF_FNV_PRIME;
	cur = s->cur;
	if (cur >= 0 && s->label_off[cur & (RF_LABELS_MAX - 1)] == pos) {
		s->suffix_hash[cur & (RF_LABELS_MAX - 1)] = s->hash;
		s->cur = cur - 1;
	}
	return 0;
}

/* Parses the question at offset 12: fills label offsets, rname, suffix hashes and
 * leaves s->off after QTYPE/QCLASS. Returns 0 on success. */
static __always_inline int parse_question(struct rf_scratch *s)
{
	s->off = 12;
	s->nlabels = 0;
	s->name_len = 0;
	s->err = 0;
	s->done = 0;
	bpf_loop(RF_LABELS_MAX, qname_label_cb, NULL, 0);
	if (s->err || !s->done || s->nlabels == 0)
		return -1;
	s->hash = RF_FNV_OFFSET;
	s->cur = (__s32)s->nlabels - 1;
	bpf_loop(RF_NAME_MAX, qname_hash_cb, NULL, 0);
	if (s->off + 4 > s->len)
		return -1;
	s->off += 4;
	return 0;
}

/* Right-aligned suffix compare, 8 bytes at a time: the last L bytes of a and b. */
static __always_inline int suffix_equal(const __u8 *a, const __u8 *b, __u32 L)
{
#pragma unroll
	for (int i = 0; i < RF_NAME_MAX / 8; i++) {
		if (i * 8 >= L)
			break;
		__u64 x = *(const __u64 *)(a + RF_NAME_MAX - 8 - i * 8) ^
			  *(const __u64 *)(b + RF_NAME_MAX - 8 - i * 8);
		__u32 n = L - i * 8;

		if (n < 8)
			x &= ~0ULL << (8 * (8 - n));
		if (x)
			return 0;
	}
	return 1;
}

/* The first n (<= 64) bytes at rname[at] equal pat? */
static __always_inline int part_equal(struct rf_scratch *s, __u32 at, const __u8 *pat, __u32 n)
{
	barrier_var(at);
	at &= RF_NAME_MAX - 1;
#pragma unroll
	for (int i = 0; i < RF_GLOB_PART_MAX / 8; i++) {
		if (i * 8 >= n)
			break;
		__u64 x = *(const __u64 *)(s->rname + at + i * 8) ^ *(const __u64 *)(pat + i * 8);
		__u32 m = n - i * 8;

		if (m < 8)
			x &= (1ULL << (8 * m)) - 1;
		if (x)
			return 0;
	}
	return 1;
}

/* Label 0 of the question against the globs of the suffix that starts at label 1. */
static __always_inline void match_globs(struct rf_scratch *s, const struct rf_name_val *v)
{
	__u32 start0 = RF_NAME_MAX - s->name_len + 1;
	__u32 len0 = s->label_off[1] - 1;

#pragma unroll
	for (int g = 0; g < RF_GLOBS_MAX; g++) {
		if (g >= v->nglobs)
			break;
		const struct rf_glob *gl = &v->globs[g];
		__u32 pl = gl->prefix_len, sl = gl->suffix_len;

		if (pl > RF_GLOB_PART_MAX || sl > RF_GLOB_PART_MAX || pl + sl > len0)
			continue;
		if (!part_equal(s, start0, gl->prefix, pl))
			continue;
		if (!part_equal(s, start0 + len0 - sl, gl->suffix, sl))
			continue;
		ports_union(&s->ports, &gl->ports);
		s->matched = 1;
	}
}

/* One label start per call: the suffix from label k against the job's names. */
static long match_cb(__u32 k, void *ctx)
{
	struct rf_scratch *s = get_scratch();
	struct rf_name_key key = {};
	struct rf_name_val *v;
	__u32 L;

	if (!s || k >= s->nlabels)
		return 1;
	key.job_id = s->job_id;
	key.hash = s->suffix_hash[k & (RF_LABELS_MAX - 1)];
	v = bpf_map_lookup_elem(&names, &key);
	if (!v)
		return 0;
	L = s->name_len - s->label_off[k & (RF_LABELS_MAX - 1)];
	/* A hash hit is only a candidate: a crafted collision must not bind anything. */
	if (v->name_len != L || !suffix_equal(s->rname, v->name, L))
		return 0;
	if (k == 0) {
		if (!ports_empty(&v->exact))
			s->matched = 1;
		ports_union(&s->ports, &v->exact);
	} else {
		if (!ports_empty(&v->wildcard))
			s->matched = 1;
		ports_union(&s->ports, &v->wildcard);
	}
	if (k == 1 && v->nglobs)
		match_globs(s, v);
	return 0;
}

/* ---- answer records ------------------------------------------------------- */

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

/* One address per call into the job's trie: refresh in place when the host entry exists
 * (an update would allocate), otherwise insert, inheriting the ports of a covering CIDR. */
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
	if (life < dns_min_ttl_ns)
		life = dns_min_ttl_ns;
	exp = s->now + life + dns_grace_ns;

	v = bpf_map_lookup_elem(&allow, &key);
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

/* Sends the DNS message in scratch to the ring buffer behind an rf_dns_event header. */
/* `skb`: the query's packet, to name its sender by (NULL for answers: they have none). */
static __always_inline void emit_dns_copy(struct rf_scratch *s, __u32 job_id, const __u8 *server,
					  struct __sk_buff *skb)
{
	__u32 len = s->len;

	if (!emit_events)
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
	s->ev._pad = 0;
	__builtin_memset(s->ev.comm, 0, sizeof(s->ev.comm));
	if (s->flags & RF_DNS_QUERY) {
		s->ev.cgroup_id = s->cgroup_id;
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

/* ---- queries (egress) ------------------------------------------------------ */

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

/* Ingress: an answer from a resolver that matches an outstanding query of a job. Binds
 * the A/AAAA records when the question is allowed, copies the answer to the ring buffer.
 * Never drops: what does not validate binds nothing and passes on to the socket. */
static __always_inline void dns_answer(struct __sk_buff *skb, struct pkt *p)
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
		if (!q)
			return;
		__builtin_memcpy(sk.server, p->saddr, 16);
		sk.client_port = p->dport;
		sv.job_id = q->job_id;
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
	count(RF_CNT_DNS_ANSWERS);
	txid = buf16(s, 0);
	__builtin_memcpy(qk.server, p->saddr, 16);
	qk.client_port = p->dport;
	qk.txid = txid;
	q = bpf_map_lookup_elem(&queries, &qk);
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
