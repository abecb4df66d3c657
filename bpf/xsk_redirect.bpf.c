/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * XDP program for a master NIC whose RX queues cni-netkit leases to pods.
 *
 * A netkit refuses XDP programs, so AF_XDP in a pod (QEMU's af-xdp netdev
 * with inhibit=on, a DPDK AF_XDP port) cannot load its own: this program
 * runs on the physical device instead and hands each leased queue's frames
 * to the XSK map of the attachment holding that queue.  Each attachment has
 * its own XSK map, so a pod can only ever place sockets where its own
 * queues' frames go.
 */
#include "xsk_redirect.h"

SEC("xdp")
int xsk_redirect(struct xdp_md *ctx)
{
	__u32 queue = ctx->rx_queue_index;
	__u32 *slot;
	void *xsks;

	xsks = bpf_map_lookup_elem(&xsk_maps, &queue);
	if (!xsks)
		return XDP_PASS; /* not a leased queue: the stack's as usual */
	slot = bpf_map_lookup_elem(&xsk_slots, &queue);
	if (!slot)
		return XDP_PASS;
	/* No socket at that index (yet): the frame goes to the stack. */
	return bpf_redirect_map(xsks, *slot, XDP_PASS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
