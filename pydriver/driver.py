"""The network driver: decisions and orchestration.

It talks to the kernel, the firewall, sysctls and the store only through the small interfaces
below, so its logic runs in unit tests with fakes. Rules it keeps:

* Persist before acting and before acknowledging. A network or endpoint is recorded as
  ``creating`` before any kernel object exists and becomes ``ready`` just before the reply; a
  network is recorded as ``deleting`` before anything is removed. After a crash, ``reconcile``
  rolls back what was being created (Docker never saw it succeed) and finishes what was being
  deleted, so the kernel and the state always end up agreeing.
* Every step is idempotent, so Docker (or reconcile) may replay any request.
* Requests for different networks run concurrently; requests touching the same network, and
  every change to the set of networks, are serialised with locks.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from . import faults
from .errors import BridgeFull, Conflict, DriverError, InvalidRequest, NotFound
from .fwsync import FirewallWriter
from .hostports import HostPorts, PortInUse, port_holder
from .ipam import ADDRESS_SPACES, HostRoute, describe_route, pool_id_for
from .locks import KeyedLock
from .model import (
    BridgeSettings,
    Endpoint,
    Family,
    InterfaceSetting,
    IPAddress,
    IPInterface,
    IPNetwork,
    Mapping,
    Network,
    NetworkOptions,
    PortBinding,
    Subnet,
)
from .naming import (
    bridge_mac,
    bridge_name,
    container_veth_name,
    endpoint_mac,
    host_veth_name,
    is_pybridge_bridge,
    is_pybridge_veth,
)
from .netlink import MAX_BRIDGE_PORTS, Link
from .options import parse_network_options
from .ports import DEFAULT_EPHEMERAL_RANGE, PortIndex, PortRequest, plan
from .protocol import (
    CreateEndpointRequest,
    CreateNetworkRequest,
    EndpointRef,
    IPData,
    JoinRequest,
    NetworkRef,
    ProgramExternalRequest,
)
from .rules import NetworkRules
from .store import Store

log = logging.getLogger(__name__)

# IP protocol numbers of the published-port protocols whose flows outlive a revoke.
DATAGRAM_PROTOCOLS = {"udp": 17, "sctp": 132}

NETWORKS_LOCK = "networks"
PORTS_LOCK = "host-ports"  # host ports are shared by all networks
# MACs tried per endpoint: a bridge holds at most 1023 ports, so 64 draws of 40 hashed bits
# all hitting a taken one does not happen.
MAC_ATTEMPTS = 64
# How long a host-port conflict with a joined endpoint whose veth is still there is looked at
# again before it is reported: the kernel tears a dead container's namespace down (veths
# last) asynchronously, so the old endpoint of a container dockerd is restarting right now
# may show its veth for a moment.
DYING_VETH_WAIT = 5.0


class Kernel(Protocol):
    async def get_link(self, name: str) -> Link | None: ...
    async def exists(self, name: str) -> bool: ...
    async def links(self) -> list[Link]: ...
    async def routes(self) -> list[HostRoute]: ...
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
    async def delete_link(self, name: str) -> bool: ...
    async def forget_flows(
        self, address: IPAddress, proto: int | None = None, port: int | None = None
    ) -> int: ...
    async def forget_port_flows(self, proto: int, port: int) -> int: ...
    async def set_hairpin(self, name: str) -> None: ...


class FirewallPort(Protocol):
    async def apply(self, networks: Sequence[NetworkRules], *, force: bool = False) -> None: ...
    async def drop_forwarded_by_default(self, family: Family) -> None: ...
    async def drift(self, networks: Sequence[NetworkRules]) -> list[str]: ...


class HostPortsPort(Protocol):
    def reserve(self, mapping: Mapping) -> None: ...
    def release(self, mapping: Mapping) -> None: ...


PortHolder = Callable[[str, int], Awaitable[str | None]]
# Gives (IPAM pool id, address) pairs back to pybridge's IPAM (IpamDriver.release_owned).
AddressReleaser = Callable[[Sequence[tuple[str, IPAddress]]], Awaitable[None]]
# Whether Docker has destroyed the sandbox of this SandboxKey (see sandboxes.py).
SandboxCheck = Callable[[str], Awaitable[bool]]


class SysctlPort(Protocol):
    async def enable_route_localnet(self, ifname: str) -> None: ...
    async def forwarding_enabled(self, family: Family) -> bool: ...
    async def enable_forwarding(self, family: Family) -> None: ...
    async def disable_accept_ra(self, ifname: str) -> None: ...
    async def interface_setting(self, ifname: str, setting: InterfaceSetting) -> str | None: ...
    async def restore_interface_setting(
        self, ifname: str, setting: InterfaceSetting, value: str
    ) -> None: ...


@dataclass(frozen=True)
class JoinResult:
    src_name: str
    dst_prefix: str
    gateway: Any
    gateway_v6: Any
    internal: bool


def short(identifier: str) -> str:
    return identifier[:12]


def _subnets(data: tuple[IPData, ...]) -> tuple[Subnet, ...]:
    return tuple(
        Subnet(
            pool=d.pool,
            gateway=d.gateway,
            aux_addresses=tuple(a.ip for a in d.aux_addresses.values()),
            # Remembered so that pybridge releases an address of this network only in the
            # pool it came from, and only when its own IPAM gave it.
            ipam_pool=pool_id_for(d.pool) if d.address_space in ADDRESS_SPACES else None,
        )
        for d in data
    )


def _publishes_any(mappings: Iterable[Mapping], bindings: Iterable[PortBinding]) -> bool:
    """Whether any of ``mappings`` uses a host port that ``bindings`` ask for (any address).
    Bounded whatever the sizes: the asked ports become merged ranges, looked up by bisection."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for b in bindings:
        if b.host_port:
            ranges.setdefault(b.proto, []).append((b.host_port, max(b.host_port, b.host_port_end)))
    lows: dict[str, list[int]] = {}
    highs: dict[str, list[int]] = {}
    for proto, spans in ranges.items():
        merged: list[tuple[int, int]] = []
        for low, high in sorted(spans):
            if merged and low <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], high))
            else:
                merged.append((low, high))
        lows[proto] = [low for low, _ in merged]
        highs[proto] = [high for _, high in merged]
    for m in mappings:
        starts = lows.get(m.proto)
        if starts:
            i = bisect.bisect_right(starts, m.host_port) - 1
            if i >= 0 and m.host_port <= highs[m.proto][i]:
                return True
    return False


def firewall_view(network: Network, mappings: Sequence[Mapping] = ()) -> NetworkRules:
    return NetworkRules(
        bridge=network.bridge,
        subnets_v4=tuple(s.pool for s in network.subnets_v4),
        subnets_v6=tuple(s.pool for s in network.subnets_v6),
        internal=network.internal,
        icc=network.options.enable_icc,
        masquerade=network.options.enable_ip_masquerade,
        mappings=tuple(mappings),
        gateways=tuple(s.gateway.ip for s in network.subnets if s.gateway is not None),
    )


class NetworkDriver:
    def __init__(
        self,
        store: Store,
        kernel: Kernel,
        firewall: FirewallPort,
        sysctl: SysctlPort,
        host_ports: HostPortsPort | None = None,
        port_holder: PortHolder = port_holder,
        ephemeral_range: tuple[int, int] = DEFAULT_EPHEMERAL_RANGE,
        eager: bool = False,
        release_addresses: AddressReleaser | None = None,
        sandbox_released: SandboxCheck | None = None,
    ) -> None:
        # eager: do at once what is otherwise left to the background (tests over fakes).
        self.eager = eager
        self.release_addresses = release_addresses
        self.sandbox_released = sandbox_released
        self.dying_veth_wait = DYING_VETH_WAIT
        self.store = store
        self.kernel = kernel
        self.firewall = firewall
        self.sysctl = sysctl
        self.host_ports: HostPortsPort = host_ports if host_ports is not None else HostPorts()
        self.port_holder = port_holder
        self.ephemeral_range = ephemeral_range
        self._ephemeral_cursor = 0
        self.networks: dict[str, Network] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self._locks = KeyedLock()
        self.firewall_writer = FirewallWriter(self.firewall.apply, self.firewall_views)
        self._background: set[asyncio.Task[None]] = set()
        self._leaving_bridges: set[str] = set()  # deleted in the background, not yet gone
        self._gone_at_startup: list[Endpoint] = []  # see _remove_gone

    # -- helpers -------------------------------------------------------------------------------

    def _network(self, network_id: str) -> Network:
        network = self.networks.get(network_id)
        if network is None or network.state != "ready":
            raise NotFound(
                f"network {short(network_id)} is not known to pybridge (was it created before "
                "pybridge's state directory was reset?); remove it and create it again"
            )
        return network

    def _endpoint_on(self, network_id: str, endpoint_id: str) -> Endpoint | None:
        """The endpoint, only if it belongs to that network (ids from Docker must agree)."""
        endpoint = self.endpoints.get(endpoint_id)
        if endpoint is None or endpoint.network_id != network_id:
            return None
        return endpoint

    def _endpoints_of(self, network_id: str) -> list[Endpoint]:
        return [e for e in self.endpoints.values() if e.network_id == network_id]

    def _mappings_by_network(self) -> dict[str, list[Mapping]]:
        found: dict[str, list[Mapping]] = {}
        for endpoint in self.endpoints.values():
            found.setdefault(endpoint.network_id, []).extend(endpoint.mappings)
        return found

    def addresses_in_pool(self, pool_id: str) -> set[IPAddress] | None:
        """The addresses endpoints use in pybridge IPAM pool ``pool_id``, or None if no network
        of this driver has a subnet from that pool. A read-only view for the IPAM driver."""
        from_pool: dict[str, list[IPNetwork]] = {}  # network id -> its subnets from that pool
        for network in self.networks.values():
            for subnet in network.subnets:
                if subnet.ipam_pool == pool_id:
                    from_pool.setdefault(network.id, []).append(subnet.pool)
        if not from_pool:
            return None
        used: set[IPAddress] = set()
        for endpoint in self.endpoints.values():
            subnets = from_pool.get(endpoint.network_id)
            if not subnets:
                continue
            for address in (endpoint.address, endpoint.address_v6):
                if address is not None and any(address.ip in pool for pool in subnets):
                    used.add(address.ip)
        return used

    def _owned_addresses(self, endpoint: Endpoint) -> list[tuple[str, IPAddress]]:
        """(pool id, address) of the endpoint's addresses that pybridge's IPAM gave."""
        network = self.networks.get(endpoint.network_id)
        if network is None:
            return []
        owned = []
        for address in (endpoint.address, endpoint.address_v6):
            if address is None:
                continue
            for subnet in network.subnets:
                if subnet.ipam_pool is not None and address.ip in subnet.pool:
                    owned.append((subnet.ipam_pool, address.ip))
                    break
        return owned

    async def _container_gone(self, endpoint: Endpoint) -> bool:
        """A joined endpoint whose host-side veth is gone lost its container: the pair dies
        with the container's network namespace. So did one whose sandbox Docker destroyed (its
        namespace is no longer mounted on its SandboxKey; the kernel may take seconds more to
        tear the namespace and the veth down). An endpoint not yet joined is never gone by
        these tests. Call it under the endpoint's network lock, so no Join or Leave runs
        meanwhile."""
        if endpoint.state != "ready" or not endpoint.sandbox_key:
            return False
        try:
            if not await self.kernel.exists(endpoint.host_veth):
                return True
        except DriverError as err:
            log.warning("cannot check the veth of endpoint %s: %s", short(endpoint.id), err)
            return False
        if self.sandbox_released is None:
            return False
        return await self.sandbox_released(endpoint.sandbox_key)

    async def _evict(self, endpoint: Endpoint, why: str) -> None:
        """Remove an endpoint whose container is gone (``_container_gone``): its record, host
        ports, published-port rules and the address pybridge's IPAM gave it.

        Releasing that address is safe: Docker deletes an endpoint before it releases its
        address, so an endpoint Docker deleted is not here, and one it failed to delete (it
        could not reach pybridge) either had its release fail too, or gets it sent later,
        which pybridge's IPAM ignores while another endpoint uses the address."""
        log.warning(
            "endpoint %s on network %s: its container is gone (%s); removing it",
            short(endpoint.id),
            short(endpoint.network_id),
            why,
        )
        await self._remove_endpoint(endpoint)
        if endpoint.mappings:
            await self._update_firewall_soon()
        await self._release_owned([endpoint])

    async def _release_owned(self, endpoints: Sequence[Endpoint]) -> None:
        """Give back the pybridge-IPAM addresses of removed endpoints whose containers are
        gone (see ``_evict`` for why that is safe)."""
        owned = [pair for endpoint in endpoints for pair in self._owned_addresses(endpoint)]
        if owned and self.release_addresses is not None:
            try:
                await self.release_addresses(owned)
            except DriverError as err:  # the addresses leak: safe, unlike a duplicate
                log.warning("could not release the addresses of vanished containers: %s", err)

    async def _evict_if_gone(self, endpoint_id: str, why: str) -> bool:
        """Evict the endpoint if its container is gone, checked now under its network's lock.
        Never evicts a live endpoint (veth present, or not joined)."""
        seen = self.endpoints.get(endpoint_id)
        if seen is None:
            return False
        async with self._locks.hold(seen.network_id):
            current = self.endpoints.get(endpoint_id)
            if current is None or not await self._container_gone(current):
                return False
            await self._evict(current, why)
            return True

    def firewall_views(self) -> list[NetworkRules]:
        mappings = self._mappings_by_network()
        return [
            firewall_view(n, mappings.get(n.id, ()))
            for n in self.networks.values()
            if n.state != "deleting"
        ]

    async def _apply_firewall(self, *, force: bool = False) -> None:
        """Write the rules and wait for them (network changes: containers rely on them)."""
        await self.firewall_writer.write(force=force)

    async def _update_firewall_soon(self) -> None:
        """Ask for the rules to be written without waiting (published ports go live a few
        milliseconds after the answer; conflicts were already checked)."""
        if self.eager:
            await self.firewall_writer.write()
        else:
            self.firewall_writer.request()

    async def _in_background(self, job: Awaitable[None], what: str) -> None:
        async def run() -> None:
            try:
                await job
            except DriverError as err:  # leftovers are removed at the next start
                log.warning("%s: %s", what, err)

        if self.eager:
            await run()
            return
        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _wait_background(self) -> None:
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def _wait_for_a_background_job(self) -> bool:
        """Wait until one background job ends; False if none was running."""
        if not self._background:
            return False
        await asyncio.wait(list(self._background), return_when=asyncio.FIRST_COMPLETED)
        return True

    async def settle(self) -> None:
        """Wait for background work: firewall writes and veth removals (tests, shutdown)."""
        await self._wait_background()
        await self.firewall_writer.settle()

    async def close(self) -> None:
        await self.settle()
        await self.firewall_writer.stop()

    # -- networks ------------------------------------------------------------------------------

    async def create_network(self, req: CreateNetworkRequest) -> None:
        options = parse_network_options(
            req.generic_options, enable_ipv4=req.enable_ipv4, enable_ipv6=req.enable_ipv6
        )
        if not req.ipv4_data and not req.ipv6_data:
            if not req.enable_ipv4 and not req.enable_ipv6:
                # Docker 28+ sends --ipv4=false without --ipv6 on to a remote driver as is
                # (only its own bridge driver refuses it).
                raise InvalidRequest(
                    "the network would have neither IPv4 nor IPv6: use --ipv4=false together "
                    "with --ipv6"
                )
            raise InvalidRequest("the network has no subnet; give one with --subnet")
        async with self._locks.hold(NETWORKS_LOCK), self._locks.hold(req.network_id):
            existing = self.networks.get(req.network_id)
            if existing is not None and existing.state == "ready":
                log.info("network %s already exists; replay acknowledged", short(req.network_id))
                return
            name = options.bridge_name or bridge_name(req.network_id)
            # A removed network's bridge of that name may be going just now: let it go first.
            while name in self._leaving_bridges and await self._wait_for_a_background_job():
                pass
            for other in self.networks.values():
                if other.id != req.network_id and other.bridge == name:
                    raise Conflict(
                        f"bridge name {name} is already used by pybridge network {short(other.id)}"
                    )
            subnets_v4, subnets_v6 = _subnets(req.ipv4_data), _subnets(req.ipv6_data)
            routes = await self.kernel.routes()
            self._check_subnets(req.network_id, name, subnets_v4 + subnets_v6, routes)
            foreign: tuple[IPInterface, ...] = ()
            previous = BridgeSettings()
            if existing is not None:
                # A crashed earlier attempt: keep its ownership record and the settings it
                # found (the bridge now has pybridge's).
                bridge_owned = existing.bridge_owned
                foreign = existing.foreign_addresses
                previous = existing.previous_settings
            else:
                link = await self.kernel.get_link(name)
                bridge_owned = link is None
                if link is not None:
                    foreign = await self._check_adoption(
                        link, subnets_v4 + subnets_v6, routes, req.network_id
                    )
                    previous = await self._settings_before(link, req.internal, options)
            network = Network(
                id=req.network_id,
                bridge=name,
                bridge_owned=bridge_owned,
                subnets_v4=subnets_v4,
                subnets_v6=subnets_v6,
                options=options,
                internal=req.internal,
                enable_ipv6=req.enable_ipv6,
                raw_options=dict(req.generic_options),
                state="creating",
                foreign_addresses=foreign,
                previous_settings=previous,
            )
            await self.store.put_network(network)
            self.networks[network.id] = network
            await faults.point("network.create.recorded")
            try:
                await self._ensure_network_datapath(network)
                await faults.point("network.create.bridge")
                await self._apply_firewall()
                await faults.point("network.create.firewall")
                await self._ensure_forwarding(network)
            except BaseException:
                log.warning("creating network %s failed; rolling back", short(network.id))
                await self._remove_network(network, best_effort=True)
                raise
            ready = network.with_changes(state="ready")
            await self.store.put_network(ready)
            self.networks[network.id] = ready
            await faults.point("network.create.ready")
        log.info("network %s ready on bridge %s", short(network.id), name)

    def _check_subnets(
        self,
        network_id: str,
        bridge: str,
        subnets: tuple[Subnet, ...],
        host_routes: Sequence[HostRoute],
    ) -> None:
        ours = {n.bridge for n in self.networks.values()}
        routes = [r for r in host_routes if r.device not in ours | {bridge}]
        for subnet in subnets:
            for other in self.networks.values():
                if other.id == network_id:
                    continue
                for theirs in other.subnets:
                    if theirs.pool.version == subnet.pool.version and theirs.pool.overlaps(
                        subnet.pool
                    ):
                        raise Conflict(
                            f"subnet {subnet.pool} overlaps subnet {theirs.pool} of pybridge "
                            f"network {short(other.id)} (bridge {other.bridge})"
                        )
            for route in routes:
                dest = route.destination
                if (
                    dest.prefixlen
                    and dest.version == subnet.pool.version
                    and dest.overlaps(subnet.pool)
                ):
                    raise Conflict(f"subnet {subnet.pool} overlaps {describe_route(route)}")

    async def _check_adoption(
        self,
        link: Link,
        subnets: tuple[Subnet, ...],
        routes: Sequence[HostRoute],
        network_id: str,
    ) -> tuple[IPInterface, ...]:
        """Refuse to take over an existing interface that is not free for a network; returns
        the gateway addresses that are already on it (they stay when the network goes)."""
        name = link.name
        if link.kind != "bridge":
            raise Conflict(f"interface {name} already exists and is not a bridge")
        if is_pybridge_bridge(name):
            # pybridge deletes unknown pyb-* bridges at start-up: one it did not make for this
            # network would be deleted as a leftover once the network is gone.
            raise Conflict(
                f"bridge {name} already exists and was not made by pybridge for network "
                f"{short(network_id)}; names starting with pyb- are pybridge's own: remove it "
                "or choose another name"
            )
        for route in routes:
            if route.device == name and route.destination.prefixlen == 0:
                raise Conflict(
                    f"bridge {name} carries the host's default IPv{route.destination.version} "
                    "route; pybridge does not take over the host's uplink: choose another "
                    "bridge name"
                )
        # Another interface on it (a NIC, a VM's tap) would reach every container port: to a
        # bridge, that is traffic within the network.
        others = sorted(
            other.name
            for other in await self.kernel.links()
            if other.master == link.index and not is_pybridge_veth(other.name)
        )
        if others:
            raise Conflict(
                f"bridge {name} already has {', '.join(others[:3])} on it, which would reach "
                "every container of the network directly; pybridge adopts only a bridge with "
                "nothing else on it: choose another bridge name"
            )
        present = await self.kernel.link_addresses(name)
        for address in present:
            if address.version == 6 and address.ip.is_link_local:
                continue  # every IPv6 interface has one
            if not any(address.ip in s.pool for s in subnets):
                raise Conflict(
                    f"bridge {name} has the address {address}, outside the network's subnets; "
                    "pybridge adopts only a bridge with no addresses but the network's own: "
                    "choose another bridge name or subnet"
                )
        return tuple(s.gateway for s in subnets if s.gateway is not None and s.gateway in present)

    async def _settings_before(
        self, link: Link, internal: bool, options: NetworkOptions
    ) -> BridgeSettings:
        """What pybridge is about to change on a bridge it did not create (see
        _ensure_network_datapath), as it is now: only what will change is recorded."""
        name = link.name
        accept_ra = await self.sysctl.interface_setting(name, "accept_ra")
        route_localnet = (
            None if internal else await self.sysctl.interface_setting(name, "route_localnet")
        )
        return BridgeSettings(
            route_localnet=route_localnet if route_localnet not in (None, "1") else None,
            accept_ra=accept_ra if accept_ra not in (None, "0") else None,
            mtu=link.mtu if options.mtu and link.mtu != options.mtu else None,
            up=False if not link.up else None,
        )

    async def _restore_bridge_settings(self, network: Network) -> None:
        """Put back what pybridge changed on a bridge it did not create (its addresses are
        already gone)."""
        saved = network.previous_settings
        if saved == BridgeSettings() or not await self.kernel.exists(network.bridge):
            return
        if saved.route_localnet is not None:
            await self.sysctl.restore_interface_setting(
                network.bridge, "route_localnet", saved.route_localnet
            )
        if saved.accept_ra is not None:
            await self.sysctl.restore_interface_setting(
                network.bridge, "accept_ra", saved.accept_ra
            )
        if saved.mtu is not None:
            await self.kernel.set_link(network.bridge, mtu=saved.mtu)
        if saved.up is False:
            await self.kernel.set_link(network.bridge, up=False)

    async def _ensure_network_datapath(self, network: Network) -> None:
        mtu = network.options.mtu
        await self.kernel.ensure_bridge(network.bridge, bridge_mac(network.id), mtu)
        if mtu:
            await self.kernel.set_link(network.bridge, mtu=mtu)
        await self.sysctl.disable_accept_ra(network.bridge)
        if not network.internal:
            # Lets 127.0.0.1:PORT reach published ports (DNAT'd in OUTPUT, routed out here).
            await self.sysctl.enable_route_localnet(network.bridge)
        for subnet in network.subnets:
            if subnet.gateway is not None:
                await self.kernel.ensure_address(network.bridge, subnet.gateway)
        await self.kernel.set_link(network.bridge, up=True)

    async def _ensure_forwarding(self, network: Network) -> None:
        families: tuple[Family, ...] = (4, 6) if network.subnets_v6 else (4,)
        for family in families:
            if await self.sysctl.forwarding_enabled(family):
                continue
            # Forwarding turns the host into a router between all its interfaces. Docker sets
            # the FORWARD policy to DROP when it is the one enabling it, and only then: when
            # pybridge does it first (it starts before dockerd), the policy must still be DROP.
            await self.firewall.drop_forwarded_by_default(family)
            await self.sysctl.enable_forwarding(family)

    async def _remove_network(self, network: Network, *, best_effort: bool = False) -> None:
        """Remove every trace of ``network``: endpoints, rules, bridge (or only the addresses
        pybridge added to a bridge the user owns), then the record. Safe to repeat.

        ``best_effort`` (rollback of a failed create) carries on past failing steps and always
        drops the record, so the same request can be retried; the next firewall apply or
        start-up removes whatever a failed step left.

        Otherwise the rules go before the answer, and a bridge named by pybridge only loses its
        addresses (and so its routes) before the record goes, and is deleted just after the
        answer: the kernel needs 30-70 ms to delete a bridge, and nothing needs to wait for
        that. A crash in between leaves an unrecorded pyb-* bridge, which start-up removes.
        A bridge pybridge did not create keeps its other addresses and gets its settings back
        (BridgeSettings)."""
        deleting = network.with_changes(state="deleting")
        await self.store.put_network(deleting)
        self.networks[network.id] = deleting
        await faults.point("network.delete.recorded")
        later = (
            not best_effort
            and not self.eager
            and network.bridge_owned
            and is_pybridge_bridge(network.bridge)
        )

        async def remove_bridge() -> None:
            if network.bridge_owned and not later:
                await self.kernel.delete_link(network.bridge)
                return
            # A bridge deleted later loses its addresses, and with them its routes, now.
            for subnet in network.subnets:
                gateway = subnet.gateway
                if gateway is not None and gateway not in network.foreign_addresses:
                    await self.kernel.remove_address(network.bridge, gateway)
            if not network.bridge_owned:
                await self._restore_bridge_settings(network)

        steps: list[Callable[[], Awaitable[None]]] = [
            functools.partial(self._remove_endpoint, e, wait=not later)
            for e in self._endpoints_of(network.id)
        ]
        steps += [
            # Waited for even when the bridge goes later: once Docker has its answer, it may
            # give the subnet (or the bridge name) to another network at once, which stale
            # rules (masquerade, isolation drops) would catch.
            self._apply_firewall,
            functools.partial(faults.point, "network.delete.firewall"),
            remove_bridge,
            functools.partial(faults.point, "network.delete.bridge"),
        ]
        for step in steps:
            try:
                await step()
            except DriverError as err:
                if not best_effort:
                    raise
                log.warning("while removing network %s: %s", short(network.id), err)
        await self.store.delete_network(network.id)
        self.networks.pop(network.id, None)
        if later:
            self._leaving_bridges.add(network.bridge)
            await self._in_background(
                self._delete_bridge(network.bridge), f"removing bridge {network.bridge}"
            )

    async def _delete_bridge(self, name: str) -> None:
        try:
            await self.kernel.delete_link(name)
        finally:
            self._leaving_bridges.discard(name)

    async def delete_network(self, ref: NetworkRef) -> None:
        async with self._locks.hold(NETWORKS_LOCK), self._locks.hold(ref.network_id):
            network = self.networks.get(ref.network_id)
            if network is None:
                log.info("network %s was already deleted", short(ref.network_id))
                return
            leftovers = self._endpoints_of(network.id)
            if leftovers:
                log.warning(
                    "network %s still had %d endpoint(s) Docker never deleted; removing them",
                    short(network.id),
                    len(leftovers),
                )
            await self._remove_network(network)
        log.info("network %s deleted", short(ref.network_id))

    # -- endpoints -----------------------------------------------------------------------------

    async def create_endpoint(self, req: CreateEndpointRequest) -> str | None:
        """Create the veth pair. Returns the MAC address to report, if pybridge chose it."""
        async with self._locks.hold(req.network_id):
            network = self._network(req.network_id)
            existing = self.endpoints.get(req.endpoint_id)
            if existing is not None and existing.network_id != req.network_id:
                raise Conflict(
                    f"endpoint {short(req.endpoint_id)} already exists on another network"
                )
            self._check_endpoint_addresses(network, req)
            if existing is not None and existing.state == "ready":
                log.info("endpoint %s already exists; replay acknowledged", short(existing.id))
                return (
                    existing.mac_address
                    if existing.mac_generated and req.mac_address is None
                    else None
                )
            first = req.address or req.address_v6
            address = first.ip if first is not None else None
            await self._evict_gone_holders(network, req, address)
            endpoint = Endpoint(
                id=req.endpoint_id,
                network_id=network.id,
                host_veth=host_veth_name(req.endpoint_id),
                container_veth=container_veth_name(req.endpoint_id),
                mac_address=req.mac_address or self._free_mac(network, req.endpoint_id, address),
                mac_generated=req.mac_address is None,
                address=req.address,
                address_v6=req.address_v6,
                port_bindings=req.ports.bindings,
                exposed_ports=req.ports.exposed,
                state="creating",
                created_at=time.time(),
            )
            await self.store.put_endpoint(endpoint)
            self.endpoints[endpoint.id] = endpoint
            await faults.point("endpoint.create.recorded")
            try:
                await self._ensure_endpoint_datapath(network, endpoint, fresh=True)
                await faults.point("endpoint.create.veth")
            except BaseException:
                await self._remove_endpoint(endpoint)
                raise
            ready = endpoint.with_changes(state="ready")
            await self.store.put_endpoint(ready)
            self.endpoints[endpoint.id] = ready
            await faults.point("endpoint.create.ready")
        return ready.mac_address if ready.mac_generated else None

    async def _evict_gone_holders(
        self, network: Network, req: CreateEndpointRequest, address: IPAddress | None
    ) -> None:
        """Evict endpoints of this network whose containers are gone and that hold the new
        endpoint's address or the MAC it derives from it (Docker's IPAM gives a restarted
        container's address again once it forgot the dead endpoint). Runs under the network's
        lock. A live holder stays; the address is then logged as used twice."""
        addresses = {a.ip for a in (req.address, req.address_v6) if a is not None}
        mac = req.mac_address or (endpoint_mac(req.endpoint_id, address) if address else None)
        for other in self._endpoints_of(network.id):
            if other.id == req.endpoint_id:
                continue
            shared = {a.ip for a in (other.address, other.address_v6) if a is not None}
            if not (shared & addresses or (mac is not None and other.mac_address == mac)):
                continue
            if await self._container_gone(other):
                why = f"its address or MAC is wanted by endpoint {short(req.endpoint_id)}"
                await self._evict(other, why)
            elif shared & addresses:
                log.warning(
                    "endpoint %s: address %s is also used by endpoint %s on network %s",
                    short(req.endpoint_id),
                    ", ".join(str(a) for a in sorted(shared & addresses, key=str)),
                    short(other.id),
                    short(network.id),
                )

    def _free_mac(self, network: Network, endpoint_id: str, address: IPAddress | None) -> str:
        """The MAC derived from the address (or the endpoint id), or, if another endpoint of
        the network (or the bridge) has it, the next of a fixed sequence: the same address
        gets the same MAC whenever it is free, whatever restarts in between."""
        taken = {e.mac_address for e in self._endpoints_of(network.id) if e.id != endpoint_id}
        taken.add(bridge_mac(network.id))
        for attempt in range(MAC_ATTEMPTS):
            mac = endpoint_mac(endpoint_id, address, attempt)
            if mac not in taken:
                if attempt:
                    log.info(
                        "endpoint %s: MAC for %s taken; using %s",
                        short(endpoint_id),
                        address,
                        mac,
                    )
                return mac
        raise Conflict(f"no free MAC address for endpoint {short(endpoint_id)}")

    def _check_endpoint_addresses(self, network: Network, req: CreateEndpointRequest) -> None:
        for address, subnets in (
            (req.address, network.subnets_v4),
            (req.address_v6, network.subnets_v6),
        ):
            if address is None:
                continue
            if subnets and not any(address.ip in s.pool for s in subnets):
                pools = ", ".join(str(s.pool) for s in subnets)
                raise InvalidRequest(
                    f"address {address.ip} is outside the network's subnets ({pools})"
                )

    async def _ensure_endpoint_datapath(
        self, network: Network, endpoint: Endpoint, *, fresh: bool
    ) -> None:
        mtu = network.options.mtu
        names = (endpoint.host_veth, endpoint.container_veth, endpoint.mac_address, mtu)
        hairpin = not network.internal

        async def create() -> bool:
            while True:
                # Created, enslaved, up and in hairpin mode in one trip to the netlink thread.
                try:
                    return await self.kernel.ensure_veth(
                        *names, master=network.bridge, hairpin=hairpin
                    )
                except BridgeFull:
                    # Veths of removed containers leave the bridge in the background, oldest
                    # first: a bridge near its limit may be full of those. Each one that goes
                    # frees a port.
                    if not await self._wait_for_a_background_job():
                        raise BridgeFull(
                            f"network {short(network.id)} is full: its bridge "
                            f"{network.bridge} already has {MAX_BRIDGE_PORTS} interfaces, the "
                            "most a Linux bridge can hold; remove a container from it first"
                        ) from None

        created = await create()
        if fresh and not created:
            # A leftover from an interrupted attempt: start clean so both ends are ours.
            await self.kernel.delete_link(endpoint.host_veth)
            await self.kernel.delete_link(endpoint.container_veth)
            created = await create()
        if not created:
            await self.kernel.set_link(endpoint.host_veth, master=network.bridge, up=True, mtu=mtu)
            if hairpin:
                await self.kernel.set_hairpin(endpoint.host_veth)

    async def _remove_endpoint(self, endpoint: Endpoint, *, wait: bool = True) -> None:
        # Forget first: if we crash after this, reconcile removes the veth as an orphan.
        await self.store.delete_endpoint(endpoint.id)
        self.endpoints.pop(endpoint.id, None)
        await faults.point("endpoint.delete.forgotten")
        for mapping in endpoint.mappings:
            self.host_ports.release(mapping)
        if endpoint.mappings:
            # Its DNAT rules go first: until then a new flow could still be NATed to it.
            await self._apply_firewall()
        # Before the answer, so before Docker can release the address and give it to another
        # container that would inherit the flows (and their reply-state accept).
        await self._forget_flows(endpoint)
        if wait:
            await self._delete_veths(endpoint)
        else:
            # The kernel takes tens of milliseconds to delete a veth; nobody needs to wait.
            await self._in_background(
                self._delete_veths(endpoint), f"removing the veth of {short(endpoint.id)}"
            )

    async def _forget_flows(self, endpoint: Endpoint) -> None:
        for address in (endpoint.address, endpoint.address_v6):
            if address is None:
                continue
            try:
                await self.kernel.forget_flows(address.ip)
            except DriverError as err:  # they time out on their own eventually
                log.warning("endpoint %s: %s", short(endpoint.id), err)

    async def _delete_veths(self, endpoint: Endpoint) -> None:
        # Deleting the host end removes the pair wherever the other end is.
        await self.kernel.delete_link(endpoint.host_veth)
        await self.kernel.delete_link(endpoint.container_veth)

    async def delete_endpoint(self, ref: EndpointRef) -> None:
        async with self._locks.hold(ref.network_id):
            endpoint = self._endpoint_on(ref.network_id, ref.endpoint_id)
            if endpoint is None:
                log.info("endpoint %s was already deleted", short(ref.endpoint_id))
                return
            await self._remove_endpoint(endpoint, wait=False)
            if endpoint.mappings:  # after a dockerd restart Docker may skip the Revoke
                await self._update_firewall_soon()

    def endpoint_oper_info(self, ref: EndpointRef) -> dict[str, Any]:
        # Docker calls this often and must never see it fail.
        endpoint = self._endpoint_on(ref.network_id, ref.endpoint_id)
        network = self.networks.get(ref.network_id)
        if endpoint is None or network is None:
            return {}
        info: dict[str, Any] = {
            "bridge": network.bridge,
            "veth_host": endpoint.host_veth,
            "mac_address": endpoint.mac_address,
        }
        if endpoint.address:
            info["address"] = str(endpoint.address)
        if endpoint.address_v6:
            info["address_v6"] = str(endpoint.address_v6)
        return info

    async def join(self, req: JoinRequest) -> JoinResult:
        async with self._locks.hold(req.network_id):
            network = self._network(req.network_id)
            endpoint = self._endpoint_on(req.network_id, req.endpoint_id)
            if endpoint is None or endpoint.state != "ready":
                raise NotFound(
                    f"endpoint {short(req.endpoint_id)} is not known to pybridge on network "
                    f"{short(req.network_id)}"
                )
            if not await self.kernel.exists(endpoint.container_veth):
                # Docker moved it away earlier (a replayed Join) or it vanished: recreate.
                await self.kernel.delete_link(endpoint.host_veth)
                await self._ensure_endpoint_datapath(network, endpoint, fresh=True)
            # (Otherwise CreateEndpoint made the pair moments ago, on the bridge and up.)
            joined = endpoint.with_changes(
                sandbox_key=req.sandbox_key or None,
                port_bindings=req.ports.bindings if req.ports.present else endpoint.port_bindings,
                exposed_ports=req.ports.exposed if req.ports.present else endpoint.exposed_ports,
            )
            if joined != endpoint:
                await self.store.put_endpoint(joined)
                self.endpoints[joined.id] = joined
            await faults.point("join.recorded")
        return JoinResult(
            src_name=endpoint.container_veth,
            dst_prefix=network.options.container_iface_prefix,
            # Internal networks give no default route: they must not look like a way out.
            gateway=None if network.internal else network.gateway_v4,
            gateway_v6=None if network.internal else network.gateway_v6,
            internal=network.internal,
        )

    async def leave(self, ref: EndpointRef) -> None:
        async with self._locks.hold(ref.network_id):
            endpoint = self._endpoint_on(ref.network_id, ref.endpoint_id)
            if endpoint is None:
                log.info("endpoint %s is not known; leave acknowledged", short(ref.endpoint_id))
                return
            if endpoint.sandbox_key is not None:
                left = endpoint.with_changes(sandbox_key=None)
                await self.store.put_endpoint(left)
                self.endpoints[left.id] = left

    async def program_external_connectivity(self, req: ProgramExternalRequest) -> None:
        """Publish the endpoint's ports. Docker does nothing for `-p` when a remote driver's
        endpoint is the gateway, so this is the whole of port publishing. May be called again
        without a Revoke (Docker 29, whenever the endpoint's gateway roles change): the new
        publication replaces the old one exactly.

        ``req.other_gateway`` (Docker's no_proxy_6to4): the container's IPv4 and IPv6 gateways
        are different endpoints. Docker's own bridge driver reads it as "do not proxy host IPv6
        to this IPv4-only container"; pybridge never maps one family to the other anyway. What
        it does mean for pybridge: host addresses of the family this endpoint is not the
        gateway for belong to the other endpoint, which publishes them. So an endpoint with an
        IPv4 address publishes IPv4 only (Docker 29 sends the flag only to an endpoint that is
        not the IPv6 gateway), an IPv6-only one (only Docker 28 sends it one) IPv6 only, and a
        binding for the other family is skipped rather than refused.

        A host port published for an endpoint whose container is gone (a container restarted
        after a dockerd crash gets a new endpoint, and Docker never deleted the old one) is
        taken back from it, and the publication tried again."""
        try:
            await self._program_external(req)
        except Conflict:
            if not await self._evict_dead_port_owners(req):
                raise
            await self._program_external(req)

    async def _evict_dead_port_owners(self, req: ProgramExternalRequest) -> bool:
        """Evict the endpoints publishing a host port ``req`` asks for whose containers are
        gone; whether any was. Holds no lock while it looks, then each owner's own network
        lock while it checks and removes (the caller's lock is not held, so two requests on
        two networks never wait for each other's)."""
        endpoint = self._endpoint_on(req.network_id, req.endpoint_id)
        if endpoint is None:
            return False
        bindings = req.ports.bindings if req.ports.present else endpoint.port_bindings
        owners = [
            e.id
            for e in self.endpoints.values()
            if e.id != endpoint.id and _publishes_any(e.mappings, bindings)
        ]
        why = f"its host ports are wanted by endpoint {short(endpoint.id)}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.dying_veth_wait
        while True:
            evicted = False
            for owner in owners:
                evicted = await self._evict_if_gone(owner, why) or evicted
            if evicted:
                return True
            # Only joined owners can turn out gone (see DYING_VETH_WAIT); no lock is held
            # while waiting.
            owners = [o for o in owners if (e := self.endpoints.get(o)) and e.sandbox_key]
            if not owners or loop.time() >= deadline:
                return False
            await asyncio.sleep(0.1)

    async def _program_external(self, req: ProgramExternalRequest) -> None:
        async with self._locks.hold(req.network_id):
            network = self._network(req.network_id)
            endpoint = self._endpoint_on(req.network_id, req.endpoint_id)
            if endpoint is None:
                raise NotFound(
                    f"endpoint {short(req.endpoint_id)} is not known to pybridge on network "
                    f"{short(req.network_id)}"
                )
            bindings = req.ports.bindings if req.ports.present else endpoint.port_bindings
            if network.internal:
                if bindings:
                    log.info("network %s is internal: ports are not published", short(network.id))
                return
            same = bindings == endpoint.port_bindings
            if endpoint.mappings and same and req.other_gateway == endpoint.other_gateway:
                return  # already published exactly so
            if not bindings and not endpoint.mappings:
                return  # nothing to publish, nothing published
            async with self._locks.hold(PORTS_LOCK):
                await self._publish(network, endpoint, bindings, req.other_gateway)

    async def _publish(
        self,
        network: Network,
        endpoint: Endpoint,
        bindings: tuple[PortBinding, ...],
        other_gateway: bool = False,
    ) -> None:
        v4 = endpoint.address.ip if endpoint.address else None
        v6 = endpoint.address_v6.ip if endpoint.address_v6 else None
        if other_gateway and v4 is not None:
            v6 = None  # another endpoint is the IPv6 gateway: host IPv6 ports are its own
        requests = plan(
            bindings,
            v4,
            v6,
            network.options.host_binding_ipv4,
            leave_unserved=other_gateway,
        )
        taken = PortIndex(
            m for e in self.endpoints.values() if e.id != endpoint.id for m in e.mappings
        )
        for old in endpoint.mappings:
            self.host_ports.release(old)
        chosen: list[Mapping] = []
        try:
            for request in requests:
                mappings = await self._choose(request, taken, endpoint)
                chosen.extend(mappings)
                for mapping in mappings:
                    taken.add(mapping)
            published = endpoint.with_changes(
                port_bindings=bindings, mappings=tuple(chosen), other_gateway=other_gateway
            )
            await self.store.put_endpoint(published)
            self.endpoints[endpoint.id] = published
            await faults.point("ports.publish.recorded")
            await self._update_firewall_soon()
            await faults.point("ports.publish.firewall")
        except BaseException:
            for mapping in chosen:
                self.host_ports.release(mapping)
            for old in endpoint.mappings:  # put the previous publication back as it was
                try:
                    self.host_ports.reserve(old)
                except DriverError as err:  # its rule stays; start-up tries again
                    log.warning("endpoint %s: %s", short(endpoint.id), err)
            raise
        # A republication without Revoke (Docker 29) may drop mappings, and new ones may have
        # flows already (see _forget_datagram_flows).
        await self._forget_datagram_flows(
            gone=[m for m in endpoint.mappings if m not in chosen],
            new=[m for m in chosen if m not in endpoint.mappings],
        )
        for mapping in chosen:
            log.info("endpoint %s publishes %s", short(endpoint.id), mapping.describe())
        if other_gateway and len(requests) < len(bindings):
            log.info(
                "endpoint %s: %d port binding(s) left to the container's other gateway endpoint",
                short(endpoint.id),
                len(bindings) - len(requests),
            )

    async def _forget_datagram_flows(
        self, *, gone: Sequence[Mapping], new: Sequence[Mapping]
    ) -> None:
        """Connection tracking outlives a publication. A UDP or SCTP flow (TCP ones end by
        themselves) of a mapping that is gone stays NATed to the container as long as its
        client keeps sending; one to a port just published may have been set up before the
        DNAT rule existed, to pybridge's own socket holding the port, and would never reach
        the container. Both are forgotten once the rules are written, just after the answer
        (as Docker does for its own ports)."""
        gone = [m for m in gone if m.proto in DATAGRAM_PROTOCOLS]
        new = [m for m in new if m.proto in DATAGRAM_PROTOCOLS]
        if not gone and not new:
            return

        async def forget() -> None:
            await self._apply_firewall()
            for mapping in gone:
                await self.kernel.forget_flows(
                    mapping.container_ip, DATAGRAM_PROTOCOLS[mapping.proto], mapping.container_port
                )
            for mapping in new:
                await self.kernel.forget_port_flows(
                    DATAGRAM_PROTOCOLS[mapping.proto], mapping.host_port
                )

        await self._in_background(forget(), "forgetting flows of published ports")

    async def _choose(  # noqa: C901 (issue 15 item 1: the driver split)
        self, request: PortRequest, taken: PortIndex, endpoint: Endpoint
    ) -> list[Mapping]:
        """Pick a host port for one binding and reserve it on every address it covers.

        Runs under PORTS_LOCK and may try every port of a range (or of the ephemeral range),
        so each try costs a lookup and a bind, nothing more: who holds a port (a search of
        every endpoint, or `ss`, a process) is looked up once, for the final error only."""
        binding = request.binding
        single = not request.ephemeral and binding.host_port == binding.host_port_end
        # Why the last port tried could not be had: published by pybridge, or held by a
        # host process.
        last: Mapping | tuple[PortInUse, int] | None = None
        for tried, port in enumerate(
            request.candidates(self.ephemeral_range, self._ephemeral_cursor)
        ):
            if tried and tried % 256 == 0:
                await asyncio.sleep(0)  # a long walk (a nearly full range) lets others run
            mappings = request.mappings(port)
            clash = taken.conflict(mappings)
            if clash is not None:
                last = clash
                if single:
                    break
                continue
            reserved: list[Mapping] = []
            try:
                for mapping in mappings:
                    self.host_ports.reserve(mapping)
                    reserved.append(mapping)
            except BaseException as err:
                for mapping in reserved:
                    self.host_ports.release(mapping)
                if not isinstance(err, PortInUse):
                    raise  # out of file descriptors, say: no other port would do better
                last = (err, port)
                if single:
                    break
                continue
            if request.ephemeral:
                self._ephemeral_cursor = port
            return mappings
        if request.ephemeral:
            low, high = self.ephemeral_range
            raise Conflict(f"no free host port is left in the ephemeral range {low}-{high}")
        reason = await self._why_taken(binding.proto, last) if last is not None else None
        if single and reason is not None:
            raise reason
        raise Conflict(
            f"no free host port in {binding.host_port}-{binding.host_port_end}/{binding.proto} "
            f"for container port {binding.port}" + (f" (last: {reason})" if reason else "")
        )

    async def _why_taken(self, proto: str, last: Mapping | tuple[PortInUse, int]) -> Conflict:
        if isinstance(last, Mapping):
            return Conflict(
                f"host port {last.host_text()}/{last.proto} is already published by "
                f"pybridge for {self._owner_of(last)}"
            )
        in_use, port = last
        holder = await self.port_holder(proto, port)
        who = holder or f"another program on the host (`ss -ltunp 'sport = :{port}'` names it)"
        return Conflict(f"{in_use} by {who}")

    def _owner_of(self, mapping: Mapping) -> str:
        for endpoint in self.endpoints.values():
            if mapping in endpoint.mappings:
                return f"endpoint {short(endpoint.id)} on network {short(endpoint.network_id)}"
        return "another endpoint"

    async def revoke_external_connectivity(self, ref: EndpointRef) -> None:
        async with self._locks.hold(ref.network_id):
            endpoint = self._endpoint_on(ref.network_id, ref.endpoint_id)
            if endpoint is None or not endpoint.mappings:
                return
            async with self._locks.hold(PORTS_LOCK):
                revoked = endpoint.with_changes(mappings=())
                await self.store.put_endpoint(revoked)
                self.endpoints[endpoint.id] = revoked
                await faults.point("ports.revoke.recorded")
                for mapping in endpoint.mappings:
                    self.host_ports.release(mapping)
                await self._update_firewall_soon()
                await self._forget_datagram_flows(gone=endpoint.mappings, new=())
            log.info("endpoint %s no longer publishes ports", short(endpoint.id))

    # -- background upkeep ------------------------------------------------------------------

    async def heal_firewall(self, confirm_delay: float = 0.5) -> list[str]:
        """Restore pybridge's rules and jumps if something removed or reordered them (a
        firewall reload, `iptables -F`, dockerd rebuilding its chains). Touches nothing else.

        A difference must still be there after ``confirm_delay``, so a change that is being
        applied right now is not mistaken for damage."""
        problems = await self.firewall.drift(self.firewall_views())
        if not problems:
            return []
        await asyncio.sleep(confirm_delay)
        async with self._locks.hold(NETWORKS_LOCK):
            problems = await self.firewall.drift(self.firewall_views())
            if problems:
                for problem in problems:
                    log.warning("firewall: %s; restoring pybridge's rules", problem)
                await self._apply_firewall(force=True)
        return problems

    async def collect_garbage(
        self, suspects: set[str], now: float, unjoined_grace: float = 600.0
    ) -> tuple[set[str], list[Endpoint]]:
        """Remove endpoints whose container is gone without Docker telling pybridge (a dockerd
        crash, or a restart while pybridge was down). Never asks Docker: a joined endpoint is
        gone when its host veth vanished (``_container_gone``); an endpoint never joined long
        after it was made is gone too. Only what two scans in a row (``suspects`` from the
        last one) agree on is removed. Returns the new suspects and the removed endpoints.

        Addresses: Docker sends DeleteEndpoint, then ReleaseAddress, whenever it reaches
        pybridge; an endpoint still here is one Docker never deleted. A joined one whose
        container is gone gets its pybridge-IPAM address released (``_evict``: with Docker's
        own IPAM, or pybridge's under another driver, nothing is released). One never joined
        is only forgotten: it may be the leftover of a start that failed half-way, whose
        address Docker still releases itself, so releasing it here could free it twice (a
        leak is safe, a duplicate is not)."""
        found: set[str] = set()
        for endpoint in list(self.endpoints.values()):
            if await self._container_gone(endpoint):
                found.add(endpoint.id)
        for endpoint in self.endpoints.values():
            never_joined = endpoint.state == "ready" and not endpoint.sandbox_key
            if never_joined and now - endpoint.created_at > unjoined_grace:
                found.add(endpoint.id)
        removed: list[Endpoint] = []
        for endpoint_id in sorted(found & suspects):
            seen = self.endpoints.get(endpoint_id)
            if seen is None:
                continue
            async with self._locks.hold(seen.network_id):
                if self.endpoints.get(endpoint_id) != seen:
                    continue  # changed meanwhile (joined, say): leave it for the next scan
                if seen.sandbox_key:
                    if not await self._container_gone(seen):
                        continue
                    await self._evict(seen, f"sandbox {seen.sandbox_key}, veth gone")
                else:
                    log.warning(
                        "endpoint %s on network %s: never joined, long after it was made; "
                        "removing it",
                        short(seen.id),
                        short(seen.network_id),
                    )
                    await self._remove_endpoint(seen)
                    if seen.mappings:
                        await self._update_firewall_soon()
                removed.append(seen)
        return found - {e.id for e in removed}, removed

    # -- start-up ------------------------------------------------------------------------------

    async def load(self) -> None:
        self.networks = {n.id: n for n in await self.store.load_networks()}
        self.endpoints = {e.id: e for e in await self.store.load_endpoints()}

    async def reconcile(self) -> list[str]:
        """Make the kernel and firewall match the state. Returns what was repaired.

        Runs before the socket is bound. One broken network must not keep pybridge from
        serving the others, so failures are logged per item and the rest carries on."""
        repairs: list[str] = []

        async def attempt(what: str, step: Callable[[], Awaitable[None]]) -> None:
            try:
                await step()
            except DriverError as err:
                repairs.append(f"could not {what}: {err}")

        async with self._locks.hold(NETWORKS_LOCK):
            for network in list(self.networks.values()):
                if network.state != "ready":
                    repairs.append(
                        f"finished an interrupted {network.state} of network {short(network.id)}"
                    )
                    await attempt(
                        f"remove network {short(network.id)}",
                        functools.partial(self._remove_network, network, best_effort=True),
                    )
            for endpoint in list(self.endpoints.values()):
                if endpoint.network_id not in self.networks or endpoint.state != "ready":
                    repairs.append(f"removed an interrupted endpoint {short(endpoint.id)}")
                    await attempt(
                        f"remove endpoint {short(endpoint.id)}",
                        functools.partial(self._remove_endpoint, endpoint),
                    )
            await attempt(
                "restore bridges and veths",
                functools.partial(self._restore_links, attempt, repairs),
            )
            await attempt("apply the firewall", self._apply_firewall)
            gone, self._gone_at_startup = self._gone_at_startup, []
            for endpoint in gone:
                await self._forget_flows(endpoint)
            for network in self.networks.values():
                await attempt(
                    "enable forwarding", functools.partial(self._ensure_forwarding, network)
                )
        for repair in repairs:
            log.warning("reconcile: %s", repair)
        return repairs

    async def _restore_links(
        self,
        attempt: Callable[[str, Callable[[], Awaitable[None]]], Awaitable[None]],
        repairs: list[str],
    ) -> None:
        # One dump of every interface, rather than one query per bridge and veth.
        links = {link.name: link for link in await self.kernel.links()}
        for network in list(self.networks.values()):
            await attempt(
                f"restore network {short(network.id)}",
                functools.partial(self._restore_network, network, links, repairs),
            )
        # Joined endpoints whose veth is gone: their containers are.
        gone = [e for e in self.endpoints.values() if e.sandbox_key and e.host_veth not in links]
        if gone:
            await attempt(
                "remove endpoints whose containers are gone",
                functools.partial(self._remove_gone, gone, repairs),
            )
        for endpoint in list(self.endpoints.values()):
            await attempt(
                f"restore endpoint {short(endpoint.id)}",
                functools.partial(self._restore_endpoint, endpoint, links, repairs),
            )
        await attempt("remove leftovers", functools.partial(self._remove_orphans, links, repairs))

    async def _restore_network(
        self, network: Network, links: dict[str, Link], repairs: list[str]
    ) -> None:
        if network.bridge not in links and not network.bridge_owned:
            # The bridge pybridge adopted is gone (removed by hand, or not yet made by the
            # host's own network set-up after a reboot). The network's containers need one, so
            # it is made again; but it stays the user's: pybridge never deletes it, which the
            # host's own set-up may count on. Restoring its settings later means giving back
            # what a new bridge has.
            repairs.append(
                f"recreated bridge {network.bridge}, which pybridge did not create: it stays "
                "when the network is removed"
            )
            await self.kernel.ensure_bridge(network.bridge, bridge_mac(network.id), None)
            link = await self.kernel.get_link(network.bridge)
            if link is not None:
                network = network.with_changes(
                    foreign_addresses=(),
                    previous_settings=await self._settings_before(
                        link, network.internal, network.options
                    ),
                )
                await self.store.put_network(network)
                self.networks[network.id] = network
        elif network.bridge not in links:
            repairs.append(f"recreated bridge {network.bridge}")
        await self._ensure_network_datapath(network)

    async def _remove_gone(self, gone: Sequence[Endpoint], repairs: list[str]) -> None:
        """Joined endpoints whose veth died with the container's namespace (a reboot, or the
        container exited while pybridge was down). Docker starts a restarted container with a
        new endpoint, and these would hold its host ports: they go now, before the socket is
        bound, so no request can race this. Their host ports were never reserved in this
        process, their veths are gone, and reconcile writes the firewall once afterwards; the
        addresses pybridge's IPAM gave them go back in one transaction."""
        self._gone_at_startup.extend(gone)  # their flows go once the rules are written
        for endpoint in gone:
            await self.store.delete_endpoint(endpoint.id)
            self.endpoints.pop(endpoint.id, None)
            repairs.append(
                f"removed endpoint {short(endpoint.id)}: its container is gone "
                f"(veth {endpoint.host_veth} missing)"
            )
        await self._release_owned(gone)

    async def _restore_endpoint(
        self, endpoint: Endpoint, links: dict[str, Link], repairs: list[str]
    ) -> None:
        network = self.networks[endpoint.network_id]
        veth = links.get(endpoint.host_veth)
        for mapping in endpoint.mappings:
            try:
                self.host_ports.reserve(mapping)
            except PortInUse as err:
                # The DNAT rule stays (the container keeps its port); say who took it.
                holder = await self.port_holder(mapping.proto, mapping.host_port)
                repairs.append(f"{err} by {holder or 'another program'} while pybridge was down")
            except DriverError as err:  # out of file descriptors, say: the rule stays too
                repairs.append(str(err))
        if veth is not None:
            # Most veths are as they were: only touch those off their bridge or down. (A
            # bridge missing from the dump was recreated just now: its veths need attaching.)
            bridge = links.get(network.bridge)
            if not veth.up or bridge is None or veth.master != bridge.index:
                await self.kernel.set_link(endpoint.host_veth, master=network.bridge, up=True)
        else:  # not joined yet: Docker may still join it
            repairs.append(f"recreated veth {endpoint.host_veth}")
            await self._ensure_endpoint_datapath(network, endpoint, fresh=False)

    async def _remove_orphans(self, links: dict[str, Link], repairs: list[str]) -> None:
        bridges = {n.bridge for n in self.networks.values()}
        veths = {e.host_veth for e in self.endpoints.values()} | {
            e.container_veth for e in self.endpoints.values()
        }
        for link in links.values():
            if link.kind == "bridge" and is_pybridge_bridge(link.name) and link.name not in bridges:
                await self.kernel.delete_link(link.name)
                repairs.append(f"removed leftover bridge {link.name}")
            elif (
                link.kind == "veth"
                and is_pybridge_veth(link.name)
                and link.name not in veths
                and await self.kernel.delete_link(link.name)
            ):
                repairs.append(f"removed leftover veth {link.name}")


__all__ = ["DriverError", "JoinResult", "NetworkDriver", "firewall_view"]
