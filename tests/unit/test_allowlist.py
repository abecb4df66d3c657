"""Closed by default: ADD leases only what the node's admin declared (plugin.allowlist).

The declaration (the agent's pool file, ``CNI_NETKIT_MASTERS``, both), the
file's trust checks, and the RSS decision, against the fake of our kernel
seam. The same refusals through the real executable and the agent's warm
path on the 7.2 kernel: tests/e2e/test_closed_default.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.config import Invocation, parse_invocation
from cni_netkit.errors import InvalidConfig, NoSuchDevice
from cni_netkit.plugin import allowlist, commands
from cni_netkit.plugin.allowlist import DeclaredPool
from cni_netkit.plugin.state import StateStore
from tests.unit.fake_kernel import POD, FakeKernel


def inv(command: str, state: Path, **conf: Any) -> Invocation:
    c = {"cniVersion": "1.1.0", "name": "afxdp", "type": "netkit", "master": "eth0",
         "queues": "8-15", "stateDir": str(state), **conf}
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_NETNS": POD,
           "CNI_IFNAME": "net1", "CNI_PATH": "", "CNI_NETKIT_STATE_DIRS": str(state)}
    return parse_invocation(env, json.dumps(c).encode())


def refused(kernel: FakeKernel, state: Path, **conf: Any) -> InvalidConfig:
    """ADD is refused with 7, and nothing was touched: no device, lease, record or request."""
    before = list(kernel.devices)
    with pytest.raises(InvalidConfig) as e:
        commands.add(inv("ADD", state, **conf), kernel)
    assert e.value.code == 7
    assert list(kernel.devices) == before
    assert kernel.leased_master_queues() == {}
    assert list(StateStore(state)) == []
    assert not (state / "records").exists() or not any((state / "records").iterdir())
    touching = {"create_netkit", "queue_create", "set_link", "move_link", "ensure_netns_id"}
    assert touching.isdisjoint(kernel.calls)
    return e.value


def declare(state: Path, *pools: DeclaredPool) -> Path:
    return allowlist.write(state, pools)


# --- neither, either, both -------------------------------------------------------------


def test_with_nothing_declared_add_is_refused_naming_what_to_configure(
    kernel: FakeKernel, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CNI_NETKIT_MASTERS")
    err = refused(kernel, state)
    assert err.msg == "no master is declared for leasing on this node"
    assert "cni-netkit-pools" in err.details and "CNI_NETKIT_MASTERS" in err.details
    assert str(Path("<stateDir>") / "policy" / "pools.json") in err.details


def test_an_undeclared_master_is_refused(
    kernel: FakeKernel, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CNI_NETKIT_MASTERS", "eth1=8-15")
    err = refused(kernel, state)
    assert err.msg == "master eth0 is not a NIC this node leases queues of"
    assert "declared: eth1 (by the node's CNI_NETKIT_MASTERS)" in err.details


def test_the_primary_nic_undeclared_is_refused(
    kernel: FakeKernel, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The node's own uplink exists and has queues, but nobody set any aside.
    uplink = dataclasses.replace(FakeKernel(master="ens3").master.link, index=99)
    kernel._add(uplink, None)  # a second host NIC
    assert kernel.link("ens3") is not None and kernel.link("eth0") is not None
    monkeypatch.setenv("CNI_NETKIT_MASTERS", "eth0=8-15")
    assert refused(kernel, state, master="ens3").msg.startswith("master ens3 is not")


def test_an_undeclared_queue_of_a_declared_master_is_refused(
    kernel: FakeKernel, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CNI_NETKIT_MASTERS", "eth0=8-11,14")
    err = refused(kernel, state, queues="8-15")
    assert err.msg == "queues 12-13,15 of eth0 are not declared for leasing"
    assert "declared on eth0: 8-11,14" in err.details


@pytest.mark.parametrize("masters", ["", "garbage", "eth0", "eth0=x", "eth0=5-1", "a/b=1"])
def test_a_malformed_masters_setting_declares_nothing(
    kernel: FakeKernel, state: Path, monkeypatch: pytest.MonkeyPatch, masters: str
) -> None:
    monkeypatch.setenv("CNI_NETKIT_MASTERS", masters)
    assert refused(kernel, state).msg.startswith("master eth0 is not")


def test_the_agents_pools_alone_declare(
    kernel: FakeKernel, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CNI_NETKIT_MASTERS")
    declare(state, DeclaredPool("eth0", frozenset(range(8, 16)), kernel.master.link.index))
    res = commands.add(inv("ADD", state), kernel)
    assert res.netkit is not None
    assert set(kernel.leased_master_queues()) <= set(range(8, 16))


def test_the_environment_narrows_the_agents_pools(
    kernel: FakeKernel, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    declare(state, DeclaredPool("eth0", frozenset(range(8, 16)), kernel.master.link.index),
            DeclaredPool("eth1", frozenset(range(16))))
    monkeypatch.setenv("CNI_NETKIT_MASTERS", "eth0=12-15;eth2=0-3")
    err = refused(kernel, state, queues="8-15")
    assert err.msg == "queues 8-11 of eth0 are not declared for leasing"
    assert "narrowed by the node's CNI_NETKIT_MASTERS" in err.details
    commands.add(inv("ADD", state, queues="12-15"), kernel)
    assert set(kernel.leased_master_queues()) <= {12, 13, 14, 15}


def test_a_master_declared_only_in_one_of_the_two_is_refused(
    kernel: FakeKernel, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    declare(state, DeclaredPool("eth1", frozenset(range(16))))
    monkeypatch.setenv("CNI_NETKIT_MASTERS", "eth0=0-15")
    assert refused(kernel, state).msg.startswith("master eth0 is not")


def test_a_master_replaced_since_the_agent_declared_it_is_refused(
    kernel: FakeKernel, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CNI_NETKIT_MASTERS")
    declare(state, DeclaredPool("eth0", frozenset(range(16)), kernel.master.link.index + 40))
    err = refused(kernel, state)
    assert "declared as ifindex" in err.msg and "renamed or replaced" in err.details


@pytest.mark.parametrize("command", ["DEL", "CHECK"])
def test_an_attachment_outlives_its_declaration(
    kernel: FakeKernel, state: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    # An admin narrowing the list must never strand a pod's DEL (nor fail its CHECK).
    prev = commands.add(inv("ADD", state), kernel).encode("1.1.0")
    monkeypatch.setenv("CNI_NETKIT_MASTERS", "eth1=0-3")
    declare(state, DeclaredPool("eth1", frozenset({0})))
    commands.run(inv(command, state, prevResult=prev), kernel)
    if command == "DEL":
        assert kernel.leased_master_queues() == {} and list(StateStore(state)) == []


def test_gc_and_status_ignore_the_declaration(
    kernel: FakeKernel, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands.add(inv("ADD", state), kernel)
    monkeypatch.delenv("CNI_NETKIT_MASTERS")
    (state / "policy").mkdir(mode=0o755, exist_ok=True)
    (state / "policy" / "pools.json").write_text("not json")  # even a broken list
    commands.run(inv("STATUS", state), kernel)
    gc = inv("GC", state).raw | {"cni.dev/valid-attachments": []}
    env = {"CNI_COMMAND": "GC", "CNI_PATH": "", "CNI_NETKIT_STATE_DIRS": str(state)}
    commands.run(parse_invocation(env, json.dumps(gc).encode()), kernel)
    assert kernel.leased_master_queues() == {} and list(StateStore(state)) == []


# --- the RSS decision ---------------------------------------------------------------------


def test_a_queue_in_the_default_rss_table_is_refused_though_declared(
    kernel: FakeKernel, state: Path
) -> None:
    kernel.rss["eth0"] = tuple(i % 16 for i in range(128))  # the driver's default spread
    err = refused(kernel, state)
    assert err.msg == "queues 8-15 of eth0 carry the NIC's default RSS traffic"
    assert "agent's pool" in err.details


def test_a_declared_queue_the_agent_took_out_of_rss_is_leasable(
    kernel: FakeKernel, state: Path
) -> None:
    from cni_netkit.agent.nicprep import indirection_table  # noqa: PLC0415

    kernel.rss["eth0"] = indirection_table(16, 128, range(8, 16))  # what nicprep writes
    assert 8 not in kernel.rss["eth0"] and 7 in kernel.rss["eth0"]
    commands.add(inv("ADD", state), kernel)
    assert len(kernel.leased_master_queues()) == 1


def test_a_partly_excluded_pool_is_refused_naming_the_queues_left_in_rss(
    kernel: FakeKernel, state: Path
) -> None:
    kernel.rss["eth0"] = tuple(i % 13 for i in range(128))  # rings 0-12 spread
    assert refused(kernel, state).msg.startswith("queues 8-12 of eth0 carry")


def test_a_nic_without_an_rss_table_is_trusted_on_the_declaration(
    kernel: FakeKernel, state: Path
) -> None:
    # netdevsim's answer (EOPNOTSUPP -> None): the kernel has no spread to tell of.
    assert "eth0" not in kernel.rss
    commands.add(inv("ADD", state), kernel)
    assert "rss_table" in kernel.calls


def test_an_rss_table_that_cannot_be_read_refuses_the_add(
    kernel: FakeKernel, state: Path
) -> None:
    kernel.fail["rss_table"] = NoSuchDevice("ETHTOOL_GRXFHINDIR on eth0", "ENODEV")
    err = refused(kernel, state)
    assert err.msg == "cannot tell whether queues of eth0 carry the node's RSS traffic"


# --- the file: written by the agent, trusted only when root's alone --------------------


def test_the_agent_writes_it_atomically_root_only_and_versioned(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = declare(state, DeclaredPool("eth1", frozenset({8, 9}), 5))
    assert path == state / "policy" / "pools.json"
    st, dst = path.stat(), path.parent.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o644)
    assert (dst.st_uid, dst.st_mode & 0o7777) == (0, 0o755)
    doc = json.loads(path.read_text())
    assert doc == {"version": 1, "generation": 1,
                   "pools": [{"master": "eth1", "ifindex": 5, "queues": [8, 9]}]}
    assert [p.name for p in path.parent.iterdir()] == ["pools.json"]  # no temp file left
    declare(state, DeclaredPool("eth1", frozenset({8, 9}), 5))
    assert json.loads(path.read_text())["generation"] == 1  # unchanged: not rewritten
    declare(state, DeclaredPool("eth1", frozenset({8}), 5))
    assert json.loads(path.read_text())["generation"] == 2
    assert allowlist.read(path) == {"eth1": DeclaredPool("eth1", frozenset({8}), 5)}
    assert allowlist.withdraw(state) and allowlist.read(path) is None


def _policy(tmp_path: Path) -> Path:
    return declare(tmp_path / "state", DeclaredPool("eth0", frozenset({8})))


def _untrusted(path: Path, why: str) -> None:
    with pytest.raises(InvalidConfig, match="refusing to trust it") as e:
        allowlist.read(path)
    assert why in e.value.msg, e.value.msg


def test_a_file_not_owned_by_root_is_refused(tmp_path: Path) -> None:
    path = _policy(tmp_path)
    os.chown(path, 1234, 0)
    _untrusted(path, "is owned by uid 1234, not root")


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_a_file_writable_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = _policy(tmp_path)
    path.chmod(mode)
    _untrusted(path, f"writable by group or others (mode {mode:04o})")


def test_a_policy_directory_not_roots_alone_is_refused(tmp_path: Path) -> None:
    path = _policy(tmp_path)
    path.parent.chmod(0o775)
    _untrusted(path, "policy is writable by group or others (mode 0775)")
    path.parent.chmod(0o755)
    os.chown(path.parent, 1234, 1234)
    _untrusted(path, "policy is owned by uid 1234")


def test_a_directory_above_it_writable_by_others_is_refused(tmp_path: Path) -> None:
    path = _policy(tmp_path)
    (tmp_path / "state").chmod(0o777)
    _untrusted(path, "state is writable by group or others (mode 0777)")
    (tmp_path / "state").chmod(0o1777)  # sticky: others cannot rename root's entries
    assert allowlist.read(path) is not None


def test_a_symlinked_file_is_refused_even_to_a_good_file(tmp_path: Path) -> None:
    path = _policy(tmp_path)
    good = path.parent / "elsewhere.json"
    path.rename(good)
    path.symlink_to(good)
    _untrusted(path, "is a symlink")


def test_a_symlinked_policy_directory_is_refused(tmp_path: Path) -> None:
    path = _policy(tmp_path)
    real = tmp_path / "real-policy"
    path.parent.rename(real)
    path.parent.symlink_to(real)
    _untrusted(path, "policy is a symlink")


def test_a_non_regular_file_is_refused(tmp_path: Path) -> None:
    path = _policy(tmp_path)
    path.unlink()
    os.mkfifo(path, 0o644)
    _untrusted(path, "is not a regular file")


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"version": 2, "pools": []}', "version 2"),
        ('{"version": 1}', '"pools" must be a list'),
        ('{"version": 1, "pools": [{"queues": [1]}]}', "pools[0] needs a master"),
        ('{"version": 1, "pools": [{"master": "eth0", "queues": "5-1"}]}', "reversed"),
        ('{"version": 1, "pools": [{"master": "eth0", "queues": []}]}', "empty"),
        ('{"version": 1, "pools": [{"master": "eth0", "queues": [1], "ifindex": "7"}]}',
         "ifindex"),
        ('{"version": 1, "pools": [{"master": "e", "queues": [1]}, '
         '{"master": "e", "queues": [2]}]}', "listed twice"),
    ],
)
def test_a_malformed_file_fails_closed(tmp_path: Path, content: str, why: str) -> None:
    path = _policy(tmp_path)
    path.write_text(content)
    with pytest.raises(InvalidConfig, match="is malformed") as e:
        allowlist.read(path)
    assert why in e.value.msg


def test_an_untrusted_file_refuses_the_add_even_with_the_environment_set(
    kernel: FakeKernel, state: Path
) -> None:
    path = declare(state, DeclaredPool("eth0", frozenset(range(16))))
    path.chmod(0o666)
    err = refused(kernel, state)  # CNI_NETKIT_MASTERS declares eth0 too: fail closed
    assert "refusing to trust it" in err.msg
