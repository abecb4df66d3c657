"""The host artifact runs on a node with no Python: copied alone, clean environment, via a symlink.

Uses the artifact that ``scripts/build-artifact`` built (``build/artifact``,
or ``$CNI_NETKIT_ARTIFACT``). Without one the tests skip and say so, except
under CI (``CI=true``), where the test command builds it first and a
missing artifact is a failure, not a skip.

The DEL case matters as much as VERSION: VERSION never loads the plugin,
pyroute2 or pydantic, while a DEL for an unknown container goes through
config parsing, the plugin and the kernel seam's imports. An exclusion in
the build script that breaks any of those fails here, not on a node.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cni_netkit import __version__
from cni_netkit.agent.install import install
from cni_netkit.errors import SUPPORTED_VERSIONS

REPO = Path(__file__).resolve().parents[2]
ARTIFACT = Path(os.environ.get("CNI_NETKIT_ARTIFACT") or REPO / "build" / "artifact")

pytestmark = pytest.mark.artifact


@pytest.fixture(scope="module")
def artifact() -> Path:
    if not (ARTIFACT / "netkit").is_file():
        reason = f"no artifact at {ARTIFACT}: run scripts/build-artifact"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI must build it before the tests)")
        pytest.skip(reason)
    return ARTIFACT


@pytest.fixture
def installed(artifact: Path, tmp_path: Path) -> Path:
    """An empty bin dir holding only the artifact, installed the way the agent does it:
    ``netkit -> .netkit-<version>-<hash>/netkit``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    install(artifact, bin_dir, version=__version__)
    return bin_dir


def run_clean(
    exe: Path, env: dict[str, str], stdin: str = "", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run with only ``env``: no PATH to a venv, no PYTHONPATH, no PYTHONHOME."""
    return subprocess.run(
        [str(exe)],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd or "/",
        check=False,
    )


def test_artifact_has_no_python_dependency_on_the_host(artifact: Path) -> None:
    # Everything it loads comes from its own _internal (or the C library).
    for exe in ("netkit", "netkit-plugin"):
        out = subprocess.run(
            ["ldd", str(artifact / exe)], capture_output=True, text=True, check=False
        ).stdout
        assert "libpython" not in out
    assert list((artifact / "_internal").glob("libpython3*.so*"))
    assert not list((artifact / "_internal").rglob("kubernetes")), "the agent's deps leaked in"


def test_netkit_is_the_thin_client_and_the_plugin_sits_beside_it(artifact: Path) -> None:
    # The executable kubelet runs is the C thin client (no interpreter start on the
    # warm path); the PyInstaller build is the plugin it execs.
    netkit, plugin = (artifact / "netkit").read_bytes(), (artifact / "netkit-plugin").read_bytes()
    assert netkit.startswith(b"\x7fELF") and plugin.startswith(b"\x7fELF")
    assert b"CNI_NETKIT_AGENT_SOCKET" in netkit and b"CNI_NETKIT_PLUGIN_EXE" in netkit
    assert b"PyInstaller" not in netkit and b"_MEIPASS" not in netkit
    assert os.access(artifact / "netkit-plugin", os.X_OK)


def test_without_an_agent_the_installed_thin_client_runs_the_plugin(installed: Path) -> None:
    # No socket at the default path on a build machine: every call falls back, quietly.
    res = run_clean(installed / "netkit", {"CNI_COMMAND": "VERSION",
                                          "CNI_NETKIT_AGENT_SOCKET": "/nonexistent/cni.sock"})
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    res = run_clean(installed / "netkit", {"CNI_COMMAND": "VERSION",
                                          "CNI_NETKIT_AGENT_SOCKET": "/dev/null"})
    assert res.returncode == 0, res.stderr  # not a socket: fell back, with a note
    assert "node agent not used" in res.stderr


def test_version_from_a_copy_in_an_empty_dir_with_a_clean_env(installed: Path) -> None:
    (vdir,) = installed.glob(f".netkit-{__version__}-*")
    exe = vdir / "netkit"
    res = run_clean(exe, {"CNI_COMMAND": "VERSION"}, '{"cniVersion": "1.0.0"}')
    assert res.returncode == 0, res.stderr
    reply = json.loads(res.stdout)
    assert reply == {"cniVersion": "1.0.0", "supportedVersions": list(SUPPORTED_VERSIONS)}


def test_version_through_the_symlink_and_from_another_cwd(installed: Path, tmp_path: Path) -> None:
    # kubelet runs /opt/cni/bin/netkit, a symlink into the versioned dir; the
    # bootloader must find _internal next to the link's target, not the link.
    res = run_clean(installed / "netkit", {"CNI_COMMAND": "VERSION"}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["supportedVersions"] == list(SUPPORTED_VERSIONS)
    # ...and through a second, relative symlink elsewhere (a runtime's own bin dir).
    other = tmp_path / "other"
    other.mkdir()
    (other / "netkit").symlink_to(os.path.relpath(installed / "netkit", other))
    res = run_clean(other / "netkit", {"CNI_COMMAND": "VERSION"})
    assert res.returncode == 0, res.stderr


def test_nothing_is_unpacked_into_tmp(installed: Path) -> None:
    # A one-file bundle would extract itself into $TMPDIR on every call
    # (and fail on a noexec /tmp): point TMPDIR at a file that cannot be a dir.
    res = run_clean(installed / "netkit", {"CNI_COMMAND": "VERSION", "TMPDIR": "/dev/null/x"})
    assert res.returncode == 0, res.stderr


def test_del_of_an_unknown_container_loads_the_whole_plugin(
    installed: Path, tmp_path: Path
) -> None:
    conf = {
        "cniVersion": "1.1.0",
        "name": "nk",
        "type": "netkit",
        "master": "eth0",
        "queues": [15],
        "stateDir": str(tmp_path / "state"),
    }
    env = {
        "CNI_COMMAND": "DEL",
        "CNI_CONTAINERID": "c0ffee",
        "CNI_IFNAME": "net1",
        "CNI_NETNS": str(tmp_path / "gone-netns"),
        "CNI_PATH": str(installed),
        "CNI_NETKIT_STATE_DIRS": str(tmp_path / "state"),
    }
    res = run_clean(installed / "netkit", env, json.dumps(conf))
    assert (res.returncode, res.stdout) == (0, ""), res.stdout + res.stderr


def test_errors_come_back_as_cni_json(installed: Path) -> None:
    res = run_clean(installed / "netkit", {"CNI_COMMAND": "ADD"}, "not json")
    assert res.returncode == 1
    reply = json.loads(res.stdout)
    assert isinstance(reply["code"], int) and reply["msg"]


# --- the image builds the same artifact the tests ran (docker cannot run here) -----------


def test_dockerfile_builds_with_the_tested_script_and_installs_where_the_agent_looks() -> None:
    from cni_netkit.agent.main import AgentConfig  # noqa: PLC0415 - only this test needs it

    # A static check on every run of scripts/test; scripts/test-image builds the image for real.
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "scripts/build-artifact /out/artifact\n" in dockerfile
    assert f"COPY --from=builder /out/artifact {AgentConfig(node='n').artifact}" in dockerfile
    # Every path the Dockerfile copies from the context is let through .dockerignore.
    allowed = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = {
        src
        for line in dockerfile.splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for src in line.split()[1:-1]
    }
    assert copied <= allowed, copied - allowed
    assert "scripts/build-shim" in copied  # build-artifact runs it
