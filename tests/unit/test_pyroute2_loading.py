"""The kernel layer loads only the pyroute2 modules it needs, and pyroute2 stays whole."""

import subprocess
import sys

PROBE = """
import sys
from cni_netkit.kernel import Kernel
loaded = {m for m in sys.modules if m.startswith("pyroute2")}
print("ndb" if "pyroute2.ndb.main" in loaded else "lean")
from pyroute2 import NDB, IPRoute  # a package-level name runs the real __init__
print(NDB.__name__, IPRoute.__name__, Kernel.__name__)
"""


def test_kernel_import_skips_pyroute2s_package_init_but_names_still_resolve() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[0] == "lean"
    assert out[1] == "NDB IPRoute Kernel"


def test_an_already_imported_pyroute2_is_left_alone() -> None:
    probe = "import pyroute2, sys\nfrom cni_netkit.kernel import Kernel\n" \
            "print(type(sys.modules['pyroute2']).__name__)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "module"
