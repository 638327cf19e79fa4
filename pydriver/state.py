"""The network driver's records in memory, written through to the store.

Persist, then act: each ``put_*``/``drop_*`` is on disk before the in-memory view (and so
whatever acts on it, the firewall writer above all) sees the change. The queries answer the
questions the rest of the driver asks of its networks and endpoints.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence, Set
from ipaddress import IPv4Address, IPv6Address
from typing import TypeVar

from .errors import NotFound
from .interfaces import NetworkStore
from .model import Endpoint, IPAddress, IPNetwork, Network, PortMapping
from .naming import short
from .ports import PortIndex
from .rules import NetworkRules, TunnelRules, firewall_view


class State:
    def __init__(self, store: NetworkStore) -> None:
        self.store = store
        self.networks: dict[str, Network] = {}
        self.endpoints: dict[str, Endpoint] = {}
        # Per network, the endpoints holding an address or a MAC: a new endpoint's checks cost
        # the same with 1 and with 1,000 endpoints present.
        self._holders: dict[tuple[str, str], set[str]] = {}
        # Per network, what the firewall needs to know (rules.py), made again only when the
        # network or one of its endpoints changes: the writer compares and renders the views
        # of every network at every change, which costs a lookup each for unchanged ones.
        self._views: dict[str, NetworkRules] = {}
        # The endpoints that publish ports, in the order of ``endpoints``: port checks and the
        # firewall's views look at these, not at every endpoint (most publish nothing).
        self._publishing: dict[str, None] = {}
        # Their host ports (ports.PortIndex): a publication's clash check is a lookup.
        self.ports = PortIndex()

    async def load(self) -> None:
        self.networks = {n.id: n for n in await self.store.load_networks()}
        self.endpoints = {}
        self._holders = {}
        self._views = {}
        self._publishing = {}
        self.ports = PortIndex()
        for endpoint in await self.store.load_endpoints():
            self._remember(endpoint)

    def _keys(self, endpoint: Endpoint) -> list[tuple[str, str]]:
        held = [a.ip for a in (endpoint.address, endpoint.address_v6) if a is not None]
        return [(endpoint.network_id, str(x)) for x in (*held, endpoint.mac_address)]

    def _remember(self, endpoint: Endpoint) -> None:
        self._forget(endpoint.id)
        self.endpoints[endpoint.id] = endpoint
        if endpoint.mappings:
            self._publishing[endpoint.id] = None
            for mapping in endpoint.mappings:
                self.ports.add(mapping, endpoint.id)
        self._views.pop(endpoint.network_id, None)
        for key in self._keys(endpoint):
            self._holders.setdefault(key, set()).add(endpoint.id)

    def _forget(self, endpoint_id: str) -> None:
        old = self.endpoints.pop(endpoint_id, None)
        if old is None:
            return
        self._publishing.pop(endpoint_id, None)
        for mapping in old.mappings:
            self.ports.remove(mapping, endpoint_id)
        self._views.pop(old.network_id, None)
        for key in self._keys(old):
            ids = self._holders.get(key)
            if ids is not None:
                ids.discard(endpoint_id)
                if not ids:
                    del self._holders[key]

    # -- changes: on disk first ---------------------------------------------------------------

    async def put_network(self, network: Network) -> None:
        await self.store.put_network(network)
        self.networks[network.id] = network
        self._views.pop(network.id, None)

    async def drop_network(self, network_id: str) -> None:
        """Forget a network, and its endpoints with it (the store deletes them too)."""
        await self.store.delete_network(network_id)
        self.networks.pop(network_id, None)
        for endpoint in self.endpoints_of(network_id):
            self._forget(endpoint.id)
        self._views.pop(network_id, None)

    async def put_endpoint(self, endpoint: Endpoint) -> None:
        await self.store.put_endpoint(endpoint)
        self._remember(endpoint)

    async def drop_endpoint(self, endpoint_id: str) -> None:
        await self.store.delete_endpoint(endpoint_id)
        self._forget(endpoint_id)

    # -- queries -------------------------------------------------------------------------------

    def ready_network(self, network_id: str) -> Network:
        """The network, if it is ready to serve requests."""
        network = self.networks.get(network_id)
        if network is None or network.state != "ready":
            raise NotFound(
                f"network {short(network_id)} is not known to pybridge (was it created before "
                "pybridge's state directory was reset?); remove it and create it again"
            )
        return network

    def endpoint_on(self, network_id: str, endpoint_id: str) -> Endpoint | None:
        """The endpoint, only if it belongs to that network (ids from Docker must agree)."""
        endpoint = self.endpoints.get(endpoint_id)
        if endpoint is None or endpoint.network_id != network_id:
            return None
        return endpoint

    def endpoints_of(self, network_id: str) -> list[Endpoint]:
        return [e for e in self.endpoints.values() if e.network_id == network_id]

    def holders(self, network_id: str, values: Iterable[object]) -> list[Endpoint]:
        """The endpoints of the network that hold any of ``values`` (addresses or MACs)."""
        ids = set().union(*(self._holders.get((network_id, str(v)), ()) for v in values))
        return [self.endpoints[i] for i in sorted(ids)]

    def mac_taken(self, network_id: str, mac: str, but: str) -> bool:
        """Whether an endpoint of the network other than ``but`` has ``mac``."""
        return bool(self._holders.get((network_id, mac), set()) - {but})

    def firewall_views(
        self, tunnels: Mapping[str, TunnelRules] | None = None
    ) -> list[NetworkRules]:
        """rules.firewall_views of the state (``tunnels``: of the networks that span hosts),
        the same objects as long as nothing changed."""
        live = [n for n in self.networks.values() if n.state != "deleting"]
        tunnel_of = {n.id: (tunnels or {}).get(n.id) for n in live}
        stale = {
            n.id
            for n in live
            if (view := self._views.get(n.id)) is None or view.tunnel != tunnel_of[n.id]
        }
        if stale:  # their ports, in one pass over the publishing endpoints
            mappings: dict[str, list[PortMapping]] = {i: [] for i in stale}
            for endpoint in self._published():
                if endpoint.network_id in mappings:
                    mappings[endpoint.network_id].extend(endpoint.mappings)
            for network in live:
                if network.id in stale:
                    view = firewall_view(network, mappings[network.id], tunnel_of[network.id])
                    self._views[network.id] = view
        return [self._views[n.id] for n in live]

    def mappings_of_others(self, endpoint_id: str) -> Iterator[PortMapping]:
        """Every host port published for an endpoint other than ``endpoint_id``."""
        for endpoint in self._published():
            if endpoint.id != endpoint_id:
                yield from endpoint.mappings

    def publisher_of(self, mapping: PortMapping) -> Endpoint | None:
        """The endpoint that publishes ``mapping``."""
        for endpoint in self._published():
            if mapping in endpoint.mappings:
                return endpoint
        return None

    def _published(self) -> list[Endpoint]:
        return [self.endpoints[i] for i in self._publishing]

    def addresses_in_pool(self, pool_id: str) -> Collection[IPAddress] | None:
        """The addresses endpoints use in pybridge IPAM pool ``pool_id``, or None if no network
        of this driver has a subnet from that pool. A read-only view for the IPAM driver:
        asking whether it holds one address (every ReleaseAddress) costs a lookup per network
        of the pool, not a pass over the endpoints."""
        from_pool: dict[str, list[IPNetwork]] = {}  # network id -> its subnets from that pool
        for network in self.networks.values():
            for subnet in network.subnets:
                if subnet.ipam_pool == pool_id:
                    from_pool.setdefault(network.id, []).append(subnet.pool)
        if not from_pool:
            return None
        return _PoolAddresses(self, from_pool)

    def _uses(self, network_id: str, address: IPAddress) -> bool:
        return bool(self._holders.get((network_id, str(address))))

    def owned_addresses(self, endpoints: Sequence[Endpoint]) -> list[tuple[str, IPAddress]]:
        """(pool id, address) of the endpoints' addresses that pybridge's IPAM gave."""
        owned = []
        for endpoint in endpoints:
            network = self.networks.get(endpoint.network_id)
            if network is None:
                continue
            for address in (endpoint.address, endpoint.address_v6):
                if address is None:
                    continue
                for subnet in network.subnets:
                    if subnet.ipam_pool is not None and address.ip in subnet.pool:
                        owned.append((subnet.ipam_pool, address.ip))
                        break
        return owned


_S = TypeVar("_S")


class _PoolAddresses(Set[IPAddress]):
    """State.addresses_in_pool: membership from the state's index of holders, the whole set
    (start-up, the collector) by a pass over the endpoints; both as the state is now."""

    def __init__(self, state: State, from_pool: Mapping[str, Sequence[IPNetwork]]) -> None:
        self._state = state
        self._from_pool = from_pool

    @classmethod
    def _from_iterable(cls, it: Iterable[_S]) -> Set[_S]:
        return set(it)  # what the set operators (&, |, -) give: a plain set

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, IPv4Address | IPv6Address):
            return False
        return any(
            self._state._uses(network_id, item) and any(item in pool for pool in subnets)
            for network_id, subnets in self._from_pool.items()
        )

    def _every(self) -> set[IPAddress]:
        every: set[IPAddress] = set()
        for endpoint in self._state.endpoints.values():
            subnets = self._from_pool.get(endpoint.network_id)
            if not subnets:
                continue
            for address in (endpoint.address, endpoint.address_v6):
                if address is not None and any(address.ip in pool for pool in subnets):
                    every.add(address.ip)
        return every

    def __iter__(self) -> Iterator[IPAddress]:
        return iter(self._every())

    def __len__(self) -> int:
        return len(self._every())
