/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The per-CPU scratch the DNS code works in, and the masked reads of the message in it.
 *
 * Verifier notes (see DESIGN.md, "Known facts about in-kernel DNS binding"):
 * - every loop is a bpf_loop callback; loop state lives in the per-CPU scratch
 *   map value, never in a stack context (6.7+ verifies callbacks to convergence);
 * - the payload is copied once into scratch and read there through masks
 *   (`off & (RF_DNS_BUF - 1)`), with `slack` after the buffer so that a masked
 *   offset plus a small fixed read stays inside the map value;
 * - barrier_var() before each mask so clang does not drop a mask it thinks redundant.
 */
#ifndef RINGFENCE_LIB_SCRATCH_H
#define RINGFENCE_LIB_SCRATCH_H

#include "../abi.h"
#include "../maps.h"
#include "parse.h"

#define RF_BUF_MASK (RF_DNS_BUF - 1)

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

static __always_inline struct rf_scratch *get_scratch(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&scratch, &zero);
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

#endif
