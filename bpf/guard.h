/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Process-level watch: a job process that ptraces (or writes the memory of, or takes a
 * descriptor from) a process outside its cgroup can make that process send for it, and the
 * dataplane judges packets by the sending socket's cgroup: it cannot stop that. What it can
 * do is see the attempt. These tracepoint programs report every such syscall a job process
 * makes (on entry: failed attempts count too); the agent checks whether the target is
 * outside the job and writes a finding.
 *
 * They run on every call of the traced syscalls host-wide, so each filters cheaply first
 * (the ptrace request, then the caller's cgroup) and does nothing else for non-job callers.
 * Loading them never depends on the tracepoints existing (that is checked at attach, which
 * may fail without harming the dataplane).
 */
#ifndef RINGFENCE_GUARD_H
#define RINGFENCE_GUARD_H

#include "abi.h"
#include "maps.h"

/* The layout of every syscalls/sys_enter_* tracepoint: the common trace header (8 bytes),
 * the syscall number, then the six arguments as 8-byte slots at offset 16. Spelled out here
 * because the dataplane is built without vmlinux.h. */
struct rf_sys_enter {
	__u64 common;
	__s32 nr;
	__u32 _pad;
	__u64 args[6];
};

enum {
	RF_PTRACE_ATTACH = 16,
	RF_PTRACE_SEIZE = 0x4206,
};

/* The job of the current task: its cgroup or one of its ancestors is in `jobs` (the same
 * rule as find_job, from the task's side instead of the socket's). */
static __always_inline struct rf_job *current_job(__u64 *cgid)
{
	__u64 id = bpf_get_current_cgroup_id();
	struct rf_job *j;
	__u32 levels;

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
		__u64 a = bpf_get_current_ancestor_cgroup_id(l);

		if (!a)
			break;
		j = bpf_map_lookup_elem(&jobs, &a);
		if (j)
			return j;
	}
	return NULL;
}

static __always_inline void guard_emit(__u32 kind, __u64 request, __u64 target, __u64 arg)
{
	struct rf_guard_event *e;
	struct rf_job *job;
	__u64 cgid = 0;

	job = current_job(&cgid);
	if (!job)
		return;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(RF_CNT_RINGBUF_DROP);
		return;
	}
	e->hdr.type = RF_EVENT_GUARD;
	e->hdr.job_id = job->job_id;
	e->hdr.ts_ns = bpf_ktime_get_boot_ns();
	e->cgroup_id = cgid;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->kind = kind;
	e->request = request;
	e->target = target;
	e->arg = arg;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	/* Rare and worth seeing at once: wake the agent. */
	bpf_ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
}

SEC("tracepoint/syscalls/sys_enter_ptrace")
int rf_guard_ptrace(struct rf_sys_enter *ctx)
{
	__u64 request = ctx->args[0];

	/* Only the requests that take hold of another process; the rest (PEEK, GETREGS, …)
	 * act on a tracee already held, and PTRACE_TRACEME makes the parent the tracer. */
	if (request != RF_PTRACE_ATTACH && request != RF_PTRACE_SEIZE)
		return 0;
	guard_emit(RF_GUARD_PTRACE, request, ctx->args[1], 0);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_process_vm_writev")
int rf_guard_vm_writev(struct rf_sys_enter *ctx)
{
	guard_emit(RF_GUARD_VM_WRITEV, 0, ctx->args[0], 0);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_pidfd_getfd")
int rf_guard_pidfd_getfd(struct rf_sys_enter *ctx)
{
	guard_emit(RF_GUARD_PIDFD_GETFD, 0, ctx->args[0], ctx->args[1]);
	return 0;
}

#endif
