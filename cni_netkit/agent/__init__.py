"""The node agent (``cni-netkit agent``, run by the DaemonSet).

It installs the host artifact, probes the kernel and the masters, prepares
the NICs (RSS spread, ntuple steering), publishes pools and leases to the
Kubernetes API and garbage-collects leases of pods that are gone. It is the
only package that imports ``kubernetes`` (in ``k8s``), and it never touches
the data plane of a running pod: a restart adopts what the kernel holds.
"""
