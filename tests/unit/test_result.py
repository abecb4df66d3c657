"""The CNI result: each version's exact shape, parsing results back, and chaining."""

from __future__ import annotations

from typing import Any

import pytest

from cni_netkit import errors
from cni_netkit.result import (
    DNS,
    Interface,
    IPConfig,
    NetkitQueue,
    NetkitResult,
    Result,
    Route,
    error_json,
    version_json,
)

# A pair-mode ADD with IPAM: host side, pod side, one IPv4 and one IPv6 address.
PAIR = Result(
    interfaces=(
        Interface(name="nk0123456789abc", mac="aa:bb:cc:00:00:01", mtu=1500),
        Interface(
            name="net1",
            mac="02:00:00:00:00:01",
            mtu=1500,
            sandbox="/var/run/netns/pod1",
            socket_path="/run/x.sock",
            pci_id="0000:01:00.0",
        ),
    ),
    ips=(
        IPConfig(address="10.1.0.5/24", gateway="10.1.0.1", interface=1),
        IPConfig(address="fd00::5/64", interface=1),
    ),
    routes=(
        Route(dst="0.0.0.0/0", gw="10.1.0.1", mtu=1400, advmss=1360, priority=10, table=0, scope=0),
        Route(dst="fd00:1::/64"),
    ),
    dns=DNS(
        nameservers=("10.1.0.53",), domain="cluster.local", search=("svc",), options=("ndots:5",)
    ),
    netkit=NetkitResult(
        master="eth0",
        pairing="pair",
        mode="l2",
        interface="net1",
        queues=(NetkitQueue(id=1, master_queue=8), NetkitQueue(id=2, master_queue=9)),
    ),
)

NETKIT_JSON = {
    "master": "eth0",
    "pairing": "pair",
    "mode": "l2",
    "interface": "net1",
    "queues": [{"id": 1, "masterQueue": 8}, {"id": 2, "masterQueue": 9}],
    "afxdpUnavailable": "the kernel refuses AF_XDP on a netkit pair",
}
DNS_JSON = {
    "nameservers": ["10.1.0.53"],
    "domain": "cluster.local",
    "search": ["svc"],
    "options": ["ndots:5"],
}


def test_encode_1_1_0_is_the_full_shape() -> None:
    assert PAIR.encode("1.1.0") == {
        "cniVersion": "1.1.0",
        "interfaces": [
            {"name": "nk0123456789abc", "mac": "aa:bb:cc:00:00:01", "mtu": 1500},
            {
                "name": "net1",
                "mac": "02:00:00:00:00:01",
                "mtu": 1500,
                "sandbox": "/var/run/netns/pod1",
                "socketPath": "/run/x.sock",
                "pciID": "0000:01:00.0",
            },
        ],
        "ips": [
            {"interface": 1, "address": "10.1.0.5/24", "gateway": "10.1.0.1"},
            {"interface": 1, "address": "fd00::5/64"},
        ],
        "routes": [
            {
                "dst": "0.0.0.0/0",
                "gw": "10.1.0.1",
                "mtu": 1400,
                "advmss": 1360,
                "priority": 10,
                "table": 0,
                "scope": 0,
            },
            {"dst": "fd00:1::/64"},
        ],
        "dns": DNS_JSON,
        "netkit": NETKIT_JSON,
    }


def test_encode_1_0_0_drops_the_1_1_only_fields() -> None:
    assert PAIR.encode("1.0.0") == {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "nk0123456789abc", "mac": "aa:bb:cc:00:00:01"},
            {"name": "net1", "mac": "02:00:00:00:00:01", "sandbox": "/var/run/netns/pod1"},
        ],
        "ips": [
            {"interface": 1, "address": "10.1.0.5/24", "gateway": "10.1.0.1"},
            {"interface": 1, "address": "fd00::5/64"},
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}, {"dst": "fd00:1::/64"}],
        "dns": DNS_JSON,
        "netkit": NETKIT_JSON,
    }


@pytest.mark.parametrize("version", ["0.4.0", "0.3.1", "0.3.0"])
def test_encode_before_1_0_tags_each_ip_with_its_family(version: str) -> None:
    assert PAIR.encode(version) == {
        "cniVersion": version,
        "interfaces": [
            {"name": "nk0123456789abc", "mac": "aa:bb:cc:00:00:01"},
            {"name": "net1", "mac": "02:00:00:00:00:01", "sandbox": "/var/run/netns/pod1"},
        ],
        "ips": [
            {"version": "4", "interface": 1, "address": "10.1.0.5/24", "gateway": "10.1.0.1"},
            {"version": "6", "interface": 1, "address": "fd00::5/64"},
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}, {"dst": "fd00:1::/64"}],
        "dns": DNS_JSON,
        "netkit": NETKIT_JSON,
    }


def test_encode_single_mode_result_omits_empty_fields_like_go() -> None:
    single = Result(
        interfaces=(Interface(name="net1", mac="02:00:00:00:00:01", sandbox="/proc/42/ns/net"),),
        netkit=NetkitResult(
            master="eth0",
            pairing="single",
            mode="l2",
            interface="net1",
            queues=(NetkitQueue(id=1, master_queue=12),),
        ),
    )
    assert single.encode("1.1.0") == {
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "net1", "mac": "02:00:00:00:00:01", "sandbox": "/proc/42/ns/net"}],
        # Go prints "dns": {} even when empty: omitempty never omits a struct.
        "dns": {},
        "netkit": {
            "master": "eth0",
            "pairing": "single",
            "mode": "l2",
            "interface": "net1",
            "queues": [{"id": 1, "masterQueue": 12}],
            "afxdpUnavailable": "master eth0 has no cni-netkit XDP program: nothing steers "
                                "its queues' frames to AF_XDP sockets (a lease for io_uring "
                                "zero-copy, or for an application that brings its own "
                                "steering)",
        },
    }


def test_encode_empty_result_carries_version_and_dns() -> None:
    assert Result().encode("0.3.0") == {"cniVersion": "0.3.0", "dns": {}}


def test_encode_zero_values_follow_go_pointers() -> None:
    # mtu/advmss/priority are plain ints (0 omitted); table/scope are pointers (0 printed).
    r = Result(
        interfaces=(Interface(name=""),),
        ips=(IPConfig(address="10.0.0.1/32", interface=0),),
        routes=(Route(dst="10.0.0.0/8", mtu=0, advmss=0, priority=0),),
    )
    got = r.encode("1.1.0")
    assert got["interfaces"] == [{"name": ""}]
    assert got["ips"] == [{"interface": 0, "address": "10.0.0.1/32"}]
    assert got["routes"] == [{"dst": "10.0.0.0/8"}]


def test_qemu_netdev_starts_at_the_lowest_netkit_queue() -> None:
    nk = NetkitResult(
        master="eth0",
        pairing="single",
        mode="l2",
        interface="net1",
        queues=(NetkitQueue(id=3, master_queue=9), NetkitQueue(id=2, master_queue=8)),
        map_path="/m",
    )
    assert nk.qemu_netdev == (
        "ifname=net1,mode=native,queues=2,start-queue=2,inhibit=on,map-path=/m,map-start-index=2")
    assert nk.dpdk_vdev is None  # the PMD takes one queue of a netkit (its channel count)


def test_encode_refuses_an_unsupported_version() -> None:
    with pytest.raises(errors.IncompatibleVersion):
        PAIR.encode("0.2.0")


# --- parsing results back -------------------------------------------------------------


def test_from_prev_round_trips_1_1_0() -> None:
    assert Result.from_prev(PAIR.encode("1.1.0"), "1.1.0") == PAIR


@pytest.mark.parametrize("version", ["1.0.0", "0.4.0", "0.3.1", "0.3.0"])
def test_from_prev_reads_every_version_back(version: str) -> None:
    back = Result.from_prev(PAIR.encode(version), version)
    assert back.encode(version) == PAIR.encode(version)
    assert back.ips == PAIR.ips


def test_from_prev_takes_go_style_nulls_and_absences() -> None:
    prev = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": None, "sandbox": ""}],
        "ips": None,
        "routes": None,
        "dns": None,
        "somethingElse": {"ignored": True},
    }
    assert Result.from_prev(prev, "1.0.0") == Result(interfaces=(Interface(name="eth0"),))
    assert Result.from_prev({}, "1.1.0") == Result()


def test_from_prev_without_own_version_uses_the_requests() -> None:
    prev = {"ips": [{"version": "4", "address": "10.0.0.2/24"}]}
    assert Result.from_prev(prev, "0.4.0").ips == (IPConfig(address="10.0.0.2/24"),)


def test_from_prev_canonicalizes_addresses() -> None:
    prev = {
        "ips": [{"address": "FD00:0:0::5/64", "gateway": "fd00:0::1"}],
        "routes": [{"dst": "10.1.2.3/8"}],
    }
    got = Result.from_prev(prev, "1.1.0")
    assert got.ips == (IPConfig(address="fd00::5/64", gateway="fd00::1"),)
    assert got.routes == (Route(dst="10.1.2.3/8"),)  # host bits kept, as Go keeps them


def test_ip_version_property() -> None:
    assert IPConfig(address="10.0.0.1/8").version == "4"
    assert IPConfig(address="::1/128").version == "6"


@pytest.mark.parametrize(
    ("prev", "where"),
    [
        ([], "prevResult: expected an object, got a list"),
        ({"interfaces": {}}, "prevResult.interfaces: expected a list, got an object"),
        ({"interfaces": ["eth0"]}, "prevResult.interfaces[0]: expected an object, got a string"),
        ({"interfaces": [{"name": 1}]}, "prevResult.interfaces[0].name: expected a string"),
        ({"interfaces": [{"mtu": "1500"}]}, "prevResult.interfaces[0].mtu: expected an integer"),
        ({"ips": [{}]}, "prevResult.ips[0].address: required"),
        ({"ips": [{"address": "10.0.0.1"}]}, "prevResult.ips[0].address: expected an address"),
        ({"ips": [{"address": "10.0.0.300/24"}]}, "prevResult.ips[0].address: not a CIDR"),
        (
            {"ips": [{"address": "10.0.0.1/24", "gateway": "x"}]},
            "prevResult.ips[0].gateway: not an IP",
        ),
        (
            {"ips": [{"address": "10.0.0.1/24", "interface": -1}]},
            "prevResult.ips[0].interface: must be at least 0",
        ),
        (
            {"ips": [{"address": "10.0.0.1/24", "interface": True}]},
            "prevResult.ips[0].interface: expected an integer, got a boolean",
        ),
        (
            {"ips": [{"address": "10.0.0.1/24", "interface": 1.0}]},
            "prevResult.ips[0].interface: expected an integer, got the number 1.0",
        ),
        (
            {"ips": [{"version": "6", "address": "10.0.0.1/24"}]},
            'prevResult.ips[0].version: "6" does not match',
        ),
        ({"routes": [{"gw": "10.0.0.1"}]}, "prevResult.routes[0].dst: required"),
        ({"routes": [{"dst": "0.0.0.0/0", "table": "main"}]}, "prevResult.routes[0].table"),
        ({"dns": {"nameservers": "8.8.8.8"}}, "prevResult.dns.nameservers: expected a list"),
        ({"netkit": {"master": "eth0"}}, "prevResult.netkit.pairing: required"),
        (
            {
                "netkit": {
                    "master": "eth0",
                    "pairing": "single",
                    "mode": "l2",
                    "interface": "net1",
                    "queues": [{"id": 1}],
                }
            },
            "prevResult.netkit.queues[0].masterQueue: required",
        ),
    ],
)
def test_from_prev_rejections_name_the_path(prev: Any, where: str) -> None:
    with pytest.raises(errors.InvalidConfig) as e:
        Result.from_prev(prev, "1.1.0")
    assert e.value.code == 7
    assert e.value.msg == "invalid prevResult"
    assert e.value.details.replace("'", '"').startswith(where)


def test_from_prev_names_another_source() -> None:
    with pytest.raises(errors.InvalidConfig) as e:
        Result.from_prev({"ips": [{}]}, "1.1.0", source="host-local result")
    assert e.value.msg == "invalid host-local result"
    assert e.value.details == "host-local result.ips[0].address: required"


@pytest.mark.parametrize("version", ["0.2.0", "2.0.0"])
def test_from_prev_refuses_unsupported_versions(version: str) -> None:
    with pytest.raises(errors.IncompatibleVersion):
        Result.from_prev({"cniVersion": version}, "1.1.0")
    with pytest.raises(errors.IncompatibleVersion):
        Result.from_prev({}, version)


# --- chaining ------------------------------------------------------------------------------

PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/pod1"}],
    "ips": [{"interface": 0, "address": "10.244.1.7/24", "gateway": "10.244.1.1"}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {"nameservers": ["10.96.0.10"]},
}


def test_merged_with_keeps_prev_and_reindexes_our_ips() -> None:
    merged = PAIR.merged_with(Result.from_prev(PREV, "1.0.0"))
    got = merged.encode("1.0.0")
    assert got["interfaces"] == [
        {"name": "eth0", "sandbox": "/var/run/netns/pod1"},
        {"name": "nk0123456789abc", "mac": "aa:bb:cc:00:00:01"},
        {"name": "net1", "mac": "02:00:00:00:00:01", "sandbox": "/var/run/netns/pod1"},
    ]
    assert got["ips"] == [
        {"interface": 0, "address": "10.244.1.7/24", "gateway": "10.244.1.1"},
        {"interface": 2, "address": "10.1.0.5/24", "gateway": "10.1.0.1"},
        {"interface": 2, "address": "fd00::5/64"},
    ]
    assert got["routes"] == [
        {"dst": "0.0.0.0/0"},
        {"dst": "0.0.0.0/0", "gw": "10.1.0.1"},
        {"dst": "fd00:1::/64"},
    ]
    assert got["dns"] == {"nameservers": ["10.96.0.10"]}  # prev's DNS wins
    assert got["netkit"] == NETKIT_JSON


def test_merged_with_accepts_the_raw_prev_result() -> None:
    assert PAIR.merged_with(PREV) == PAIR.merged_with(Result.from_prev(PREV, "1.0.0"))


def test_merged_with_empty_prev_is_ours() -> None:
    assert PAIR.merged_with({}) == PAIR
    assert PAIR.merged_with(Result()) == PAIR


def test_merged_with_leaves_unindexed_ips_alone() -> None:
    ours = Result(ips=(IPConfig(address="10.0.0.1/24"),))
    assert ours.merged_with(PREV).ips[1] == IPConfig(address="10.0.0.1/24")


def test_merged_with_uses_our_dns_when_prev_has_none() -> None:
    prev = {k: v for k, v in PREV.items() if k != "dns"}
    assert PAIR.merged_with(prev).dns == PAIR.dns


# --- errors and VERSION ----------------------------------------------------------------------


def test_error_json_shape() -> None:
    err = errors.PoolExhausted("no free queue on eth0", "pool 8-15, all leased")
    assert error_json(err, "1.0.0") == {
        "cniVersion": "1.0.0",
        "code": 100,
        "msg": "no free queue on eth0",
        "details": "pool 8-15, all leased",
    }


def test_error_json_always_has_details() -> None:
    assert error_json(errors.NetkitError("boom"), "1.1.0")["details"] == ""


@pytest.mark.parametrize(
    ("requested", "answered"),
    [("1.0.0", "1.0.0"), ("0.3.0", "0.3.0"), ("0.2.0", "1.1.0"), (None, "1.1.0")],
)
def test_version_json(requested: str | None, answered: str) -> None:
    assert version_json(requested) == {
        "cniVersion": answered,
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }
