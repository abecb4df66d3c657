"""The KubeVirt network binding plugin: a hook sidecar in the virt-launcher pod.

``cni-netkit kubevirt-binding`` serves KubeVirt's hook sidecar gRPC API on a
unix socket under ``/var/run/kubevirt-hooks/`` (``server``), reads the
leases of the VMI's bound interfaces from the files the launcher pod gets
(``leases``) and rewrites the libvirt domain so QEMU gets an ``af-xdp``
netdev and a virtio-net device for each (``domain``). ``api`` holds the
hooks API's messages and services. The only package that imports grpc or
protobuf (the optional extra ``kubevirt``); nothing else imports it
(import-linter contracts in pyproject.toml). docs/kubevirt.md walks the path.
"""
