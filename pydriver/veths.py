"""An endpoint in the kernel: a veth pair, one end on its network's bridge, the other handed to
Docker for the container. Also its MAC and whether its addresses fit its network (pure)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import time
from collections.abc import Awaitable, Callable, Container

from .background import Background
from .errors import BridgeFull, Conflict, DriverError, InvalidRequest
from .interfaces import MAX_BRIDGE_PORTS, Kernel
from .locks import KernelWork
from .model import Endpoint, IPAddress, Network
from .naming import RETIRED_LINK_GROUP, bridge_mac, endpoint_mac, short

log = logging.getLogger(__name__)

# MACs tried per endpoint: a bridge holds at most 1023 ports, so 64 draws of 40 hashed bits
# all hitting a taken one does not happen.
MAC_ATTEMPTS = 64


def free_mac(
    network: Network, endpoint_id: str, address: IPAddress | None, taken: Container[str]
) -> str:
    """The MAC derived from the address (or the endpoint id), or, if another endpoint of
    the network (``taken``) or the bridge has it, the next of a fixed sequence: the same
    address gets the same MAC whenever it is free, whatever restarts in between."""
    bridge = bridge_mac(network.id)
    for attempt in range(MAC_ATTEMPTS):
        mac = endpoint_mac(endpoint_id, address, attempt)
        if mac != bridge and mac not in taken:
            if attempt:
                log.info(
                    "endpoint %s: MAC for %s taken; using %s", short(endpoint_id), address, mac
                )
            return mac
    raise Conflict(f"no free MAC address for endpoint {short(endpoint_id)}")


def check_addresses(
    network: Network,
    address: ipaddress.IPv4Interface | None,
    address_v6: ipaddress.IPv6Interface | None,
) -> None:
    """Refuse an endpoint address outside its network's subnets of that family."""
    for given, subnets in ((address, network.subnets_v4), (address_v6, network.subnets_v6)):
        if given is None:
            continue
        if subnets and not any(given.ip in s.pool for s in subnets):
            pools = ", ".join(str(s.pool) for s in subnets)
            raise InvalidRequest(f"address {given.ip} is outside the network's subnets ({pools})")


# Removed containers' veths are deleted together, once no endpoint has been made for a moment
# (Veths.retire): deleting one takes the kernel 15-40 ms, partly under the rtnl lock that
# putting the next container's veth on its bridge needs too (5-15 ms instead of under 1 when
# they met), and deleting 150 in one request took 43 ms. Under a steady stream of container
# starts they wait at most RETIRED_WAIT_AT_MOST seconds, and never more than RETIRED_AT_MOST.
# Retired pairs are down and on no bridge meanwhile (Veths.retire).
RETIRED_IDLE = 0.05
RETIRED_WAIT_AT_MOST = 5.0
RETIRED_AT_MOST = 256
RETIRED_RETRY = 1.0  # after an unexpected failure
CLOSE_WAIT = 5.0  # shutdown waits this long for them; start-up deletes what is left


class Veths:
    def __init__(
        self,
        kernel: Kernel,
        background: Background,
        work: KernelWork | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kernel = kernel
        self.background = background
        self.work = work or KernelWork()
        self.clock = clock
        self._retired: dict[str, tuple[str, float]] = {}  # host end: (peer, when retired)
        self._making = 0  # ensure() calls under way
        self._last_made = -math.inf  # when the last ensure() ended
        self._between_last_two = math.inf  # and how long after the one before
        self._hurry = 0  # settle() calls under way
        self._closed = False
        self._changed = asyncio.Event()
        self._deleter: asyncio.Task[None] | None = None

    async def ensure(
        self, network: Network, endpoint: Endpoint, *, fresh: bool, spare: bool = False
    ) -> None:
        """The endpoint's pair, on the bridge, up (in hairpin mode unless the network is
        internal). ``fresh``: a pair already there is a leftover of an interrupted attempt,
        made again so that both ends are ours. ``spare``: the endpoint's names are those of a
        spare pair (spares.py), which is put on the bridge as it is (made anew if it is gone)."""
        self._making += 1
        try:
            await self._ensure(network, endpoint, fresh=fresh, spare=spare)
        finally:
            self._making -= 1
            now = self.clock()
            self._between_last_two, self._last_made = now - self._last_made, now

    async def _ensure(
        self, network: Network, endpoint: Endpoint, *, fresh: bool, spare: bool
    ) -> None:
        mtu = network.options.mtu
        names = (endpoint.host_veth, endpoint.container_veth, endpoint.mac_address, mtu)
        hairpin = not network.internal

        async def on_a_free_port(step: Callable[[], Awaitable[bool]]) -> bool:
            while True:
                try:
                    return await step()
                except BridgeFull:
                    # Veths of removed containers leave the bridge in the background, oldest
                    # first: a bridge near its limit may be full of those. Each one that goes
                    # frees a port.
                    log.info(
                        "endpoint %s: bridge %s is full; waiting for a removed container's "
                        "veth to leave it",
                        short(endpoint.id),
                        network.bridge,
                    )
                    if not await self.background.wait_for_one():
                        raise BridgeFull(
                            f"network {short(network.id)} is full: its bridge "
                            f"{network.bridge} already has {MAX_BRIDGE_PORTS} interfaces, the "
                            "most a Linux bridge can hold; remove a container from it first"
                        ) from None

        if spare and await on_a_free_port(
            lambda: self.kernel.attach_veth(*names, master=network.bridge, hairpin=hairpin)
        ):
            return

        async def create() -> bool:
            # Created, enslaved, up and in hairpin mode in one trip to the netlink thread.
            return await on_a_free_port(
                lambda: self.kernel.ensure_veth(*names, master=network.bridge, hairpin=hairpin)
            )

        created = await create()
        if fresh and not created:
            await self.kernel.delete_link(endpoint.host_veth)
            await self.kernel.delete_link(endpoint.container_veth)
            created = await create()
        if not created:
            await self.kernel.set_link(endpoint.host_veth, master=network.bridge, up=True, mtu=mtu)
            if hairpin:
                await self.kernel.set_hairpin(endpoint.host_veth)

    async def retire(self, endpoint: Endpoint) -> None:
        """Take the endpoint's pair down and off its bridge now (about a millisecond): its port
        is free for the next container at once, a bridge near its 1,023 ports is not full of
        removed containers' veths, and nothing reaches the host through the host end (down, it
        has no link-local address, and the container's end no carrier). The pair is deleted
        later, with the others retired by then (RETIRED_IDLE)."""
        host, peer = endpoint.host_veth, endpoint.container_veth
        try:
            await self.kernel.retire(host, peer)
        except DriverError as err:
            log.warning("endpoint %s: %s; deleting its veth pair now", short(endpoint.id), err)
            await self._delete_pair(host, peer)
            return
        if self.background.inline:  # tests over fakes: nothing is left for later
            await self._delete_pair(host, peer)
            return
        # Oldest first (a name retired again is as old as now).
        self._retired.pop(host, None)
        self._retired[host] = (peer, self.clock())
        self._wake()

    @property
    def retired(self) -> list[str]:
        """The host ends of the pairs waiting to be deleted."""
        return list(self._retired)

    async def settle(self) -> None:
        """Delete the retired pairs now, without waiting for a quiet moment (tests, shutdown).
        Gives up after a failed attempt (start-up deletes what is left)."""
        self._hurry += 1
        try:
            if self._retired:
                self._wake()
            if self._deleter is not None:
                await asyncio.wait({self._deleter})
        finally:
            self._hurry -= 1

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.settle(), CLOSE_WAIT)
        except TimeoutError:
            log.warning("removed containers' veth pairs left for the next start to delete")
        self._closed = True

    def _retry(self) -> None:
        if not self._closed and self._retired:
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        if self._deleter is None or self._deleter.done():
            self._deleter = asyncio.create_task(self._delete_retired(), name="pydriver-retired")

    async def _delete_retired(self) -> None:
        while self._retired:
            now = self.clock()
            oldest = next(iter(self._retired.values()))[1]
            if self._making:
                idle_at = now + RETIRED_IDLE
            elif self._between_last_two >= RETIRED_IDLE:
                idle_at = now  # containers come slowly: done before the next one comes
            else:
                idle_at = self._last_made + RETIRED_IDLE  # back to back: when they pause
            due = min(idle_at, oldest + RETIRED_WAIT_AT_MOST)
            if now < due and len(self._retired) < RETIRED_AT_MOST and not self._hurry:
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), due - now)
                continue
            batch = dict(self._retired)
            try:
                await self._delete(batch)
            except Exception:  # never a dead deleter, the pairs waiting for the next retire
                log.exception("could not delete removed containers' veth pairs")
                if self._hurry:  # settle() waits for this task: again later, without it
                    asyncio.get_running_loop().call_later(RETIRED_RETRY, self._retry)
                    return
                await asyncio.sleep(RETIRED_RETRY)
                continue
            for host, entry in batch.items():
                if self._retired.get(host) == entry:  # (not retired again meanwhile)
                    del self._retired[host]

    async def _delete(self, batch: dict[str, tuple[str, float]]) -> None:
        try:
            async with self.work.quiet():
                await self.kernel.delete_retired()
            return
        except DriverError as err:
            log.warning("%s; deleting them one by one", err)
        for host, (peer, _) in batch.items():
            try:
                # One by one, by name, if still in the group (not made again since under the
                # same names, by an endpoint created again with the same id); each in a quiet
                # section of its own, so rule writes are not held up for all of them.
                link = await self.kernel.get_link(host)
                if link is None or link.group == RETIRED_LINK_GROUP:
                    await self._delete_pair(host, peer)
            except DriverError as err:
                log.warning("%s", err)  # start-up removes it as a leftover

    async def delete(self, endpoint: Endpoint) -> None:
        await self._delete_pair(endpoint.host_veth, endpoint.container_veth)

    async def _delete_pair(self, host: str, peer: str) -> None:
        # Like making one, deleting an interface waits for an nf_tables commit in progress
        # while holding the rtnl lock, and the next container's veth would wait behind it
        # (locks.KernelWork).
        async with self.work.quiet():
            # Deleting the host end removes the pair wherever the other end is.
            await self.kernel.delete_link(host)
            await self.kernel.delete_link(peer)
