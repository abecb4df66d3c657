"""Network config and environment: the forms we accept, and every rejection with its CNI code."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from cni_netkit import errors
from cni_netkit.config import (
    MAX_STDIN,
    Invocation,
    NetConf,
    parse_cni_args,
    parse_invocation,
)

ADD_ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "0123abcd",
    "CNI_NETNS": "/var/run/netns/pod1",
    "CNI_IFNAME": "net1",
    "CNI_PATH": "/opt/cni/bin",
}
BASE: dict[str, Any] = {
    "cniVersion": "1.1.0",
    "name": "netkit-net",
    "type": "netkit",
    "master": "eth0",
    "queues": "8-15",
}


# env/stdin are typed Any so tests can pass config keys that are not identifiers as **{...}.
def parse(env: Any = None, **conf: Any) -> Invocation:
    return parse_invocation(env or ADD_ENV, json.dumps({**BASE, **conf}).encode())


def rejected(code: int, *, env: Any = None, stdin: Any = None, **conf: Any) -> errors.NetkitError:
    """Parse, expect a NetkitError with ``code``, return it for the message checks."""
    data = stdin if stdin is not None else json.dumps({**BASE, **conf}).encode()
    with pytest.raises(errors.NetkitError) as e:
        parse_invocation(env or ADD_ENV, data)
    assert e.value.code == code, str(e.value)
    return e.value


# --- accepted forms -----------------------------------------------------------------


def test_minimal_config_takes_the_documented_defaults() -> None:
    cfg = parse().config
    assert cfg.cni_version == "1.1.0"
    assert cfg.master == "eth0"
    assert cfg.queues == (8, 9, 10, 11, 12, 13, 14, 15)
    assert cfg.queues_per_attachment == 1
    assert cfg.pairing == "single"
    assert cfg.mode == "l2"
    assert cfg.mtu is None
    assert cfg.ipam is None
    assert cfg.log_file is None
    assert cfg.log_level == "info"
    assert cfg.state_dir == "/var/lib/cni/netkit"
    assert cfg.lock_timeout == 10.0
    assert cfg.runtime_config.mac is None
    assert cfg.runtime_config.cni_device_info_file is None
    assert cfg.prev_result is None
    assert cfg.valid_attachments is None


def test_full_config_reads_every_camel_case_key() -> None:
    cfg = parse(
        {**ADD_ENV, "CNI_NETKIT_STATE_DIRS": "/run/netkit", "CNI_NETKIT_LOG_DIRS": "/var/log"},
        queuesPerAttachment=2,
        pairing="pair",
        mode="l3",
        mtu=9000,
        ipam={"type": "host-local", "subnet": "10.1.0.0/24"},
        logFile="/var/log/netkit.log",
        logLevel="debug",
        stateDir="/run/netkit",
        lockTimeout=2.5,
        runtimeConfig={"CNIDeviceInfoFile": "/var/run/k8s.cni.cncf.io/devinfo/x.json"},
        capabilities={"CNIDeviceInfoFile": True},
        prevResult={"cniVersion": "1.1.0", "interfaces": []},
    ).config
    assert (cfg.queues_per_attachment, cfg.pairing, cfg.mode, cfg.mtu) == (2, "pair", "l3", 9000)
    assert cfg.ipam == {"type": "host-local", "subnet": "10.1.0.0/24"}
    assert (cfg.log_file, cfg.log_level) == ("/var/log/netkit.log", "debug")
    assert (cfg.state_dir, cfg.lock_timeout) == ("/run/netkit", 2.5)
    assert cfg.runtime_config.cni_device_info_file == "/var/run/k8s.cni.cncf.io/devinfo/x.json"
    assert cfg.capabilities == {"CNIDeviceInfoFile": True}
    assert cfg.prev_result == {"cniVersion": "1.1.0", "interfaces": []}


@pytest.mark.parametrize(
    "queues",
    [
        [8, 9, 10, 11],
        [11, 9, 10, 8],
        "8-11",
        " 8 - 11 ",
        "8-9,10,11",
        [8, "9-10", 11],
        ["8-9", "10,11"],
    ],
)
def test_queue_pool_forms_normalize_to_sorted_ids(queues: object) -> None:
    assert parse(queues=queues).config.queues == (8, 9, 10, 11)


def test_queue_pool_accepts_the_limits() -> None:
    assert parse(queues=[0, 65535]).config.queues == (0, 65535)
    assert len(parse(queues="0-4095").config.queues) == 4096


@pytest.mark.parametrize(
    ("queues", "reason"),
    [
        ([-1], "queue id -1 is negative"),
        ("15-8", "range 15-8 is reversed"),
        ("8-11,10-12", "queue 10 is listed twice (in 8-11 and in 10-12)"),
        ([8, 9, 8], "queue 8 is listed twice"),
        (["0-10", 3], "queue 3 is listed twice"),
        ([65536], "queue id 65536 is above 65535"),
        ("8-70000", "queue id 70000 is above 65535"),
        ([], "the pool is empty"),
        ("", "the pool is empty"),
        ("0-4096", "more than 4096 queues"),
        (["0-4000", "5000-5100"], "more than 4096 queues"),
        (8, "expected a list of queue ids"),
        ({"from": 8}, "expected a list of queue ids"),
        ([True], "true is not a queue id"),
        ([8.5], "8.5 is not a queue id"),
        ("eight", '"eight" is not a queue id'),
        ("8-", '"8-" is not a queue id'),
        ("-3", '"-3" is not a queue id'),
        ("8,,9", '"" is not a queue id'),
    ],
)
def test_queue_pool_rejections_say_why(queues: object, reason: str) -> None:
    err = rejected(7, queues=queues)
    assert err.details.startswith("queues: ")
    assert reason in err.details


def test_huge_range_is_rejected_without_expanding_it() -> None:
    # 10 ranges of 65536 would be 655360 ids; the count check stops at 4096.
    err = rejected(7, queues=["0-65535"] * 10)
    assert "more than 4096" in err.details


@pytest.mark.parametrize("master", ["eth0", "a" * 15, "enp1s0f0np0", "bond0.100"])
def test_master_accepts_linux_ifnames(master: str) -> None:
    assert parse(master=master).config.master == master


@pytest.mark.parametrize(
    ("master", "reason"),
    [
        ("", "is empty"),
        ("a" * 16, "longer than 15 bytes"),
        ("é" * 8, "longer than 15 bytes"),  # 16 bytes in UTF-8
        ("eth/0", "contains '/'"),
        ("eth 0", "whitespace"),
        ("eth:0", "':'"),
        ("eth\t0", "whitespace"),
        (".", 'cannot be "."'),
        ("..", 'cannot be ".."'),
    ],
)
def test_master_rejects_what_the_kernel_rejects(master: str, reason: str) -> None:
    err = rejected(7, master=master)
    assert err.details.startswith("master: interface name ")
    assert reason in err.details


def test_master_must_be_a_string() -> None:
    assert "master: Input should be a valid string (got 5)" in rejected(7, master=5).details


@pytest.mark.parametrize(("field", "alias"), [("master", "master"), ("queues", "queues")])
def test_required_fields_are_named_when_missing(field: str, alias: str) -> None:
    conf = {k: v for k, v in BASE.items() if k != alias}
    err = rejected(7, stdin=json.dumps(conf).encode())
    assert f"{alias}: Field required" in err.details


def test_mtu_bounds() -> None:
    assert parse(mtu=68).config.mtu == 68
    assert parse(mtu=65535).config.mtu == 65535
    assert (
        "mtu: Input should be greater than or equal to 68 (got 67)" in rejected(7, mtu=67).details
    )
    assert "mtu: Input should be less than or equal to 65535" in rejected(7, mtu=65536).details


@pytest.mark.parametrize("value", ["1500", 1500.0, True])
def test_integers_are_strict(value: object) -> None:
    assert rejected(7, mtu=value).details.startswith("mtu: Input should be a valid integer")


def test_queues_per_attachment_at_least_one_and_at_most_the_pool() -> None:
    assert parse(queues="8-9", queuesPerAttachment=2).config.queues_per_attachment == 2
    assert "queuesPerAttachment: Input should be greater than or equal to 1" in (
        rejected(7, queuesPerAttachment=0).details
    )
    err = rejected(7, queues="8-9", queuesPerAttachment=3)
    assert err.details == "queuesPerAttachment: 3 is more than the 2 queue(s) in the pool"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("pairing", "pear", "pairing: Input should be 'single' or 'pair' (got \"pear\")"),
        ("mode", "l4", "mode: Input should be 'l2' or 'l3'"),
        ("logLevel", "trace", "logLevel: Input should be 'debug', 'info', 'warning' or 'error'"),
    ],
)
def test_enumerations_name_their_choices(key: str, value: str, expected: str) -> None:
    assert expected in rejected(7, **{key: value}).details


def test_ipam_needs_pair_mode() -> None:
    err = rejected(7, ipam={"type": "host-local"})
    assert err.details.startswith('ipam: a "single" netkit has no peer')
    assert parse(pairing="pair", ipam={"type": "host-local"}).config.ipam == {"type": "host-local"}


@pytest.mark.parametrize("ipam", [{}, {"type": ""}, {"type": 3}, "host-local"])
def test_ipam_needs_a_type(ipam: object) -> None:
    assert rejected(7, pairing="pair", ipam=ipam).details.startswith("ipam: ")


@pytest.mark.parametrize("key", ["logFile", "stateDir"])
def test_paths_must_be_absolute(key: str) -> None:
    assert (
        f'{key}: must be an absolute path, got "var/log"' in rejected(7, **{key: "var/log"}).details
    )
    assert f"{key}: must not contain a NUL byte" in rejected(7, **{key: "/var\0x"}).details


def test_device_info_file_must_be_absolute() -> None:
    err = rejected(7, runtimeConfig={"CNIDeviceInfoFile": "x.json"})
    assert err.details.startswith("runtimeConfig.CNIDeviceInfoFile: must be an absolute path")


# --- where a config may make the plugin write (a NetworkAttachmentDefinition is a user's) ---


def test_default_places_are_the_plugins_own_and_multus_device_info_dirs() -> None:
    cfg = parse(
        stateDir="/var/lib/cni/netkit",
        logFile="/var/log/cni-netkit/netkit.log",
        runtimeConfig={"CNIDeviceInfoFile":
                       "/var/run/k8s.cni.cncf.io/devinfo/cni/afxdp-c1-net1-device-info.json"},
    ).config
    assert cfg.state_dir == "/var/lib/cni/netkit"
    assert parse().config.state_dir == "/var/lib/cni/netkit"  # the default is allowed


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("stateDir", "/etc"),
        ("stateDir", "/"),
        ("stateDir", "/var/lib/cni"),
        ("stateDir", "/var/lib/cni/netkit/sub"),  # other locks: two ADDs could race
        ("logFile", "/etc/cron.d/netkit"),
        ("logFile", "/var/log/cni-netkit"),  # the directory itself is not a file inside it
        ("logFile", "/var/log/cni-netkitX/n.log"),  # a prefix of the name is not inside
    ],
)
def test_a_config_cannot_point_the_plugin_at_other_places(key: str, value: str) -> None:
    err = rejected(7, **{key: value})
    assert err.msg.startswith(f'{key} "{value}"')
    assert "CNI_NETKIT_" in err.details  # says which setting of the node's admin decides


def test_a_device_info_file_outside_multus_dirs_is_refused() -> None:
    err = rejected(7, runtimeConfig={"CNIDeviceInfoFile": "/etc/ld.so.preload"})
    assert err.msg.startswith('runtimeConfig.CNIDeviceInfoFile "/etc/ld.so.preload" is outside')
    assert "/run/k8s.cni.cncf.io/devinfo" in err.details


@pytest.mark.parametrize(
    "path",
    ["/var/log/cni-netkit/../../../etc/passwd", "/var/log/cni-netkit/./x", "//var/log/x",
     "/var/log/cni-netkit//x", "/var/log/cni-netkit/x/"],
)
def test_paths_are_normalized_so_they_cannot_climb_out(path: str) -> None:
    assert "logFile: must be a normalized path" in rejected(7, logFile=path).details


def test_the_node_admin_chooses_the_places_in_the_environment() -> None:
    env = {**ADD_ENV, "CNI_NETKIT_STATE_DIRS": "/srv/a:/srv/b", "CNI_NETKIT_LOG_DIRS": "/srv/log",
           "CNI_NETKIT_DEVICE_INFO_DIRS": "/srv/dev"}
    cfg = parse(env, stateDir="/srv/b", logFile="/srv/log/x/n.log",
                runtimeConfig={"CNIDeviceInfoFile": "/srv/dev/d.json"}).config
    assert (cfg.state_dir, cfg.log_file) == ("/srv/b", "/srv/log/x/n.log")
    # ... and the defaults are no longer allowed.
    assert rejected(7, env=env).msg.startswith('stateDir "/var/lib/cni/netkit"')


@pytest.mark.parametrize("value", ["", ":", "relative", ".", "/srv/../", "/srv/"])
def test_a_malformed_admin_setting_allows_nothing_more(value: str) -> None:
    env = {**ADD_ENV, "CNI_NETKIT_LOG_DIRS": value}
    assert rejected(7, env=env, logFile="/srv/n.log").msg.startswith('logFile "/srv/n.log"')


@pytest.mark.parametrize("value", [0, -1, 300.5, "10", True])
def test_lock_timeout_is_positive_seconds_up_to_300(value: object) -> None:
    assert rejected(7, lockTimeout=value).details.startswith("lockTimeout: ")


@pytest.mark.parametrize(("value", "expected"), [(300, 300.0), (0.25, 0.25), (5, 5.0)])
def test_lock_timeout_accepts_ints_and_floats(value: object, expected: float) -> None:
    assert parse(lockTimeout=value).config.lock_timeout == expected


@pytest.mark.parametrize(
    ("mac", "normal"),
    [("02:AA:bb:00:00:01", "02:aa:bb:00:00:01"), ("02-aa-bb-00-00-01", "02:aa:bb:00:00:01")],
)
def test_runtime_mac_is_normalized(mac: str, normal: str) -> None:
    inv = parse(runtimeConfig={"mac": mac})
    assert inv.config.runtime_config.mac == normal
    assert inv.mac == normal


@pytest.mark.parametrize(
    ("mac", "reason"),
    [
        ("01:00:5e:00:00:01", "is a multicast address"),
        ("00:00:00:00:00:00", "all-zero MAC"),
        ("02:00:00:00:00", "not a MAC address"),
        ("02:00:00-00:00:01", "not a MAC address"),
        ("zz:00:00:00:00:01", "not a MAC address"),
    ],
)
def test_runtime_mac_must_be_a_unicast_address(mac: str, reason: str) -> None:
    err = rejected(7, runtimeConfig={"mac": mac})
    assert err.details.startswith("runtimeConfig.mac: ")
    assert reason in err.details


def test_mac_needs_l2_mode() -> None:
    err = rejected(7, mode="l3", runtimeConfig={"mac": "02:00:00:00:00:01"})
    assert err.details.startswith("runtimeConfig.mac: an l3 netkit has no MAC address")


def test_capabilities_are_booleans() -> None:
    err = rejected(7, capabilities={"mac": "yes"})
    assert err.details.startswith("capabilities.mac: Input should be a valid boolean")


def test_network_name_is_a_safe_word() -> None:
    assert rejected(7, name="a/b").details.startswith("name: must match")
    assert rejected(7, name="").details.startswith("name: must match")


def test_every_field_problem_is_reported_at_once() -> None:
    err = rejected(7, mtu=1, mode="l4", master="")
    assert err.msg == "invalid network configuration"
    assert [p.split(":")[0] for p in err.details.split("; ")] == ["master", "mode", "mtu"]


def test_unknown_top_level_keys_are_allowed_and_listed() -> None:
    cfg = parse(queuesPerAtachment=2, dns={"nameservers": []}, **{"cni.dev/other": 1}).config
    assert cfg.unknown_keys == ("queuesPerAtachment",)
    assert cfg.model_extra == {
        "queuesPerAtachment": 2,
        "dns": {"nameservers": []},
        "cni.dev/other": 1,
    }


def test_netconf_is_frozen_and_built_by_field_name_too() -> None:
    cfg = NetConf(
        cni_version="1.0.0", name="n", type="netkit", master="eth0", queues=(1, 2), mtu=1500
    )
    assert cfg.queues == (1, 2)
    with pytest.raises(ValidationError):
        cfg.mtu = 9000


# --- GC's attachment lists --------------------------------------------------------


def test_valid_attachments_from_the_spec_key() -> None:
    cfg = parse(**{"cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "net1"}]}).config
    assert cfg.valid_attachments == frozenset({("c1", "net1")})


def test_valid_attachments_from_the_older_key_and_both_united() -> None:
    old = {"cni.dev/attachments": [{"containerID": "c1", "ifname": "net1"}]}
    assert parse(**old).config.valid_attachments == frozenset({("c1", "net1")})
    both = {**old, "cni.dev/valid-attachments": [{"containerID": "c2", "ifname": "net1"}]}
    assert parse(**both).config.valid_attachments == frozenset({("c1", "net1"), ("c2", "net1")})


def test_valid_attachments_absent_or_null_is_none_but_empty_is_empty() -> None:
    assert parse().config.valid_attachments is None
    assert parse(**{"cni.dev/valid-attachments": None}).config.valid_attachments is None
    assert parse(**{"cni.dev/valid-attachments": []}).config.valid_attachments == frozenset()


def test_valid_attachment_entries_are_checked() -> None:
    err = rejected(7, **{"cni.dev/valid-attachments": [{"containerID": "c1"}]})
    assert err.details == "cni.dev/valid-attachments[0].ifname: Field required"


# --- cniVersion ---------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_supported_versions(version: str) -> None:
    assert parse(cniVersion=version).config.cni_version == version


@pytest.mark.parametrize("version", ["0.2.0", "0.1.0", "1.2.0", "", 1, None])
def test_unsupported_version_is_code_1_naming_the_supported(version: object) -> None:
    err = rejected(1, cniVersion=version)
    assert "0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0" in err.details


def test_missing_version_is_code_1() -> None:
    conf = {k: v for k, v in BASE.items() if k != "cniVersion"}
    rejected(1, stdin=json.dumps(conf).encode())


def test_version_is_checked_before_env_and_config() -> None:
    rejected(1, env={"CNI_COMMAND": "ADD"}, cniVersion="9.9.9", master="", queues=[])


@pytest.mark.parametrize(
    ("command", "version"), [("CHECK", "0.3.1"), ("STATUS", "1.0.0"), ("GC", "0.4.0")]
)
def test_commands_newer_than_the_config_version_are_refused(command: str, version: str) -> None:
    err = rejected(1, env={**ADD_ENV, "CNI_COMMAND": command}, cniVersion=version)
    assert command in err.msg


# --- stdin decoding -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("stdin", "msg"),
    [
        (b"", "no network config on stdin"),
        (b"  \n", "no network config on stdin"),
        (b"{", "not valid JSON"),
        (b'{"cniVersion": NaN}', "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"text"', "not a JSON object"),
        (b"\xff\xfe{}", "not UTF-8"),
        (json.dumps(BASE).encode("utf-16"), "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ],
)
def test_undecodable_stdin_is_code_6(stdin: bytes, msg: str) -> None:
    assert msg in rejected(6, stdin=stdin).msg


def test_oversized_stdin_is_code_6() -> None:
    conf = {**BASE, "pad": "x" * MAX_STDIN}
    err = rejected(6, stdin=json.dumps(conf).encode())
    assert err.msg == "network config too large"


def test_raw_is_the_stdin_object_as_received() -> None:
    conf = {**BASE, "queues": [8, "9-10"], "extra": {"k": [1]}}
    assert parse_invocation(ADD_ENV, json.dumps(conf).encode()).raw == conf


# --- environment ----------------------------------------------------------------------


def test_add_env_is_read() -> None:
    inv = parse(env={**ADD_ENV, "CNI_PATH": "/opt/cni/bin::/usr/libexec/cni"})
    assert inv.command == "ADD"
    assert (inv.container_id, inv.netns, inv.ifname) == ("0123abcd", "/var/run/netns/pod1", "net1")
    assert inv.cni_path == ("/opt/cni/bin", "/usr/libexec/cni")


@pytest.mark.parametrize(
    ("command", "missing"),
    [
        ("ADD", "CNI_CONTAINERID"),
        ("ADD", "CNI_NETNS"),
        ("ADD", "CNI_IFNAME"),
        ("CHECK", "CNI_CONTAINERID"),
        ("CHECK", "CNI_NETNS"),
        ("CHECK", "CNI_IFNAME"),
        ("DEL", "CNI_CONTAINERID"),
        ("DEL", "CNI_IFNAME"),
    ],
)
def test_required_env_is_named_when_missing_or_empty(command: str, missing: str) -> None:
    env = {**ADD_ENV, "CNI_COMMAND": command}
    for absent in ({k: v for k, v in env.items() if k != missing}, {**env, missing: ""}):
        err = rejected(4, env=absent)
        assert missing in err.msg


def test_del_without_netns_is_fine() -> None:
    env = {k: v for k, v in ADD_ENV.items() if k != "CNI_NETNS"}
    inv = parse(env={**env, "CNI_COMMAND": "DEL"})
    assert (inv.container_id, inv.netns, inv.ifname) == ("0123abcd", None, "net1")
    assert parse(env={**env, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}).netns is None


@pytest.mark.parametrize("command", ["STATUS", "GC"])
def test_status_and_gc_need_only_the_command(command: str) -> None:
    inv = parse(env={"CNI_COMMAND": command})
    assert (inv.command, inv.container_id, inv.netns, inv.ifname) == (command, None, None, None)
    assert inv.cni_path == ()


def test_missing_command_is_code_4() -> None:
    assert "CNI_COMMAND" in rejected(4, env={"CNI_CONTAINERID": "x"}).msg


def test_unknown_command_is_code_4_naming_it() -> None:
    err = rejected(4, env={**ADD_ENV, "CNI_COMMAND": "UPDATE"})
    assert err.msg == 'unknown CNI_COMMAND "UPDATE"'
    assert "ADD, DEL, CHECK, STATUS, GC, VERSION" in err.details


def test_version_is_not_an_invocation() -> None:
    with pytest.raises(ValueError, match="VERSION"):
        parse(env={"CNI_COMMAND": "VERSION"})


@pytest.mark.parametrize("container_id", ["abc", "A1_b.c-d", "0" * 255, "a..b"])
def test_container_ids_accepted(container_id: str) -> None:
    assert parse(env={**ADD_ENV, "CNI_CONTAINERID": container_id}).container_id == container_id


@pytest.mark.parametrize(
    "container_id",
    ["../etc", "a/b", "/abs", ".hidden", "..", "-x", "_x", "a b", "a\nb", "ä", "0" * 256],
)
def test_container_ids_rejected(container_id: str) -> None:
    err = rejected(4, env={**ADD_ENV, "CNI_CONTAINERID": container_id})
    assert err.msg == "invalid CNI_CONTAINERID"
    assert err.details.startswith("CNI_CONTAINERID ")


@pytest.mark.parametrize(
    "ifname", ["", "a" * 16, "net/1", "../x", ".", "..", "net 1", "net:1", "n\x00", "é" * 8]
)
def test_ifnames_rejected(ifname: str) -> None:
    env = {**ADD_ENV, "CNI_IFNAME": ifname}
    err = rejected(4, env=env)
    # An empty one is missing rather than invalid; both name the variable.
    assert "CNI_IFNAME" in err.msg


@pytest.mark.parametrize("netns", ["var/run/netns/x", "netns", "/" + "x" * 4096])
def test_netns_must_be_an_absolute_path(netns: str) -> None:
    err = rejected(4, env={**ADD_ENV, "CNI_NETNS": netns})
    assert err.msg == "invalid CNI_NETNS"


def test_netns_existence_is_not_checked_here() -> None:
    assert parse(env={**ADD_ENV, "CNI_NETNS": "/proc/999999999/ns/net"}).netns is not None


# --- CNI_ARGS and args ------------------------------------------------------------------


def test_cni_args_known_keys() -> None:
    text = "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod;K8S_POD_INFRA_CONTAINER_ID=c;K8S_POD_UID=u"
    assert parse_cni_args(text) == {
        "K8S_POD_NAMESPACE": "ns",
        "K8S_POD_NAME": "pod",
        "K8S_POD_INFRA_CONTAINER_ID": "c",
        "K8S_POD_UID": "u",
    }


def test_cni_args_empty_and_trailing_separator() -> None:
    assert parse_cni_args("") == {}
    assert parse_cni_args("K8S_POD_NAME=p;") == {"K8S_POD_NAME": "p"}
    assert parse_cni_args("K8S_POD_NAME=") == {"K8S_POD_NAME": ""}


@pytest.mark.parametrize("text", ["K8S_POD_NAME", "=x", "K8S_POD_NAME=a=b", "A=1;;B"])
def test_cni_args_malformed_is_code_4(text: str) -> None:
    with pytest.raises(errors.InvalidEnvironment, match="malformed CNI_ARGS"):
        parse_cni_args(text)


def test_cni_args_unknown_key_is_code_2_naming_key_and_value() -> None:
    with pytest.raises(errors.UnsupportedField) as e:
        parse_cni_args("K8S_POD_NAME=p;FOO=bar")
    assert e.value.code == 2
    assert e.value.msg == 'unsupported CNI_ARGS key "FOO"'
    assert e.value.details.startswith('FOO="bar"; known keys: IgnoreUnknown, K8S_POD_INFRA')


@pytest.mark.parametrize("flag", ["1", "true", "True", "TRUE"])
def test_cni_args_ignore_unknown_drops_unknown_keys(flag: str) -> None:
    assert parse_cni_args(f"IgnoreUnknown={flag};FOO=bar;K8S_POD_NAME=p") == {"K8S_POD_NAME": "p"}


def test_cni_args_ignore_unknown_false_still_refuses() -> None:
    with pytest.raises(errors.UnsupportedField):
        parse_cni_args("IgnoreUnknown=0;FOO=bar")


def test_cni_args_ignore_unknown_must_be_a_boolean() -> None:
    with pytest.raises(errors.InvalidEnvironment, match="IgnoreUnknown"):
        parse_cni_args("IgnoreUnknown=maybe")


def test_cni_args_errors_surface_from_parse_invocation() -> None:
    rejected(2, env={**ADD_ENV, "CNI_ARGS": "FOO=bar"})
    rejected(4, env={**ADD_ENV, "CNI_ARGS": "FOO"})


def test_pod_identity_from_cni_args_or_config_args() -> None:
    env = {**ADD_ENV, "CNI_ARGS": "K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=old"}
    inv = parse(env=env, args={"cni": {"K8S_POD_NAME": "new", "ips": ["10.0.0.1/24"]}})
    assert (inv.pod_namespace, inv.pod_name) == ("ns1", "new")
    # Non-string args.cni values stay in the config, not in the string map.
    assert dict(inv.args) == {"K8S_POD_NAMESPACE": "ns1", "K8S_POD_NAME": "new"}
    assert inv.config.args["cni"]["ips"] == ["10.0.0.1/24"]
    assert (parse().pod_namespace, parse().pod_name) == (None, None)


def test_config_args_cni_must_be_an_object() -> None:
    assert rejected(7, args={"cni": []}).details == 'args: "cni" must be an object'


def test_mac_from_cni_args_is_normalized() -> None:
    assert parse(env={**ADD_ENV, "CNI_ARGS": "MAC=02-AB-00-00-00-01"}).mac == "02:ab:00:00:00:01"


def test_invalid_mac_in_cni_args_is_code_4() -> None:
    err = rejected(4, env={**ADD_ENV, "CNI_ARGS": "MAC=nope"})
    assert err.msg == "invalid CNI_ARGS MAC"


def test_mac_in_cni_args_needs_l2() -> None:
    rejected(7, env={**ADD_ENV, "CNI_ARGS": "MAC=02:00:00:00:00:01"}, mode="l3")


def test_mac_precedence_runtime_config_then_args_then_cni_args() -> None:
    env = {**ADD_ENV, "CNI_ARGS": "MAC=02:00:00:00:00:03"}
    args = {"cni": {"mac": "02:00:00:00:00:02"}}
    runtime = {"mac": "02:00:00:00:00:01"}
    assert parse(env=env, args=args, runtimeConfig=runtime).mac == "02:00:00:00:00:01"
    assert parse(env=env, args=args).mac == "02:00:00:00:00:02"
    assert parse(env=env).mac == "02:00:00:00:00:03"
    assert parse().mac is None


def test_mac_in_config_args_is_validated() -> None:
    assert rejected(7, args={"cni": {"mac": "01:00:00:00:00:00"}}).details.startswith(
        "args: cni.mac: 01:00:00:00:00:00 is a multicast address"
    )
    assert rejected(7, mode="l3", args={"cni": {"mac": "02:00:00:00:00:01"}}).details.startswith(
        "args.cni.mac: an l3 netkit has no MAC"
    )


# --- which NICs and queues a config may lease --------------------------------------------------
# Decided at ADD, not here (tests/unit/test_allowlist.py): DEL, CHECK and GC of an
# attachment must parse whatever the node's admin declares now.


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
def test_parsing_never_judges_the_master(command: str) -> None:
    env = {**ADD_ENV, "CNI_COMMAND": command, "CNI_NETKIT_MASTERS": "eth1=8-15"}
    assert parse(env, master="eth0").config.master == "eth0"


def test_xsk_map_owner_is_numeric_uid_and_gid() -> None:
    assert parse().config.map_owner is None
    assert parse(xskMapOwner="107:107").config.map_owner == (107, 107)
    assert parse(xskMapOwner="0:0").config.map_owner == (0, 0)


@pytest.mark.parametrize("value", ["107", "qemu:qemu", "107:", ":107", "-1:107", "107:107:1",
                                   "4294967295:0", "\u0661\u0660\u0667:107", 107])
def test_xsk_map_owner_rejects_anything_but_uid_colon_gid(value: object) -> None:
    assert rejected(7, xskMapOwner=value).details.startswith("xskMapOwner: ")


def test_xsk_map_volume_is_a_pod_volume_name_and_its_mount_path_has_a_default() -> None:
    cfg = parse(xskMapVolume="netkit-xsk").config
    assert (cfg.xsk_map_volume, cfg.xsk_map_mount_path, cfg.kubelet_root) == (
        "netkit-xsk", "/run/netkit", "/var/lib/kubelet")
    assert parse().config.xsk_map_volume is None  # no delivery unless asked for
    assert parse(xskMapVolume="x", xskMapMountPath="/xsk").config.xsk_map_mount_path == "/xsk"


@pytest.mark.parametrize("value", ["", "..", "a/b", "Xsk", "-x", "x" * 64, 7])
def test_xsk_map_volume_rejects_what_is_no_volume_name(value: object) -> None:
    assert rejected(7, xskMapVolume=value).details.startswith("xskMapVolume: ")


def test_the_kubelet_root_is_the_node_admins_choice() -> None:
    err = rejected(7, xskMapVolume="x", kubeletRoot="/etc")
    assert err.msg == 'kubeletRoot "/etc" is not a kubelet root of this node'
    assert "CNI_NETKIT_KUBELET_ROOTS" in err.details
    env = {**ADD_ENV, "CNI_NETKIT_KUBELET_ROOTS": "/srv/kubelet"}
    assert parse(env, xskMapVolume="x", kubeletRoot="/srv/kubelet").config.kubelet_root == (
        "/srv/kubelet")
    rejected(7, env=env, xskMapVolume="x")  # the default is not allowed there any more
    assert parse(kubeletRoot="/etc").config.kubelet_root == "/etc"  # unused without a volume
