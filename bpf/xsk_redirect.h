/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The maps of the per-master XDP program: the ABI between the program, the
 * node agent (which pins them) and the CNI plugin (which wires attachments
 * into them).  A new program replaces an attached one in place only if it
 * keeps these definitions: the agent reuses the pinned maps, and libbpf
 * refuses a pinned map whose type, sizes or flags differ.
 *
 * Mirrored in cni_netkit/kernel/xsk.py (XSK_SLOTS, XSK_QUEUES and the map
 * names); tests/unit/test_xsk_abi.py keeps the two in step.
 */
#ifndef CNI_NETKIT_XSK_REDIRECT_H
#define CNI_NETKIT_XSK_REDIRECT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/*
 * Entries of every attachment's XSK map.  The kernel requires each inner map
 * of an array of maps to match the template's max_entries exactly
 * (xsk_map_meta_equal; XSKMAP refuses BPF_F_INNER_MAP), so all attachments
 * share one size.  Index = the queue id on the pod's netkit (1..N), so an
 * attachment can use up to XSK_SLOTS - 1 leased queues.
 */
#define XSK_SLOTS 64

/* Physical RX queue ids the program can steer (0..XSK_QUEUES-1). */
#define XSK_QUEUES 1024

/* The template every attachment's XSK map must match. */
struct xsk_attachment_map {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, XSK_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
};

/* Physical RX queue id -> the XSK map of the attachment that leased it. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, XSK_QUEUES);
	__type(key, __u32);
	__array(values, struct xsk_attachment_map);
} xsk_maps SEC(".maps");

/* Physical RX queue id -> the index of its socket in that XSK map. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XSK_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xsk_slots SEC(".maps");

#endif /* CNI_NETKIT_XSK_REDIRECT_H */
