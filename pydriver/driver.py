"""The network driver: Docker's verbs, as orchestration of the concerns that do the work.

Each verb takes its locks, checks the request against the state, records what it is about to
do, asks the kernel, the firewall and the host ports for it, and records that it is done.
Who does what:

* state.py: the networks and endpoints, persisted before anything acts on them;
* bridges.py and veths.py: a network's bridge and an endpoint's veth pair in the kernel;
* removal.py: taking them down in a crash-safe order; eviction.py: endpoints whose
  containers are gone; publishing.py: published ports; startup.py: reconcile at start-up;
* background.py: what is left until after the answer; firewall_writer.py: the rules.

Rules every verb keeps:

* Persist before acting and before acknowledging. A network or endpoint is recorded as
  ``creating`` before any kernel object exists and becomes ``ready`` just before the reply; a
  network is recorded as ``deleting`` before anything is removed. After a crash, ``reconcile``
  rolls back what was being created (Docker never saw it succeed) and finishes what was being
  deleted, so the kernel and the state always end up agreeing.
* Every step is idempotent, so Docker (or reconcile) may replay any request.
* Requests for different networks run concurrently; requests touching the same network, and
  every change to the set of networks, are serialised with locks (locks.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import faults
from .background import Background
from .bridges import Bridges, check_bridge_name, check_subnets
from .clusterhost import ClusterHost
from .errors import Conflict, DriverError, InvalidRequest, NotFound
from .eviction import Eviction
from .firewall_writer import FirewallWriter
from .flows import StaleFlows
from .interfaces import (
    AddressReleaser,
    Firewall,
    Kernel,
    KernelSettings,
    NetworkStore,
    PortHolder,
    PortReservations,
    SandboxCheck,
)
from .ipam import ADDRESS_SPACES, pool_id_for
from .locks import NETWORKS_LOCK, PORTS_LOCK, KernelWork, KeyedLock
from .model import BridgeSettings, Endpoint, IPInterface, Network, Subnet
from .naming import bridge_name, container_veth_name, host_veth_name, short
from .options import (
    check_endpoint_options,
    check_host_binding,
    gateway_skips,
    parse_network_options,
)
from .ports import DEFAULT_EPHEMERAL_RANGE
from .protocol import (
    CreateEndpointRequest,
    CreateNetworkRequest,
    EndpointRef,
    GwAllocCheckRequest,
    IPData,
    JoinRequest,
    NetworkRef,
    ProgramExternalRequest,
)
from .publishing import DYING_VETH_WAIT, Publisher
from .removal import Removal
from .rules import NetworkRules
from .segments import SEGMENT, segment_options
from .spares import SpareVeths
from .startup import Startup
from .state import State
from .veths import Veths, check_addresses, free_mac

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JoinResult:
    src_name: str
    dst_prefix: str
    gateway: Any
    gateway_v6: Any
    internal: bool


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


@dataclass(frozen=True)
class MacsOfOthers:
    """The MACs of a network's endpoints but one, as free_mac asks for them (``in``)."""

    state: State
    network_id: str
    but: str

    def __contains__(self, mac: object) -> bool:
        return isinstance(mac, str) and self.state.mac_taken(self.network_id, mac, self.but)


class NetworkDriver:
    def __init__(
        self,
        store: NetworkStore,
        kernel: Kernel,
        firewall: Firewall,
        sysctl: KernelSettings,
        host_ports: PortReservations,
        port_holder: PortHolder,
        ephemeral_range: tuple[int, int] = DEFAULT_EPHEMERAL_RANGE,
        inline_background: bool = False,
        release_addresses: AddressReleaser | None = None,
        dying_veth_wait: float = DYING_VETH_WAIT,
        sandbox_released: SandboxCheck | None = None,
        cluster: ClusterHost | None = None,
        spare_veths: int = 0,
    ) -> None:
        """``inline_background``: run at once what is otherwise left to the background (tests
        over fakes, which then need not wait for it). ``release_addresses``: gives addresses
        of endpoints whose containers are gone back to pybridge's IPAM. ``spare_veths``: how
        many veth pairs to keep made ahead (spares.py; the service keeps SPARE_PAIRS)."""
        self.kernel = kernel
        self.cluster = cluster  # networks that span hosts (pydriver serve --cluster)
        self.state = State(store)
        self._locks = KeyedLock()
        # nf_tables commits vs. link changes made in the background (locks.KernelWork).
        self.kernel_work = KernelWork()

        async def apply(views: Sequence[NetworkRules], *, force: bool = False) -> None:
            async with self.kernel_work.busy():
                await firewall.apply(views, force=force)

        self.firewall_writer = FirewallWriter(apply, self._firewall_views, firewall.drift)
        if cluster is not None:
            cluster.firewall_changed = self.firewall_writer.request
        self.background = Background(self.firewall_writer, inline=inline_background)
        self.bridges = Bridges(kernel, sysctl, firewall, self.background)
        self.veths = Veths(kernel, self.background, self.kernel_work)
        self.spares = SpareVeths(kernel, spare_veths, self.kernel_work)
        self.stale_flows = StaleFlows(store, kernel, inline=inline_background)
        self.removal = Removal(
            self.state,
            kernel,
            host_ports,
            self.firewall_writer,
            self.background,
            self.bridges,
            self.veths,
            self.stale_flows,
        )
        self.eviction = Eviction(
            self.state, kernel, self._locks, self.removal, release_addresses, sandbox_released
        )
        self.publisher = Publisher(
            self.state,
            kernel,
            host_ports,
            port_holder,
            self.firewall_writer,
            self.background,
            self.eviction,
            ephemeral_range,
            dying_veth_wait,
        )
        self.startup = Startup(
            self.state,
            kernel,
            self._locks,
            self.firewall_writer,
            self.bridges,
            self.veths,
            self.removal,
            self.eviction,
            self.publisher,
        )

    def _firewall_views(self) -> list[NetworkRules]:
        return self.state.firewall_views(self.cluster.tunnels() if self.cluster else None)

    @property
    def networks(self) -> Mapping[str, Network]:
        return self.state.networks

    @property
    def endpoints(self) -> Mapping[str, Endpoint]:
        return self.state.endpoints

    # -- life cycle ----------------------------------------------------------------------------

    async def load(self) -> None:
        await self.state.load()
        await self.stale_flows.load()

    async def reconcile(self) -> list[str]:
        """Make the kernel and firewall match the state (startup.py); what was repaired."""
        return await self.startup.reconcile()

    async def settle(self) -> None:
        """Wait for background work: firewall writes, veth removals, stale flows (tests,
        shutdown)."""
        await self.background.settle()
        await self.veths.settle()
        await self.stale_flows.settled_all()

    async def close(self) -> None:
        await self.spares.close()
        await self.stale_flows.close()
        await self.background.close()
        await self.veths.close()

    # -- upkeep --------------------------------------------------------------------------------

    async def heal_firewall(self, confirm_delay: float = 0.5) -> list[str]:
        """Restore pybridge's rules if something changed them (FirewallWriter.repair); checked
        again while no network is being created or removed."""
        return await self.firewall_writer.repair(
            lambda: self._locks.hold(NETWORKS_LOCK), confirm_delay
        )

    async def collect_garbage(
        self, suspects: set[str], now: float, unjoined_grace: float = 600.0
    ) -> tuple[set[str], list[Endpoint]]:
        """Remove endpoints whose containers are gone without Docker saying so
        (Eviction.collect); the new suspects and the removed endpoints."""
        return await self.eviction.collect(suspects, now, unjoined_grace)

    # -- networks ------------------------------------------------------------------------------

    def gw_alloc_check(self, req: GwAllocCheckRequest) -> tuple[bool, bool]:
        """Docker 28+, before it allocates a new network's gateways: whether to skip the IPv4
        and the IPv6 one (options.gateway_skips). The options are checked here as in
        CreateNetwork, so a bad one fails `docker network create` before any address is
        taken. Older daemons never ask: they allocate both, and a gateway of an isolated
        family then simply stays off the bridge."""
        options = parse_network_options(
            req.generic_options,
            enable_ipv4=req.enable_ipv4,
            enable_ipv6=req.enable_ipv6,
            internal=req.internal,
        )
        return gateway_skips(options, internal=req.internal)

    async def create_network(self, req: CreateNetworkRequest) -> None:
        options = parse_network_options(
            req.generic_options,
            enable_ipv4=req.enable_ipv4,
            enable_ipv6=req.enable_ipv6,
            internal=req.internal,
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
        check_host_binding(options, has_ipv6=bool(req.ipv6_data))
        joins = segment_options(req.generic_options)
        segment = None
        if joins is not None:
            if self.cluster is None:
                raise InvalidRequest(
                    f"{SEGMENT} needs pybridge started in a cluster "
                    "(pydriver serve --cluster etcd://HOST:2379)"
                )
            # Before any lock: the one wait on the cluster (bounded) holds up no other network.
            segment = await self.cluster.prepare(
                joins,
                req,
                icc=options.enable_icc,
                owned=all(
                    d.address_space in ADDRESS_SPACES for d in (*req.ipv4_data, *req.ipv6_data)
                ),
            )
            if options.mtu is None or options.mtu > segment.mtu:
                # The encapsulation's overhead comes off the containers' MTU.
                options = dataclasses.replace(options, mtu=segment.mtu)
        async with self._locks.hold(NETWORKS_LOCK), self._locks.hold(req.network_id):
            existing = self.state.networks.get(req.network_id)
            if existing is not None and existing.state == "ready":
                log.info("network %s already exists; replay acknowledged", short(req.network_id))
                return
            name = options.bridge_name or bridge_name(req.network_id)
            await self.bridges.wait_until_gone(name)
            check_bridge_name(req.network_id, name, self.state.networks.values())
            subnets_v4, subnets_v6 = _subnets(req.ipv4_data), _subnets(req.ipv6_data)
            subnets = subnets_v4 + subnets_v6
            # (Only those that matter: decoding every route took 12 ms at 500 networks.)
            routes = await self.kernel.routes([s.pool for s in subnets])
            check_subnets(req.network_id, name, subnets, self.state.networks.values(), routes)
            owned: bool
            foreign: tuple[IPInterface, ...]
            previous: BridgeSettings
            if existing is not None:
                # A crashed earlier attempt: keep its ownership record and the settings it
                # found (the bridge now has pybridge's).
                owned = existing.bridge_owned
                foreign, previous = existing.foreign_addresses, existing.previous_settings
            else:
                owned, foreign, previous = await self.bridges.take(
                    name, req.network_id, subnets, routes, req.internal, options
                )
            network = Network(
                id=req.network_id,
                bridge=name,
                bridge_owned=owned,
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
            await self.state.put_network(network)
            await faults.point("network.create.recorded")
            try:
                await self.bridges.ensure(network)
                await faults.point("network.create.bridge")
                await self.firewall_writer.write()
                await faults.point("network.create.firewall")
                await self.bridges.ensure_forwarding(network)
                if self.cluster is not None and segment is not None:
                    await self.cluster.attach(network, segment)
            except BaseException:
                log.warning("creating network %s failed; rolling back", short(network.id))
                if self.cluster is not None:
                    await self.cluster.detach(network)
                await self.removal.network(network, best_effort=True)
                raise
            await self.state.put_network(network.with_changes(state="ready"))
            await faults.point("network.create.ready")
        log.info("network %s ready on bridge %s", short(network.id), name)

    async def delete_network(self, ref: NetworkRef) -> None:
        async with self._locks.hold(NETWORKS_LOCK), self._locks.hold(ref.network_id):
            network = self.state.networks.get(ref.network_id)
            if network is None:
                log.info("network %s was already deleted", short(ref.network_id))
                return
            leftovers = self.state.endpoints_of(network.id)
            if leftovers:
                log.warning(
                    "network %s still had %d endpoint(s) Docker never deleted; removing them",
                    short(network.id),
                    len(leftovers),
                )
            if self.cluster is not None:
                await self.cluster.detach(network)
            await self.removal.network(network)
            if not self.state.networks:
                self.spares.release_all()  # no endpoint to come until a network does
        log.info("network %s deleted", short(ref.network_id))

    # -- endpoints -----------------------------------------------------------------------------

    async def create_endpoint(self, req: CreateEndpointRequest) -> str | None:
        """Create the veth pair. Returns the MAC address to report, if pybridge chose it."""
        check_endpoint_options(req.driver_options)
        async with self._locks.hold(req.network_id):
            network = self.state.ready_network(req.network_id)
            existing = self.state.endpoints.get(req.endpoint_id)
            if existing is not None and existing.network_id != req.network_id:
                raise Conflict(
                    f"endpoint {short(req.endpoint_id)} already exists on another network"
                )
            check_addresses(network, req.address, req.address_v6)
            if existing is not None and existing.state == "ready":
                log.info("endpoint %s already exists; replay acknowledged", short(existing.id))
                return (
                    existing.mac_address
                    if existing.mac_generated and req.mac_address is None
                    else None
                )
            first = req.address or req.address_v6
            address = first.ip if first is not None else None
            wanted = {a.ip for a in (req.address, req.address_v6) if a is not None}
            await self.eviction.evict_holders(
                network, req.endpoint_id, wanted, address, req.mac_address
            )
            # The flows of an endpoint that had the address before go first (StaleFlows).
            await self.stale_flows.settled(wanted)
            macs = MacsOfOthers(self.state, network.id, req.endpoint_id)
            mac = req.mac_address or free_mac(network, req.endpoint_id, address, macs)
            # The names a crashed attempt recorded (its pair may be there), else a spare
            # pair's (spares.py), else the endpoint's own.
            spare = None if existing is not None else self.spares.take()
            if existing is not None:
                host_veth, container_veth = existing.host_veth, existing.container_veth
            elif spare is not None:
                host_veth, container_veth = spare
            else:
                host_veth = host_veth_name(req.endpoint_id)
                container_veth = container_veth_name(req.endpoint_id)
            endpoint = Endpoint(
                id=req.endpoint_id,
                network_id=network.id,
                host_veth=host_veth,
                container_veth=container_veth,
                mac_address=mac,
                mac_generated=req.mac_address is None,
                address=req.address,
                address_v6=req.address_v6,
                port_bindings=req.ports.bindings,
                exposed_ports=req.ports.exposed,
                state="creating",
                created_at=time.time(),
            )
            try:
                await self.state.put_endpoint(endpoint)
            except BaseException:
                if spare is not None:  # untouched, and recorded nowhere: still a spare
                    self.spares.give_back(spare)
                raise
            await faults.point("endpoint.create.recorded")
            try:
                await self.veths.ensure(network, endpoint, fresh=True, spare=spare is not None)
                await faults.point("endpoint.create.veth")
            except BaseException:
                await self.removal.endpoint(endpoint)
                raise
            finally:
                self.spares.refill()  # after this endpoint's own link changes
            ready = endpoint.with_changes(state="ready")
            await self.state.put_endpoint(ready)
            await faults.point("endpoint.create.ready")
            if self.cluster is not None:
                self.cluster.endpoint_ready(network, ready)  # announced, never waited on
        return ready.mac_address if ready.mac_generated else None

    async def delete_endpoint(self, ref: EndpointRef) -> None:
        async with self._locks.hold(ref.network_id):
            endpoint = self.state.endpoint_on(ref.network_id, ref.endpoint_id)
            if endpoint is None:
                log.info("endpoint %s was already deleted", short(ref.endpoint_id))
                return
            # Its published ports go too: after a dockerd restart Docker may skip the Revoke.
            await self.removal.endpoint(endpoint, wait=False)
            network = self.state.networks.get(ref.network_id)
            if self.cluster is not None and network is not None:
                self.cluster.endpoint_gone(network, endpoint)

    def endpoint_oper_info(self, ref: EndpointRef) -> dict[str, Any]:
        # Docker calls this often and must never see it fail.
        endpoint = self.state.endpoint_on(ref.network_id, ref.endpoint_id)
        network = self.state.networks.get(ref.network_id)
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

    def _known_endpoint(
        self, network_id: str, endpoint_id: str, *, ready: bool = False
    ) -> Endpoint:
        endpoint = self.state.endpoint_on(network_id, endpoint_id)
        if endpoint is None or (ready and endpoint.state != "ready"):
            raise NotFound(
                f"endpoint {short(endpoint_id)} is not known to pybridge on network "
                f"{short(network_id)}"
            )
        return endpoint

    async def join(self, req: JoinRequest) -> JoinResult:
        async with self._locks.hold(req.network_id):
            network = self.state.ready_network(req.network_id)
            endpoint = self._known_endpoint(req.network_id, req.endpoint_id, ready=True)
            if not await self.kernel.exists(endpoint.container_veth):
                # Docker moved it away earlier (a replayed Join) or it vanished: recreate.
                await self.kernel.delete_link(endpoint.host_veth)
                await self.veths.ensure(network, endpoint, fresh=True)
            # (Otherwise CreateEndpoint made the pair moments ago, on the bridge and up.)
            joined = endpoint.with_changes(
                sandbox_key=req.sandbox_key or None,
                port_bindings=req.ports.bindings if req.ports.present else endpoint.port_bindings,
                exposed_ports=req.ports.exposed if req.ports.present else endpoint.exposed_ports,
            )
            if joined != endpoint:
                await self.state.put_endpoint(joined)
            await faults.point("join.recorded")
        return JoinResult(
            src_name=endpoint.container_veth,
            dst_prefix=network.options.container_iface_prefix,
            # Internal networks give no default route: they must not look like a way out (an
            # isolated family is always internal). inhibit_ipv4 keeps the IPv4 gateway out of
            # the bridge, not out of Join: containers route via it, elsewhere on the LAN, as
            # with Docker's own driver (moby v28.5.2 setup_ipv4_linux.go:54-57).
            gateway=None if network.internal else network.gateway_v4,
            gateway_v6=None if network.internal else network.gateway_v6,
            internal=network.internal,
        )

    async def leave(self, ref: EndpointRef) -> None:
        async with self._locks.hold(ref.network_id):
            endpoint = self.state.endpoint_on(ref.network_id, ref.endpoint_id)
            if endpoint is None:
                log.info("endpoint %s is not known; leave acknowledged", short(ref.endpoint_id))
                return
            if endpoint.sandbox_key is not None:
                await self.state.put_endpoint(endpoint.with_changes(sandbox_key=None))

    # -- published ports -----------------------------------------------------------------------

    async def program_external_connectivity(self, req: ProgramExternalRequest) -> None:
        """Publish the endpoint's ports (publishing.py). May be called again without a Revoke
        (Docker 29, whenever the endpoint's gateway roles change): the new publication
        replaces the old one exactly.

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
            endpoint = self.state.endpoint_on(req.network_id, req.endpoint_id)
            if endpoint is None:
                raise
            bindings = req.ports.bindings if req.ports.present else endpoint.port_bindings
            if not await self.publisher.evict_dead_owners(endpoint, bindings):
                raise
            await self._program_external(req)

    async def _program_external(self, req: ProgramExternalRequest) -> None:
        async with self._locks.hold(req.network_id):
            network = self.state.ready_network(req.network_id)
            endpoint = self._known_endpoint(req.network_id, req.endpoint_id)
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
                await self.publisher.publish(network, endpoint, bindings, req.other_gateway)

    async def revoke_external_connectivity(self, ref: EndpointRef) -> None:
        async with self._locks.hold(ref.network_id):
            endpoint = self.state.endpoint_on(ref.network_id, ref.endpoint_id)
            if endpoint is None or not endpoint.mappings:
                return
            async with self._locks.hold(PORTS_LOCK):
                await self.publisher.revoke(endpoint)
            log.info("endpoint %s no longer publishes ports", short(endpoint.id))


__all__ = ["DriverError", "JoinResult", "NetworkDriver"]
