/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Multicast joins, judged on the job's cgroup (cgroup/setsockopt).
 *
 * Joining a group makes the kernel send an IGMP or MLD report naming the group: the group
 * address is chosen by the job (28 bits in IPv4, 112 in IPv6), and the report is the
 * kernel's own packet, with no job socket, so neither TC nor the cgroup egress backstop can
 * tell it from any other. The join itself is the one place it can be judged: in block mode
 * it is refused with EPERM, in audit mode it is let be; both report it as a flow event to
 * the group (protocol IGMP or ICMPv6, port 0, reason "not-allowed").
 *
 * Included from ringfence.bpf.c (it uses the maps, the job table and emit_flow).
 */
#ifndef RF_SOCKOPT_H
#define RF_SOCKOPT_H

/* Levels and option names (include/uapi/linux/in.h, in6.h, socket.h). Spelled out here:
 * the uapi headers hide some behind libc-compatibility guards. */
#define RF_SOL_IP 0
#define RF_SOL_IPV6 41
#define RF_IP_ADD_MEMBERSHIP 35
#define RF_IP_ADD_SOURCE_MEMBERSHIP 39
#define RF_MCAST_JOIN_GROUP 42
#define RF_MCAST_JOIN_SOURCE_GROUP 46
#define RF_IPV6_ADD_MEMBERSHIP 20 /* also IPV6_JOIN_GROUP */
#define RF_IPV6_JOIN_ANYCAST 27   /* joins the solicited-node group of the address */
#define RF_AF_INET 2
#define RF_AF_INET6 10
#define RF_IPPROTO_IGMP 2
#define RF_IPPROTO_ICMPV6 58
/* Where struct group_req and group_source_req keep gr_group: after the 32-bit interface,
 * aligned to a sockaddr_storage (8 bytes) on 64-bit ABIs. */
#define RF_GR_GROUP 8

/* Copies the 4 (IPv4) or 16 (IPv6) bytes at `off` of the option value into a mapped
 * address; leaves it zero when the value is too short (the kernel then refuses the option
 * itself, and the attempt is still reported). */
static __always_inline void sockopt_addr(struct bpf_sockopt *ctx, __u32 off, int v6, __u8 *dst)
{
	__u8 *v = ctx->optval, *end = ctx->optval_end;

	if (off > 128)
		return;
	if (v6) {
		if (v + off + 16 <= end)
			__builtin_memcpy(dst, v + off, 16);
	} else if (v + off + 4 <= end) {
		__be32 a;

		__builtin_memcpy(&a, v + off, 4);
		v4_mapped(dst, a);
	}
}

/* Whether (level, optname) joins a group; sets *v6 to the family of the group address,
 * *off to where it is in the value (MCAST_* carry a sockaddr whose family says). */
static __always_inline int is_join(struct bpf_sockopt *ctx, int *v6, __u32 *off)
{
	int level = ctx->level, name = ctx->optname;

	if (level == RF_SOL_IP &&
	    (name == RF_IP_ADD_MEMBERSHIP || name == RF_IP_ADD_SOURCE_MEMBERSHIP)) {
		*v6 = 0;
		*off = 0; /* ip_mreq(n), ip_mreq_source: imr_multiaddr first */
		return 1;
	}
	if (level == RF_SOL_IPV6 &&
	    (name == RF_IPV6_ADD_MEMBERSHIP || name == RF_IPV6_JOIN_ANYCAST)) {
		*v6 = 1;
		*off = 0; /* ipv6_mreq: ipv6mr_multiaddr first */
		return 1;
	}
	if ((level == RF_SOL_IP || level == RF_SOL_IPV6) &&
	    (name == RF_MCAST_JOIN_GROUP || name == RF_MCAST_JOIN_SOURCE_GROUP)) {
		__u8 *v = ctx->optval, *end = ctx->optval_end;
		__u16 family = 0;

		if (v + RF_GR_GROUP + 2 <= end)
			__builtin_memcpy(&family, v + RF_GR_GROUP, 2);
		*v6 = family == RF_AF_INET6 || (family != RF_AF_INET && level == RF_SOL_IPV6);
		/* sin_addr after family and port; sin6_addr after family, port, flowinfo. */
		*off = RF_GR_GROUP + (*v6 ? 8 : 4);
		return 1;
	}
	return 0;
}

SEC("cgroup/setsockopt")
int rf_sockopt(struct bpf_sockopt *ctx)
{
	struct pkt p = {};
	struct rf_job *job;
	__u64 cgid, now;
	__u32 off = 0;
	__u8 verdict;
	int v6 = 0;

	if (!is_join(ctx, &v6, &off)) {
		/* Not ours. A value larger than a page is only partly copied for the program;
		 * optlen 0 tells the kernel to use the caller's buffer as it is (otherwise 6.1
		 * fails the call with EFAULT). */
		if (ctx->optlen > 4096)
			ctx->optlen = 0;
		return 1;
	}
	/* Attached to the job's cgroup only: the caller is the job. Unknown (a job already
	 * gone, a cgroup below the job's): refused, there is nothing to judge it by. */
	cgid = bpf_get_current_cgroup_id();
	job = bpf_map_lookup_elem(&jobs, &cgid);
	if (!job)
		return 0;
	sockopt_addr(ctx, off, v6, p.daddr);
	p.family = v6 ? 6 : 4;
	p.proto = v6 ? RF_IPPROTO_ICMPV6 : RF_IPPROTO_IGMP;
	now = bpf_ktime_get_boot_ns();
	verdict = deny(job, 0);
	count(verdict == RF_VERDICT_BLOCKED ? RF_CNT_BLOCKED : RF_CNT_AUDITED);
	emit_flow(job, cgid, &p, now, verdict, RF_REASON_NOT_ALLOWED, RF_DIR_OUTBOUND,
		  RF_SENDER_CALLER, NULL);
	if (verdict == RF_VERDICT_BLOCKED)
		return 0; /* EPERM */
	if (ctx->optlen > 4096)
		ctx->optlen = 0;
	return 1;
}

#endif
