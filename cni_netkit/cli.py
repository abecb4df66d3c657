"""``cni-netkit``: the admin command (the CNI executable itself is ``netkit``).

Each subcommand lives in its own module and is imported only when chosen,
so ``cni-netkit agent health`` (a liveness probe run every few seconds) does
not load the Kubernetes client, and a subcommand's heavy imports never slow
another one down.

To add a subcommand, add one line to :data:`SUBCOMMANDS`: its name, the
module, and a one-line help. The module provides
``add_arguments(parser: argparse.ArgumentParser) -> None`` and
``main(args: argparse.Namespace) -> int`` (the exit status).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol, cast

from cni_netkit import __version__


class Subcommand(Protocol):
    """What a subcommand module provides."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def main(self, args: argparse.Namespace) -> int: ...


# name -> (module, help). The registration point for subcommands.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "agent": ("cni_netkit.agent.main", "the node agent (run by the DaemonSet), its health check"),
    "kubevirt-binding": ("cni_netkit.kubevirt.main",
                         "the KubeVirt hook sidecar (the netkit-afxdp network binding)"),
    "leases": ("cni_netkit.admin", "every leased queue of the masters, and whose it is"),
    "queues": ("cni_netkit.admin", "a master's RX queues as the kernel reports them (queue-get)"),
    "status": ("cni_netkit.admin", "can this node lease queues now? (kernel, masters, free pool)"),
}


def _load(module: str) -> Subcommand:
    return cast(Subcommand, importlib.import_module(module))


def parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser, with the arguments of the chosen subcommand only (imports just that one)."""
    parser = argparse.ArgumentParser(prog="cni-netkit", description="cni-netkit admin command")
    parser.add_argument("--version", action="version", version=f"cni-netkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            _load(module).add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``cni-netkit``."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parser_for(args_list).parse_args(args_list)
    return _load(args._module).main(args)


if __name__ == "__main__":
    sys.exit(main())
