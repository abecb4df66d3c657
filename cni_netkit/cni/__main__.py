"""``python -m cni_netkit.cni``: the ``netkit`` executable, for tests and debugging."""

from cni_netkit.cni.entry import main

main()
