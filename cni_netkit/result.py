"""The CNI result: one version-neutral model, encoded in each spec version's own shape.

``Result`` holds the 1.1.0 shape plus our documented extension key ``netkit``
(README "Result").  ``encode`` drops what an older version lacks and adds what
it needs (``ips[].version`` before 1.0.0), leaving out empty optional fields as
Go's ``omitempty`` does, so a runtime reads what a Go plugin would have printed.
``from_prev`` reads a result of any supported version back: a chained
``prevResult``, or the output of a delegated IPAM plugin.

Standard library only: the entry point imports this module to answer VERSION
and to print errors, before (or without) paying for pydantic.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, NoReturn

from cni_netkit import errors
from cni_netkit.errors import SUPPORTED_VERSIONS

# Results before 1.0.0 (types040 in libcni) tag each IP with its family.
_TAGGED_IP_VERSIONS = frozenset({"0.3.0", "0.3.1", "0.4.0"})
# Interface mtu/socketPath/pciID and the route fields after gw are new in 1.1.0.
_V1_1_FIELDS_VERSIONS = frozenset({"1.1.0"})


@dataclass(frozen=True)
class Interface:
    """One entry of ``interfaces``; ``sandbox`` is the netns path for pod-side interfaces."""

    name: str
    mac: str | None = None
    mtu: int | None = None
    sandbox: str | None = None
    socket_path: str | None = None
    pci_id: str | None = None


@dataclass(frozen=True)
class IPConfig:
    """One entry of ``ips``: ``address`` in CIDR form (``10.1.2.3/24``), canonical text."""

    address: str
    gateway: str | None = None
    interface: int | None = None  # index into Result.interfaces

    @property
    def version(self) -> str:
        """``"4"`` or ``"6"``: the family, as pre-1.0 results spell it."""
        return str(ipaddress.ip_interface(self.address).version)


@dataclass(frozen=True)
class Route:
    """One entry of ``routes``; ``dst`` in CIDR form as given (Go keeps host bits too)."""

    dst: str
    gw: str | None = None
    mtu: int | None = None
    advmss: int | None = None
    priority: int | None = None
    table: int | None = None
    scope: int | None = None


@dataclass(frozen=True)
class DNS:
    """The ``dns`` object."""

    nameservers: tuple[str, ...] = ()
    domain: str | None = None
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class NetkitQueue:
    """A leased queue: its id on the netkit and the physical master queue it proxies."""

    id: int
    master_queue: int


@dataclass(frozen=True)
class NetkitResult:
    """Our ``netkit`` result key: what was leased, and how to hand it to an AF_XDP consumer."""

    master: str
    pairing: str
    mode: str
    interface: str  # the netkit's name in the pod (podIfname, else CNI_IFNAME)
    queues: tuple[NetkitQueue, ...]
    # The attachment's pinned XSK map and the index of its first queue's socket
    # there, when the master has AF_XDP steering (docs/af_xdp.md).
    map_path: str | None = None
    map_start_index: int | None = None
    # With a map: how the kernel will bind the consumer's sockets, "zerocopy" when
    # the master's xdp-features (netdev dev-get) have xsk-zerocopy, else "copy".
    # Neither consumer's arguments force a mode, so the same ones work on both.
    xsk_mode: str | None = None

    @property
    def first_queue(self) -> int:
        return min((q.id for q in self.queues), default=1)

    @property
    def qemu_netdev(self) -> str | None:
        """The ``-netdev af-xdp`` arguments for these queues; None without a map.

        ``ifname=…,mode=native,queues=…,start-queue=…,inhibit=on,map-path=…,
        map-start-index=…``: QEMU loads no XDP program (a netkit refuses one)
        and puts its sockets into the map the master's program redirects to.
        Without a map nothing steers the queues' frames to a socket: QEMU would
        load its own program on the netkit (natively refused, then generic,
        where it never sees a frame of the leased queues), so there is nothing
        to hand out (``afxdp_unavailable`` says why).
        """
        if self.map_path is None:
            return None
        start = self.first_queue if self.map_start_index is None else self.map_start_index
        return (
            f"ifname={_qemu_value(self.interface)},mode=native,queues={len(self.queues)},"
            f"start-queue={self.first_queue},inhibit=on,map-path={_qemu_value(self.map_path)},"
            f"map-start-index={start}"
        )

    @property
    def dpdk_vdev(self) -> str | None:
        """DPDK's ``--vdev`` for an AF_XDP port on these queues; None without a map.

        The PMD inserts queue i's socket at index ``start_queue + i`` of the
        pinned map (libxdp keys it by queue id), which is where the program
        looks. ``busy_budget=0``: preferred busy polling needs CAP_NET_ADMIN.
        DPDK's devargs cannot quote a comma: None when a value holds one.
        One queue only: the PMD refuses a ``queue_count`` above the device's
        combined channel count (ethtool), which a netkit reports as 1.
        """
        if (self.map_path is None or len(self.queues) != 1
                or "," in self.interface + self.map_path):
            return None
        return (
            f"net_af_xdp0,iface={self.interface},start_queue={self.first_queue},"
            f"queue_count={len(self.queues)},use_pinned_map=1,dp_path={self.map_path},"
            "busy_budget=0"
        )

    @property
    def dpdk_vdevs(self) -> tuple[str, ...] | None:
        """DPDK ``--vdev`` arguments for these queues, one AF_XDP port per queue; None
        without a map (or a comma in a value, as for ``dpdk_vdev``).

        The PMD refuses a port of more queues than the device's combined channel
        count, which it takes as 1 on a netkit (it answers ETHTOOL_GCHANNELS with
        EOPNOTSUPP: netkit has no ethtool channels), but it does not compare
        ``start_queue`` with it: one port per netkit queue carries them all. Port
        names are unique per interface, so a pod's attachments can share one app.
        ``shared_umem=1``: ports drawing on one mempool register it as UMEM once,
        not once per port, against the workload's RLIMIT_MEMLOCK.
        """
        if self.map_path is None or "," in self.interface + self.map_path:
            return None
        return tuple(
            f"net_af_xdp_{self.interface}_{q.id},iface={self.interface},start_queue={q.id},"
            f"queue_count=1,shared_umem=1,use_pinned_map=1,dp_path={self.map_path},"
            "busy_budget=0" for q in sorted(self.queues, key=lambda q: q.id))

    @property
    def afxdp_unavailable(self) -> str | None:
        """Why an AF_XDP consumer cannot receive these queues' frames (None: it can)."""
        if self.map_path is not None:
            return None
        if self.pairing == "pair":
            return "the kernel refuses AF_XDP on a netkit pair"
        return (f"master {self.master} has no cni-netkit XDP program: nothing steers its "
                "queues' frames to AF_XDP sockets (a lease for io_uring zero-copy, or for "
                "an application that brings its own steering)")


def _qemu_value(value: str) -> str:
    """A QEMU option value: a comma is written doubled (an ifname may hold one)."""
    return value.replace(",", ",,")


@dataclass(frozen=True)
class Result:
    """An ADD result, independent of the CNI version it is printed in."""

    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: DNS = DNS()
    netkit: NetkitResult | None = None

    def encode(self, version: str) -> dict[str, Any]:
        """This result as the JSON object of CNI ``version``."""
        _require_supported(version, "result")
        v11 = version in _V1_1_FIELDS_VERSIONS
        out: dict[str, Any] = {"cniVersion": version}
        if self.interfaces:
            out["interfaces"] = [_encode_interface(i, v11=v11) for i in self.interfaces]
        if self.ips:
            tagged = version in _TAGGED_IP_VERSIONS
            out["ips"] = [_encode_ip(ip, tagged=tagged) for ip in self.ips]
        if self.routes:
            out["routes"] = [_encode_route(r, v11=v11) for r in self.routes]
        # Go's omitempty never omits a struct, so every Go plugin prints "dns": {}.
        out["dns"] = _encode_dns(self.dns)
        if self.netkit is not None:
            out["netkit"] = _encode_netkit(self.netkit)
        return out

    @classmethod
    def from_prev(
        cls, prev: Mapping[str, Any], version: str, *, source: str = "prevResult"
    ) -> Result:
        """Parse a result JSON object of any supported version (``prevResult``, IPAM output).

        ``version`` is the request's; the object's own ``cniVersion``, when it
        has one, must be supported too.  Unknown keys are ignored, as libcni's
        typed parse does; bad values raise InvalidConfig naming ``source`` and
        the path (e.g. ``prevResult.ips[0].address``).
        """
        _require_supported(version, "request")
        d = _Decoder(source)
        top = d.obj(prev, source)
        own = top.get("cniVersion")
        if own is not None and own not in SUPPORTED_VERSIONS:
            raise errors.IncompatibleVersion(
                f"{source} has unsupported cniVersion {own!r}",
                f"supported: {', '.join(SUPPORTED_VERSIONS)}",
            )
        netkit = top.get("netkit")
        return cls(
            interfaces=tuple(
                d.interface(v, f"{source}.interfaces[{i}]")
                for i, v in enumerate(d.items(top.get("interfaces"), f"{source}.interfaces"))
            ),
            ips=tuple(
                d.ip_config(v, f"{source}.ips[{i}]")
                for i, v in enumerate(d.items(top.get("ips"), f"{source}.ips"))
            ),
            routes=tuple(
                d.route(v, f"{source}.routes[{i}]")
                for i, v in enumerate(d.items(top.get("routes"), f"{source}.routes"))
            ),
            dns=d.dns(top.get("dns"), f"{source}.dns"),
            netkit=None if netkit is None else d.netkit(netkit, f"{source}.netkit"),
        )

    def merged_with(self, prev: Result | Mapping[str, Any]) -> Result:
        """This result appended to a chain's ``prevResult``, which keeps all it had.

        Our interfaces go after prev's, so our ips' ``interface`` indexes are
        shifted to keep pointing at them.  Prev's DNS wins when it has any.
        ``prev`` may be the raw ``prevResult`` object, parsed here.
        """
        if not isinstance(prev, Result):
            prev = Result.from_prev(prev, SUPPORTED_VERSIONS[-1])
        offset = len(prev.interfaces)
        ours = tuple(
            ip if ip.interface is None else replace(ip, interface=ip.interface + offset)
            for ip in self.ips
        )
        return Result(
            interfaces=prev.interfaces + self.interfaces,
            ips=prev.ips + ours,
            routes=prev.routes + self.routes,
            dns=prev.dns if prev.dns != DNS() else self.dns,
            netkit=self.netkit,
        )


def error_json(err: errors.NetkitError, version: str) -> dict[str, Any]:
    """The CNI error object for ``err``, in the request's ``version``."""
    return {"cniVersion": version, "code": err.code, "msg": err.msg, "details": err.details}


def version_json(requested: str | None) -> dict[str, Any]:
    """The VERSION answer: the requested version when we speak it, else our newest."""
    version = requested if requested in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1]
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}


# --- encoding ----------------------------------------------------------------


def _encode_interface(i: Interface, *, v11: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"name": i.name}  # the one field Go never omits
    if i.mac:
        out["mac"] = i.mac
    if v11 and i.mtu:
        out["mtu"] = i.mtu
    if i.sandbox:
        out["sandbox"] = i.sandbox
    if v11 and i.socket_path:
        out["socketPath"] = i.socket_path
    if v11 and i.pci_id:
        out["pciID"] = i.pci_id
    return out


def _encode_ip(ip: IPConfig, *, tagged: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"version": ip.version} if tagged else {}
    if ip.interface is not None:  # a pointer in Go: index 0 is printed
        out["interface"] = ip.interface
    out["address"] = ip.address
    if ip.gateway:
        out["gateway"] = ip.gateway
    return out


def _encode_route(r: Route, *, v11: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"dst": r.dst}
    if r.gw:
        out["gw"] = r.gw
    if v11:
        for key, value in (("mtu", r.mtu), ("advmss", r.advmss), ("priority", r.priority)):
            if value:
                out[key] = value
        # Pointers in Go: table 0 / scope 0 (RT_SCOPE_UNIVERSE) are meaningful and printed.
        for key, value in (("table", r.table), ("scope", r.scope)):
            if value is not None:
                out[key] = value
    return out


def _encode_dns(dns: DNS) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if dns.nameservers:
        out["nameservers"] = list(dns.nameservers)
    if dns.domain:
        out["domain"] = dns.domain
    if dns.search:
        out["search"] = list(dns.search)
    if dns.options:
        out["options"] = list(dns.options)
    return out


def _encode_netkit(nk: NetkitResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "master": nk.master,
        "pairing": nk.pairing,
        "mode": nk.mode,
        "interface": nk.interface,
        "queues": [{"id": q.id, "masterQueue": q.master_queue} for q in nk.queues],
    }
    return out | consumer_fields(nk)


def consumer_fields(nk: NetkitResult) -> dict[str, Any]:
    """What an AF_XDP consumer needs (or why it cannot have it), as the result and the
    pod annotation (``agent.publish``) both carry it."""
    if nk.map_path is None:
        return {"afxdpUnavailable": nk.afxdp_unavailable}
    out: dict[str, Any] = {"qemuNetdev": nk.qemu_netdev}
    if nk.dpdk_vdev is not None:
        out["dpdkVdev"] = nk.dpdk_vdev
    if nk.dpdk_vdevs is not None:
        out["dpdkVdevs"] = list(nk.dpdk_vdevs)
    out["mapPath"] = nk.map_path
    out["mapStartIndex"] = nk.map_start_index
    if nk.xsk_mode is not None:
        out["xskMode"] = nk.xsk_mode
    return out


def _require_supported(version: str, what: str) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise errors.IncompatibleVersion(
            f"unsupported {what} cniVersion {version!r}",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )


# --- decoding ----------------------------------------------------------------


class _Decoder:
    """Reads one result object like Go's typed unmarshal: ``null`` and absent
    optional fields are empty, wrong types are errors naming the path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, reason: str) -> NoReturn:
        raise errors.InvalidConfig(f"invalid {self.source}", f"{path}: {reason}")

    def obj(self, value: object, path: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.fail(path, f"expected an object, got {_kind(value)}")
        return value

    def items(self, value: object, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {_kind(value)}")
        return value

    def text(self, value: object, path: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {_kind(value)}")
        return value

    def texts(self, value: object, path: str) -> tuple[str, ...]:
        return tuple(
            self.text(v, f"{path}[{i}]") or "" for i, v in enumerate(self.items(value, path))
        )

    def integer(self, value: object, path: str, *, minimum: int | None = None) -> int | None:
        if value is None:
            return None
        # bool is an int in Python but never in JSON; 1500.0 is not an int to Go either.
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(path, f"expected an integer, got {_kind(value)}")
        if minimum is not None and value < minimum:
            self.fail(path, f"must be at least {minimum}, got {value}")
        return value

    def required_text(self, value: object, path: str) -> str:
        text = self.text(value, path)
        if text is None:
            self.fail(path, "required")
        return text

    def required_int(self, value: object, path: str, *, minimum: int) -> int:
        number = self.integer(value, path, minimum=minimum)
        if number is None:
            self.fail(path, "required")
        return number

    def cidr(self, value: object, path: str) -> str:
        text = self.required_text(value, path)
        if "/" not in text:
            self.fail(path, f"expected an address with a prefix length (CIDR), got {text!r}")
        try:
            return str(ipaddress.ip_interface(text))
        except ValueError:
            self.fail(path, f"not a CIDR address: {text!r}")

    def ip(self, value: object, path: str) -> str | None:
        text = self.text(value, path)
        if not text:
            return None
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            self.fail(path, f"not an IP address: {text!r}")

    def interface(self, value: object, path: str) -> Interface:
        o = self.obj(value, path)
        return Interface(
            name=self.text(o.get("name"), f"{path}.name") or "",
            mac=self.text(o.get("mac"), f"{path}.mac") or None,
            mtu=self.integer(o.get("mtu"), f"{path}.mtu", minimum=0) or None,
            sandbox=self.text(o.get("sandbox"), f"{path}.sandbox") or None,
            socket_path=self.text(o.get("socketPath"), f"{path}.socketPath") or None,
            pci_id=self.text(o.get("pciID"), f"{path}.pciID") or None,
        )

    def ip_config(self, value: object, path: str) -> IPConfig:
        o = self.obj(value, path)
        ip = IPConfig(
            address=self.cidr(o.get("address"), f"{path}.address"),
            gateway=self.ip(o.get("gateway"), f"{path}.gateway"),
            interface=self.integer(o.get("interface"), f"{path}.interface", minimum=0),
        )
        tag = self.text(o.get("version"), f"{path}.version")
        if tag is not None and tag != ip.version:
            self.fail(f"{path}.version", f"{tag!r} does not match address {ip.address}")
        return ip

    def route(self, value: object, path: str) -> Route:
        o = self.obj(value, path)
        return Route(
            dst=self.cidr(o.get("dst"), f"{path}.dst"),
            gw=self.ip(o.get("gw"), f"{path}.gw"),
            mtu=self.integer(o.get("mtu"), f"{path}.mtu", minimum=0) or None,
            advmss=self.integer(o.get("advmss"), f"{path}.advmss", minimum=0) or None,
            priority=self.integer(o.get("priority"), f"{path}.priority", minimum=0) or None,
            table=self.integer(o.get("table"), f"{path}.table", minimum=0),
            scope=self.integer(o.get("scope"), f"{path}.scope", minimum=0),
        )

    def dns(self, value: object, path: str) -> DNS:
        if value is None:
            return DNS()
        o = self.obj(value, path)
        return DNS(
            nameservers=self.texts(o.get("nameservers"), f"{path}.nameservers"),
            domain=self.text(o.get("domain"), f"{path}.domain") or None,
            search=self.texts(o.get("search"), f"{path}.search"),
            options=self.texts(o.get("options"), f"{path}.options"),
        )

    def netkit(self, value: object, path: str) -> NetkitResult:
        o = self.obj(value, path)
        queues = []
        for i, v in enumerate(self.items(o.get("queues"), f"{path}.queues")):
            q = self.obj(v, f"{path}.queues[{i}]")
            queues.append(
                NetkitQueue(
                    id=self.required_int(q.get("id"), f"{path}.queues[{i}].id", minimum=0),
                    master_queue=self.required_int(
                        q.get("masterQueue"), f"{path}.queues[{i}].masterQueue", minimum=0
                    ),
                )
            )
        return NetkitResult(
            master=self.required_text(o.get("master"), f"{path}.master"),
            pairing=self.required_text(o.get("pairing"), f"{path}.pairing"),
            mode=self.required_text(o.get("mode"), f"{path}.mode"),
            interface=self.required_text(o.get("interface"), f"{path}.interface"),
            queues=tuple(queues),
            map_path=self.text(o.get("mapPath"), f"{path}.mapPath") or None,
            map_start_index=self.integer(o.get("mapStartIndex"), f"{path}.mapStartIndex",
                                         minimum=0),
            xsk_mode=self.text(o.get("xskMode"), f"{path}.xskMode") or None,
        )


def _kind(value: object) -> str:
    """The JSON name of a value's type, for error messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value}"
    names = {type(None): "null", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)
