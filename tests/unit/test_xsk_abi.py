"""The program's map ABI is written twice, in C (bpf/xsk_redirect.h) and in Python
(cni_netkit.kernel.xsk): the plugin makes maps the program's template must accept."""

from __future__ import annotations

import re
from pathlib import Path

from cni_netkit.kernel import xsk

BPF = Path(__file__).resolve().parents[2] / "bpf"


def define(name: str) -> int:
    (value,) = re.findall(rf"^#define {name} (\d+)$", (BPF / "xsk_redirect.h").read_text(), re.M)
    return int(value)


def test_sizes_match_the_c_header() -> None:
    assert (define("XSK_SLOTS"), define("XSK_QUEUES")) == (xsk.XSK_SLOTS, xsk.XSK_QUEUES)


def test_map_and_program_names_match_the_c_source() -> None:
    header = (BPF / "xsk_redirect.h").read_text()
    for name in (xsk.OUTER_MAP, xsk.SLOT_MAP):
        assert re.search(rf'^}} {name} SEC\("\.maps"\);$', header, re.M), name
    program = (BPF / "xsk_redirect.bpf.c").read_text()
    assert re.search(rf"^int {xsk.PROGRAM}\(struct xdp_md \*ctx\)$", program, re.M)
    # BPF object names are cut at 15 characters: ours must fit to be found again.
    assert max(len(n) for n in (xsk.OUTER_MAP, xsk.SLOT_MAP, xsk.PROGRAM)) <= 15
