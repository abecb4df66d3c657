"""Per-attachment XSK maps on a real 7.x kernel: pinning, wiring, isolation, unwiring.

"Where would this frame go" is asked of the attached program itself with
BPF_PROG_TEST_RUN on the netdevsim master's RX queue: XDP_REDIRECT means a
socket sits at that queue's slot, XDP_PASS means none does. The sockets are
real AF_XDP sockets (unbound: an XSK map takes any with an RX ring).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_netkit.errors import InvalidRequest, KernelError
from cni_netkit.kernel import bpf, xsk
from tests.kernel.support import Nsim
from tests.kernel.xsk_support import (
    FRAME,
    XDP_PASS,
    XDP_REDIRECT,
    bpf_object,
    bpftool,
    outer_map,
    private_root,
    slot_map,
    xsk_socket,
)

pytestmark = pytest.mark.kernel


@pytest.fixture
def root(nsim: Nsim) -> Iterator[Path]:
    """A private bpffs root with the program attached to ``nsim``."""
    with private_root() as r:
        xsk.ensure_program(nsim.name, bpf_object(), root=r)
        yield r


def verdicts(nsim: Nsim, root: Path) -> list[int]:
    return [xsk.verdict(nsim.name, q, FRAME, root=root) for q in range(nsim.queues)]


def test_attachment_map_is_pinned_and_wired_by_physical_queue(nsim: Nsim, root: Path) -> None:
    xsk_map = xsk.create_map(root / "pods" / "ns" / "pod" / "afxdp:c1:net1")
    xsk.wire(nsim.name, xsk_map, [xsk.XskSlot(1, 1), xsk.XskSlot(3, 2)], root=root)

    pinned = bpftool("map", "show", "pinned", xsk_map.path)
    assert (pinned["type"], pinned["max_entries"], pinned["id"]) == (
        "xskmap", xsk.XSK_SLOTS, xsk_map.map_id)
    d = xsk.master_dir(nsim.name, root)
    assert outer_map(d / "xsk_maps") == {1: xsk_map.map_id, 3: xsk_map.map_id}
    assert slot_map(d / "xsk_slots") == {1: 1, 3: 2}
    assert xsk.wiring(nsim.name, root=root) == {
        1: xsk.Wiring(1, xsk_map.map_id, 1), 3: xsk.Wiring(3, xsk_map.map_id, 2)}


def test_every_attachment_map_must_have_the_template_size(nsim: Nsim, root: Path) -> None:
    # Why all XSK maps have XSK_SLOTS entries: the kernel compares an inner
    # XSKMAP's max_entries with the template's (xsk_map_meta_equal).
    path = root / "small"
    fd = bpf.map_create(bpf.BPF_MAP_TYPE_XSKMAP, "small", 4, 4, 8)
    try:
        bpf.obj_pin(fd, str(path))
        small = xsk.XskMap(str(path), bpf.map_info(fd).id)
    finally:
        os.close(fd)

    with pytest.raises(InvalidRequest):
        xsk.wire(nsim.name, small, [xsk.XskSlot(1, 1)], root=root)
    assert outer_map(xsk.master_dir(nsim.name, root) / "xsk_maps") == {}


def test_one_pods_map_cannot_redirect_another_pods_queue(nsim: Nsim, root: Path) -> None:
    pod_a = xsk.create_map(root / "pods" / "ns" / "a" / "afxdp:ca:net1")
    xsk.wire(nsim.name, pod_a, [xsk.XskSlot(1, 1)], root=root)
    pod_b = xsk.create_map(root / "pods" / "ns" / "b" / "afxdp:cb:net1")
    xsk.wire(nsim.name, pod_b, [xsk.XskSlot(2, 1)], root=root)
    sock_b = xsk_socket()

    # Pod B writes its socket into every index of the only map it can reach.
    for index in range(xsk.XSK_SLOTS):
        xsk.insert_socket(pod_b.path, index, sock_b.fileno())

    # Only B's own queue goes to a socket; A's queue (no socket of A yet) and
    # an unleased queue still go to the stack.
    assert verdicts(nsim, root) == [XDP_PASS, XDP_PASS, XDP_REDIRECT, XDP_PASS]
    with pytest.raises(KernelError) as beyond:
        xsk.insert_socket(pod_b.path, xsk.XSK_SLOTS, sock_b.fileno())
    assert beyond.value.err == 7  # E2BIG: the map ends at XSK_SLOTS - 1

    # A's own socket, in A's map, is what makes A's queue redirect.
    sock_a = xsk_socket()
    xsk.insert_socket(pod_a.path, 1, sock_a.fileno())
    assert verdicts(nsim, root) == [XDP_PASS, XDP_REDIRECT, XDP_REDIRECT, XDP_PASS]
    assert xsk.clear_socket(pod_a.path, 1)
    assert verdicts(nsim, root) == [XDP_PASS, XDP_PASS, XDP_REDIRECT, XDP_PASS]


def test_unwire_leaves_a_slot_that_points_elsewhere_now(nsim: Nsim, root: Path) -> None:
    old = xsk.create_map(root / "pods" / "ns" / "old" / "afxdp:c1:net1")
    xsk.wire(nsim.name, old, [xsk.XskSlot(1, 1)], root=root)
    # The queue was released and leased again: the new holder wired it.
    new = xsk.create_map(root / "pods" / "ns" / "new" / "afxdp:c2:net1")
    xsk.wire(nsim.name, new, [xsk.XskSlot(1, 1)], root=root)
    outer = xsk.master_dir(nsim.name, root) / "xsk_maps"

    assert xsk.unwire(nsim.name, [1], old.map_id, root=root) == ()
    assert outer_map(outer) == {1: new.map_id}
    assert xsk.unwire(nsim.name, [1], new.map_id, root=root) == (1,)
    assert outer_map(outer) == {}


def test_removing_a_pin_prunes_only_emptied_directories(root: Path) -> None:
    pod = root / "pods" / "ns" / "pod"
    first = xsk.create_map(pod / "net-a:c1:net1")
    xsk.create_map(pod / "net-b:c1:net2")

    assert xsk.remove_map(Path(first.path), prune_below=root)
    assert sorted(p.name for p in pod.iterdir()) == ["net-b:c1:net2"]
    assert xsk.remove_map(pod / "net-b:c1:net2", prune_below=root)
    assert not (root / "pods").exists()
    assert not xsk.remove_map(pod / "net-b:c1:net2", prune_below=root)
