/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Who sent a packet: the current task where the kernel lets the program ask and it is the
 * sender, else the socket's owner as the cgroup socket hooks recorded it (bpf/sockowner.h).
 * Asked only where an event is sent (a new flow, a DNS query copy), never per packet. */
#ifndef RINGFENCE_LIB_SENDER_H
#define RINGFENCE_LIB_SENDER_H

#include "../abi.h"
#include "../maps.h"
#include "common.h"

/* sender_of's `task`: whether, and when, the current task is the sender. */
#define RF_SENDER_SOCKET 0 /* never asked (cgroup_skb: no task helpers there): the socket's owner */
#define RF_SENDER_TC 1     /* TC: the current task where the helpers exist and it is in the socket's cgroup */
#define RF_SENDER_CALLER 2 /* a syscall hook (cgroup/setsockopt): the caller, where the helpers exist */

#define RF_ROOT_CGROUP_ID 1 /* cgroup v2's root: kernfs gives it id 1 */

/* Who sent `skb` (socket cgroup `cgid`): *pid and comm (16 bytes), zero when unknown.
 * `task` (a constant at each call site, RF_SENDER_*) says whether the current task may be
 * asked: in TC it may on kernels with the task helpers there (config.have_task_helpers),
 * and it is the sender only when it is in the socket's cgroup (a packet sent from a timer,
 * a retransmit, runs in whatever task was current). Not when that cgroup is the root
 * (id 1): kernel threads live there, and a packet a kworker or ksoftirqd handles (an
 * interface job's packets cross a veth, the kernel's own multicast reports) would be named
 * after it. Otherwise the socket's owner names the process that opened it. */
static __always_inline void sender_of(struct __sk_buff *skb, __u64 cgid, int task, __u32 *pid,
				      char *comm)
{
	struct rf_sock_owner *o;
	__u64 cookie;

	if ((task == RF_SENDER_TC && config.have_task_helpers && cgid != RF_ROOT_CGROUP_ID &&
	     bpf_get_current_cgroup_id() == cgid) ||
	    (task == RF_SENDER_CALLER && config.have_sockopt_task)) {
		*pid = bpf_get_current_pid_tgid() >> 32;
		bpf_get_current_comm(comm, 16);
		return;
	}
	if (config.have_sock_owner && skb) {
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

#endif
