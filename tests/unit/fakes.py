"""In-memory fakes of the interfaces the drivers talk through (pydriver/interfaces.py: Kernel,
Firewall, KernelSettings, PortReservations, NetworkStore and PoolStore), plus helpers that
build Docker-shaped request bodies with 64-hex ids."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydriver import protocol as p
from pydriver.errors import Conflict, DriverError, HostError, PortInUse
from pydriver.ipam import AnswerKind, Pool, UnacknowledgedAnswer
from pydriver.model import (
    Endpoint,
    Family,
    HostRoute,
    InterfaceSetting,
    IPAddress,
    IPInterface,
    IPNetwork,
    Link,
    Network,
    PortBinding,
    PortMapping,
)
from pydriver.naming import RETIRED_LINK_GROUP
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
    group: int = 0

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
            group=self.group,
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

    async def routes(self, overlapping: Sequence[IPNetwork] | None = None) -> list[HostRoute]:
        self._enter("routes", "")
        connected = [
            HostRoute(address.network, name)
            for name, addresses in self.addresses.items()
            for address in addresses
        ]
        return [
            r
            for r in [*self.extra_routes, *connected]
            if overlapping is None
            or r.destination.prefixlen == 0
            or any(
                r.destination.version == o.version and r.destination.overlaps(o)
                for o in overlapping
            )
        ]

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

    async def create_spare_veth(self, host: str, peer: str) -> bool:
        self._enter("create_spare_veth", host)
        if host in self.links_by_name or peer in self.links_by_name:
            return False
        self.add_link(host, "veth", peer=peer, mtu=1500)
        self.add_link(peer, "veth", peer=host, mtu=1500)
        return True

    async def retire(self, host: str, peer: str) -> None:
        self._enter("retire", host)
        for name in (host, peer):
            link = self.links_by_name.get(name)
            if link is not None:
                link.group, link.up = RETIRED_LINK_GROUP, False
                if name == host:
                    link.master = None

    async def delete_retired(self) -> None:
        self._enter("delete_retired", "")
        for link in [k for k in self.links_by_name.values() if k.group == RETIRED_LINK_GROUP]:
            self.links_by_name.pop(link.name, None)
            self.addresses.pop(link.name, None)
            if link.peer:
                self.links_by_name.pop(link.peer, None)
                self.addresses.pop(link.peer, None)

    async def attach_veth(
        self,
        host: str,
        peer: str,
        peer_mac: str,
        mtu: int | None,
        master: str,
        *,
        hairpin: bool = False,
    ) -> bool:
        self._enter("attach_veth", host)
        if master not in self.links_by_name:
            raise HostError(f"bridge {master} does not exist")
        link, peer_link = self.links_by_name.get(host), self.links_by_name.get(peer)
        if link is None or peer_link is None:
            return False
        peer_link.mac = peer_mac
        link.master, link.up = master, True
        link.group = peer_link.group = 0
        if mtu:
            link.mtu = peer_link.mtu = mtu
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

    async def forget_port_flows(self, proto: int, port: int, family: Family) -> int:
        self._enter("forget_port_flows", f"{proto}/{port}/v{family}")
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
KERNEL_DEFAULTS: dict[InterfaceSetting, str] = {
    "route_localnet": "0",
    "accept_ra": "1",
    "disable_ipv6": "0",
}


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

    async def disable_ipv6(self, ifname: str) -> None:
        self.values[(ifname, "disable_ipv6")] = "1"

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

    held: set[PortMapping] = field(default_factory=set)
    busy: dict[tuple[str, int], str] = field(default_factory=dict)

    def reserve(self, mapping: PortMapping) -> None:
        if (mapping.proto, mapping.host_port) in self.busy:
            raise PortInUse(f"host port {mapping.host_text()}/{mapping.proto} is already in use")
        self.held.add(mapping)

    def release(self, mapping: PortMapping) -> None:
        self.held.discard(mapping)

    async def holder(self, proto: str, port: int) -> str | None:
        return self.busy.get((proto, port))


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------


def _stored(data: dict[str, Any]) -> dict[str, Any]:
    """A record as a database row holds it: plain JSON, nothing shared with the caller."""
    stored: dict[str, Any] = json.loads(json.dumps(data))
    return stored


@dataclass
class _PoolRow:
    data: dict[str, Any]
    unacknowledged: bool
    recorded_at: float | None


@dataclass
class _AddressRow:
    unacknowledged: bool
    kind: AnswerKind
    recorded_at: float | None
    endpoint_name: str | None


class FakeStore:
    """The state in memory, with the SQLite store's semantics (test_store.py runs the same
    checks on both): records are kept in their stored form, so a load after a "restart" gives
    new objects, as reading the database does. Every write is "durable" at once.

    ``fail[method] = error`` makes every later call of that method raise ``error``."""

    def __init__(self) -> None:
        self.networks: dict[str, dict[str, Any]] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.pools: dict[str, _PoolRow] = {}
        self.addresses: dict[tuple[str, str], _AddressRow] = {}
        self.meta: dict[str, str] = {}
        self.quarantine: list[tuple[str, str, str]] = []  # (source, key, error)
        self.fail: dict[str, DriverError] = {}

    def _enter(self, method: str) -> None:
        error = self.fail.get(method)
        if error is not None:
            raise error

    # -- NetworkStore -------------------------------------------------------------------------

    async def load_networks(self) -> list[Network]:
        self._enter("load_networks")
        return [Network.from_dict(_stored(d)) for _, d in sorted(self.networks.items())]

    async def load_endpoints(self) -> list[Endpoint]:
        self._enter("load_endpoints")
        return [Endpoint.from_dict(_stored(d)) for _, d in sorted(self.endpoints.items())]

    async def put_network(self, network: Network) -> None:
        self._enter("put_network")
        self.networks[network.id] = _stored(network.to_dict())

    async def delete_network(self, network_id: str) -> None:
        self._enter("delete_network")
        self.networks.pop(network_id, None)
        for endpoint_id, data in list(self.endpoints.items()):
            if data["network_id"] == network_id:
                del self.endpoints[endpoint_id]

    async def put_endpoint(self, endpoint: Endpoint) -> None:
        self._enter("put_endpoint")
        self.endpoints[endpoint.id] = _stored(endpoint.to_dict())

    async def delete_endpoint(self, endpoint_id: str) -> None:
        self._enter("delete_endpoint")
        self.endpoints.pop(endpoint_id, None)

    # -- PoolStore ----------------------------------------------------------------------------

    async def load_pools(self) -> list[Pool]:
        self._enter("load_pools")
        pools = []
        for pool_id, row in sorted(self.pools.items()):
            mine = {a: r for (pid, a), r in self.addresses.items() if pid == pool_id}
            pools.append(
                Pool.from_dict(
                    _stored(row.data),
                    list(mine),
                    {
                        a: UnacknowledgedAnswer(r.kind, r.recorded_at, r.endpoint_name)
                        for a, r in mine.items()
                        if r.unacknowledged
                    },
                    row.unacknowledged,
                    row.recorded_at if row.unacknowledged else None,
                )
            )
        return pools

    async def put_pool(self, pool: Pool, recorded_at: float | None = None) -> None:
        self._enter("put_pool")
        at = time.time() if recorded_at is None else recorded_at
        self.pools[pool.id] = _PoolRow(_stored(pool.to_dict()), True, at)

    async def delete_pool(self, pool_id: str) -> None:
        self._enter("delete_pool")
        self.pools.pop(pool_id, None)
        for key in [k for k in self.addresses if k[0] == pool_id]:
            del self.addresses[key]

    async def add_address(
        self,
        pool: Pool,
        address: str,
        kind: AnswerKind,
        recorded_at: float | None = None,
        endpoint_name: str | None = None,
    ) -> None:
        self._enter("add_address")
        if (pool.id, address) in self.addresses:
            raise HostError(f"address {address} of pool {pool.id} is already recorded")
        at = time.time() if recorded_at is None else recorded_at
        self.addresses[(pool.id, address)] = _AddressRow(True, kind, at, endpoint_name)
        row = self.pools.get(pool.id)
        if row is not None:  # the pool's row carries the cursor
            row.data = _stored(pool.to_dict())

    async def acknowledge(self, pool_id: str, address: str | None = None) -> None:
        self._enter("acknowledge")
        row = self.pools.get(pool_id) if address is None else self.addresses.get((pool_id, address))
        if row is not None:
            row.unacknowledged = False

    async def remove_address(self, pool_id: str, address: str) -> None:
        self._enter("remove_address")
        self.addresses.pop((pool_id, address), None)

    async def remove_addresses(self, addresses: list[tuple[str, str]]) -> None:
        self._enter("remove_addresses")
        for key in addresses:
            self.addresses.pop(key, None)

    async def get_meta(self, key: str) -> str | None:
        return self.meta.get(key)

    async def set_meta(self, key: str, value: str) -> None:
        self._enter("set_meta")
        self.meta[key] = value

    async def quarantine_meta(self, key: str, error: str) -> None:
        if key in self.meta:
            del self.meta[key]
            self.quarantine.append(("meta", key, error))

    async def quarantined_keys(self, source: str) -> list[str]:
        return [key for kind, key, _ in self.quarantine if kind == source]


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
    v4 = (
        []
        if subnet is None
        else [p.ip_data_body(subnet, gateway, aux_addresses=aux, address_space=address_space)]
    )
    v6 = (
        []
        if v6_subnet is None
        else [p.ip_data_body(v6_subnet, v6_gateway, address_space=address_space)]
    )
    return p.create_network_body(
        network_id, v4, v6, generic=generic, enable_ipv6=v6_subnet is not None, internal=internal
    )


def create_endpoint_body(
    network_id: str,
    endpoint_id: str,
    address: str = "10.50.0.2/24",
    *,
    address_v6: str = "",
    mac: str = "",
    ports: bool = False,
) -> dict[str, Any]:
    """``ports``: the container exposes 80/tcp and publishes it on host port 18100."""
    options = (
        p.port_options_body([PortBinding("tcp", 80, None, 18100, 18100)], [("tcp", 80)])
        if ports
        else {}
    )
    return p.create_endpoint_body(
        network_id, endpoint_id, address, address_v6=address_v6, mac_address=mac, options=options
    )


def join_body(
    network_id: str, endpoint_id: str, sandbox: str = "/var/run/docker/netns/e61ac536cf4e"
) -> dict[str, Any]:
    return p.join_body(network_id, endpoint_id, sandbox)


def endpoint_ref_body(network_id: str, endpoint_id: str) -> dict[str, Any]:
    return p.endpoint_ref_body(network_id, endpoint_id)
