"""Start-up: make the kernel and the firewall match the state, before the socket is bound.

After a crash the state may hold what was being created (Docker never saw it succeed: rolled
back) or deleted (finished); after a reboot the bridges and veths are gone (made again), and
so are the containers whose endpoints were joined (removed, so they free their host ports for
the containers Docker starts again); anything named like pybridge's that no record refers to
is a leftover (removed). One broken network must not keep pybridge from serving the others,
so failures are reported per item and the rest carries on.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from .bridges import Bridges
from .errors import DriverError
from .eviction import Eviction
from .firewall_writer import FirewallWriter
from .interfaces import Kernel
from .locks import NETWORKS_LOCK, KeyedLock
from .model import Endpoint, Link, Network
from .naming import RETIRED_LINK_GROUP, bridge_mac, is_pybridge_bridge, is_pybridge_veth, short
from .publishing import Publisher
from .removal import Removal
from .state import State
from .veths import Veths

log = logging.getLogger(__name__)

Step = Callable[[], Awaitable[None]]


class Startup:
    def __init__(
        self,
        state: State,
        kernel: Kernel,
        locks: KeyedLock,
        writer: FirewallWriter,
        bridges: Bridges,
        veths: Veths,
        removal: Removal,
        eviction: Eviction,
        publisher: Publisher,
    ) -> None:
        self.state = state
        self.kernel = kernel
        self.locks = locks
        self.writer = writer
        self.bridges = bridges
        self.veths = veths
        self.removal = removal
        self.eviction = eviction
        self.publisher = publisher

    async def reconcile(self) -> list[str]:
        """Make the kernel and firewall match the state. Returns what was repaired."""
        repairs: list[str] = []

        async def attempt(what: str, step: Step) -> None:
            try:
                await step()
            except DriverError as err:
                repairs.append(f"could not {what}: {err}")

        async with self.locks.hold(NETWORKS_LOCK):
            for network in list(self.state.networks.values()):
                if network.state != "ready":
                    repairs.append(
                        f"finished an interrupted {network.state} of network {short(network.id)}"
                    )
                    await attempt(
                        f"remove network {short(network.id)}",
                        functools.partial(self.removal.network, network, best_effort=True),
                    )
            for endpoint in list(self.state.endpoints.values()):
                if endpoint.network_id not in self.state.networks or endpoint.state != "ready":
                    repairs.append(f"removed an interrupted endpoint {short(endpoint.id)}")
                    await attempt(
                        f"remove endpoint {short(endpoint.id)}",
                        functools.partial(self.removal.endpoint, endpoint),
                    )
            await attempt(
                "restore bridges and veths",
                functools.partial(self._restore_links, attempt, repairs),
            )
            await attempt("apply the firewall", self.writer.write)
            for network in self.state.networks.values():
                await attempt(
                    "enable forwarding", functools.partial(self.bridges.ensure_forwarding, network)
                )
        for repair in repairs:
            log.warning("reconcile: %s", repair)
        return repairs

    async def _restore_links(
        self, attempt: Callable[[str, Step], Awaitable[None]], repairs: list[str]
    ) -> None:
        # One dump of every interface, rather than one query per bridge and veth.
        links = {link.name: link for link in await self.kernel.links()}
        for network in list(self.state.networks.values()):
            await attempt(
                f"restore network {short(network.id)}",
                functools.partial(self._restore_network, network, links, repairs),
            )
        # Joined endpoints whose veth is gone: their containers are.
        gone = [
            e for e in self.state.endpoints.values() if e.sandbox_key and e.host_veth not in links
        ]
        if gone:
            await attempt(
                "remove endpoints whose containers are gone",
                functools.partial(self._remove_gone, gone, repairs),
            )
        for endpoint in list(self.state.endpoints.values()):
            await attempt(
                f"restore endpoint {short(endpoint.id)}",
                functools.partial(self._restore_endpoint, endpoint, links, repairs),
            )
        await attempt("remove leftovers", functools.partial(self._remove_orphans, links, repairs))

    async def _restore_network(
        self, network: Network, links: dict[str, Link], repairs: list[str]
    ) -> None:
        if network.bridge not in links and not network.bridge_owned:
            # The bridge pybridge adopted is gone (removed by hand, or not yet made by the
            # host's own network set-up after a reboot). The network's containers need one, so
            # it is made again; but it stays the user's: pybridge never deletes it, which the
            # host's own set-up may count on. Restoring its settings later means giving back
            # what a new bridge has.
            repairs.append(
                f"recreated bridge {network.bridge}, which pybridge did not create: it stays "
                "when the network is removed"
            )
            await self.kernel.ensure_bridge(network.bridge, bridge_mac(network.id), None)
            link = await self.kernel.get_link(network.bridge)
            if link is not None:
                network = network.with_changes(
                    foreign_addresses=(),
                    previous_settings=await self.bridges.settings_before(
                        link, network.internal, network.options
                    ),
                )
                await self.state.put_network(network)
        elif network.bridge not in links:
            repairs.append(f"recreated bridge {network.bridge}")
        await self.bridges.ensure(network)

    async def _remove_gone(self, gone: list[Endpoint], repairs: list[str]) -> None:
        """Joined endpoints whose veth died with the container's namespace (a reboot, or the
        container exited while pybridge was down). Docker starts a restarted container with a
        new endpoint, and these would hold its host ports: they go now, before the socket is
        bound, so no request can race this, all at once (one firewall write, one transaction
        for the addresses pybridge's IPAM gave them)."""
        for endpoint in gone:
            repairs.append(
                f"removed endpoint {short(endpoint.id)}: its container is gone "
                f"(veth {endpoint.host_veth} missing)"
            )
        await self.eviction.remove_gone(gone)

    async def _restore_endpoint(
        self, endpoint: Endpoint, links: dict[str, Link], repairs: list[str]
    ) -> None:
        network = self.state.networks[endpoint.network_id]
        veth = links.get(endpoint.host_veth)
        repairs += await self.publisher.hold_again(endpoint)
        if veth is not None:
            # Most veths are as they were: only touch those off their bridge or down. (A
            # bridge missing from the dump was recreated just now: its veths need attaching.)
            bridge = links.get(network.bridge)
            if not veth.up or bridge is None or veth.master != bridge.index:
                await self.kernel.set_link(endpoint.host_veth, master=network.bridge, up=True)
        else:  # not joined yet: Docker may still join it
            repairs.append(f"recreated veth {endpoint.host_veth}")
            await self.veths.ensure(network, endpoint, fresh=False)

    async def _remove_orphans(self, links: dict[str, Link], repairs: list[str]) -> None:
        bridges = {n.bridge for n in self.state.networks.values()}
        veths = {e.host_veth for e in self.state.endpoints.values()} | {
            e.container_veth for e in self.state.endpoints.values()
        }
        # Removed containers' pairs a stopped pybridge had not deleted yet (Veths.retire): in
        # one request, as it would have, unless an endpoint's own pair is in the group too.
        retired = [link for link in links.values() if link.group == RETIRED_LINK_GROUP]
        if retired and not any(link.name in veths for link in retired):
            try:
                await self.kernel.delete_retired()
                repairs.append(f"removed {len(retired)} leftover retired veth(s)")
            except DriverError as err:
                log.warning("%s; deleting them one by one", err)
        for link in links.values():
            if link.kind == "bridge" and is_pybridge_bridge(link.name) and link.name not in bridges:
                await self.kernel.delete_link(link.name)
                repairs.append(f"removed leftover bridge {link.name}")
            elif (
                link.kind == "veth"
                and is_pybridge_veth(link.name)
                and link.name not in veths
                and await self.kernel.delete_link(link.name)
            ):
                repairs.append(f"removed leftover veth {link.name}")
