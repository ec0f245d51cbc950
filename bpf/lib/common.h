/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* What every part of the programs uses: the settings the agent fixes before load, the
 * per-CPU counters, and when to wake the agent for ring-buffer records. */
#ifndef RINGFENCE_LIB_COMMON_H
#define RINGFENCE_LIB_COMMON_H

#include "../abi.h"
#include "../maps.h"

/* Set by the agent before load (see struct rf_config); these defaults are Options'. The
 * task helpers (bpf_get_current_pid_tgid/comm) are callable from TC programs only on newer
 * kernels: the agent probes, and the verifier skips the calls it can prove are dead. */
const volatile struct rf_config config = {
	.dns_min_ttl_ns = 0,
	.dns_grace_ns = 30ULL * 1000000000ULL,
	.emit_events = 1,
	.always_judge = 0,
	.have_task_helpers = 0,
	.have_sock_owner = 0,
	.have_sockopt_task = 0,
};

/* Waking the agent for every record costs a context switch per DNS answer, which on a busy
 * runner lands on the lookup's critical path. Records wait in the ring buffer until a quarter
 * of it is used (or the agent's tick drains it); what must not wait forces a wakeup.
 * Past the quarter, only the records that land in the first RF_WAKE_WINDOW bytes of each
 * further RF_WAKE_STEP force one: waking for every record there made each an interrupt the
 * CPU sends itself (a VM exit under a hypervisor), which halved a flooding producer and the
 * agent with it, while one wakeup per megabyte is all a draining agent needs. The window is
 * wider than any record, so a growing backlog cannot step over it. */
#define RF_WAKE_BYTES (2 << 20)
#define RF_WAKE_STEP (1 << 20)
#define RF_WAKE_WINDOW (8 << 10)

static __always_inline __u64 ringbuf_flags(int urgent)
{
	__u64 avail;

	if (urgent)
		return BPF_RB_FORCE_WAKEUP;
	avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	if (avail > RF_WAKE_BYTES && ((avail - RF_WAKE_BYTES) & (RF_WAKE_STEP - 1)) < RF_WAKE_WINDOW)
		return BPF_RB_FORCE_WAKEUP;
	return BPF_RB_NO_WAKEUP;
}

/* The allow entry that decides for `key` (prefixlen RF_LPM_FULL, job and address set): the
 * longest match of the job's entries, as one trie holding them all answered. A host entry
 * (in `allow`) is the longest possible match; only without one does a covering prefix (in
 * `allow_cidrs`) decide. */
static __always_inline struct rf_addr_val *allow_lookup(const struct rf_lpm_key *key)
{
	struct rf_addr_val *v = bpf_map_lookup_elem(&allow, key);

	if (v)
		return v;
	return bpf_map_lookup_elem(&allow_cidrs, key);
}

static __always_inline void count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &idx);

	if (c)
		*c += 1;
}

#endif
