"""The built image's tests: ``scripts/test-image`` builds the image and runs them.

They need podman and an image (``CNI_NETKIT_IMAGE``), so the ordinary host
suite (``scripts/test``) does not collect them at all rather than skipping
them: a skipped image test would look like a passed one.
"""

from __future__ import annotations

import os

collect_ignore_glob = [] if os.environ.get("CNI_NETKIT_IMAGE") else ["test_*.py"]
