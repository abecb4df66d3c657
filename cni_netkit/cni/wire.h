/* Generated from cni_netkit/cni/client.py (c_header); the spec is
 * docs/wire-protocol.md. Do not edit: tests/unit/test_wire.py checks it. */
#ifndef CNI_NETKIT_WIRE_H
#define CNI_NETKIT_WIRE_H

#define WIRE_MAGIC "NKR1"
#define WIRE_DEFAULT_SOCKET "/run/cni-netkit/cni.sock"
#define WIRE_READY 'R'
#define WIRE_REFUSED 'N'
#define WIRE_VIEW 'V'
#define WIRE_GO 'G'
#define WIRE_BEAT '.'
#define WIRE_ANSWER 'A'
#define WIRE_MAX_ENV 65536u
#define WIRE_MAX_META 4096u
#define WIRE_MAX_STDIN 1048577u
#define WIRE_MAX_REFUSAL 4096u
#define WIRE_MAX_REPLY 16777216u
#define WIRE_READY_TIMEOUT_MS 2000
#define WIRE_SILENCE_LIMIT_MS 10000

#endif
