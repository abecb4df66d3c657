"""Network namespaces by path: accepted, refused, never created; nsids across netns."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from cni_netkit.errors import InvalidNetns
from cni_netkit.kernel import Kernel

pytestmark = pytest.mark.kernel


def test_check_netns_accepts_named_and_proc_netns(
    kernel: Kernel, make_netns: Callable[[], str]
) -> None:
    kernel.check_netns(make_netns())
    kernel.check_netns("/proc/self/ns/net")


def test_check_netns_rejects_a_plain_file_without_touching_it(
    kernel: Kernel, tmp_path: Path
) -> None:
    plain = tmp_path / "netns"
    plain.write_text("")

    with pytest.raises(InvalidNetns):
        kernel.check_netns(str(plain))

    assert plain.is_file()
    assert not plain.is_mount()


def test_check_netns_rejects_another_namespace_kind(kernel: Kernel) -> None:
    with pytest.raises(InvalidNetns, match="not a network namespace"):
        kernel.check_netns("/proc/self/ns/uts")


def test_missing_netns_is_refused_and_never_created(kernel: Kernel) -> None:
    missing = "/var/run/netns/cnk-test-never-made"

    with pytest.raises(InvalidNetns):
        kernel.check_netns(missing)
    # what pyroute2's netns= would have created on the way: a socket there
    with pytest.raises(InvalidNetns):
        kernel.link("lo", netns=missing)

    assert not Path(missing).exists()


def test_deleted_netns_is_refused(kernel: Kernel, make_netns: Callable[[], str]) -> None:
    pod = make_netns()
    subprocess.run(["ip", "netns", "del", Path(pod).name], check=True)

    with pytest.raises(InvalidNetns):
        kernel.link("lo", netns=pod)
    assert not Path(pod).exists()


def test_netns_id_is_assigned_once_and_seen_back(
    kernel: Kernel, make_netns: Callable[[], str]
) -> None:
    pod = make_netns()
    assert kernel.netns_id(None, netns=pod) is None

    nsid = kernel.ensure_netns_id(None, netns=pod)

    assert kernel.netns_id(None, netns=pod) == nsid
    assert kernel.ensure_netns_id(None, netns=pod) == nsid
