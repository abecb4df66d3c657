"""libvirt's own RNG schemas, through Debian's ``virt-xml-validate`` (libvirt-clients)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path


def assert_valid_domain(xml: bytes) -> None:
    """Fail unless ``virt-xml-validate`` accepts ``xml`` as a libvirt domain."""
    program = shutil.which("virt-xml-validate")
    assert program, "virt-xml-validate missing: scripts/host-packages install test"
    with tempfile.NamedTemporaryFile(suffix=".xml") as f:
        Path(f.name).write_bytes(xml)
        done = subprocess.run([program, f.name, "domain"], capture_output=True, text=True,
                              check=False)
    assert done.returncode == 0, f"libvirt's schema refuses the domain:\n{done.stderr}\n{xml!r}"
