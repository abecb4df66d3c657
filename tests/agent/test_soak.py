"""The soak's no-leak invariants on a bounded number of warm cycles (issue 13 item 4).

The real agent server over its unix socket, the real thin C client, the fake
of our kernel seam inside the agent (``bench/soak.py`` explains the set-up;
``scripts/soak`` runs the 10 000-cycle version and prints the figures).
Counts only, never times or bytes: the agent's open fds (by kind) and
threads do not change between the sample after the first cycles and the
last; no record, device-info file, host-local address, device, lease or
netns handle is left; every call succeeded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import HOST_LOCAL_DIR, SHIM, Sample, Soak

CYCLES = 120  # ~15 s on a loaded host; half of them pair mode (with host-local when present)
BASELINE = 20


def test_warm_add_del_cycles_through_the_agent_leak_nothing(tmp_path: Path) -> None:
    if not SHIM.is_file():
        pytest.fail(f"no thin client at {SHIM}: scripts/bootstrap builds it (scripts/build-shim)")
    soak = Soak(tmp_path, client="shim", ipam=(HOST_LOCAL_DIR / "host-local").is_file())
    soak.start()
    try:
        soak.run(CYCLES, baseline=BASELINE, every=CYCLES)
    finally:
        soak.stop()
    assert soak.failures == []
    assert soak.calls == 2 * CYCLES
    assert [s.cycle for s in soak.samples] == [BASELINE, CYCLES]
    assert soak.leaks() == []
    last = soak.samples[-1]
    assert last.fd_kinds.get("socket") == 1  # the listening socket: no connection kept
    assert soak.proc is not None and soak.proc.returncode == 0  # SIGTERM: a clean close


def sample(cycle: int, **over: object) -> Sample:
    values: dict[str, object] = dict(
        cycle=cycle, rss_kb=40_000, hwm_kb=40_000, threads=3, fds=4,
        fd_kinds={"file": 3, "socket": 1}, records=0, devinfo=0, ipam_addresses=0, lock_files=1,
        kernel={"devices": 0, "leases": 0, "netns_ids": 4, "open_netns": 0})
    values.update(over)
    return Sample(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(("over", "found"), [
    ({"fds": 5, "fd_kinds": {"file": 3, "socket": 2}}, "fds: 4 after 20 cycles, 5 after 120"),
    ({"threads": 4}, "threads: 3 after 20 cycles, 4 after 120"),
    ({"records": 1}, "records left: 1"),
    ({"ipam_addresses": 2}, "ipam_addresses left: 2"),
    ({"kernel": {"devices": 1, "leases": 0, "netns_ids": 4, "open_netns": 0}},
     "fake kernel devices left: 1"),
    ({"kernel": {"devices": 0, "leases": 0, "netns_ids": 4, "open_netns": 2}},
     "fake kernel open_netns left: 2"),
    ({"kernel": {"devices": 0, "leases": 0, "netns_ids": 9, "open_netns": 0}},
     "netns ids: 9 for 4 pod netns"),
])
def test_the_soak_reports_each_kind_of_leak(tmp_path: Path, over: dict[str, object],
                                            found: str) -> None:
    soak = Soak(tmp_path)
    soak.samples = [sample(20), sample(120, **over)]
    assert found in soak.leaks()
    soak.samples = [sample(20), sample(120)]
    assert soak.leaks() == []
