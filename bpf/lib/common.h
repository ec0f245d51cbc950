/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* What every part of the programs uses: the settings the agent fixes before load, the
 * per-CPU counters, and when to wake the agent for ring-buffer records. */
#ifndef RINGFENCE_LIB_COMMON_H
#define RINGFENCE_LIB_COMMON_H

#include "../abi.h"
#include "../maps.h"

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

static __always_inline void count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &idx);

	if (c)
		*c += 1;
}

#endif
