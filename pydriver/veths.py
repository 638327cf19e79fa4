"""An endpoint in the kernel: a veth pair, one end on its network's bridge, the other handed to
Docker for the container. Also its MAC and whether its addresses fit its network (pure)."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Container

from .background import Background
from .errors import BridgeFull, Conflict, DriverError, InvalidRequest
from .interfaces import MAX_BRIDGE_PORTS, Kernel
from .locks import KernelWork
from .model import Endpoint, IPAddress, Network
from .naming import bridge_mac, endpoint_mac, short

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


class Veths:
    def __init__(
        self, kernel: Kernel, background: Background, work: KernelWork | None = None
    ) -> None:
        self.kernel = kernel
        self.background = background
        self.work = work or KernelWork()

    async def ensure(
        self, network: Network, endpoint: Endpoint, *, fresh: bool, spare: bool = False
    ) -> None:
        """The endpoint's pair, on the bridge, up (in hairpin mode unless the network is
        internal). ``fresh``: a pair already there is a leftover of an interrupted attempt,
        made again so that both ends are ours. ``spare``: the endpoint's names are those of a
        spare pair (spares.py), which is put on the bridge as it is (made anew if it is gone)."""
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

    async def detach(self, endpoint: Endpoint) -> None:
        """Take the endpoint's veth off its bridge (a fraction of a millisecond; deleting it
        takes 15-40 ms): its port is free for the next container at once, and a bridge near
        its 1,023 ports is not full of removed containers' veths."""
        try:
            await self.kernel.detach(endpoint.host_veth)
        except DriverError as err:  # deleted just after anyway
            log.warning("endpoint %s: %s", short(endpoint.id), err)

    async def delete(self, endpoint: Endpoint) -> None:
        # Like making one, deleting an interface waits for an nf_tables commit in progress
        # while holding the rtnl lock, and the next container's veth would wait behind it
        # (locks.KernelWork).
        async with self.work.quiet():
            # Deleting the host end removes the pair wherever the other end is.
            await self.kernel.delete_link(endpoint.host_veth)
            await self.kernel.delete_link(endpoint.container_veth)
