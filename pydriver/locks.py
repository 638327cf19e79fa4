"""Per-key asyncio locks: requests for different networks run concurrently, requests for the
same network are serialised.

The network driver's keys: a network's id (every request about it or its endpoints),
NETWORKS_LOCK (every change to the set of networks, taken first) and PORTS_LOCK (host ports,
shared by all networks, taken after a network's)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

NETWORKS_LOCK = "networks"
PORTS_LOCK = "host-ports"


class KeyedLock:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if self._users[key] == 0:  # forget idle locks so the dict stays small
                del self._users[key]
                del self._locks[key]
