"""cluster.py's session and publisher over an in-memory store: what is written under which
lease when the lease is replaced."""

from __future__ import annotations

import asyncio
import ipaddress

from pydriver.cluster import Cluster
from tests.unit.fakecluster import MemoryClusterStore, Unavailable


class GatedStore(MemoryClusterStore):
    """Refreshing the lease fails (etcd unreachable for refreshes), and a put of ``gated`` waits
    for ``gate`` after it reached the store (a put in flight)."""

    def __init__(self, gated: str) -> None:
        super().__init__()
        self.gated = gated
        self.gate = asyncio.Event()
        self.in_flight = asyncio.Event()

    async def keep_alive(self, lease: int) -> int:
        raise Unavailable("refresh failed")

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        if key == self.gated:
            self.in_flight.set()
            await self.gate.wait()
        return await super().put(key, value, lease)


async def test_a_write_in_flight_when_the_lease_is_replaced_is_written_again_under_the_new() -> (
    None
):
    """A put in flight under the old lease when the session takes a new one must not count as
    done: the key would stay under the abandoned lease and vanish when it expires."""
    key = "/pybridge/v1/endpoints/seg/10.70.0.5"
    store = GatedStore(key)
    cluster = Cluster(store, "h1", ipaddress.ip_address("203.0.113.1"), lease_ttl=1)
    cluster.start()
    try:
        await asyncio.sleep(0.1)
        cluster.publish(key, b'{"host": "h1"}')
        await asyncio.wait_for(store.in_flight.wait(), 2)
        old = cluster._lease
        # The session gives up on the old lease (refreshes failed for a TTL) and takes a new one.
        for _ in range(60):
            if cluster._lease != old:
                break
            await asyncio.sleep(0.05)
        assert cluster._lease != old
        store.gate.set()
        await asyncio.sleep(0.3)
        assert store.lease_of(key) == cluster._lease, "the key stayed under the old lease"
    finally:
        await cluster.stop()
