"""The steering XDP program on a real 7.x kernel: attach, mode, restart, upgrade, coexistence.

The master is a netdevsim device, whose driver takes XDP programs in native
(driver) mode unless told not to through debugfs. What the kernel did is
read back with bpftool, not with the binding under test.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cni_netkit.errors import AlreadyExists, PermissionDenied
from cni_netkit.kernel import Kernel, bpf, xsk
from tests.kernel.support import Nsim, del_nsim
from tests.kernel.xsk_support import (
    CHANGED_OBJECT,
    FRAME,
    XDP_PASS,
    XDP_REDIRECT,
    bpf_object,
    bpftool,
    nsim_debugfs,
    outer_map,
    private_root,
    xdp_on,
    xsk_socket,
)

pytestmark = pytest.mark.kernel


@pytest.fixture
def root() -> Iterator[Path]:
    with private_root() as r:
        yield r


def pins(root: Path, nsim: Nsim) -> Path:
    return xsk.master_dir(nsim.name, root)


def test_program_attaches_in_native_mode_on_netdevsim(nsim: Nsim, root: Path) -> None:
    change = xsk.ensure_program(nsim.name, bpf_object(), root=root)

    assert (change.action, change.native_refused) == ("attached", None)
    prog = change.program
    assert prog.mode == "native" and prog.ifindex == nsim.ifindex
    assert xdp_on(nsim.name) == [{"mode": "driver", "id": prog.prog_id}]
    link = bpftool("link", "show", "pinned", str(pins(root, nsim) / "link"))
    assert (link["type"], link["prog_id"], link["id"]) == ("xdp", prog.prog_id, prog.link_id)
    outer = bpftool("map", "show", "pinned", str(pins(root, nsim) / "xsk_maps"))
    assert (outer["type"], outer["max_entries"]) == ("array_of_maps", xsk.XSK_QUEUES)
    assert outer["id"] in bpftool("prog", "show", "id", str(prog.prog_id))["map_ids"]

    # Uninstall: unpinning the link detaches the program; the maps' pins go too.
    assert xsk.remove_program(nsim.name, root=root)
    assert xdp_on(nsim.name) == [] and not pins(root, nsim).exists()
    assert not xsk.remove_program(nsim.name, root=root)


def test_driver_refusing_native_xdp_gets_generic_mode(
    make_nsim: Callable[[int], Nsim], root: Path
) -> None:
    nsim = make_nsim(4)
    nsim_debugfs(nsim.id, "bpf_xdpdrv_accept").write_text("0")

    change = xsk.ensure_program(nsim.name, bpf_object(), root=root)

    assert change.program.mode == "generic"
    assert change.native_refused is not None
    assert "Operation not supported" in change.native_refused
    assert xdp_on(nsim.name) == [{"mode": "generic", "id": change.program.prog_id}]


def test_agent_restart_leaves_program_link_and_wiring_untouched(nsim: Nsim, root: Path) -> None:
    first = xsk.ensure_program(nsim.name, bpf_object(), root=root)
    xsk_map = xsk.create_map(root / "pods" / "ns" / "pod" / "afxdp:c1:net1")
    xsk.wire(nsim.name, xsk_map, [xsk.XskSlot(2, 1)], root=root)

    again = xsk.ensure_program(nsim.name, bpf_object(), root=root)

    assert again.action == "unchanged"
    assert again.program == first.program  # same program, link, maps and mode
    assert xdp_on(nsim.name) == [{"mode": "driver", "id": first.program.prog_id}]
    assert outer_map(pins(root, nsim) / "xsk_maps") == {2: xsk_map.map_id}


def test_object_built_from_changed_source_replaces_the_program_in_place(
    nsim: Nsim, root: Path
) -> None:
    first = xsk.ensure_program(nsim.name, bpf_object(), root=root).program
    xsk_map = xsk.create_map(root / "pods" / "ns" / "pod" / "afxdp:c1:net1")
    xsk.wire(nsim.name, xsk_map, [xsk.XskSlot(2, 1)], root=root)
    sock = xsk_socket()
    xsk.insert_socket(xsk_map.path, 1, sock.fileno())

    change = xsk.ensure_program(nsim.name, bpf_object(CHANGED_OBJECT), root=root)

    assert change.action == "replaced"
    new = change.program
    # One link, updated in place: the master was never without a program.
    assert new.link_id == first.link_id and new.mode == "native"
    assert new.prog_id != first.prog_id and new.tag != first.tag
    assert new.outer_map_id == first.outer_map_id
    assert xdp_on(nsim.name) == [{"mode": "driver", "id": new.prog_id}]
    assert bpftool("link", "show", "pinned", str(pins(root, nsim) / "link"))["prog_id"] == (
        new.prog_id)
    # The pinned maps were reused: the attachment is still wired and steered...
    assert outer_map(pins(root, nsim) / "xsk_maps") == {2: xsk_map.map_id}
    assert xsk.verdict(nsim.name, 2, FRAME, root=root) == XDP_REDIRECT
    # ... by the new code, which counts the frames it sees per queue.
    (seen,) = [m for m in bpftool("prog", "show", "id", str(new.prog_id))["map_ids"]
               if bpftool("map", "show", "id", str(m))["name"] == "xsk_seen"]
    entry = bpftool("map", "lookup", "id", str(seen), "key", "2", "0", "0", "0")
    assert entry["formatted"]["value"] == 1
    assert xsk.ensure_program(nsim.name, bpf_object(CHANGED_OBJECT), root=root).action == (
        "unchanged")


def test_link_update_only_replaces_the_program_it_expects(nsim: Nsim, root: Path) -> None:
    first = xsk.ensure_program(nsim.name, bpf_object(), root=root).program
    with bpf.BpfObject(bpf_object(CHANGED_OBJECT)) as obj:
        obj.pin_map(xsk.OUTER_MAP, str(pins(root, nsim) / xsk.OUTER_MAP))
        obj.pin_map(xsk.SLOT_MAP, str(pins(root, nsim) / xsk.SLOT_MAP))
        obj.load()
        new_fd = obj.prog_fd(xsk.PROGRAM)
    link_fd = bpf.obj_get(str(pins(root, nsim) / "link"))
    try:
        # Expecting a program the link does not run (someone updated it meanwhile): refused.
        with pytest.raises(PermissionDenied):
            bpf.link_update(link_fd, new_fd, expected_prog_fd=new_fd)
    finally:
        os.close(link_fd)
        os.close(new_fd)
    assert xdp_on(nsim.name) == [{"mode": "driver", "id": first.prog_id}]


def test_foreign_xdp_program_is_never_replaced(nsim: Nsim, root: Path) -> None:
    subprocess.run(["ip", "link", "set", "dev", nsim.name, "xdpgeneric", "obj",
                    bpf_object(CHANGED_OBJECT), "sec", "xdp"], check=True)
    (foreign,) = xdp_on(nsim.name)

    with pytest.raises(AlreadyExists) as refused:
        xsk.ensure_program(nsim.name, bpf_object(), root=root)

    assert f"XDP program id {foreign['id']}" in refused.value.details
    assert xdp_on(nsim.name) == [foreign]
    state = xsk.program(nsim.name, root=root)
    assert not state.attached and state.other_prog_id == foreign["id"]


def test_recreated_master_is_reported_without_program_until_reattached(
    make_nsim: Callable[[int], Nsim], kernel: Kernel, root: Path
) -> None:
    old = make_nsim(4)
    first = xsk.ensure_program(old.name, bpf_object(), root=root).program
    name = old.name
    del_nsim(old)  # the driver went away: the link is left without a device
    new = make_nsim(4)
    kernel.set_link(new.ifindex, up=False)
    kernel.set_link(new.ifindex, name=name)
    kernel.set_link(new.ifindex, up=True)

    lost = xsk.program(name, root=root)
    assert lost.steering and not lost.attached and lost.ifindex == new.ifindex
    assert xdp_on(name) == []

    # The agent's pass: re-attached because it is missing, and only then.
    change = xsk.reconcile(name, bpf_object(), startup=False, root=root)
    assert change is not None
    assert change.action == "attached" and change.program.mode == "native"
    assert xsk.reconcile(name, bpf_object(), startup=False, root=root) is None
    assert change.program.link_id != first.link_id
    assert change.program.outer_map_id == first.outer_map_id  # the maps outlived the device
    assert xsk.verdict(name, 1, FRAME, root=root) == XDP_PASS
