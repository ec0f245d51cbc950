/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Maps shared by the egress and ingress programs. Sizes are set from userspace before load. */
#ifndef RINGFENCE_MAPS_H
#define RINGFENCE_MAPS_H

#include "abi.h"

/* cgroup id -> job. A job's child cgroups are found through their ancestors. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, struct rf_job);
} jobs SEC(".maps");

/* ifindex -> job, for jobs that are a network namespace / container / microVM behind a
 * device: with RF_JOB_HOST_SIDE the device is the host side of the job's link, its ingress is
 * judged as the job's outbound and its egress binds the job's answers. Without it the
 * device's egress is the job's own (BPF_PROG_TEST_RUN, where packets have no socket and so
 * no cgroup). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct rf_job);
} ifjobs SEC(".maps");

/* What a job may reach, by destination: (job, address) -> ports allowed. Split in two by
 * prefix length, one answer: the longest match (see allow_lookup in lib/common.h).
 * `allow` holds the host entries (prefixlen RF_LPM_FULL: the whole address), the bulk:
 * every address learned from a DNS answer and every exact address of a policy. A hash
 * lookup costs the same at 10 entries as at 1M, where a trie lookup walks a node per
 * branching bit. `allow_cidrs` holds the shorter prefixes (a policy's CIDRs, networks a
 * job shares with its containers): a host entry is the longest match there can be, so the
 * trie is asked only when the hash has no entry. Both sized alike from userspace. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* memory for what is learned, as the trie did */
	__type(key, struct rf_lpm_key);       /* prefixlen always RF_LPM_FULL */
	__type(value, struct rf_addr_val);
} allow SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct rf_lpm_key);
	__type(value, struct rf_addr_val);
} allow_cidrs SEC(".maps");

/* (job, peer address/prefix) -> the job's local ports a peer may connect to (allowed-inbound).
 * A prefix of 32 bits (the job id alone) is "every peer". */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct rf_lpm_key);
	__type(value, struct rf_ports);
} inbound SEC(".maps");

/* ifindex -> enum rf_link, for every interface the TC programs are attached to. The TC
 * program reads it only when some attached interface is not Ethernet (have_l3_devs); the
 * cgroup backstop reads it to tell watched interfaces from the rest. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} devices SEC(".maps");

/* ifindex -> 1 for the devices that face containers and namespaces (bridges, their veths,
 * taps: the way *in* to them). A forwarded packet leaving through one of these is an answer
 * or a peer going to a container, not a container's outbound: it is not judged there. Every
 * other device is an uplink, where a forwarded packet no job has judged is judged under the
 * forwarded-traffic job (fail closed: a device not listed is an uplink). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} inside_devs SEC(".maps");

/* ifindex in another namespace -> (job id << 32 | host-side ifindex): the far end of a job's
 * host-side link (a container's or a pod's eth0, a namespace's veth). A process of the job's
 * cgroup inside that namespace sends through it, and the backstop (which knows devices by
 * index only) lets such a packet on: the link's host side judges it as it comes in. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} peer_devs SEC(".maps");

/* The job forwarded traffic no job has judged is judged under (see forwarded_job in
 * ringfence.bpf.c): exec's own job, or the daemon's host default policy. Read only while
 * have_fwd_job is set. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rf_job);
} fwd_job SEC(".maps");

/* (job, hash of a name suffix) -> what that name allows. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* ~1 KiB values: allocate what policies use */
	__type(key, struct rf_name_key);
	__type(value, struct rf_name_val);
} names SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct rf_resolver_key);
	__type(value, __u8);
} resolvers SEC(".maps");

/* Outstanding queries: an answer binds only if it matches one. LRU: no cleanup needed. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct rf_query_key);
	__type(value, struct rf_query_val);
} queries SEC(".maps");

/* TCP DNS answers split across segments, by stream: their segments are copied to the agent,
 * which reassembles and binds them. The agent deletes an entry when the answer is whole. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, RF_TCP_STREAMS_MAX);
	__type(key, struct rf_stream_key);
	__type(value, struct rf_stream_val);
} tcp_streams SEC(".maps");

/* TCP DNS streams from a job to a resolver, followed in the kernel so that every message is
 * judged whatever the segmentation (see dns_tcp_query in lib/dns_tcp.h). Internal to the programs. */
enum rf_dns_stream_limits {
	/* Bytes of a message held across segments: enough for any question (12-byte header,
	 * a name of at most 255 bytes, type and class: 271). Later bytes are only counted. */
	RF_DNS_HOLD = 288,
	/* Message pieces (a length prefix and what follows it) walked in one segment; a
	 * segment holding more messages cannot be judged. */
	RF_DNS_TCP_STEPS = 32,
};

enum rf_dns_stream_state {
	RF_STREAM_OPEN = 0, /* followed: next_seq is the next byte the resolver has not been sent */
	RF_STREAM_DEAD = 1, /* block mode: something could not be judged or was refused; every later segment is dropped */
	RF_STREAM_LOST = 2, /* audit mode: lost track (a gap, an unknown stream); reported once, no longer followed */
};

struct rf_dns_stream_key {
	__u8 client[16];
	__u8 server[16];
	__u32 job_id;
	__u16 client_port;
	__u16 server_port;
};

struct rf_dns_stream {
	__u32 next_seq;    /* client sequence number of the first byte not judged yet */
	__u16 msglen;      /* the current message's length, once its prefix is in */
	__u16 got;         /* bytes of the current message seen so far */
	__u8 prefix_have;  /* bytes of the current message's 2-byte length prefix seen: 0, 1, 2 */
	__u8 prefix0;      /* the first prefix byte, when a segment ended between the two */
	__u8 judged;       /* the current message's question has been judged */
	__u8 state;        /* enum rf_dns_stream_state */
	__u8 hold[RF_DNS_HOLD]; /* the current message's first bytes, while it spans segments */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct rf_dns_stream_key);
	__type(value, struct rf_dns_stream);
} dns_streams SEC(".maps");

/* Flow verdict cache: a flow is judged once; later packets follow the cached verdict. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct rf_flow_key);
	__type(value, struct rf_flow_val);
} flows SEC(".maps");

/* The fast path of an established flow: a job's socket -> the flow it last sent on, with the
 * verdict the slow path gave it (allowed or audited; blocked and DNS flows are never kept
 * here). It answers what the `flows` lookup would, without hashing a key: the packet is
 * still parsed and its flow compared with the one kept, so a socket that sends elsewhere (an
 * unconnected UDP socket, a raw socket, a packet NATed or encapsulated after its socket
 * wrote it) misses and takes the slow path, which keeps the new flow instead. An entry
 * holds only while `verdict_gen` is the one it was made under: the agent bumps it whenever
 * which job a socket belongs to, or what a device is, can have changed (jobs, interface
 * jobs, devices, policies, a purge). Internal to the programs: not pinned, a new load
 * starts empty. */
struct rf_sk_flow {
	/* A seqlock: odd while one writer (the only one: it takes it with a compare-and-swap)
	 * rewrites the entry; a reader that saw it odd, or changed across its reads, misses.
	 * Two CPUs may keep flows of one socket at once (an unconnected UDP socket shared by
	 * threads): without it a reader could match a mix of two flows, neither of them. */
	__u32 seq;
	__u32 _pad0;
	__u8 daddr[16];
	__u32 ifindex;  /* the device it was judged on */
	__u32 gen;      /* verdict_gen when it was made */
	__be16 sport;   /* network order, as in the packet */
	__be16 dport;
	__u8 proto;     /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;    /* 4 or 6 */
	__u8 _pad[2];
	__u64 touched;  /* jiffies at the last keep-alive of the flow and its address */
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct rf_sk_flow);
} sk_flows SEC(".maps");

/* Socket cookie -> the process that owns the socket (struct rf_sock_owner), written by the
 * cgroup socket hooks on the job's cgroup (sock_create, connect4/6, sendmsg4/6) and read
 * only where an event is sent (a new flow, a DNS query copy), never per packet. LRU: a
 * closed socket's entry is never deleted, it ages out; 65536 sockets recently opened or
 * used by the jobs of one host is far more than live at once. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct rf_sock_owner);
} rf_sock_owner SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RF_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

#endif
