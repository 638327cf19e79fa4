"""What the logic needs from the host, as interfaces: the one place to look for them.

The network driver and the IPAM driver depend on these Protocols only; the adapters that
implement them (netlink.Netlink, firewall.IptablesFirewall, hostports.SocketReservations and
hostports.port_holder, sysctl.Sysctl, store.SqliteStore) are wired together in one place,
cli.serve, and the unit tests wire in-memory fakes instead (tests/unit/fakes.py). Records
that cross these interfaces are in model.py; errors they raise are in errors.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import Protocol

from .clustermodel import Change, Entry
from .ipam import AnswerKind, Pool
from .model import (
    Endpoint,
    Family,
    HostRoute,
    InterfaceSetting,
    IPAddress,
    IPInterface,
    IPNetwork,
    Link,
    Network,
    PortMapping,
)
from .rules import NetworkRules
from .tunnel import Step, TunnelEntries

# BR_MAX_PORTS - 1 (port number 0 is never used): Kernel.ensure_veth raises BridgeFull when a
# bridge already has this many interfaces.
MAX_BRIDGE_PORTS = 1023


class Kernel(Protocol):
    """Links, addresses, routes and connection tracking of the host's network namespace. Every
    ``ensure_*`` is idempotent and every removal treats "already gone" as success."""

    async def get_link(self, name: str) -> Link | None: ...
    async def exists(self, name: str) -> bool: ...
    async def links(self) -> list[Link]: ...
    async def routes(self, overlapping: Sequence[IPNetwork] | None = None) -> list[HostRoute]: ...
    async def ensure_bridge(self, name: str, mac: str, mtu: int | None) -> bool: ...
    async def set_link(
        self,
        name: str,
        *,
        up: bool | None = None,
        mtu: int | None = None,
        master: str | None = None,
    ) -> None: ...
    async def ensure_address(self, name: str, address: IPInterface) -> None: ...
    async def link_addresses(self, name: str) -> list[IPInterface]: ...
    async def remove_address(self, name: str, address: IPInterface) -> None: ...
    async def ensure_veth(
        self,
        host: str,
        peer: str,
        peer_mac: str,
        mtu: int | None,
        master: str | None = None,
        *,
        hairpin: bool = False,
    ) -> bool: ...
    async def attach_veth(
        self,
        host: str,
        peer: str,
        peer_mac: str,
        mtu: int | None,
        master: str,
        *,
        hairpin: bool = False,
    ) -> bool: ...
    async def create_spare_veth(self, host: str, peer: str) -> bool: ...
    async def retire(self, host: str, peer: str) -> None: ...
    async def delete_retired(self) -> None: ...
    async def delete_link(self, name: str) -> bool: ...
    async def forget_flows(
        self, address: IPAddress, proto: int | None = None, port: int | None = None
    ) -> int: ...
    async def forget_port_flows(self, proto: int, port: int, family: Family) -> int: ...
    async def set_hairpin(self, name: str) -> None: ...


class Firewall(Protocol):
    """pybridge's own chains and the jumps to them (rendered by rules.py)."""

    async def apply(self, networks: Sequence[NetworkRules], *, force: bool = False) -> None: ...
    async def drop_forwarded_by_default(self, family: Family) -> None: ...
    async def drift(self, networks: Sequence[NetworkRules]) -> list[str]: ...


class PortReservations(Protocol):
    """Holds the host ports pybridge publishes, so no host process can take one. ``reserve``
    raises errors.PortInUse when something else holds the port."""

    def reserve(self, mapping: PortMapping) -> None: ...
    def release(self, mapping: PortMapping) -> None: ...


class KernelSettings(Protocol):
    """Forwarding, and the per-interface settings pybridge changes on its bridges."""

    async def enable_route_localnet(self, ifname: str) -> None: ...
    async def forwarding_enabled(self, family: Family) -> bool: ...
    async def enable_forwarding(self, family: Family) -> None: ...
    async def disable_accept_ra(self, ifname: str) -> None: ...
    async def disable_ipv6(self, ifname: str) -> None: ...
    async def interface_setting(self, ifname: str, setting: InterfaceSetting) -> str | None: ...
    async def restore_interface_setting(
        self, ifname: str, setting: InterfaceSetting, value: str
    ) -> None: ...


class NetworkStore(Protocol):
    """The network driver's records. Each write is on disk when it returns (deleting a
    network deletes its endpoints too)."""

    async def load_networks(self) -> list[Network]: ...
    async def load_endpoints(self) -> list[Endpoint]: ...
    async def put_network(self, network: Network) -> None: ...
    async def delete_network(self, network_id: str) -> None: ...
    async def put_endpoint(self, endpoint: Endpoint) -> None: ...
    async def delete_endpoint(self, endpoint_id: str) -> None: ...
    async def get_meta(self, key: str) -> str | None: ...
    async def set_meta(self, key: str, value: str) -> None: ...


class PoolStore(Protocol):
    """The IPAM driver's records: pools, their addresses, and whether each answer is
    unacknowledged (recorded before it was sent, not yet known to have reached Docker)."""

    async def load_pools(self) -> list[Pool]: ...
    async def put_pool(self, pool: Pool, recorded_at: float | None = None) -> None: ...
    async def delete_pool(self, pool_id: str) -> None: ...
    async def add_address(
        self,
        pool: Pool,
        address: str,
        kind: AnswerKind,
        recorded_at: float | None = None,
        endpoint_name: str | None = None,
    ) -> None: ...
    async def acknowledge(self, pool_id: str, address: str | None = None) -> None: ...
    async def remove_address(self, pool_id: str, address: str) -> None: ...
    async def remove_addresses(self, addresses: list[tuple[str, str]]) -> None: ...
    async def get_meta(self, key: str) -> str | None: ...
    async def set_meta(self, key: str, value: str) -> None: ...
    async def quarantine_meta(self, key: str, error: str) -> None: ...
    async def quarantined_keys(self, source: str) -> list[str]: ...


# Describes the process holding a host port (proto, port), or None (hostports.port_holder).
PortHolder = Callable[[str, int], Awaitable[str | None]]
# The host's routes (Kernel.routes), for the IPAM driver's choice of subnets.
RoutesProvider = Callable[[], Awaitable[list[HostRoute]]]
# Gives (IPAM pool id, address) pairs back to pybridge's IPAM (IpamDriver.release_owned).
AddressReleaser = Callable[[Sequence[tuple[str, IPAddress]]], Awaitable[None]]
# Whether Docker has destroyed the sandbox of this SandboxKey (sandboxes.sandbox_released).
SandboxCheck = Callable[[str], Awaitable[bool]]
# The addresses that endpoints known to pybridge's network driver use in an IPAM pool, or
# None when the pool backs no pybridge network (State.addresses_in_pool).
EndpointAddresses = Callable[[str], Collection[IPAddress] | None]


class TunnelKernel(Protocol):
    """The kernel side of a segment's tunnel (netlink.Netlink)."""

    async def ensure_vxlan(
        self, name: str, vni: int, port: int, local: IPAddress, underlay: str, master: str
    ) -> bool: ...

    async def tunnel_entries(self, name: str) -> TunnelEntries: ...

    async def apply_tunnel(self, name: str, steps: Sequence[Step]) -> None: ...

    async def delete_link(self, name: str) -> bool: ...

    async def links(self) -> list[Link]: ...


class MetaStore(Protocol):
    """Small records in the state database (store.SqliteStore)."""

    async def get_meta(self, key: str) -> str | None: ...

    async def set_meta(self, key: str, value: str) -> None: ...


class SegmentAddresses(Protocol):
    """Addresses of pools that back networks spanning hosts (clusterhost.ClusterHost)."""

    def pool_segment(self, pool_id: str) -> str | None: ...

    async def segment_subnet(self, name: str, *, v6: bool) -> IPNetwork: ...

    def pick(
        self, pool_id: str, subnet: IPNetwork, used: Collection[int], wanted: IPAddress | None
    ) -> IPAddress | None: ...

    async def claim_for(
        self, pool_id: str, subnet: IPNetwork, wanted: IPAddress | None
    ) -> None: ...

    async def release_pool(self, pool_id: str) -> None: ...


__all__ = [
    "MAX_BRIDGE_PORTS",
    "AddressReleaser",
    "EndpointAddresses",
    "Firewall",
    "Kernel",
    "KernelSettings",
    "MetaStore",
    "NetworkStore",
    "PoolStore",
    "PortHolder",
    "PortReservations",
    "RoutesProvider",
    "SandboxCheck",
    "SegmentAddresses",
    "TunnelKernel",
]


class ClusterStore(Protocol):
    """The cluster store (etcdstore.EtcdStore): every call bounded in time, raising HostError
    (ClusterUnavailable) when it cannot answer."""

    async def get(self, key: str) -> Entry | None: ...

    async def create(self, key: str, value: bytes, lease: int = 0) -> tuple[bool, Entry | None]: ...

    async def put(self, key: str, value: bytes, lease: int = 0) -> int: ...

    async def delete(self, key: str) -> bool: ...

    async def delete_if(self, key: str, value: bytes) -> bool: ...

    async def read_prefix(self, prefix: str) -> tuple[int, list[Entry]]: ...

    async def grant(self, ttl: int) -> int: ...

    async def keep_alive(self, lease: int) -> int: ...

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Change]: ...

    async def close(self) -> None: ...
