/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Baselines for the per-frame steering benchmark (bench/steering.py), never
 * loaded by the plugin or the agent:
 *
 * - upstream_xsk: the recipe of the kernel's AF_XDP documentation and of
 *   libxdp's default program, one XSKMAP shared by every socket of the
 *   device, indexed by the RX queue;
 * - bare_pass: an XDP program that does nothing, the floor of any program.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 1024); /* as many as xsk_redirect can steer */
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

SEC("xdp")
int upstream_xsk(struct xdp_md *ctx)
{
	return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
}

SEC("xdp")
int bare_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
