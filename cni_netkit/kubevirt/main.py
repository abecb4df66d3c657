"""``cni-netkit kubevirt-binding``: the KubeVirt hook sidecar's entry point.

Run as the binding's ``sidecarImage`` (manifests/examples/kubevirt.yaml):
serves until virt-launcher's v1alpha3 ``Shutdown`` or SIGTERM, then exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
from types import FrameType

from cni_netkit import logs
from cni_netkit.kubevirt import leases, server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--binding", default=env("CNI_NETKIT_BINDING", leases.DEFAULT_BINDING),
                        help="the binding name in the KubeVirt CR and the VMI interfaces "
                             "(default: %(default)s; env CNI_NETKIT_BINDING)")
    parser.add_argument("--hooks-dir", default=server.HOOKS_DIR,
                        help="where virt-launcher looks for hook sockets (default: %(default)s)")
    parser.add_argument("--network-info", default=leases.NETWORK_INFO,
                        help="KubeVirt's downward-API network-info file (default: %(default)s)")
    parser.add_argument("--leases-dir", default=env("CNI_NETKIT_LEASES_DIR", leases.LEASES_DIR),
                        help="where the plugin's cni-netkit-*.json lease files are (the "
                             "NAD's xskMapSubdir as this sidecar mounts it; default: "
                             "%(default)s; env CNI_NETKIT_LEASES_DIR; empty: not read)")
    parser.add_argument("--leases", default=env("CNI_NETKIT_LEASES_FILE"),
                        help="a downward-API file of the pod's netkit.cni.dev/leases "
                             "annotation, when mounted (env CNI_NETKIT_LEASES_FILE)")
    parser.add_argument("--wait", type=float, default=server.Settings.wait,
                        help="seconds to wait for a lease to appear (default: %(default)s)")
    parser.add_argument("--map-dir", default=env("CNI_NETKIT_MAP_DIR"),
                        help="where QEMU's container sees the pin directory, when not at the "
                             "lease's mapPath (env CNI_NETKIT_MAP_DIR)")
    parser.add_argument("--qemu-multiqueue", action="store_true",
                        default=env("CNI_NETKIT_QEMU_MULTIQUEUE", "") == "1",
                        help="give a lease of N queues to QEMU as one queues=N netdev; only "
                             "for a QEMU whose af-xdp netdev reads every queue (10.2 reads "
                             "only the last: docs/kubevirt.md) (env "
                             "CNI_NETKIT_QEMU_MULTIQUEUE=1)")


def main(args: argparse.Namespace) -> int:
    logs.configure("info")  # JSON lines on stderr: the container log
    settings = server.Settings(binding=args.binding, network_info=args.network_info or None,
                               leases=args.leases or None,
                               leases_dir=args.leases_dir or None, wait=args.wait,
                               map_dir=args.map_dir or None,
                               qemu_multiqueue=args.qemu_multiqueue)
    grpc_server, hooks = server.serve(settings, args.hooks_dir)

    def stop(signum: int, _: FrameType | None) -> None:
        logs.get_logger().info("signal received: exiting", signal=signum)
        hooks.shutdown.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    hooks.shutdown.wait()
    grpc_server.stop(grace=1).wait()
    return 0
