/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* The question name of a DNS message (a query at egress, an answer at ingress): parsed,
 * lowercased, hashed suffix by suffix, and matched against the job's names (exact names,
 * `*.suffix` wildcards, label globs). */
#ifndef RINGFENCE_LIB_DNS_QUESTION_H
#define RINGFENCE_LIB_DNS_QUESTION_H

#include "../abi.h"
#include "../maps.h"
#include "ports.h"
#include "scratch.h"

#define RF_FNV_OFFSET 0xcbf29ce484222325ULL
#define RF_FNV_PRIME 0x100000001b3ULL

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

#endif
