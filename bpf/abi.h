/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The one ABI shared by the BPF programs and the Rust agent.
 *
 * Every type here reaches Rust through the skeleton's `types` module (BTF),
 * so constants are enum members, not #defines, and every struct is referenced
 * from a map or a dummy global in ringfence.bpf.c so it survives into BTF.
 * Rust asserts the sizes (src/kernel/abi.rs); keep fields naturally aligned and pad
 * explicitly so C and Rust agree byte for byte.
 *
 * Addresses are always 16 bytes: IPv4 is stored IPv4-mapped (::ffff:a.b.c.d),
 * so one LPM trie and one flow table serve both families.
 */
#ifndef RINGFENCE_ABI_H
#define RINGFENCE_ABI_H

enum rf_limits {
	RF_MAX_PORTS = 8,        /* ports one endpoint entry can carry; more => "any" is refused by the policy compiler */
	RF_NAME_MAX = 256,       /* wire-format name buffer (names are <= 255 bytes) */
	RF_LABELS_MAX = 128,     /* labels in a name (255 bytes => at most 127 labels) */
	RF_GLOBS_MAX = 4,        /* label globs ("ab*cd") sharing one suffix */
	RF_GLOB_PART_MAX = 64,   /* prefix / suffix bytes of one label glob */
	RF_DNS_BUF = 4096,       /* DNS payload copied for parsing and for the audit trail */
	RF_DNS_ADDRS_MAX = 64,   /* A/AAAA records bound from one answer */
	RF_DNS_RR_MAX = 256,     /* resource records walked in one answer */
	RF_JOB_LEVELS = 32,      /* cgroup ancestor levels searched for a job */
	RF_LPM_FULL = 160,       /* prefixlen of a host entry: 32 bits job id + 128 bits address */
	RF_TCP_STREAMS_MAX = 4096, /* split TCP DNS answers followed at once (tcp_streams; the agent holds as many) */
};

enum rf_verdict {
	RF_VERDICT_ALLOWED = 0,
	RF_VERDICT_BLOCKED = 1,
	RF_VERDICT_AUDITED = 2, /* would have been blocked; audit mode let it pass */
};

enum rf_reason {
	RF_REASON_ALLOWED = 0,
	RF_REASON_NOT_ALLOWED = 1,  /* a DNS answer named it, but the name/port is not allowed */
	RF_REASON_DIRECT_IP = 2,    /* no DNS answer produced this address and no CIDR lists it */
	RF_REASON_DNS_RESOLVER = 3, /* DNS to a server that is not a configured resolver */
	RF_REASON_METADATA = 4,     /* link-local / cloud metadata address not listed */
	RF_REASON_DNS_QUERY = 5,    /* a DNS query for a name the policy does not allow */
	RF_REASON_DNS_UNJUDGED = 6, /* DNS traffic the kernel could not fully parse: dropped or refused in block mode */
	RF_REASON_UNPARSED = 7,     /* a packet the dataplane could not parse (odd device, odd headers) */
	RF_REASON_INBOUND = 8,      /* an inbound connection from a peer the policy does not list */
};

/* rf_flow_event.direction: who opened the connection. */
enum rf_direction {
	RF_DIR_OUTBOUND = 0,
	RF_DIR_INBOUND = 1,  /* a peer connected to a job's listening socket */
};

/* devices: what sits in front of the IP header on an attached interface. */
enum rf_link {
	RF_L2_NONE = 0,      /* L3 devices (tun, WireGuard, PPP, raw IP): the packet starts at the IP header */
	RF_L2_ETHER = 14,    /* Ethernet, and loopback (which carries an Ethernet-sized header) */
	RF_L2_UNKNOWN = 255, /* a link type ringfence does not know: its job packets are unparsed (fail closed) */
};

enum rf_mode {
	RF_MODE_AUDIT = 0,
	RF_MODE_BLOCK = 1,
};

enum rf_event_type {
	RF_EVENT_FLOW = 1,
	RF_EVENT_DNS = 2,
	RF_EVENT_GUARD = 3, /* process-level findings: struct rf_guard_event */
};

/* rf_guard_event.kind: a job process reached for another process's memory or descriptors. */
enum rf_guard_kind {
	RF_GUARD_PTRACE = 1,      /* ptrace(PTRACE_ATTACH or PTRACE_SEIZE, target) */
	RF_GUARD_VM_WRITEV = 2,   /* process_vm_writev(target, ...) */
	RF_GUARD_PIDFD_GETFD = 3, /* pidfd_getfd(pidfd, fd): target is the pidfd, not a pid */
};

/* rf_addr_val.flags */
enum rf_addr_flags {
	RF_ADDR_STATIC = 1,  /* listed in the policy as an address or CIDR */
	RF_ADDR_LEARNED = 2, /* bound from a DNS answer to an allowed name */
	RF_ADDR_SEEN = 4,    /* produced by a DNS answer to a name that is not allowed */
};

/* rf_dns_event.flags */
enum rf_dns_flags {
	RF_DNS_ALLOWED = 1,   /* question name allowed by the job's policy: addresses bound */
	RF_DNS_MALFORMED = 2, /* did not validate: nothing bound */
	RF_DNS_TRUNCATED = 4, /* payload larger than RF_DNS_BUF: copy cut, nothing bound */
	RF_DNS_TRIE_FULL = 8, /* some address could not be inserted */
	RF_DNS_QUERY = 16,    /* the copy is a query (egress) whose name is not allowed */
	RF_DNS_REFUSED = 32,  /* ...and it was answered REFUSED in the kernel, never sent */
	RF_DNS_TCP = 64,      /* carried over TCP */
	RF_DNS_TCP_SPLIT = 128, /* a TCP answer split across segments: not parsed in the kernel */
	RF_DNS_TCP_SEGMENT = 256, /* the copy is one raw TCP segment of such an answer */
	RF_DNS_TCP_FIRST = 512,   /* ...the one the message starts in */
	RF_DNS_OVERFLOW = 1024,   /* more than RF_DNS_ADDRS_MAX addresses: the rest bound by the agent */
	RF_DNS_UNJUDGED = 2048,   /* a query the kernel could not fully judge: refused/dropped in block mode */
	RF_DNS_SPECIAL = 4096,    /* the answer named special addresses (loopback, link-local...): not bound */
};

/* Index into the per-CPU `counters` array. */
enum rf_counter {
	RF_CNT_PACKETS = 0,    /* reserved: not counted on the hot path (it costs a lookup) */
	RF_CNT_JOB_PACKETS,    /* reserved, likewise */
	RF_CNT_ALLOWED,        /* new flows allowed */
	RF_CNT_BLOCKED,
	RF_CNT_AUDITED,
	RF_CNT_NEW_FLOWS,
	RF_CNT_DNS_QUERIES,
	RF_CNT_DNS_ANSWERS,
	RF_CNT_DNS_BOUND,      /* addresses inserted or refreshed */
	RF_CNT_DNS_MALFORMED,
	RF_CNT_DNS_UNMATCHED,  /* answer with no outstanding query: ignored */
	RF_CNT_DNS_FRAGMENT,   /* fragmented answer: cannot be parsed at TC, nothing bound */
	RF_CNT_DNS_TOO_BIG,
	RF_CNT_TRIE_FULL,
	RF_CNT_RINGBUF_DROP,
	RF_CNT_DNS_REFUSED,    /* queries answered REFUSED at egress */
	RF_CNT_DNS_TCP_SPLIT,  /* TCP answers split across segments: bound by the agent, late */
	RF_CNT_DNS_OVERFLOW,   /* answers with more addresses than the kernel binds at once */
	RF_CNT_DNS_UNJUDGED,   /* queries that could not be fully judged (dropped/refused in block mode) */
	RF_CNT_UNPARSED,       /* job packets that could not be parsed */
	RF_CNT_INBOUND,        /* inbound connections seen (allowed or not) */
	RF_CNT_DNS_SPECIAL,    /* special addresses in answers, never bound */
	RF_CNT_MAX,
};

/* The programs' settings: the one read-only global `config` (bpf/lib/common.h), written by
 * the agent before load (Dataplane::load) and frozen with it, so the verifier knows every
 * value and skips the code they turn off. */
struct rf_config {
	__u64 dns_min_ttl_ns;   /* learned addresses live at least this long */
	__u64 dns_grace_ns;     /* added to every learned address's TTL */
	__u8 emit_events;       /* 0: no ring-buffer records (benchmarks: a full buffer distorts them) */
	__u8 always_judge;      /* benchmarks: every packet judged as a new flow (no flow cache) */
	__u8 have_task_helpers; /* bpf_get_current_pid_tgid/comm are callable from TC programs */
	__u8 have_sock_owner;   /* the socket-owner hooks (bpf/sockowner.h) load: rf_sock_owner is filled */
	__u8 have_sockopt_task; /* cgroup/setsockopt programs may call bpf_get_current_pid_tgid/comm */
	__u8 _pad[3];
};

/* A set of destination ports. any != 0 means every port. */
struct rf_ports {
	__u16 port[RF_MAX_PORTS];
	__u8 n;
	__u8 any;
	__u8 _pad[6];
};

/* rf_job.flags */
enum rf_job_flags {
	/* ifjobs: the interface is the host side of the job's link (the host end of a veth, a
	 * tap): the job's packets arrive as ingress there, and what leaves as egress goes to the
	 * job. Clear: the interface's egress is the job's own (BPF_PROG_TEST_RUN tables). */
	RF_JOB_HOST_SIDE = 1,
};

/* jobs: key __u64 cgroup id (cgroup v2 inode number); ifjobs: key __u32 ifindex. */
struct rf_job {
	__u32 job_id;    /* policy slot: keys the trie, the names and the resolvers */
	__u8 mode;       /* enum rf_mode */
	__u8 direct_ip;  /* enum rf_mode: RF_MODE_BLOCK blocks direct-ip even in audit mode */
	__u8 dns_filter; /* block mode: queries for names not allowed are answered REFUSED */
	__u8 flags;      /* enum rf_job_flags */
};

/* allow: LPM trie. prefixlen counts the 32 job-id bits plus the address bits. */
struct rf_lpm_key {
	__u32 prefixlen;
	__u32 job_id; /* always fully inside the prefix, so byte order does not matter */
	__u8 addr[16];
};

struct rf_addr_val {
	struct rf_ports ports;
	__u64 expires_ns;   /* CLOCK_BOOTTIME; 0 = never (static entries) */
	__u64 last_used_ns; /* refreshed at most once a second by live flows */
	__u32 flags;        /* enum rf_addr_flags */
	__u32 prefixlen;    /* same as the key's: tells a host entry from a covering CIDR */
	__u64 name_hash;    /* question name that last bound it */
};

/* names: hash of a lowercased wire-format suffix (see rf_name_hash) -> what it allows. */
struct rf_name_key {
	__u32 job_id;
	__u32 _pad;
	__u64 hash;
};

struct rf_glob {
	struct rf_ports ports;
	__u8 prefix_len;
	__u8 suffix_len;
	__u8 _pad[6];
	__u8 prefix[RF_GLOB_PART_MAX];
	__u8 suffix[RF_GLOB_PART_MAX];
};

struct rf_name_val {
	struct rf_ports exact;    /* the name itself ("github.com") */
	struct rf_ports wildcard; /* any name strictly below it ("*.npmjs.org") */
	struct rf_glob globs[RF_GLOBS_MAX]; /* one glob label directly below it ("ab*.blob...") */
	__u32 nglobs;
	__u32 name_len;           /* bytes of the suffix, wire format, no terminating zero */
	/* The suffix, lowercased, RIGHT-aligned: it fills name[RF_NAME_MAX - name_len ..] and
	 * the bytes before it are zero. Suffixes compare right-aligned, 8 bytes at a time,
	 * which confirms every hash hit byte by byte without a loop over the name. */
	__u8 name[RF_NAME_MAX];
};

/* resolvers: which servers a job may send DNS to. value: __u8 1. */
struct rf_resolver_key {
	__u32 job_id;
	__u8 addr[16];
};

/* queries: outstanding DNS queries seen at egress; answers must match one. */
struct rf_query_key {
	__u8 server[16];
	__u16 client_port; /* host order */
	__u16 txid;        /* host order */
};

struct rf_query_val {
	__u64 name_hash;
	__u64 sent_ns;
	__u32 job_id;
	__u8 bind_seen; /* audit mode: bind addresses of names that are not allowed as RF_ADDR_SEEN */
	/* Sent by an interface job (it came in on the host side of its link): the answer binds
	 * on its way out of that device, where it is the job's, not at ingress elsewhere. */
	__u8 at_link;
	__u8 _pad[2];
};

/* flows: key of one flow of one job; the verdict is made once, on its first packet. */
struct rf_flow_key {
	__u8 daddr[16];
	__u32 job_id;
	__u16 sport; /* host order */
	__u16 dport; /* host order */
	__u8 proto;
	__u8 _pad[3];
};

struct rf_flow_val {
	__u64 first_ns;
	__u64 last_ns;
	__u8 verdict;
	__u8 reason;
	__u8 _pad[6];
};

struct rf_event_hdr {
	__u32 type;   /* enum rf_event_type */
	__u32 job_id;
	__u64 ts_ns;  /* CLOCK_BOOTTIME */
};

struct rf_flow_event {
	struct rf_event_hdr hdr;
	__u64 cgroup_id;
	__u32 pid;    /* 0 when the packet was not sent from process context */
	__u32 ifindex; /* the device a packet no socket sent came in on (a container's link, a bridge); 0 for a socket's */
	char comm[16];
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u8 proto;   /* IPPROTO_* */
	__u8 verdict; /* enum rf_verdict */
	__u8 reason;  /* enum rf_reason */
	__u8 direction; /* enum rf_direction */
};

/* rf_sock_owner: socket cookie -> the process that owns the socket, as the cgroup socket
 * hooks saw it (bpf/sockowner.h): whoever created it, then whoever connected it or sent an
 * addressed datagram on it last. Lets the TC and cgroup_skb programs, which cannot ask the
 * current task (kernels before 6.10, packets sent from timers), name a flow's process. */
struct rf_sock_owner {
	__u64 cgroup_id; /* the process's cgroup when it was recorded */
	__u32 tgid;      /* init pid namespace */
	__u32 _pad;
	char comm[16];
};

/* Followed by `len` bytes of the DNS message. */
struct rf_dns_event {
	struct rf_event_hdr hdr;
	__u8 server[16];
	__u16 len;
	__u16 bound;  /* addresses inserted or refreshed */
	__u32 flags;  /* enum rf_dns_flags */
	/* Who sent it: filled for query copies (egress runs in the sender's context). */
	__u64 cgroup_id;
	__u32 pid;
	__u32 ifindex; /* query copies: the device the query came in on (a container's link); 0 for a socket's */
	char comm[16];
	/* For RF_DNS_TCP_SEGMENT copies: where the bytes sit in the stream. */
	__u32 seq;
	__u16 client_port;
	__u16 _pad2;
};

/* A job process called a syscall that acts on another process (see bpf/guard.h). Sent on
 * entry, so failed attempts are reported too; whether the target is outside the job is
 * for the agent to check. */
struct rf_guard_event {
	struct rf_event_hdr hdr;
	__u64 cgroup_id; /* the caller's */
	__u32 pid;       /* the caller's (tgid, init namespace) */
	__u32 kind;      /* enum rf_guard_kind */
	__u64 request;   /* ptrace request; 0 otherwise */
	__u32 target;    /* the pid argument (the pidfd for RF_GUARD_PIDFD_GETFD) */
	__u32 arg;       /* pidfd_getfd: the fd number asked for; 0 otherwise */
	char comm[16];
};

/* tcp_streams: TCP DNS answers being reassembled by the agent. */
struct rf_stream_key {
	__u8 server[16];
	__u16 client_port;
	__u16 _pad;
};

struct rf_stream_val {
	__u32 job_id;
	__u8 at_link; /* as rf_query_val.at_link: its segments are copied where its answer binds */
	__u8 _pad[3];
};

#endif
