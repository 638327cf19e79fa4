"""The IPAM driver: pools and addresses for `--ipam-driver pybridge`, with any network driver.

Keeps the pools in memory, persists every change before replying, and reads host routes
through an injected function (so this module stays free of netlink). What pybridge's network
driver knows about endpoints comes through an injected read-only view, too (this module never
imports the driver).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection, Iterable

from . import faults
from .errors import Conflict, InvalidRequest, NotFound, Unsupported
from .interfaces import EndpointAddresses, PoolStore, RoutesProvider, SegmentAddresses
from .ipam import (
    GLOBAL_ADDRESS_SPACE,
    LOCAL_ADDRESS_SPACE,
    REPLAY_WINDOW,
    AnswerKind,
    Pool,
    choose_subnet,
    choose_v6_subnet,
    default_v4_candidates,
    describe_route,
    find_overlap,
    make_ula_prefix,
    pool_id_for,
)
from .locks import KeyedLock
from .model import HostRoute, IPAddress, IPInterface, IPNetwork
from .protocol import (
    ReleaseAddressRequest,
    ReleasePoolRequest,
    RequestAddressRequest,
    RequestPoolRequest,
)
from .segments import SEGMENT

log = logging.getLogger(__name__)

ULA_META_KEY = "ula_prefix"

__all__ = ["GLOBAL_ADDRESS_SPACE", "LOCAL_ADDRESS_SPACE", "IpamDriver"]

Ack = Callable[[], Awaitable[None]]


def _no_endpoints(pool_id: str) -> None:
    return None


class IpamDriver:
    def __init__(
        self,
        store: PoolStore,
        routes: RoutesProvider,
        endpoint_addresses: EndpointAddresses = _no_endpoints,
        clock: Callable[[], float] = time.time,
        segments: SegmentAddresses | None = None,
    ) -> None:
        """``segments``: pools of networks that span hosts take their addresses from it
        (clusterhost.py), so that no two hosts hand out the same one."""
        self.store = store
        self._segments = segments
        self._routes = routes
        self._endpoint_addresses = endpoint_addresses
        self._clock = clock
        self.pools: dict[str, Pool] = {}
        self.set_aside: list[IPNetwork] = []  # subnets of pools whose rows were set aside
        self.ula_prefix: ipaddress.IPv6Network | None = None
        self._lock = KeyedLock()

    def _in_use(self, pool_id: str) -> Collection[IPAddress]:
        """The addresses known endpoints use in the pool (none if it backs no network);
        `or ()` would count them all first (Collection truthiness is its length)."""
        in_use = self._endpoint_addresses(pool_id)
        return () if in_use is None else in_use

    async def load(self) -> None:
        self.pools = {pool.id: pool for pool in await self.store.load_pools()}
        # A pool set aside (its row could not be read) may still be some network's: its
        # subnet stays taken until whoever repairs the state decides.
        self.set_aside = []
        for key in await self.store.quarantined_keys("pools"):
            with contextlib.suppress(ValueError):
                self.set_aside.append(ipaddress.ip_network(key))
        for pool in self.pools.values():
            await self._settle_replays(pool)
        stored = await self.store.get_meta(ULA_META_KEY)
        if stored:
            try:
                self.ula_prefix = ipaddress.IPv6Network(stored)
            except ValueError as err:
                # Set aside (doctor lists it) and choose another: pools already made keep
                # their subnets, and new ones still overlap none of them.
                await self.store.quarantine_meta(ULA_META_KEY, f"ValueError: {err}"[:300])
                stored = None
        if not stored:
            self.ula_prefix = make_ula_prefix(os.urandom(5))
            await self.store.set_meta(ULA_META_KEY, str(self.ula_prefix))

    async def _settle_replays(self, pool: Pool) -> None:
        """Drop answers waiting for Docker's retry that a known endpoint uses (Docker has them;
        recorded as acknowledged), and set aside those past the retry window (still
        allocated: a leak is safe, a duplicate is not)."""
        if not pool.unacknowledged and not pool.unclaimed:
            return
        for address in pool.drop_replays(self._in_use(pool.id)):
            log.info("address %s in pool %s: Docker has it (an endpoint uses it)", address, pool.id)
            await self.store.acknowledge(pool.id, str(address))
        for address, answer in pool.expire_replays(self._clock()):
            log.warning(
                "address %s in pool %s: answered (%s) just before pybridge stopped and not "
                "asked for again within %.0f s; it stays allocated, never handed out again "
                "unless released",
                address,
                pool.id,
                answer.kind,
                REPLAY_WINDOW,
            )
            if answer.kind != "dynamic" or answer.recorded_at is None:
                # Never released by pybridge (Pool.releasable): an ordinary allocation now.
                del pool.unclaimed[int(address)]
                await self.store.acknowledge(pool.id, str(address))

    def address_spaces(self) -> tuple[str, str]:
        return LOCAL_ADDRESS_SPACE, GLOBAL_ADDRESS_SPACE

    async def request_pool(self, req: RequestPoolRequest) -> tuple[str, IPNetwork, Ack]:
        """Allocate a pool. Also returns the callback to run once the answer reached Docker."""
        if req.options:
            req = await self._segment_pool(req)
        # One lock for all pools: choosing a subnet must see every other pool.
        async with self._lock.hold("pools"):
            replayed = self._replayed_pool(req)
            if replayed is not None:
                log.info("pool %s: a retry of a request answered before a restart", replayed.id)
                return replayed.id, replayed.subnet, self._ack(replayed.id, None)
            routes = await self._routes()
            taken = [pool.subnet for pool in self.pools.values()] + self.set_aside
            if req.pool is not None:
                found = find_overlap(req.pool, taken, routes)
                if isinstance(found, HostRoute):
                    raise Conflict(f"subnet {req.pool} overlaps {describe_route(found)}")
                if found is not None:
                    raise Conflict(f"subnet {req.pool} overlaps the pool {found} already in use")
                subnet = req.pool
            elif req.v6:
                assert self.ula_prefix is not None
                subnet = choose_v6_subnet(self.ula_prefix, taken, routes)
            else:
                subnet = choose_subnet(default_v4_candidates(), taken, routes)
            pool = Pool(
                id=pool_id_for(subnet),
                subnet=subnet,
                sub_range=req.sub_pool,
                address_space=req.address_space,
                auto=req.pool is None,
            )
            await self.store.put_pool(pool, self._clock())
            self.pools[pool.id] = pool
            await faults.point("ipam.pool.recorded")
        log.info("pool %s allocated%s", pool.id, f" (range {req.sub_pool})" if req.sub_pool else "")
        return pool.id, subnet, self._ack(pool.id, None)

    async def _segment_pool(self, req: RequestPoolRequest) -> RequestPoolRequest:
        """``--ipam-opt pybridge.segment=NAME``: the subnet of segment NAME (so that the hosts
        after the first need not repeat --subnet), or a check that --subnet is it."""
        unknown = sorted(o[:60] for o in req.options if o != SEGMENT)
        if unknown:
            raise Unsupported(
                f"pybridge IPAM does not support the IPAM option {', '.join(unknown[:5])}; it "
                f"takes only --ipam-opt {SEGMENT}=NAME"
            )
        if self._segments is None:
            raise InvalidRequest(
                f"--ipam-opt {SEGMENT} needs pybridge started in a cluster "
                "(pydriver serve --cluster etcd://HOST:2379)"
            )
        name = req.options[SEGMENT]
        subnet = await self._segments.segment_subnet(name, v6=req.v6)
        if req.pool is not None and req.pool != subnet:
            raise Conflict(
                f"--subnet {req.pool} is not the subnet of segment {name} ({subnet}); leave "
                "--subnet out to take the segment's"
            )
        return dataclasses.replace(req, pool=subnet, options={})

    def _replayed_pool(self, req: RequestPoolRequest) -> Pool | None:
        """A pool allocated just before a crash, never confirmed to Docker, that this request
        asks for again (Docker retries requests that died with the plugin)."""
        if req.pool is None:
            # An automatic request says nothing that tells Docker's retry from another
            # network's request: replaying to it could give one pool to two networks. A fresh
            # pool it is; the unconfirmed one stays taken (`pydriver prune` finds it).
            return None
        now = self._clock()
        for pool in self.pools.values():
            if not pool.pool_may_be_replayed(now):
                continue
            if (pool.subnet, pool.v6, pool.sub_range) == (req.pool, req.v6, req.sub_pool):
                pool.pool_unacknowledged = False
                return pool
        return None

    def _ack(self, pool_id: str, address: str | None) -> Ack:
        async def acknowledge() -> None:
            # The answer is written to Docker's connection: a crash from here on leaves an
            # answer Docker has but pybridge does not know it has (see Pool.unacknowledged).
            await faults.point("ipam.pool.sent" if address is None else "ipam.address.sent")
            await self.store.acknowledge(pool_id, address)

        return acknowledge

    async def release_pool(self, req: ReleasePoolRequest) -> None:
        async with self._lock.hold("pools"):
            if req.pool_id not in self.pools:
                log.info("pool %s was already released", req.pool_id)
                return
            await self.store.delete_pool(req.pool_id)
            del self.pools[req.pool_id]
            if self._segments is not None:
                await self._segments.release_pool(req.pool_id)

    def _pool(self, pool_id: str) -> Pool:
        pool = self.pools.get(pool_id)
        if pool is None:
            raise NotFound(f"IPAM pool {pool_id!r} is not known to pybridge")
        return pool

    async def request_address(self, req: RequestAddressRequest) -> tuple[IPInterface, Ack]:
        answer = await self._request_address(req, claimed=False)
        if answer is None:
            # A pool of a network that spans hosts, and no free address in this host's blocks:
            # a block is claimed from the cluster without holding up every other pool.
            assert self._segments is not None
            pool = self._pool(req.pool_id)
            await self._segments.claim_for(pool.id, pool.subnet, req.address)
            answer = await self._request_address(req, claimed=True)
        assert answer is not None
        return answer

    async def _request_address(
        self, req: RequestAddressRequest, *, claimed: bool
    ) -> tuple[IPInterface, Ack] | None:
        """The address, or None when a block must be claimed first (never once ``claimed``)."""
        async with self._lock.hold("pools"):
            pool = self._pool(req.pool_id)
            if req.address is not None and req.address.version != pool.subnet.version:
                raise InvalidRequest(
                    f"address {req.address} is not an IPv{pool.subnet.version} address "
                    f"of {pool.subnet}"
                )
            if pool.pool_unacknowledged:
                # Docker asks for addresses of a pool only once it has the pool.
                pool.pool_unacknowledged = False
                await self.store.acknowledge(pool.id, None)
            if pool.unacknowledged:
                await self._settle_replays(pool)
            replayed = pool.claim_replay(
                req.address,
                gateway=req.is_gateway,
                endpoint_name=req.endpoint_name,
                now=self._clock(),
            )
            if replayed is not None:
                log.info("address %s: a retry of a request answered before a restart", replayed)
                address = replayed
            else:
                before = pool.cursor
                spans_hosts = (
                    self._segments is not None
                    and not req.is_gateway  # the gateway is the same address on every host
                    and self._segments.pool_segment(pool.id) is not None
                )
                if spans_hosts:
                    assert self._segments is not None
                    if pool.sub_range is not None:
                        raise InvalidRequest(
                            "--ip-range is not supported on a network that spans hosts: each "
                            "host hands out addresses from blocks of the whole subnet"
                        )
                    chosen = self._segments.pick(pool.id, pool.subnet, pool.allocated, req.address)
                    if chosen is None and not claimed:
                        return None
                    if chosen is None:
                        raise Conflict(
                            f"address {req.address} is in use or reserved in {pool.subnet}"
                            if req.address
                            else f"no free address left in {pool.subnet} for this host"
                        )
                    address = pool.allocate(chosen)
                else:
                    address = pool.allocate(req.address, gateway=req.is_gateway)
                kind: AnswerKind = (
                    "gateway"
                    if req.is_gateway
                    else ("specific" if req.address is not None else "dynamic")
                )
                try:
                    await self.store.add_address(
                        pool, str(address), kind, self._clock(), req.endpoint_name
                    )
                except BaseException:
                    pool.allocated.discard(int(address))
                    pool.cursor = before
                    raise
                await faults.point("ipam.address.recorded")
        iface = ipaddress.ip_interface(f"{address}/{pool.subnet.prefixlen}")
        return iface, self._ack(pool.id, str(address))

    async def release_address(self, req: ReleaseAddressRequest) -> None:
        async with self._lock.hold("pools"):
            pool = self.pools.get(req.pool_id)
            if pool is None or int(req.address) not in pool.allocated:
                log.info("address %s in pool %s was already released", req.address, req.pool_id)
                return
            if req.address in self._in_use(pool.id):
                # Docker deletes an endpoint before it releases its address, so the holder is
                # another endpoint: this is a late release for one pybridge already removed
                # (a dead container's, see eviction.py) whose address went to a new
                # container since. Releasing it would hand it out twice.
                log.warning(
                    "address %s in pool %s: not released, a live endpoint uses it (a late "
                    "release for a removed endpoint)",
                    req.address,
                    pool.id,
                )
                return
            await self.store.remove_address(pool.id, str(req.address))
            pool.release(req.address)

    async def release_owned(self, addresses: Iterable[tuple[str, IPAddress]]) -> None:
        """Give back (pool id, address) pairs of endpoints that pybridge's network driver
        removed because their containers are gone, when Docker will not release them itself.
        Only in that pool: another IPAM may use the same subnet. Pairs not allocated, or that
        a live endpoint uses too, are left alone."""
        async with self._lock.hold("pools"):
            in_use: dict[str, Collection[IPAddress]] = {}
            owned = []
            for pool_id, address in addresses:
                pool = self.pools.get(pool_id)
                if pool is None or int(address) not in pool.allocated:
                    continue
                if pool_id not in in_use:
                    in_use[pool_id] = self._in_use(pool_id)
                if address not in in_use[pool_id]:
                    owned.append((pool, address))
            if not owned:
                return
            # One transaction (one fsync) for all: start-up may release hundreds at once.
            await self.store.remove_addresses([(pool.id, str(address)) for pool, address in owned])
            for pool, address in owned:
                pool.release(address)
                log.info("released address %s in pool %s of a vanished container", address, pool.id)

    async def release_unclaimed(self) -> list[IPAddress]:
        """Release dynamic answers that Docker never took up (see Pool.releasable), in pools
        that back a pybridge network (elsewhere pybridge cannot see who uses an address)."""
        released: list[IPAddress] = []
        async with self._lock.hold("pools"):
            for pool in list(self.pools.values()):
                await self._settle_replays(pool)
                if not pool.unclaimed:
                    continue
                in_use = self._endpoint_addresses(pool.id)
                if in_use is None:
                    continue
                for address in pool.releasable(self._clock(), in_use):
                    await self.store.remove_address(pool.id, str(address))
                    pool.release(address)
                    released.append(address)
                    log.warning(
                        "address %s in pool %s: answered just before pybridge stopped and "
                        "never used by an endpoint; released",
                        address,
                        pool.id,
                    )
        return released
