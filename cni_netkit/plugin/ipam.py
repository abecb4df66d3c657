"""Delegation to the IPAM plugin named in ``ipam.type`` (pair mode only).

The CNI way (libcni's ``DelegateAdd``/``DelegateDel``): execute the plugin
found on ``CNI_PATH`` with our environment and the whole network config on
stdin; it prints a result (ADD) or nothing (DEL), or an error JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cni_netkit.errors import IPAMFailure

_TIMEOUT = 60.0


def find_plugin(name: str, cni_path: Sequence[str]) -> Path:
    """The first executable ``name`` in ``cni_path``."""
    if not name or "/" in name or name in (".", ".."):
        raise IPAMFailure(f"invalid IPAM plugin type {name!r}")
    for d in cni_path:
        candidate = Path(d) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise IPAMFailure(
        f"IPAM plugin {name!r} not found",
        f"searched CNI_PATH={':'.join(cni_path) or '(empty)'}",
    )


def delegate(
    command: str,
    plugin: str,
    netconf: Mapping[str, Any],
    environ: Mapping[str, str],
    cni_path: Sequence[str],
) -> dict[str, Any] | None:
    """Run the IPAM plugin for ``command`` ("ADD"/"DEL"/"CHECK"); ADD returns its result."""
    exe = find_plugin(plugin, cni_path)
    env = {**environ, "CNI_COMMAND": command, "CNI_PATH": ":".join(cni_path)}
    try:
        proc = subprocess.run(
            [str(exe)],
            input=json.dumps(netconf).encode(),
            env=env,
            capture_output=True,
            timeout=_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise IPAMFailure(f"IPAM plugin {plugin} {command} failed to run", str(e)) from e
    out = proc.stdout.strip()
    if proc.returncode != 0:
        raise IPAMFailure(f"IPAM plugin {plugin} {command} failed", _error_text(out, proc.stderr))
    if command != "ADD":
        return None
    try:
        result = json.loads(out)
    except ValueError as e:
        raise IPAMFailure(f"IPAM plugin {plugin} printed no valid result", out[:200].decode(
            "utf-8", "replace")) from e
    if not isinstance(result, dict):
        raise IPAMFailure(f"IPAM plugin {plugin} printed no valid result", repr(result)[:200])
    return result


def _error_text(stdout: bytes, stderr: bytes) -> str:
    """The delegate's CNI error (code, msg, details) or, failing that, its stderr."""
    try:
        err = json.loads(stdout)
        return f"code {err.get('code')}: {err.get('msg')} {err.get('details', '')}".strip()
    except (ValueError, AttributeError):
        return (stderr or stdout).decode("utf-8", "replace").strip()[-500:]
