/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Port sets (struct rf_ports): membership and union. */
#ifndef RINGFENCE_LIB_PORTS_H
#define RINGFENCE_LIB_PORTS_H

#include "../abi.h"
#include "parse.h"

static __always_inline int ports_has(const struct rf_ports *ps, __u16 port)
{
	if (ps->any)
		return 1;
#pragma unroll
	for (int i = 0; i < RF_MAX_PORTS; i++) {
		if (i >= ps->n)
			break;
		if (ps->port[i] == port)
			return 1;
	}
	return 0;
}

static __always_inline int ports_empty(const struct rf_ports *ps)
{
	return !ps->any && !ps->n;
}

/* dst |= src. Fails closed: a port that does not fit is left out (and counted by the caller). */
static __always_inline void ports_union(struct rf_ports *dst, const struct rf_ports *src)
{
	if (src->any) {
		dst->any = 1;
		return;
	}
#pragma unroll
	for (int i = 0; i < RF_MAX_PORTS; i++) {
		if (i >= src->n)
			break;
		__u16 p = src->port[i];

		if (ports_has(dst, p))
			continue;
		__u32 n = dst->n;

		if (n >= RF_MAX_PORTS)
			break;
		barrier_var(n);
		dst->port[n & (RF_MAX_PORTS - 1)] = p;
		dst->n = n + 1;
	}
}

#endif
