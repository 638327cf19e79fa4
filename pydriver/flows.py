"""The connection-tracking entries of removed endpoints ("stale flows"), forgotten after the
answer, with no address used again before its flows are gone.

An entry outlives its container: left in place, a reply-state entry lets the next holder of
the address receive, through the replies rule, traffic nobody allowed (issue 12). Forgetting
them means walking the kernel's whole conntrack table (about 10 ms per walk, however few
entries there are), which once made up most of every ``DeleteEndpoint``. So the removal only
records the addresses (on disk, before the answer) and the walks run after it; what must
wait for them does: a ``CreateEndpoint`` for one of those addresses, and a ``DeleteNetwork``
(after it Docker may give the subnet to any driver). Addresses recorded by a run that
stopped are forgotten at the next start.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Iterable

from .errors import DriverError
from .interfaces import Kernel, NetworkStore
from .model import IPAddress

log = logging.getLogger(__name__)

META_KEY = "stale_flows"


class StaleFlows:
    def __init__(self, store: NetworkStore, kernel: Kernel, *, inline: bool = False) -> None:
        """``inline``: forget at once, before forget_after_answer returns (unit tests)."""
        self.store = store
        self.kernel = kernel
        self.inline = inline
        self._recorded: set[str] = set()  # as on disk
        self._running: dict[IPAddress, asyncio.Task[None]] = {}

    async def load(self) -> None:
        """Forget (in the background) the flows a previous run recorded and did not finish."""
        text = await self.store.get_meta(META_KEY)
        try:
            recorded = {str(ipaddress.ip_address(a)) for a in json.loads(text or "[]")}
        except (ValueError, TypeError):
            log.warning("ignoring an unreadable list of stale flows: %r", text)
            recorded = set()
        self._recorded = recorded
        for address in sorted(recorded):
            self._start(ipaddress.ip_address(address))

    async def record(self, addresses: Iterable[IPAddress]) -> None:
        """Write down (on disk before this returns) that the flows of ``addresses`` are to
        go: called before the endpoints' records go, so a crash in between loses nothing."""
        new = {str(a) for a in addresses} - self._recorded
        if new:
            self._recorded |= new
            await self._persist()

    async def forget(self, addresses: Iterable[IPAddress]) -> None:
        """Start forgetting the flows of recorded ``addresses`` (in the background)."""
        wanted = list(addresses)
        for address in wanted:
            self._start(address)
        if self.inline:
            await self.settled(wanted)

    async def settled(self, addresses: Iterable[IPAddress]) -> None:
        """Wait until the stale flows of ``addresses`` are gone (at once when none are)."""
        tasks = [self._running[a] for a in addresses if a in self._running]
        if tasks:
            # asyncio.wait: a caller that gives up does not cancel the forgetting.
            await asyncio.wait(tasks)

    async def settled_all(self) -> None:
        await self.settled(list(self._running))

    @property
    def pending(self) -> list[IPAddress]:
        return sorted(self._running, key=lambda a: (a.version, a))

    def _start(self, address: IPAddress) -> None:
        # Already running: it started after the endpoint was gone, so nothing newer to find.
        if address not in self._running:
            self._running[address] = asyncio.create_task(self._forget(address))

    async def _forget(self, address: IPAddress) -> None:
        try:
            await self.kernel.forget_flows(address)
        except DriverError as err:  # they time out on their own eventually
            log.warning("stale flows of %s: %s", address, err)
        finally:
            del self._running[address]
        self._recorded.discard(str(address))
        try:
            await self._persist()
        except DriverError as err:  # forgotten again at the next start: harmless
            log.warning("could not record that the flows of %s are gone: %s", address, err)

    async def _persist(self) -> None:
        # The snapshot is taken now, in order: the last write holds the latest set.
        await self.store.set_meta(META_KEY, json.dumps(sorted(self._recorded)))
