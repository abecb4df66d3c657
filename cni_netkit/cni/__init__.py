"""The CNI protocol layer: environment and stdin in, result or error JSON out.

``entry.main`` is the ``netkit`` executable and the only code that prints.
Config parsing lives in ``cni_netkit.config``, result shapes in
``cni_netkit.result``; this package ties them to the plugin commands.
"""
