"""Load only the pyroute2 modules the kernel layer uses.

pyroute2 0.9.7's package ``__init__`` imports every feature it has (NDB,
IPDB, nftables, wireless, ...) before any submodule can load. A CNI command
pays that on every cold start: ~35 ms on a host, about a second in the test
VM. ``install()`` registers ``pyroute2`` as a package whose ``__init__`` has
not run yet, so ``pyroute2.iproute.linux`` and friends load on their own.

It stays a faithful pyroute2: the first access to a package-level name
(``from pyroute2 import NDB`` anywhere in the process) runs the real
``__init__`` right then. If pyroute2 is already imported, nothing changes.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any


class _DeferredPackage(types.ModuleType):
    """``pyroute2`` with its ``__init__`` deferred until a package-level name is needed."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)  # e.g. __all__ probes must not load everything
        # `from pyroute2 import config` asks for the attribute before importing
        # the submodule: a submodule is just imported.
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:
            return importlib.import_module(f"pyroute2.{name}")
        # A package-level name (IPRoute, NDB, ...): run the real __init__ once,
        # then behave as the ordinary module it is.
        spec = self.__spec__
        object.__setattr__(self, "__class__", types.ModuleType)
        if spec is not None and spec.loader is not None:
            spec.loader.exec_module(self)
        return getattr(self, name)


def install() -> None:
    """Make ``import pyroute2.<submodule>`` skip the package ``__init__`` (see module doc)."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.submodule_search_locations is None:
        return  # let the real import report the missing package
    pkg = _DeferredPackage("pyroute2")
    pkg.__spec__ = spec
    pkg.__file__ = spec.origin
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__package__ = "pyroute2"
    sys.modules["pyroute2"] = pkg
