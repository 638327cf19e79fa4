"""Spare veth pairs, made ahead of the endpoints that take them.

Creating an interface is the one step of ``CreateEndpoint`` the kernel can hold up: it waits
while an nf_tables transaction is in progress in the namespace (pybridge's own rule writes,
Docker's ``iptables`` calls) and while the conntrack table is being walked (StaleFlows), taking
2-20 ms instead of 1. Putting an existing pair on a bridge does not wait for either (0.7 ms in
both cases; renaming one waits like creating). So pybridge keeps a few pairs made in the
background, each end named from a random token (``pys…``/``pyt…``), and an endpoint takes one
and keeps its names. When none is left, the endpoint's pair is made on the spot, as before.

Spares exist only while pybridge serves endpoints: the first ``CreateEndpoint`` starts them,
the last network's removal and shutdown delete them. They are in no state: start-up deletes
any that a stopped run left (like any veth named like pybridge's that no endpoint has).
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from .errors import DriverError, HostError
from .interfaces import Kernel
from .locks import KernelWork
from .naming import spare_veth_names

log = logging.getLogger(__name__)

# Enough for the containers of a `docker compose up` to start without waiting, few enough
# not to clutter `ip link`; at most MAX_SPARE_PAIRS (all that are missing are made in one
# quiet moment, while rule writes wait).
SPARE_PAIRS = 4
MAX_SPARE_PAIRS = 16
# Shutdown waits this long for the spares to go; start-up removes what is left.
CLOSE_WAIT = 5.0


class SpareVeths:
    def __init__(
        self, kernel: Kernel, size: int = SPARE_PAIRS, work: KernelWork | None = None
    ) -> None:
        self.kernel = kernel
        self.size = max(0, min(size, MAX_SPARE_PAIRS))
        self.work = work or KernelWork()
        self._ready: list[tuple[str, str]] = []
        self._wanted = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def ready(self) -> list[tuple[str, str]]:
        """The pairs ready to be taken (host end, peer end)."""
        return list(self._ready)

    def take(self) -> tuple[str, str] | None:
        """A spare pair's names (the caller owns the pair from now on), or None. The caller
        calls refill() once it is done with the kernel: a pair being made holds up the
        kernel's other link changes (the rtnl lock), the taker's too."""
        if self.size <= 0 or self._closed:
            return None
        self._wanted = True
        pair = self._ready.pop(0) if self._ready else None
        log.debug("spare veth pair %s taken (%d left)", pair and pair[0], len(self._ready))
        return pair

    def give_back(self, pair: tuple[str, str]) -> None:
        """A pair taken and not used after all (the caller failed before touching it)."""
        self._ready.insert(0, pair)
        if not self._wanted or self._closed:
            self._kick()  # deleted by the task, with the others

    def refill(self) -> None:
        """Make the spares taken so far again, in the background."""
        if self._wanted and not self._closed:
            self._kick()

    def release_all(self) -> None:
        """No endpoints to come for now (the last network went): delete the spares."""
        self._wanted = False
        self._kick()

    async def settle(self) -> None:
        """Wait until the spares are as wanted (tests)."""
        while self._task is not None and not self._task.done():
            await asyncio.gather(self._task, return_exceptions=True)

    async def close(self) -> None:
        """Delete the spares (a pair being made is deleted once made)."""
        self._closed = True
        self._wanted = False
        self._kick()
        try:
            await asyncio.wait_for(self.settle(), CLOSE_WAIT)
        except TimeoutError:
            log.warning("spare veths left for the next start to remove")

    def _kick(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="pydriver-spare-veths")

    async def _run(self) -> None:
        try:
            while True:
                if not self._wanted:
                    await self._delete_all()
                    if not self._wanted:
                        return
                elif len(self._ready) < self.size:
                    # All that are missing in one quiet moment (about a millisecond each).
                    async with self.work.quiet():  # see locks.KernelWork
                        log.debug("making %d spare veth pair(s)", self.size - len(self._ready))
                        while self._wanted and len(self._ready) < self.size:
                            await self._make_one()
                else:
                    return
        except DriverError as err:
            # Given up until the next take: endpoints get pairs made on the spot meanwhile.
            log.warning("could not make a spare veth pair: %s", err)

    async def _make_one(self) -> None:
        for _ in range(3):  # a name already taken (1 in 2**48): another
            pair = spare_veth_names(secrets.token_hex(6))
            if await self.kernel.create_spare_veth(*pair):
                break
        else:
            raise HostError("every name tried for a spare veth pair was taken")
        if self._wanted and not self._closed:
            self._ready.append(pair)
        else:
            await self.kernel.delete_link(pair[0])

    async def _delete_all(self) -> None:
        while self._ready:
            host, _ = self._ready.pop()
            await self.kernel.delete_link(host)  # the peer goes with it
