"""In-memory fakes of the ports NetworkDriver talks through (Kernel, FirewallPort, SysctlPort),
plus helpers that build Docker-shaped request bodies with 64-hex ids."""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydriver.errors import Conflict, DriverError, HostError
from pydriver.hostports import PortInUse
from pydriver.ipam import HostRoute
from pydriver.model import Family, InterfaceSetting, IPAddress, IPInterface, Mapping
from pydriver.netlink import Link
from pydriver.protocol import (
    ENABLE_IPV6,
    EXPOSED_PORTS,
    GENERIC_OPTIONS,
    INTERNAL,
    PORT_MAP,
)
from pydriver.rules import NetworkRules


def hexid(seed: str) -> str:
    """A deterministic Docker-style id: 64 lowercase hex digits."""
    return hashlib.sha256(seed.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


@dataclass
class FakeLink:
    index: int
    name: str
    kind: str | None
    master: str | None = None
    up: bool = False
    mtu: int = 1500
    mac: str = ""
    peer: str | None = None  # the other end of a veth pair
    hairpin: bool = False

    def as_link(self, kernel: FakeKernel) -> Link:
        master = kernel.links_by_name.get(self.master) if self.master else None
        return Link(
            index=self.index,
            name=self.name,
            kind=self.kind,
            master=master.index if master else None,
            mtu=self.mtu,
            up=self.up,
            mac=self.mac,
        )


DEFAULT_ROUTES = (
    HostRoute(ipaddress.ip_network("0.0.0.0/0"), "eth0"),
    HostRoute(ipaddress.ip_network("::/0"), "eth0"),
    HostRoute(ipaddress.ip_network("192.0.2.0/24"), "eth0"),
)


class FakeKernel:
    """Links, addresses and routes of one network namespace, in memory.

    ``fail[method] = error`` makes every later call of that method raise ``error``.
    Every call is recorded in ``calls`` as (method, first argument).
    """

    def __init__(self, routes: Sequence[HostRoute] = DEFAULT_ROUTES) -> None:
        self.links_by_name: dict[str, FakeLink] = {}
        self.addresses: dict[str, list[IPInterface]] = {}
        self.extra_routes: list[HostRoute] = list(routes)
        self.fail: dict[str, DriverError] = {}
        self.calls: list[tuple[str, str]] = []
        self._next_index = 1

    # -- helpers for tests --------------------------------------------------------------------

    def _enter(self, method: str, arg: str) -> None:
        self.calls.append((method, arg))
        error = self.fail.get(method)
        if error is not None:
            raise error

    def add_link(self, name: str, kind: str | None, **attrs: Any) -> FakeLink:
        self._next_index += 1
        link = FakeLink(index=self._next_index, name=name, kind=kind, **attrs)
        self.links_by_name[name] = link
        return link

    def add_veth_pair(self, host: str, peer: str) -> None:
        self.add_link(host, "veth", peer=peer)
        self.add_link(peer, "veth", peer=host)

    def move_to_container(self, name: str) -> None:
        """What Docker does to the container end after Join: it leaves this namespace."""
        link = self.links_by_name.pop(name)
        self.addresses.pop(name, None)
        if link.peer and link.peer in self.links_by_name:
            self.links_by_name[link.peer].peer = None

    def names(self) -> set[str]:
        return set(self.links_by_name)

    # -- the Kernel protocol ------------------------------------------------------------------

    async def get_link(self, name: str) -> Link | None:
        self._enter("get_link", name)
        link = self.links_by_name.get(name)
        return link.as_link(self) if link else None

    async def exists(self, name: str) -> bool:
        self._enter("exists", name)
        return name in self.links_by_name

    async def links(self) -> list[Link]:
        self._enter("links", "")
        return [link.as_link(self) for link in self.links_by_name.values()]

    async def routes(self) -> list[HostRoute]:
        self._enter("routes", "")
        connected = [
            HostRoute(address.network, name)
            for name, addresses in self.addresses.items()
            for address in addresses
        ]
        return [*self.extra_routes, *connected]

    async def ensure_bridge(self, name: str, mac: str, mtu: int | None) -> bool:
        self._enter("ensure_bridge", name)
        existing = self.links_by_name.get(name)
        if existing is not None:
            if existing.kind != "bridge":
                raise Conflict(f"interface {name} already exists and is not a bridge")
            return False
        self.add_link(name, "bridge", mac=mac, mtu=mtu or 1500)
        return True

    async def set_link(
        self,
        name: str,
        *,
        up: bool | None = None,
        mtu: int | None = None,
        master: str | None = None,
    ) -> None:
        self._enter("set_link", name)
        link = self.links_by_name.get(name)
        if link is None:
            raise HostError(f"interface {name} does not exist")
        if master is not None:
            if master not in self.links_by_name:
                raise HostError(f"bridge {master} does not exist")
            link.master = master
        if up is not None:
            link.up = up
        if mtu:
            link.mtu = mtu

    async def ensure_address(self, name: str, address: IPInterface) -> None:
        self._enter("ensure_address", name)
        if name not in self.links_by_name:
            raise HostError(f"interface {name} does not exist")
        addresses = self.addresses.setdefault(name, [])
        if address not in addresses:
            addresses.append(address)

    async def link_addresses(self, name: str) -> list[IPInterface]:
        self._enter("link_addresses", name)
        return list(self.addresses.get(name, []))

    async def remove_address(self, name: str, address: IPInterface) -> None:
        self._enter("remove_address", name)
        addresses = self.addresses.get(name, [])
        if address in addresses:
            addresses.remove(address)

    async def ensure_veth(
        self,
        host: str,
        peer: str,
        peer_mac: str,
        mtu: int | None,
        master: str | None = None,
        *,
        hairpin: bool = False,
    ) -> bool:
        self._enter("ensure_veth", host)
        if host in self.links_by_name:
            return False
        if peer in self.links_by_name:
            return False  # the kernel answers EEXIST; netlink.py reports "not created"
        if master is not None and master not in self.links_by_name:
            raise HostError(f"bridge {master} does not exist")
        link = self.add_link(host, "veth", peer=peer, mtu=mtu or 1500)
        if master is not None:
            link.master, link.up = master, True
        self.add_link(peer, "veth", peer=host, mac=peer_mac, mtu=mtu or 1500)
        if hairpin:
            await self.set_hairpin(host)
        return True

    async def set_hairpin(self, name: str) -> None:
        self._enter("set_hairpin", name)
        link = self.links_by_name.get(name)
        if link is None:
            raise HostError(f"interface {name} does not exist")
        link.hairpin = True

    async def forget_flows(
        self, address: IPAddress, proto: int | None = None, port: int | None = None
    ) -> int:
        self._enter("forget_flows", f"{address}" + (f" {proto}/{port}" if proto else ""))
        return 0

    async def forget_port_flows(self, proto: int, port: int) -> int:
        self._enter("forget_port_flows", f"{proto}/{port}")
        return 0

    async def delete_link(self, name: str) -> bool:
        self._enter("delete_link", name)
        link = self.links_by_name.pop(name, None)
        if link is None:
            return False
        self.addresses.pop(name, None)
        if link.peer:  # deleting one end of a veth pair deletes the other
            self.links_by_name.pop(link.peer, None)
            self.addresses.pop(link.peer, None)
        for other in self.links_by_name.values():
            if other.master == name:
                other.master = None
        return True


# ---------------------------------------------------------------------------------------------
# Firewall and sysctl
# ---------------------------------------------------------------------------------------------


@dataclass
class FakeFirewall:
    applied: list[list[NetworkRules]] = field(default_factory=list)
    fail: DriverError | None = None
    damaged: list[str] = field(default_factory=list)  # what drift() reports until next apply
    forced: int = 0  # writes with force=True (a repair)
    forward_policy_dropped: list[Family] = field(default_factory=list)
    on_apply: Callable[[], object] | None = None  # called after each write (to see the order)

    async def drop_forwarded_by_default(self, family: Family) -> None:
        self.forward_policy_dropped.append(family)

    async def apply(self, networks: Sequence[NetworkRules], *, force: bool = False) -> None:
        if self.fail is not None:
            raise self.fail
        self.applied.append(list(networks))
        self.forced += force
        if self.on_apply is not None:
            self.on_apply()
        self.damaged = []

    async def drift(self, networks: Sequence[NetworkRules]) -> list[str]:
        return list(self.damaged)

    @property
    def last(self) -> list[NetworkRules]:
        assert self.applied, "the firewall was never applied"
        return self.applied[-1]

    def last_bridges(self) -> set[str]:
        return {n.bridge for n in self.last}


# What a new interface has (Debian's defaults).
KERNEL_DEFAULTS: dict[InterfaceSetting, str] = {"route_localnet": "0", "accept_ra": "1"}


@dataclass
class FakeSysctl:
    forwarding: int = 0  # times pybridge turned forwarding on
    forwarding_v6: int = 0
    forwarding_on: dict[Family, bool] = field(default_factory=lambda: {4: False, 6: False})
    route_localnet: list[str] = field(default_factory=list)
    accept_ra_disabled: list[str] = field(default_factory=list)
    # Per-interface values; an interface not listed has KERNEL_DEFAULTS.
    values: dict[tuple[str, InterfaceSetting], str] = field(default_factory=dict)
    restored: list[tuple[str, InterfaceSetting, str]] = field(default_factory=list)

    async def forwarding_enabled(self, family: Family) -> bool:
        return self.forwarding_on[family]

    async def enable_forwarding(self, family: Family) -> None:
        self.forwarding_on[family] = True
        if family == 4:
            self.forwarding += 1
        else:
            self.forwarding_v6 += 1

    async def enable_route_localnet(self, ifname: str) -> None:
        self.route_localnet.append(ifname)
        self.values[(ifname, "route_localnet")] = "1"

    async def disable_accept_ra(self, ifname: str) -> None:
        self.accept_ra_disabled.append(ifname)
        self.values[(ifname, "accept_ra")] = "0"

    async def interface_setting(self, ifname: str, setting: InterfaceSetting) -> str | None:
        return self.values.get((ifname, setting), KERNEL_DEFAULTS[setting])

    async def restore_interface_setting(
        self, ifname: str, setting: InterfaceSetting, value: str
    ) -> None:
        self.restored.append((ifname, setting, value))
        self.values[(ifname, setting)] = value

    def value(self, ifname: str, setting: InterfaceSetting) -> str:
        return self.values.get((ifname, setting), KERNEL_DEFAULTS[setting])


@dataclass
class FakeHostPorts:
    """Host port reservations; ``busy[(proto, port)] = holder`` simulates a host process."""

    held: set[Mapping] = field(default_factory=set)
    busy: dict[tuple[str, int], str] = field(default_factory=dict)

    def reserve(self, mapping: Mapping) -> None:
        if (mapping.proto, mapping.host_port) in self.busy:
            raise PortInUse(f"host port {mapping.host_text()}/{mapping.proto} is already in use")
        self.held.add(mapping)

    def release(self, mapping: Mapping) -> None:
        self.held.discard(mapping)

    async def holder(self, proto: str, port: int) -> str | None:
        return self.busy.get((proto, port))


# ---------------------------------------------------------------------------------------------
# Request bodies shaped like the ones dockerd sends (see tests/data/corpus)
# ---------------------------------------------------------------------------------------------


def create_network_body(
    network_id: str,
    subnet: str | None = "10.50.0.0/24",
    gateway: str | None = "10.50.0.1/24",
    *,
    generic: dict[str, str] | None = None,
    internal: bool = False,
    v6_subnet: str | None = None,
    v6_gateway: str | None = None,
    aux: dict[str, str] | None = None,
    address_space: str = "LocalDefault",
) -> dict[str, Any]:
    """``address_space``: "LocalDefault" is Docker's own IPAM, "PybridgeLocal" pybridge's."""
    options: dict[str, Any] = {
        ENABLE_IPV6: v6_subnet is not None,
        GENERIC_OPTIONS: dict(generic or {}),
    }
    if internal:
        options[INTERNAL] = True
    v4: list[dict[str, Any]] = []
    if subnet is not None:
        entry: dict[str, Any] = {"AddressSpace": address_space, "Pool": subnet}
        if gateway is not None:
            entry["Gateway"] = gateway
        if aux:
            entry["AuxAddresses"] = aux
        v4.append(entry)
    v6: list[dict[str, Any]] = []
    if v6_subnet is not None:
        entry6: dict[str, Any] = {"AddressSpace": address_space, "Pool": v6_subnet}
        if v6_gateway is not None:
            entry6["Gateway"] = v6_gateway
        v6.append(entry6)
    return {"NetworkID": network_id, "Options": options, "IPv4Data": v4, "IPv6Data": v6}


def create_endpoint_body(
    network_id: str,
    endpoint_id: str,
    address: str = "10.50.0.2/24",
    *,
    address_v6: str = "",
    mac: str = "",
    ports: bool = False,
) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if ports:
        options[EXPOSED_PORTS] = [{"Proto": 6, "Port": 80}]
        options[PORT_MAP] = [
            {
                "Proto": 6,
                "IP": "",
                "Port": 80,
                "HostIP": "",
                "HostPort": 18100,
                "HostPortEnd": 18100,
            }
        ]
    return {
        "NetworkID": network_id,
        "EndpointID": endpoint_id,
        "Interface": {"Address": address, "AddressIPv6": address_v6, "MacAddress": mac},
        "Options": options,
    }


def join_body(
    network_id: str, endpoint_id: str, sandbox: str = "/var/run/docker/netns/e61ac536cf4e"
) -> dict[str, Any]:
    return {
        "NetworkID": network_id,
        "EndpointID": endpoint_id,
        "SandboxKey": sandbox,
        "Options": {},
    }


def endpoint_ref_body(network_id: str, endpoint_id: str) -> dict[str, Any]:
    return {"NetworkID": network_id, "EndpointID": endpoint_id}
