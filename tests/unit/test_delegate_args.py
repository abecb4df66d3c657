"""What a delegated IPAM plugin receives: the runtime's CNI_ARGS, as the runtime sent them.

The IPAM plugin here is a stand-in executable that records its environment and
judges CNI_ARGS as host-local does (keys it does not know are an error unless
``IgnoreUnknown`` is set); the kernel is the fake of our seam.  The VM test
with Debian's real host-local is tests/e2e/test_runtime_args.py.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from cni_netkit.config import Invocation, parse_invocation
from cni_netkit.errors import IPAMFailure
from cni_netkit.plugin import commands
from tests.unit.fake_kernel import POD, FakeKernel

# containerd's CRI path (kubelet's pods), podman's --ip: what real runtimes send.
CONTAINERD = ("IgnoreUnknown=1;K8S_POD_NAMESPACE=rtns;K8S_POD_NAME=p1;"
              "K8S_POD_INFRA_CONTAINER_ID=0123abcd;K8S_POD_UID=uid-p1")
PODMAN = "IgnoreUnknown=1;K8S_POD_NAME=web;IP=10.88.9.50"

# host-local's rule (types.LoadArgs): a key its args struct lacks fails the call
# unless IgnoreUnknown is true; IP= is the address it must hand out.
FAKE_IPAM = r"""#!/bin/sh
printf '%s\n' "$CNI_COMMAND $CNI_ARGS" >> "$(dirname "$0")/calls"
cat > /dev/null
ignore=0; ip=10.1.0.2
IFS=';'
for kv in $CNI_ARGS; do
  case "$kv" in
    IgnoreUnknown=1|IgnoreUnknown=true) ignore=1 ;;
  esac
done
for kv in $CNI_ARGS; do
  case "$kv" in
    IgnoreUnknown=*) ;;
    IP=*) ip="${kv#IP=}" ;;
    *) if [ "$ignore" = 0 ]; then
         echo '{"code":999,"msg":"ARGS: unknown args [\"'"$kv"'\"]"}'; exit 1
       fi ;;
  esac
done
[ "$CNI_COMMAND" = ADD ] || exit 0
echo '{"cniVersion":"1.0.0","ips":[{"address":"'"$ip"'/24","gateway":"10.1.0.1"}]}'
"""


@pytest.fixture
def ipam_dir(tmp_path: Path) -> Path:
    d = tmp_path / "cni-bin"
    d.mkdir()
    exe = d / "fake-ipam"
    exe.write_text(FAKE_IPAM)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return d


def calls(ipam_dir: Path) -> list[str]:
    f = ipam_dir / "calls"
    return f.read_text().splitlines() if f.exists() else []


def inv(command: str, tmp_path: Path, ipam_dir: Path, cni_args: str | None,
        **conf: Any) -> Invocation:
    state = tmp_path / "state"
    c: dict[str, Any] = {"cniVersion": "1.0.0", "name": "afxdp", "type": "netkit",
                         "master": "eth0", "queues": "8-15", "stateDir": str(state),
                         "pairing": "pair", "mode": "l3", "ipam": {"type": "fake-ipam"}}
    c.update(conf)
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_NETNS": POD,
           "CNI_IFNAME": "eth0", "CNI_PATH": str(ipam_dir), "CNI_NETKIT_STATE_DIRS": str(state)}
    if cni_args is not None:
        env["CNI_ARGS"] = cni_args
    return parse_invocation(env, json.dumps(c).encode())


@pytest.mark.parametrize("cni_args", [CONTAINERD, PODMAN], ids=["containerd", "podman"])
def test_delegate_gets_the_runtimes_cni_args_verbatim_on_add_and_del(
    kernel: FakeKernel, tmp_path: Path, ipam_dir: Path, cni_args: str
) -> None:
    res = commands.add(inv("ADD", tmp_path, ipam_dir, cni_args), kernel)
    commands.delete(inv("DEL", tmp_path, ipam_dir, cni_args), kernel)
    assert calls(ipam_dir) == [f"ADD {cni_args}", f"DEL {cni_args}"]
    want = "10.88.9.50/24" if "IP=" in cni_args else "10.1.0.2/24"
    assert [ip["address"] for ip in res.encode("1.0.0")["ips"]] == [want]
    assert kernel.leased_master_queues() == {}


def test_no_cni_args_means_none_for_the_delegate(
    kernel: FakeKernel, tmp_path: Path, ipam_dir: Path
) -> None:
    commands.add(inv("ADD", tmp_path, ipam_dir, None), kernel)
    assert calls(ipam_dir) == ["ADD "]


def test_config_args_cni_never_reach_the_delegates_cni_args(
    kernel: FakeKernel, tmp_path: Path, ipam_dir: Path
) -> None:
    # A NAD author's args.cni strings: with ';' they would have been extra keys.
    args = {"cni": {"K8S_POD_NAME": "x;IgnoreUnknown=1", "IP": "10.1.0.99"}}
    runtime = "K8S_POD_NAMESPACE=rtns"
    a = inv("ADD", tmp_path, ipam_dir, runtime, args=args)
    assert a.pod_name == "x;IgnoreUnknown=1"  # still our reading of the pod, as before
    with pytest.raises(IPAMFailure) as e:
        commands.add(a, kernel)
    # The runtime sent no IgnoreUnknown, so the delegate refuses its K8S key;
    # nothing the config said could switch that off or add IP=.
    assert calls(ipam_dir) == [f"ADD {runtime}"]
    assert "999" in e.value.details
    assert kernel.leased_master_queues() == {}


def test_gc_releases_with_the_gc_requests_cni_args(
    kernel: FakeKernel, tmp_path: Path, ipam_dir: Path
) -> None:
    commands.add(inv("ADD", tmp_path, ipam_dir, CONTAINERD), kernel)
    gc = inv("GC", tmp_path, ipam_dir, "IgnoreUnknown=1", cniVersion="1.1.0",
             **{"cni.dev/valid-attachments": []})
    commands.gc(gc, kernel, netns_paths=[POD])
    assert calls(ipam_dir) == [f"ADD {CONTAINERD}", "DEL IgnoreUnknown=1", "GC IgnoreUnknown=1"]
