/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * A changed build of bpf/xsk_redirect.bpf.c, for the test that an upgrade
 * replaces the attached program in place: the same maps (so the pinned ones
 * are reused and attachments stay wired), plus a count of the frames seen
 * per RX queue, which the test reads to see the new code run.
 */
#include "xsk_redirect.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XSK_QUEUES);
	__type(key, __u32);
	__type(value, __u64);
} xsk_seen SEC(".maps");

SEC("xdp")
int xsk_redirect(struct xdp_md *ctx)
{
	__u32 queue = ctx->rx_queue_index;
	__u64 *seen;
	__u32 *slot;
	void *xsks;

	seen = bpf_map_lookup_elem(&xsk_seen, &queue);
	if (seen)
		__sync_fetch_and_add(seen, 1);
	xsks = bpf_map_lookup_elem(&xsk_maps, &queue);
	if (!xsks)
		return XDP_PASS;
	slot = bpf_map_lookup_elem(&xsk_slots, &queue);
	if (!slot)
		return XDP_PASS;
	return bpf_redirect_map(xsks, *slot, XDP_PASS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
