"""cni-netkit: a CNI plugin that leases physical NIC RX queues to netkit devices.

Layers (each imports only downwards; an import-linter contract enforces it):
``cni`` (protocol) -> ``plugin`` (what each command does) -> ``kernel`` (the only
pyroute2 user) and ``pool`` (queue choice) -> ``config`` -> ``errors``.
``agent`` is the node agent and the only importer of ``kubernetes``.
"""

__version__ = "0.1.0"
