"""The IPAM driver: pools and addresses for `--ipam-driver pybridge`, with any network driver.

Keeps the pools in memory, persists every change before replying, and reads host routes
through an injected function (so this module stays free of netlink).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable

from . import faults
from .errors import Conflict, InvalidRequest, NotFound, Unsupported
from .ipam import (
    HostRoute,
    Pool,
    choose_subnet,
    choose_v6_subnet,
    default_v4_candidates,
    find_overlap,
    make_ula_prefix,
    pool_id_for,
)
from .locks import KeyedLock
from .model import IPAddress, IPInterface, IPNetwork
from .protocol import (
    ReleaseAddressRequest,
    ReleasePoolRequest,
    RequestAddressRequest,
    RequestPoolRequest,
)
from .store import Store

log = logging.getLogger(__name__)

LOCAL_ADDRESS_SPACE = "PybridgeLocal"
GLOBAL_ADDRESS_SPACE = "PybridgeGlobal"
ULA_META_KEY = "ula_prefix"

RoutesProvider = Callable[[], Awaitable[list[HostRoute]]]
Ack = Callable[[], Awaitable[None]]


class IpamDriver:
    def __init__(self, store: Store, routes: RoutesProvider) -> None:
        self.store = store
        self._routes = routes
        self.pools: dict[str, Pool] = {}
        self.ula_prefix: ipaddress.IPv6Network | None = None
        self._lock = KeyedLock()

    async def load(self) -> None:
        self.pools = {pool.id: pool for pool in await self.store.load_pools()}
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

    def address_spaces(self) -> tuple[str, str]:
        return LOCAL_ADDRESS_SPACE, GLOBAL_ADDRESS_SPACE

    async def request_pool(self, req: RequestPoolRequest) -> tuple[str, IPNetwork, Ack]:
        """Allocate a pool. Also returns the callback to run once the answer reached Docker."""
        if req.options:
            names = ", ".join(sorted(o[:60] for o in req.options)[:5])
            raise Unsupported(
                f"pybridge IPAM does not support the IPAM option {names}; it takes no --ipam-opt"
            )
        # One lock for all pools: choosing a subnet must see every other pool.
        async with self._lock.hold("pools"):
            replayed = self._replayed_pool(req)
            if replayed is not None:
                log.info("pool %s: a retry of a request answered before a restart", replayed.id)
                return replayed.id, replayed.subnet, self._ack(replayed.id, None)
            routes = await self._routes()
            taken = [pool.subnet for pool in self.pools.values()]
            if req.pool is not None:
                conflict = find_overlap(req.pool, taken, routes)
                if conflict:
                    raise Conflict(f"subnet {req.pool} overlaps {conflict}")
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
            await self.store.put_pool(pool)
            self.pools[pool.id] = pool
            await faults.point("ipam.pool.recorded")
        log.info("pool %s allocated%s", pool.id, f" (range {req.sub_pool})" if req.sub_pool else "")
        return pool.id, subnet, self._ack(pool.id, None)

    def _replayed_pool(self, req: RequestPoolRequest) -> Pool | None:
        """A pool allocated just before a crash, never confirmed to Docker, that this request
        asks for again (Docker retries requests that died with the plugin)."""
        for pool in self.pools.values():
            if not pool.replayable_pool or pool.allocated:
                continue
            same_subnet = pool.subnet == req.pool if req.pool is not None else pool.auto
            if same_subnet and pool.v6 == req.v6 and pool.sub_range == req.sub_pool:
                pool.replayable_pool = False
                return pool
        return None

    def _ack(self, pool_id: str, address: str | None) -> Ack:
        async def acknowledge() -> None:
            await self.store.acknowledge(pool_id, address)

        return acknowledge

    async def release_pool(self, req: ReleasePoolRequest) -> None:
        async with self._lock.hold("pools"):
            if req.pool_id not in self.pools:
                log.info("pool %s was already released", req.pool_id)
                return
            await self.store.delete_pool(req.pool_id)
            del self.pools[req.pool_id]

    def _pool(self, pool_id: str) -> Pool:
        pool = self.pools.get(pool_id)
        if pool is None:
            raise NotFound(f"IPAM pool {pool_id!r} is not known to pybridge")
        return pool

    async def request_address(self, req: RequestAddressRequest) -> tuple[IPInterface, Ack]:
        async with self._lock.hold("pools"):
            pool = self._pool(req.pool_id)
            if req.address is not None and req.address.version != pool.subnet.version:
                raise InvalidRequest(
                    f"address {req.address} is not an IPv{pool.subnet.version} address "
                    f"of {pool.subnet}"
                )
            replayed = pool.claim_replay(req.address, gateway=req.is_gateway)
            if replayed is not None:
                log.info("address %s: a retry of a request answered before a restart", replayed)
                address = replayed
            else:
                before = pool.cursor
                address = pool.allocate(req.address, gateway=req.is_gateway)
                kind = (
                    "gateway"
                    if req.is_gateway
                    else ("specific" if req.address is not None else "dynamic")
                )
                try:
                    await self.store.add_address(pool, str(address), kind)
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
            await self.store.remove_address(pool.id, str(req.address))
            pool.release(req.address)

    async def release_addresses(self, addresses: list[IPAddress]) -> None:
        """Give back addresses of endpoints whose containers vanished without Docker releasing
        them (found by the collector). Addresses not allocated are ignored."""
        async with self._lock.hold("pools"):
            for address in addresses:
                for pool in self.pools.values():
                    if address in pool.subnet and int(address) in pool.allocated:
                        await self.store.remove_address(pool.id, str(address))
                        pool.release(address)
                        log.info("released address %s of a vanished container", address)
