"""This host's networks that span hosts (orchestration between the driver, the IPAM driver,
the kernel's tunnels and the cluster).

A pybridge network created with ``-o pybridge.segment=NAME`` joins segment NAME: the same
subnet, gateway and VXLAN network on every host that joins it. This module

* records or checks the segment when the network is created (the one wait on the cluster a
  network create makes, bounded), then puts a VXLAN device on the network's bridge and
  announces this host as a member;
* hands out the segment's addresses from the blocks this host holds (claiming a block, bounded,
  only when none is free), so no two hosts ever give out the same address;
* announces this host's containers (address -> MAC, at this host's tunnel address) and writes
  the other hosts' into the tunnel whenever the cluster's view changes.

What it keeps across restarts, in the state database (meta key ``cluster``): each segment's
definition, which IPAM pools are whose segment's, the blocks this host holds. With that, a host
that restarts while etcd is down rebuilds its tunnels' devices and keeps handing out addresses
of the blocks it holds; the tunnel's entries for other hosts stay in the kernel meanwhile."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .blocks import REFILL_BELOW, Holdings, block_of, block_prefix, reserved_in
from .cluster import Cluster
from .clustermodel import (
    DEFAULT_VXLAN_PORT,
    Segment,
    check_segment_name,
    differences,
    endpoint_key,
    member_key,
    segment_key,
)
from .errors import Conflict, HostError, InvalidRequest
from .interfaces import MetaStore, TunnelKernel
from .model import Endpoint, IPAddress, IPNetwork, Network
from .naming import VXLAN_PREFIX, short, vxlan_name
from .protocol import CreateNetworkRequest
from .rules import TunnelRules
from .segments import SEGMENT, SegmentOptions, check_underlay, definition
from .tunnel import plan, wanted

log = logging.getLogger(__name__)

META_KEY = "cluster"
WAIT = 2.0  # seconds a Docker request may wait on the cluster, at most (the stated bound)
RETRY_PAUSE = 0.05
T = TypeVar("T")


@dataclass(frozen=True)
class Underlay:
    """Where this host's tunnels run: the interface and address other hosts reach it at."""

    interface: str
    address: IPAddress
    mtu: int


async def bounded(call: Callable[[], Awaitable[T]], budget: float | None = None) -> T:
    """``call()``, tried again while the cluster store cannot answer, for ``budget`` seconds
    in all (each store call has its own, shorter bound: one slow answer, an etcd busy writing
    its log, does not fail a request that a second try would pass)."""
    budget = WAIT if budget is None else budget
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                return await call()
        except TimeoutError:
            raise HostError(f"no answer within {budget:g} s") from None
        except HostError:  # (a refusal, Conflict or InvalidRequest, is no HostError)
            if loop.time() + RETRY_PAUSE >= deadline:
                raise
            await asyncio.sleep(RETRY_PAUSE)


def within(block: IPNetwork, pool: IPNetwork) -> bool:
    return block.version == pool.version and block.subnet_of(pool)  # type: ignore[arg-type]


def segment_of(network: Network) -> str | None:
    return network.raw_options.get(SEGMENT)


def tunnel_rules(
    networks: Iterable[Network], members: Mapping[str, Iterable[IPAddress]], port: int
) -> dict[str, TunnelRules]:
    """The firewall's view of the tunnels of ``networks`` that span hosts, by network id."""
    return {
        network.id: TunnelRules(port, tuple(sorted(members.get(name, ()), key=str)))
        for network in networks
        if (name := segment_of(network)) is not None and network.state != "deleting"
    }


def recorded_tunnels(networks: Iterable[Network], record: str | None) -> dict[str, TunnelRules]:
    """The same, from the record a running pybridge keeps in its state database (for the
    tools, which have no cluster)."""
    if not record:
        return {}
    try:
        data = json.loads(record)
        members = {
            name: [ipaddress.ip_address(m) for m in found]
            for name, found in data.get("members", {}).items()
        }
        return tunnel_rules(networks, members, int(data.get("vxlan_port", DEFAULT_VXLAN_PORT)))
    except (ValueError, TypeError, AttributeError):
        return {}


class ClusterHost:
    def __init__(
        self,
        cluster: Cluster,
        kernel: TunnelKernel,
        meta: MetaStore,
        underlay: Underlay,
        networks: Callable[[], Iterable[Network]],
        endpoints_of: Callable[[str], Iterable[Endpoint]],
        *,
        vxlan_port: int,
        endpoint: str = "",
    ) -> None:
        self.cluster = cluster
        self.kernel = kernel
        self.meta = meta
        self.underlay = underlay
        self.vxlan_port = vxlan_port
        self._networks = networks
        self._endpoints_of = endpoints_of
        self._endpoint = endpoint  # how messages name the cluster (etcd://...)
        self.segments: dict[str, Segment] = {}
        self.pools: dict[str, str] = {}  # IPAM pool id -> segment
        self.blocks: dict[str, set[IPNetwork]] = {}  # segment -> blocks held (as recorded)
        # The other hosts of each segment as last seen: VXLAN is accepted from them (kept, so
        # that a restart while etcd is away keeps the tunnels open).
        self.members: dict[str, set[IPAddress]] = {}
        self.firewall_changed: Callable[[], object] = lambda: None  # the driver's writer
        self._published: dict[str, dict[str, bytes]] = {}  # segment -> endpoint key -> value
        self._tunnel_lock = asyncio.Lock()
        self._claiming: set[tuple[str, IPNetwork]] = set()  # refills under way
        self._background: set[asyncio.Task[None]] = set()

    # -- state ----------------------------------------------------------------------------------

    async def load(self) -> None:
        raw = await self.meta.get_meta(META_KEY)
        data: Any = {}
        try:
            data = json.loads(raw) if raw else {}
            self.segments = {
                name: Segment.from_json(text) for name, text in data.get("segments", {}).items()
            }
            self.pools = {str(k): str(v) for k, v in data.get("pools", {}).items()}
            self.blocks = {
                name: {ipaddress.ip_network(b) for b in blocks}
                for name, blocks in data.get("blocks", {}).items()
            }
            self.members = {
                name: {ipaddress.ip_address(m) for m in members}
                for name, members in data.get("members", {}).items()
            }
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            # Blocks are also in etcd under this host's id: the view gives them back.
            log.error("the cluster record in the state database cannot be read (%s)", err)
            data = {}
        if (data.get("cluster"), data.get("vtep")) != (self._endpoint, str(self.underlay.address)):
            await self._save()  # what the tools read: where the cluster is, who this host is

    async def _save(self) -> None:
        await self.meta.set_meta(
            META_KEY,
            json.dumps(
                {
                    "segments": {n: s.to_json() for n, s in self.segments.items()},
                    "pools": self.pools,
                    "blocks": {n: sorted(map(str, b)) for n, b in self.blocks.items()},
                    "members": {n: sorted(map(str, m)) for n, m in self.members.items()},
                    "vxlan_port": self.vxlan_port,
                    # For the tools (pydriver status, doctor), which read the cluster too.
                    "cluster": self._endpoint,
                    "host": self.cluster.host_id,
                    "vtep": str(self.underlay.address),
                },
                sort_keys=True,
            ),
        )

    def _local_networks(self) -> list[tuple[Network, str]]:
        found = []
        for network in self._networks():
            name = segment_of(network)
            if name is not None and network.state != "deleting":
                found.append((network, name))
        return found

    # -- network create and delete -----------------------------------------------------------

    async def prepare(
        self, options: SegmentOptions, req: CreateNetworkRequest, *, icc: bool, owned: bool
    ) -> Segment:
        """The segment a new network joins, as the cluster has it: recorded now if this host is
        the first, else checked (one sentence naming a difference). Waits on the cluster at
        most WAIT seconds; a segment this host already knows needs no wait while etcd is away."""
        want = definition(
            options,
            req,
            icc=icc,
            underlay_mtu=self.underlay.mtu,
            underlay_version=self.underlay.address.version,
            vxlan_port=self.vxlan_port,
            pool_owned_by_pybridge=owned,
        )
        for network, name in self._local_networks():
            if name == options.name and network.id != req.network_id:
                raise Conflict(
                    f"segment {options.name} already has a network on this host "
                    f"({short(network.id)}); a host joins a segment once"
                )
        try:
            segment = await bounded(lambda: self.cluster.record_segment(want))
        except HostError as err:
            known = self.segments.get(options.name)
            if known is None:
                raise HostError(
                    f"pybridge cannot reach the cluster store{self._at()} to record or check "
                    f"segment {options.name}: {err or 'no answer in time'}"
                ) from None
            sentence = differences(want, known)
            if sentence is not None:
                raise Conflict(sentence) from None
            segment = known
        check_underlay(segment, self.underlay.mtu, self.underlay.address.version)
        return segment

    def _at(self) -> str:
        return f" at {self._endpoint}" if self._endpoint else ""

    async def attach(self, network: Network, segment: Segment) -> None:
        """After the network's bridge exists: its pools take addresses from blocks, its VXLAN
        device is on the bridge, this host is a member. Idempotent (start-up calls it too)."""
        changed = self.segments.get(segment.name) != segment
        self.segments[segment.name] = segment
        for subnet in (*network.subnets_v4, *network.subnets_v6):
            if subnet.ipam_pool is not None and self.pools.get(subnet.ipam_pool) != segment.name:
                self.pools[subnet.ipam_pool] = segment.name
                changed = True
        if changed:
            await self._save()
        await self.kernel.ensure_vxlan(
            vxlan_name(network.id),
            segment.vni,
            segment.vxlan_port,
            self.underlay.address,
            self.underlay.interface,
            network.bridge,
        )
        self.cluster.publish(
            member_key(segment.name, self.cluster.host_id),
            json.dumps({"vtep": str(self.underlay.address)}).encode(),
        )
        self.sync_endpoints(network.id)
        await self.reconcile({segment.name})
        if self.cluster.is_synced:
            await self._learn_members({segment.name})
        # A first block now, in the background: the first container start need not wait.
        for subnet in (*network.subnets_v4, *network.subnets_v6):
            held = self.blocks.get(segment.name, ())
            if not any(within(b, subnet.pool) for b in held):
                prefix = block_prefix(subnet.pool, segment.block_size or None)
                self._spawn(self._refill(segment.name, subnet.pool, prefix))

    async def detach(self, network: Network) -> None:
        """Before the network's bridge goes: no longer a member, its tunnel removed. The
        blocks stay this host's (addresses its containers had may still be in use elsewhere
        in Docker's view until the release; a later network of the segment uses them again)."""
        name = segment_of(network)
        if name is None:
            return
        self.cluster.unpublish(member_key(name, self.cluster.host_id))
        for key in self._published.pop(name, {}):
            self.cluster.unpublish(key)
        await self.kernel.delete_link(vxlan_name(network.id))

    async def release_pool(self, pool_id: str) -> None:
        if self.pools.pop(pool_id, None) is not None:
            await self._save()

    # -- endpoints -------------------------------------------------------------------------------

    def _announcement(self, name: str, endpoint: Endpoint) -> dict[str, bytes]:
        """The keys announcing ``endpoint`` (one per address) and their values."""
        value = json.dumps(
            {
                "host": self.cluster.host_id,
                "mac": endpoint.mac_address,
                "vtep": str(self.underlay.address),
            },
            sort_keys=True,
        ).encode()
        return {
            endpoint_key(name, iface.ip): value
            for iface in (endpoint.address, endpoint.address_v6)
            if iface is not None
        }

    def endpoint_ready(self, network: Network, endpoint: Endpoint) -> None:
        """Announce one endpoint (never waits: the cluster's publisher writes it)."""
        name = segment_of(network)
        if name is None:
            return
        have = self._published.setdefault(name, {})
        for key, value in self._announcement(name, endpoint).items():
            if have.get(key) != value:
                self.cluster.publish(key, value)
                have[key] = value

    def endpoint_gone(self, network: Network, endpoint: Endpoint) -> None:
        """Withdraw one endpoint's announcement (only its own: an address another endpoint
        announces since stays)."""
        name = segment_of(network)
        if name is None:
            return
        have = self._published.setdefault(name, {})
        for key, value in self._announcement(name, endpoint).items():
            if have.get(key) == value:
                self.cluster.unpublish(key)
                del have[key]

    def sync_endpoints(self, network_id: str) -> None:
        """Announce exactly the ready endpoints this host has on ``network_id`` (start-up, and
        the upkeep: endpoints removed without a Docker request)."""
        network = next((n for n, _ in self._local_networks() if n.id == network_id), None)
        if network is None:
            return
        name = segment_of(network)
        assert name is not None
        want: dict[str, bytes] = {}
        for endpoint in self._endpoints_of(network_id):
            if endpoint.state == "ready":
                want.update(self._announcement(name, endpoint))
        have = self._published.setdefault(name, {})
        for key, value in want.items():
            if have.get(key) != value:
                self.cluster.publish(key, value)
        for key in set(have) - set(want):
            self.cluster.unpublish(key)
        self._published[name] = want

    # -- tunnels ---------------------------------------------------------------------------------

    async def reconcile(self, segments: Collection[str] | None = None) -> int:
        """Make the tunnels of ``segments`` (all if None) hold the cluster's entries; the
        number of changes. Nothing is removed before the first read of the cluster: an empty
        view is not an empty cluster."""
        if not self.cluster.is_synced:
            return 0
        changes = 0
        async with self._tunnel_lock:
            for network, name in self._local_networks():
                if segments is not None and name not in segments:
                    continue
                view = self.cluster.view.segment(name)
                want = wanted(view.members.values(), view.remote_endpoints(), self.underlay.address)
                device = vxlan_name(network.id)
                steps = plan(want, await self.kernel.tunnel_entries(device))
                if steps:
                    await self.kernel.apply_tunnel(device, steps)
                    changes += len(steps)
        return changes

    async def on_change(self, segments: set[str]) -> None:
        await self.reconcile(segments)
        for name in segments:
            self._learn_blocks(name)
        await self._learn_members(segments)

    async def _learn_members(self, segments: Collection[str]) -> None:
        """The firewall lets VXLAN in from the hosts the cluster lists now."""
        changed = False
        local = {name for _, name in self._local_networks()}
        for name in segments:
            if name not in local:
                continue
            now = {
                vtep
                for vtep in self.cluster.view.segment(name).members.values()
                if vtep != self.underlay.address
            }
            if self.members.get(name) != now:
                self.members[name] = now
                changed = True
        if changed:
            await self._save()
            self.firewall_changed()

    def tunnels(self) -> dict[str, TunnelRules]:
        """The firewall's view of each segment network's tunnel, by network id."""
        return tunnel_rules(self._networks(), self.members, self.vxlan_port)

    # -- addresses ---------------------------------------------------------------------------------

    def _learn_blocks(self, name: str) -> None:
        """This host's blocks as the cluster has them: one it won just before a crash is
        added; one the cluster no longer lists (`pydriver cluster forget` was run for this
        host, or etcd lost its data) is claimed again; one another host holds now is never
        handed out from here again."""
        view = self.cluster.view.segment(name)
        me = self.cluster.host_id
        mine = self.blocks.setdefault(name, set())
        changed = False
        for block, holder in view.blocks.items():
            if holder == me and block not in mine:
                mine.add(block)
                changed = True
        for block in list(mine):
            found = view.blocks.get(block)
            if found is None:
                self._spawn(self._reclaim(name, block))
            elif found != me:
                self._give_up(name, block, found)
                changed = True
        if changed:
            self._spawn(self._save())

    def _give_up(self, name: str, block: IPNetwork, holder: str) -> None:
        self.blocks.get(name, set()).discard(block)
        log.error(
            "segment %s: block %s, recorded as this host's, is held by host %s in the "
            "cluster; no address of it is handed out here any more (was `pydriver cluster "
            "forget` run for this host?)",
            name,
            block,
            holder,
        )

    async def _reclaim(self, name: str, block: IPNetwork) -> None:
        try:
            holder = await self.cluster.claim_this_block(name, block)
        except HostError as err:
            log.warning(
                "segment %s: block %s could not be claimed again yet (%s)", name, block, err
            )
            return
        if holder != self.cluster.host_id:
            self._give_up(name, block, holder)
            await self._save()
        else:
            log.warning(
                "segment %s: block %s was missing from the cluster; claimed again", name, block
            )

    def _holdings(self, name: str, subnet: IPNetwork, used: Collection[int]) -> Holdings:
        segment = self.segments[name]
        held = tuple(b for b in self.blocks.get(name, ()) if within(b, subnet))
        gateways = [ipaddress.ip_address(g) for g in segment.gateways if g]
        # The block's addresses looked up in ``used`` (a set): what grows is the blocks held,
        # never the addresses used elsewhere in the pool.
        in_blocks = frozenset(a for b in held for a in b if int(a) in used)
        return Holdings(held, in_blocks, frozenset(reserved_in(subnet, gateways, ())))

    def pool_segment(self, pool_id: str) -> str | None:
        return self.pools.get(pool_id)

    async def segment_subnet(self, name: str, *, v6: bool) -> IPNetwork:
        """The subnet of segment ``name`` of one family, as the cluster has it (what this host
        knows of it, else one bounded read)."""
        check_segment_name(name)
        segment = self.cluster.view.segments.get(name)
        known = (segment.definition if segment else None) or self.segments.get(name)
        if known is None:
            try:
                found = await bounded(lambda: self.cluster.store.get(segment_key(name)))
            except HostError as err:
                raise HostError(
                    f"pybridge cannot reach the cluster store{self._at()} to read segment "
                    f"{name}: {err or 'no answer in time'}; give --subnet"
                ) from None
            if found is None:
                raise InvalidRequest(
                    f"segment {name} does not exist in the cluster yet: the first host creates "
                    "it with --subnet"
                )
            known = Segment.from_json(found.value.decode())
        for text in known.subnets:
            subnet = ipaddress.ip_network(text)
            if (subnet.version == 6) == v6:
                return subnet
        raise InvalidRequest(f"segment {name} has no IPv{6 if v6 else 4} subnet")

    def pick(
        self, pool_id: str, subnet: IPNetwork, used: Collection[int], wanted: IPAddress | None
    ) -> IPAddress | None:
        """An address of a segment's pool for a container of this host, from the blocks this
        host holds (never waits); None when they have none (``claim_for`` then). Claims the
        next block in the background when few are left."""
        name = self.pools[pool_id]
        holdings = self._holdings(name, subnet, used)
        found = holdings.allocate(wanted)
        if found is not None:
            capacity = holdings.capacity()
            if capacity == 0 or holdings.free() - 1 < capacity * REFILL_BELOW:
                self._spawn(self._refill(name, subnet, self._prefix(name, subnet)))
        return found

    async def claim_for(self, pool_id: str, subnet: IPNetwork, wanted: IPAddress | None) -> None:
        """A block for ``pick`` to take an address from: the one ``wanted`` is in, or the next
        free one; waits on the cluster WAIT seconds at most (no IPAM lock is held meanwhile)."""
        name = self.pools[pool_id]
        prefix = self._prefix(name, subnet)
        try:
            block = await bounded(lambda: self._claim(name, subnet, prefix, wanted))
        except HostError:
            raise HostError(
                f"pybridge cannot reach the cluster store{self._at()} and holds no free "
                f"address in segment {name}"
                + (f" for {wanted}" if wanted else "")
                + "; containers can start again once it answers"
            ) from None
        if block is None:
            raise Conflict(f"segment {name} has no free address left in {subnet}")

    def _prefix(self, name: str, subnet: IPNetwork) -> int:
        return block_prefix(subnet, self.segments[name].block_size or None)

    async def _claim(
        self, name: str, subnet: IPNetwork, prefix: int, wanted: IPAddress | None
    ) -> IPNetwork | None:
        if wanted is not None:
            block = block_of(wanted, subnet, prefix)
            holder = await self.cluster.claim_this_block(name, block)
            if holder != self.cluster.host_id:
                raise Conflict(
                    f"address {wanted} is in block {block} of segment {name}, which another "
                    f"host holds ({holder}); leave out --ip or choose one of this host's blocks"
                )
        else:
            found = await self.cluster.claim_block(name, subnet, prefix)
            if found is None:
                return None
            block = found
        # Recorded before any address of it is handed out.
        self.blocks.setdefault(name, set()).add(block)
        await self._save()
        log.info("segment %s: this host now holds block %s", name, block)
        return block

    async def _refill(self, name: str, subnet: IPNetwork, prefix: int) -> None:
        """Claim the next block before the last one runs out (no container start waits)."""
        if (name, subnet) in self._claiming:
            return
        self._claiming.add((name, subnet))
        try:
            await self._claim(name, subnet, prefix, None)
        except HostError as err:
            log.warning("segment %s: could not claim another address block yet (%s)", name, err)
        finally:
            self._claiming.discard((name, subnet))

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- start-up ----------------------------------------------------------------------------------

    async def restore(self) -> None:
        """At start-up, after the driver's reconcile: every segment network's tunnel device
        and announcements again (from the state database: etcd may be away); tunnel devices
        of networks that are gone (a create rolled back by a crash) removed."""
        wanted = {vxlan_name(network.id) for network, _ in self._local_networks()}
        for link in await self.kernel.links():
            if link.name.startswith(VXLAN_PREFIX) and link.name not in wanted:
                log.info("removing the tunnel device %s of a network that is gone", link.name)
                await self.kernel.delete_link(link.name)
        for network, name in self._local_networks():
            segment = self.segments.get(name)
            if segment is None:
                log.error(
                    "network %s belongs to segment %s, whose definition pybridge no longer "
                    "has; its tunnel waits for the cluster",
                    short(network.id),
                    name,
                )
                continue
            try:
                await self.attach(network, segment)
            except HostError as err:
                log.error(
                    "network %s: its tunnel could not be restored: %s", short(network.id), err
                )

    def start(self, interval: float = 5.0) -> None:
        """Take part in the cluster (its session, sync and publisher), and the upkeep:
        announcements and tunnels checked every ``interval`` seconds (endpoints removed
        without a Docker request, entries someone else changed)."""
        self.cluster.start()
        self._spawn(self._upkeep(interval))

    async def _upkeep(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                for network, _ in self._local_networks():
                    self.sync_endpoints(network.id)
                repaired = await self.reconcile()
                if repaired:
                    log.warning("tunnels: %d entries differed from the cluster; repaired", repaired)
            except HostError as err:
                log.warning("tunnels could not be checked: %s", err)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.cluster.stop()
        await self.cluster.store.close()


__all__ = ["ClusterHost", "TunnelKernel", "Underlay", "segment_of"]
