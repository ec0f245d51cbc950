/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Socket owners, recorded on the job's cgroup (cgroup/sock_create, connect4/6, sendmsg4/6).
 *
 * TC programs cannot ask which task sent a packet on kernels before 6.10, and a packet sent
 * from a timer (a retransmit) carries no task anywhere. These hooks run in the calling
 * process, in the syscall, before any packet of the socket leaves: each records the caller
 * (tgid, comm, cgroup) under the socket's cookie in rf_sock_owner, which the verdict
 * program and the backstop look up when they report a new flow (sender_of in dns.h).
 *
 * - sock_create: every AF_INET/AF_INET6 socket, whatever it becomes (raw, ping, UDP sent
 *   with send() on a socket connected elsewhere...): its creator owns it first;
 * - connect4/6: TCP connect (and Fast Open), UDP connect: who opens the flow owns it;
 * - sendmsg4/6: UDP datagrams sent with an address (unconnected sockets): the sender of the
 *   datagram, re-recorded only when it is not the one recorded already.
 *
 * They attribute, never judge: every one of them returns 1 (allow), whatever happens.
 * Included from ringfence.bpf.c.
 */
#ifndef RF_SOCKOWNER_H
#define RF_SOCKOWNER_H

/* Records the current task as the owner of ctx's socket. `always`: replace whatever is
 * recorded (a connect names the flow's opener); otherwise keep an entry that already names
 * this process (a busy unconnected UDP sender pays a lookup per datagram, not an update). */
static __always_inline void own_socket(void *ctx, int always)
{
	struct rf_sock_owner o = {}, *cur;
	__u64 cookie = bpf_get_socket_cookie(ctx);

	if (!cookie)
		return;
	o.tgid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(o.comm, sizeof(o.comm));
	if (!always) {
		cur = bpf_map_lookup_elem(&rf_sock_owner, &cookie);
		/* The same process under the same name (an exec keeps the pid, not the comm). */
		if (cur && cur->tgid == o.tgid &&
		    *(__u64 *)cur->comm == *(__u64 *)o.comm &&
		    *(__u64 *)(cur->comm + 8) == *(__u64 *)(o.comm + 8))
			return;
	}
	o.cgroup_id = bpf_get_current_cgroup_id();
	bpf_map_update_elem(&rf_sock_owner, &cookie, &o, BPF_ANY);
}

SEC("cgroup/sock_create")
int rf_own_create(struct bpf_sock *ctx)
{
	own_socket(ctx, 1);
	return 1;
}

SEC("cgroup/connect4")
int rf_own_connect4(struct bpf_sock_addr *ctx)
{
	own_socket(ctx, 1);
	return 1;
}

SEC("cgroup/connect6")
int rf_own_connect6(struct bpf_sock_addr *ctx)
{
	own_socket(ctx, 1);
	return 1;
}

SEC("cgroup/sendmsg4")
int rf_own_sendmsg4(struct bpf_sock_addr *ctx)
{
	own_socket(ctx, 0);
	return 1;
}

SEC("cgroup/sendmsg6")
int rf_own_sendmsg6(struct bpf_sock_addr *ctx)
{
	own_socket(ctx, 0);
	return 1;
}

#endif
