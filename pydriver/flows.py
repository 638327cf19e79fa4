"""The connection-tracking entries of removed endpoints ("stale flows"), forgotten after the
answer, with no address used again before its flows are gone.

An entry outlives its container: left in place, a reply-state entry lets the next holder of
the address receive, through the replies rule, traffic nobody allowed (issue 12). Forgetting
them meant walking the kernel's whole conntrack table (about 10 ms per walk, however few
entries there are; IPv4 on Linux 6.12+ has the kernel's filtered flush instead, netlink.py),
which once made up most of every ``DeleteEndpoint``. So the removal only
records the addresses (on disk, before the answer) and the walks run after it; what must
wait for them does: a ``CreateEndpoint`` for one of those addresses, and a ``DeleteNetwork``
(after it Docker may give the subnet to any driver). Addresses recorded by a run that
stopped are forgotten at the next start.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
from collections.abc import Iterable

from .errors import DriverError
from .interfaces import Kernel, NetworkStore
from .model import IPAddress, IPNetwork

log = logging.getLogger(__name__)

META_KEY = "stale_flows"


# Waits between tries when the kernel refuses (a busy socket, memory): then given up, logged,
# as the entries time out on their own eventually.
RETRY_DELAYS = (0.1, 0.5)
# Shutdown waits this long; whatever is left is on disk for the next start.
CLOSE_WAIT = 5.0


class StaleFlows:
    def __init__(
        self,
        store: NetworkStore,
        kernel: Kernel,
        *,
        inline: bool = False,
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
    ) -> None:
        """``inline``: forget at once, before forget returns (unit tests)."""
        self.store = store
        self.kernel = kernel
        self.inline = inline
        self.retry_delays = retry_delays
        self._recorded: frozenset[str] = frozenset()  # as on disk
        self._running: dict[IPAddress, asyncio.Task[None]] = {}
        # Asked for again while their task was past its first look at the table.
        self._again: set[IPAddress] = set()
        # Recorded by a removal that has not called forget() for them yet.
        self._handoffs: dict[IPAddress, int] = {}
        self._change_lock = asyncio.Lock()

    async def load(self) -> None:
        """Forget (in the background) the flows a previous run recorded and did not finish."""
        text = await self.store.get_meta(META_KEY)
        try:
            recorded = {str(ipaddress.ip_address(a)) for a in json.loads(text or "[]")}
        except (ValueError, TypeError):
            log.warning("ignoring an unreadable list of stale flows: %r", text)
            recorded = set()
        self._recorded = frozenset(recorded)
        for address in sorted(recorded):
            self._start(ipaddress.ip_address(address))

    async def record(self, addresses: Iterable[IPAddress]) -> None:
        """Write down (on disk before this returns) that the flows of ``addresses`` are to
        go: called before the endpoints' records go, so a crash in between loses nothing."""
        wanted = list(addresses)
        await self._change(add={str(a) for a in wanted})
        for address in wanted:  # not off the disk before forget() has taken them on
            self._handoffs[address] = self._handoffs.get(address, 0) + 1

    async def forget(self, addresses: Iterable[IPAddress]) -> None:
        """Start forgetting the flows of recorded ``addresses`` (in the background)."""
        wanted = list(addresses)
        for address in wanted:
            left = self._handoffs.get(address, 0) - 1
            if left > 0:
                self._handoffs[address] = left
            else:
                self._handoffs.pop(address, None)
            self._start(address)
        if self.inline:
            await self.settled(wanted)

    async def settled(self, addresses: Iterable[IPAddress]) -> None:
        """Wait until the stale flows of ``addresses`` are gone (at once when none are)."""
        tasks = [self._running[a] for a in addresses if a in self._running]
        if tasks:
            # asyncio.wait: a caller that gives up does not cancel the forgetting.
            await asyncio.wait(tasks)

    async def settled_in(self, subnets: Iterable[IPNetwork]) -> None:
        """Wait until the stale flows of every address in ``subnets`` are gone."""
        nets = list(subnets)
        await self.settled([a for a in list(self._running) if any(a in n for n in nets)])

    async def settled_all(self) -> None:
        await self.settled(list(self._running))

    async def close(self) -> None:
        """Give what is running a moment; the rest is on disk for the next start."""
        tasks = list(self._running.values())
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_WAIT)
        for task in tasks:
            task.cancel()

    @property
    def pending(self) -> list[IPAddress]:
        return sorted(self._running, key=lambda a: (a.version, a))

    def _start(self, address: IPAddress) -> None:
        if address in self._running:
            # Its task may have read the table already: flows set up since would be missed.
            self._again.add(address)
            return
        task = asyncio.create_task(self._forget(address))
        self._running[address] = task
        # A task cancelled before its first step never runs its finally.
        task.add_done_callback(functools.partial(self._ended, address))

    def _ended(self, address: IPAddress, task: asyncio.Task[None]) -> None:
        if self._running.get(address) is task:
            del self._running[address]

    async def _forget(self, address: IPAddress) -> None:
        try:
            while True:
                self._again.discard(address)
                await self._forget_once(address)
                if address not in self._again:
                    break
        finally:
            self._running.pop(address, None)
            self._again.discard(address)
        if self._handoffs.get(address):
            return  # recorded again by a removal that has not handed it over yet
        try:
            await self._change(remove={str(address)})
        except DriverError as err:  # forgotten again at the next start: harmless
            log.warning("could not record that the flows of %s are gone: %s", address, err)

    async def _forget_once(self, address: IPAddress) -> None:
        for delay in (*self.retry_delays, None):
            try:
                await self.kernel.forget_flows(address)
                return
            except Exception as err:  # nothing may end the task unobserved
                if delay is None:
                    log.error(
                        "could not remove the connection-tracking entries of %s (%s); they "
                        "stay until they time out (UDP: minutes; an established TCP "
                        "connection: up to days), and a container given the address meanwhile "
                        "may receive their traffic",
                        address,
                        err,
                    )
                    return
                log.warning("stale flows of %s: %s; trying again", address, err)
                await asyncio.sleep(delay)

    async def _change(self, *, add: set[str] = set(), remove: set[str] = set()) -> None:  # noqa: B006 (never mutated)
        # One change at a time, each from the latest set: none undoes another.
        async with self._change_lock:
            recorded = (self._recorded | add) - remove
            if recorded != self._recorded:
                await self.store.set_meta(META_KEY, json.dumps(sorted(recorded)))
                self._recorded = recorded  # only once it is on disk
