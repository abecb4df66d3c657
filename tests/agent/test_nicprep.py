"""NIC preparation decisions, and their application through a fake of our ethtool seam.

The real RSS/ntuple calls are validated only on hardware (netdevsim has no
such ops); what is pinned here is what we decide to write and what we
promise to restore, plus the exact ethtool CLI invocations (via a stand-in
``ethtool`` executable).
"""

from __future__ import annotations

import errno
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from cni_netkit.agent import nicprep
from cni_netkit.agent.nicprep import (
    NicState,
    NicStateStore,
    RssRecord,
    Steer,
    desired_steering,
    indirection_table,
    plan_rss,
    plan_rules,
)
from cni_netkit.errors import InvalidRequest, NotFound, NotSupported
from cni_netkit.kernel.ethtool import Ethtool, SteeringRule
from cni_netkit.plugin.state import Attachment, LeasedQueue


def default(rings: int, size: int) -> tuple[int, ...]:
    return tuple(i % rings for i in range(size))


def att(mac: str | None, *queues: int, master: str = "eth0", cid: str = "c1") -> Attachment:
    return Attachment(
        container_id=cid,
        ifname="net1",
        netns="/var/run/netns/x",
        network="nk",
        master=master,
        pairing="single",
        mode="l2",
        mac=mac,
        mtu=None,
        queues=tuple(LeasedQueue(i + 1, q) for i, q in enumerate(queues)),
    )


# --- indirection_table -------------------------------------------------------------


def test_table_for_a_pool_at_the_top_matches_ethtool_start_0_equal_k() -> None:
    # `ethtool -X eth0 start 0 equal 15` on 16 rings: every entry in 0..14.
    table = indirection_table(16, 128, {15})
    assert len(table) == 128
    assert set(table) == set(range(15))
    assert 15 not in table


def test_table_only_rewrites_entries_that_point_at_pool_queues() -> None:
    base = default(8, 64)
    table = indirection_table(8, 64, {2, 5}, base)
    for before, after in zip(base, table, strict=True):
        if before not in {2, 5}:
            assert after == before
    assert not {2, 5} & set(table)


def test_table_spreads_the_freed_entries_evenly() -> None:
    table = indirection_table(4, 128, {3})
    counts = [table.count(r) for r in range(3)]
    assert max(counts) - min(counts) <= 1


def test_table_keeps_a_custom_original_shape() -> None:
    # An admin had already taken ring 1 out; we must not put it back.
    original = tuple(r for r in default(4, 16) for r in ([r] if r != 1 else [0]))
    table = indirection_table(4, 16, {3}, original)
    assert 1 not in table and 3 not in table


def test_pool_of_every_ring_is_refused() -> None:
    with pytest.raises(ValueError, match="every RSS ring"):
        indirection_table(4, 16, {0, 1, 2, 3})


def test_pool_ids_beyond_the_ring_count_do_not_matter() -> None:
    assert indirection_table(4, 16, {9, 10}) == default(4, 16)


# --- plan_rss --------------------------------------------------------------------------


def test_first_contact_records_the_table_found_and_writes_the_exclusion() -> None:
    cur = default(16, 128)
    step = plan_rss(cur, 16, {14, 15}, None)
    assert step.write is not None and not {14, 15} & set(step.write)
    assert step.record == RssRecord(16, cur, step.write)


def test_a_table_that_already_excludes_the_pool_is_left_and_not_recorded() -> None:
    cur = indirection_table(16, 128, {15})
    step = plan_rss(cur, 16, {15}, None)
    assert step.write is None and step.record is None  # nothing of ours to restore later


def test_unchanged_pool_is_a_noop() -> None:
    cur = default(16, 128)
    first = plan_rss(cur, 16, {15}, None)
    assert first.write is not None
    again = plan_rss(first.write, 16, {15}, first.record)
    assert again.write is None and not again.reset_to_default
    assert again.record == first.record


def test_shrinking_pool_gives_queues_back_as_they_were() -> None:
    original = default(16, 128)
    grown = plan_rss(original, 16, {12, 13, 14, 15}, None)
    assert grown.write is not None
    shrunk = plan_rss(grown.write, 16, {15}, grown.record)
    assert shrunk.write == indirection_table(16, 128, {15}, original)
    assert shrunk.record is not None and shrunk.record.original == original


def test_empty_pool_restores_the_exact_original() -> None:
    original = tuple(reversed(default(16, 128)))  # a custom table someone set before us
    step = plan_rss(original, 16, {15}, None)
    assert step.write is not None
    restore = plan_rss(step.write, 16, (), step.record)
    assert restore.write == original
    assert restore.record is None


def test_empty_pool_leaves_a_table_someone_changed_after_us() -> None:
    step = plan_rss(default(16, 128), 16, {15}, None)
    theirs = default(8, 128)
    restore = plan_rss(theirs, 16, (), step.record)
    assert restore.write is None and not restore.reset_to_default
    assert restore.record is None and "someone else" in restore.note


def test_table_rewritten_by_someone_becomes_the_new_baseline() -> None:
    step = plan_rss(default(16, 128), 16, {15}, None)
    theirs = default(8, 128)  # an admin limited RSS to rings 0..7 meanwhile
    again = plan_rss(theirs, 16, {7}, step.record)
    assert again.record is not None and again.record.original == theirs


def test_changed_ring_count_restores_the_driver_default() -> None:
    step = plan_rss(default(16, 128), 16, {15}, None)
    assert step.write is not None
    restore = plan_rss(step.write, 8, (), step.record)
    assert restore.reset_to_default and restore.write is None


def test_no_pool_and_no_record_is_nothing() -> None:
    step = plan_rss(default(4, 16), 4, (), None)
    assert step == nicprep.RssStep()


# --- steering decisions ---------------------------------------------------------------


def test_one_rule_per_attachment_mac_on_this_master() -> None:
    steers, conflicts = desired_steering(
        [
            att("02:AA:00:00:00:01", 15),
            att("02:aa:00:00:00:02", 13, 14, cid="c2"),
            att("02:aa:00:00:00:03", 12, master="eth1", cid="c3"),  # another master
            att(None, 11, cid="c4"),  # L3 netkit: no MAC to steer
        ],
        "eth0",
    )
    assert steers == (Steer("02:aa:00:00:00:01", (15,)), Steer("02:aa:00:00:00:02", (13, 14)))
    assert conflicts == ()


def test_a_mac_shared_by_two_attachments_is_not_steered() -> None:
    steers, conflicts = desired_steering(
        [att("02:aa:00:00:00:01", 15), att("02:aa:00:00:00:01", 14, cid="c2")], "eth0"
    )
    assert steers == () and conflicts == ("02:aa:00:00:00:01",)


def test_plan_rules_adds_missing_and_removes_stale_or_moved() -> None:
    owned = [
        SteeringRule("02:aa:00:00:00:01", (15,), rule_id=1023),
        SteeringRule("02:aa:00:00:00:02", (14,), rule_id=1022),  # pod gone
        SteeringRule("02:aa:00:00:00:03", (13,), rule_id=1021),  # now leases queue 12
    ]
    plan = plan_rules(
        [
            Steer("02:AA:00:00:00:01", (15,)),
            Steer("02:aa:00:00:00:03", (12,)),
            Steer("02:aa:00:00:00:04", (11,)),
        ],
        owned,
    )
    assert plan.add == (Steer("02:aa:00:00:00:03", (12,)), Steer("02:aa:00:00:00:04", (11,)))
    assert plan.remove == (owned[1], owned[2])


# --- reconcile through a fake seam ----------------------------------------------------


class FakeEthtool:
    """An RSS-and-ntuple capable NIC, as our seam sees it."""

    def __init__(self, rings: int = 16, size: int = 128, *, ntuple: bool = True) -> None:
        self.rings = rings
        self.size = size
        self.table = default(rings, size)
        self.rules: dict[int, SteeringRule] = {}
        self.ntuple = ntuple
        self.next_id = 1023
        self.writes = 0

    def rx_rings(self, ifname: str) -> int:
        return self.rings

    def rss_table(self, ifname: str) -> tuple[int, ...]:
        return self.table

    def set_rss_table(self, ifname: str, table: Sequence[int] | None) -> None:
        self.writes += 1
        self.table = tuple(table) if table else default(self.rings, self.size)

    def add_steering(self, ifname: str, mac: str, queues: Sequence[int]) -> SteeringRule:
        if not self.ntuple:
            raise NotSupported("ntuple off", err=errno.EOPNOTSUPP)
        rule = SteeringRule(mac, tuple(queues), self.next_id, 1 if len(queues) > 1 else None)
        self.rules[rule.rule_id] = rule
        self.next_id -= 1
        return rule

    def remove_steering(self, ifname: str, rule: SteeringRule) -> bool:
        return self.rules.pop(rule.rule_id, None) is not None


@pytest.fixture
def store(tmp_path: Path) -> NicStateStore:
    return NicStateStore(tmp_path)


def test_reconcile_prepares_and_uninstall_restores_everything(store: NicStateStore) -> None:
    nic = FakeEthtool()
    nic.rules[5] = SteeringRule("02:bb:00:00:00:01", (3,), 5)  # an admin's rule, not ours
    before = nic.table
    rep = nicprep.reconcile(nic, store, "eth0", {14, 15}, [att("02:aa:00:00:00:01", 15)])
    assert rep.rss == "excluded" and rep.rules_added == 1 and rep.steering == "ok"
    assert not {14, 15} & set(nic.table)
    assert [r.queues for r in nic.rules.values() if r.rule_id != 5] == [(15,)]
    saved = store.load("eth0")
    assert saved.rss is not None and saved.rss.original == before
    assert [r.rule_id for r in saved.rules] == [1023]

    rep = nicprep.reconcile(nic, store, "eth0", (), ())
    assert rep.rss == "restored" and rep.rules_removed == 1
    assert nic.table == before
    assert list(nic.rules) == [5]  # theirs survives
    assert not (store.dir / "eth0.json").exists()


def test_reconcile_twice_changes_nothing_the_second_time(store: NicStateStore) -> None:
    nic = FakeEthtool()
    atts = [att("02:aa:00:00:00:01", 15)]
    nicprep.reconcile(nic, store, "eth0", {15}, atts)
    writes, rules = nic.writes, dict(nic.rules)
    rep = nicprep.reconcile(nic, store, "eth0", {15}, atts)
    assert (rep.rss, rep.rules_added, rep.rules_removed) == ("unchanged", 0, 0)
    assert nic.writes == writes and nic.rules == rules


def test_agent_restart_adopts_recorded_rules(tmp_path: Path) -> None:
    nic = FakeEthtool()
    atts = [att("02:aa:00:00:00:01", 15)]
    nicprep.reconcile(nic, NicStateStore(tmp_path), "eth0", {15}, atts)
    rep = nicprep.reconcile(nic, NicStateStore(tmp_path), "eth0", {15}, atts)
    assert rep.rules_added == 0 and len(nic.rules) == 1


def test_pod_gone_removes_its_rule_only(store: NicStateStore) -> None:
    nic = FakeEthtool()
    a, b = att("02:aa:00:00:00:01", 15), att("02:aa:00:00:00:02", 14, cid="c2")
    nicprep.reconcile(nic, store, "eth0", {14, 15}, [a, b])
    rep = nicprep.reconcile(nic, store, "eth0", {14, 15}, [b])
    assert rep.rules_removed == 1
    assert [r.mac for r in nic.rules.values()] == ["02:aa:00:00:00:02"]
    assert [r.mac for r in store.load("eth0").rules] == ["02:aa:00:00:00:02"]


def test_nic_without_ntuple_still_gets_the_rss_exclusion(store: NicStateStore) -> None:
    nic = FakeEthtool(ntuple=False)
    rep = nicprep.reconcile(nic, store, "eth0", {15}, [att("02:aa:00:00:00:01", 15)])
    assert rep.rss == "excluded" and rep.steering == "unsupported"
    assert any("ntuple" in e for e in rep.errors)
    assert 15 not in nic.table


def test_nic_without_rss_is_reported_and_nothing_recorded(store: NicStateStore) -> None:
    class NoRss(FakeEthtool):
        def rss_table(self, ifname: str) -> tuple[int, ...]:
            raise NotSupported("ETHTOOL_GRXFHINDIR", err=errno.EOPNOTSUPP)

    rep = nicprep.reconcile(NoRss(), store, "eth0", {15}, ())
    assert rep.rss == "unsupported"
    assert store.load("eth0") == NicState("eth0")


def test_rule_removed_behind_our_back_is_forgotten(store: NicStateStore) -> None:
    nic = FakeEthtool()
    nicprep.reconcile(nic, store, "eth0", {15}, [att("02:aa:00:00:00:01", 15)])
    nic.rules.clear()  # someone ran ethtool -N delete
    rep = nicprep.reconcile(nic, store, "eth0", {15}, ())
    assert rep.rules_removed == 1 and store.load("eth0").rules == ()


def test_state_file_round_trips(store: NicStateStore) -> None:
    state = NicState(
        "eth0",
        RssRecord(16, None, default(15, 128)),
        (SteeringRule("02:aa:00:00:00:01", (13, 14), 1023, 2),),
    )
    store.save(state)
    assert store.load("eth0") == state
    assert store.masters() == ["eth0"]
    assert json.loads((store.dir / "eth0.json").read_text())["rules"][0]["context"] == 2


# --- the CLI invocations, against a stand-in ethtool ----------------------------------


@pytest.fixture
def fake_cli(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "calls"
    cli = tmp_path / "ethtool"
    cli.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'case "$*" in\n'
        '  *"context new"*) echo "New RSS context is 3" ;;\n'
        '  *"delete 77"*) echo "rmgr: Cannot delete RX class rule: No such file or directory" >&2;'
        " exit 1 ;;\n"
        '  *flow-type*) echo "Added rule with ID 1021" ;;\n'
        "esac\n"
    )
    cli.chmod(0o755)
    return cli, log


def test_cli_single_queue_rule_is_the_upstream_invocation(fake_cli: tuple[Path, Path]) -> None:
    cli, log = fake_cli
    rule = Ethtool(str(cli)).add_steering("eth0", "02:aa:00:00:00:01", [15])
    assert rule == SteeringRule("02:aa:00:00:00:01", (15,), 1021, None)
    assert log.read_text().splitlines() == [
        "-N eth0 flow-type ether dst 02:aa:00:00:00:01 action 15"
    ]


def test_cli_multi_queue_rule_uses_an_rss_context(
    fake_cli: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli, log = fake_cli
    et = Ethtool(str(cli))
    monkeypatch.setattr(et, "rx_rings", lambda ifname: 6)
    rule = et.add_steering("eth0", "02:aa:00:00:00:01", [4, 5])
    assert rule == SteeringRule("02:aa:00:00:00:01", (4, 5), 1021, 3)
    assert log.read_text().splitlines() == [
        "-X eth0 context new weight 0 0 0 0 1 1",
        "-N eth0 flow-type ether dst 02:aa:00:00:00:01 context 3 action 0",
    ]
    assert et.remove_steering("eth0", rule)
    assert log.read_text().splitlines()[-2:] == ["-N eth0 delete 1021", "-X eth0 context 3 delete"]


def test_cli_deleting_a_rule_already_gone_is_not_an_error(fake_cli: tuple[Path, Path]) -> None:
    cli, _ = fake_cli
    assert not Ethtool(str(cli)).remove_steering("eth0", SteeringRule("02:aa::", (1,), 77))


def test_cli_errors_carry_the_errno(tmp_path: Path) -> None:
    cli = tmp_path / "ethtool"
    cli.write_text(
        "#!/bin/sh\necho 'Cannot insert classification rule: "
        "No such file or directory' >&2\nexit 1\n"
    )
    cli.chmod(0o755)
    with pytest.raises(NotFound) as e:
        Ethtool(str(cli)).add_steering("eth0", "02:aa:00:00:00:01", [1])
    assert "Cannot insert" in e.value.details


def test_missing_cli_is_not_supported(tmp_path: Path) -> None:
    with pytest.raises(NotSupported, match="not installed"):
        Ethtool(str(tmp_path / "nope")).add_steering("eth0", "02:aa:00:00:00:01", [1])


def test_cli_rule_failure_deletes_the_context_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "calls"
    cli = tmp_path / "ethtool"
    cli.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'case "$*" in\n'
        '  *"context new"*) echo "New RSS context is 4" ;;\n'
        "  *flow-type*) echo 'Cannot insert classification rule: Invalid argument' >&2; exit 1 ;;\n"
        "esac\n"
    )
    cli.chmod(0o755)
    et = Ethtool(str(cli))
    monkeypatch.setattr(et, "rx_rings", lambda ifname: 4)
    with pytest.raises(InvalidRequest):
        et.add_steering("eth0", "02:aa:00:00:00:01", [2, 3])
    assert log.read_text().splitlines()[-1] == "-X eth0 context 4 delete"
