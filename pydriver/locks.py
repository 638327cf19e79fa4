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


class KernelWork:
    """Keeps nf_tables commits (pybridge's firewall writes: ``busy``) apart from the link
    changes pybridge makes in the background (spare veth pairs made, removed containers'
    veths deleted: ``quiet``).

    Creating or deleting an interface while a commit is in progress waits for the commit while
    holding the kernel's rtnl lock, so every other link change waits too: the next container's
    pair being put on its bridge took 5-20 ms instead of about one. So a quiet section starts
    only when no commit runs, one at a time; and a commit that comes while one is wanted lets
    it go first, for at most ``YIELD_AT_MOST`` (back to back, commits would otherwise never
    pause for one; a commit that a network change waits for is never held up for long)."""

    YIELD_AT_MOST = 0.02

    def __init__(self) -> None:
        self._busy = 0
        self._making = False
        self._wanted = 0  # quiet sections waiting to start
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def busy(self) -> AsyncIterator[None]:
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: not self._making and not self._wanted),
                    self.YIELD_AT_MOST,
                )
            except TimeoutError:  # (the condition's lock is held again here)
                await self._changed.wait_for(lambda: not self._making)
            self._busy += 1
        try:
            yield
        finally:
            async with self._changed:
                self._busy -= 1
                self._changed.notify_all()

    @asynccontextmanager
    async def quiet(self) -> AsyncIterator[None]:
        async with self._changed:
            self._wanted += 1
            try:
                await self._changed.wait_for(lambda: not self._busy and not self._making)
            finally:
                self._wanted -= 1
                self._changed.notify_all()  # (a waiter given up: busy() need not wait for it)
            self._making = True
        try:
            yield
        finally:
            async with self._changed:
                self._making = False
                self._changed.notify_all()
