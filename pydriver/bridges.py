"""A network in the kernel: its bridge (made by pybridge, or the user's, adopted and given
back as it was found), the gateway addresses on it, and forwarding. Also what makes a new
network's bridge name and subnets acceptable (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .background import Background
from .errors import Conflict
from .interfaces import Firewall, Kernel, KernelSettings
from .ipam import describe_route, find_overlap
from .model import (
    BridgeSettings,
    Family,
    HostRoute,
    IPInterface,
    Link,
    Network,
    NetworkOptions,
    Subnet,
    addresses_on_bridge,
)
from .naming import bridge_mac, is_pybridge_bridge, is_pybridge_veth, short


def check_bridge_name(network_id: str, bridge: str, networks: Iterable[Network]) -> None:
    """Refuse a bridge name another pybridge network has."""
    for other in networks:
        if other.id != network_id and other.bridge == bridge:
            raise Conflict(
                f"bridge name {bridge} is already used by pybridge network {short(other.id)}"
            )


def check_subnets(
    network_id: str,
    bridge: str,
    subnets: Sequence[Subnet],
    networks: Iterable[Network],
    host_routes: Sequence[HostRoute],
) -> None:
    """Refuse subnets that overlap another pybridge network's, or a host route that is not on
    a pybridge bridge (those are the networks' own)."""
    networks = list(networks)
    others = [n for n in networks if n.id != network_id]
    ours = {n.bridge for n in networks} | {bridge}
    routes = [r for r in host_routes if r.device not in ours]
    taken = [theirs.pool for other in others for theirs in other.subnets]
    for subnet in subnets:
        found = find_overlap(subnet.pool, taken, routes)
        if isinstance(found, HostRoute):
            raise Conflict(f"subnet {subnet.pool} overlaps {describe_route(found)}")
        if found is not None:
            other = next(n for n in others if any(t.pool == found for t in n.subnets))
            raise Conflict(
                f"subnet {subnet.pool} overlaps subnet {found} of pybridge network "
                f"{short(other.id)} (bridge {other.bridge})"
            )


class Bridges:
    def __init__(
        self,
        kernel: Kernel,
        settings: KernelSettings,
        firewall: Firewall,
        background: Background,
    ) -> None:
        self.kernel = kernel
        self.settings = settings
        self.firewall = firewall
        self.background = background
        self.leaving: set[str] = set()  # deleted in the background, not yet gone

    # -- taking a bridge -----------------------------------------------------------------------

    async def wait_until_gone(self, name: str) -> None:
        """A removed network's bridge of that name may be going just now: let it go first."""
        while name in self.leaving and await self.background.wait_for_one():
            pass

    async def take(
        self,
        name: str,
        network_id: str,
        subnets: tuple[Subnet, ...],
        routes: Sequence[HostRoute],
        internal: bool,
        options: NetworkOptions,
    ) -> tuple[bool, tuple[IPInterface, ...], BridgeSettings]:
        """Whether the network's bridge will be pybridge's own (none of that name exists);
        otherwise, once it is found free for the network, the gateway addresses already on it
        and what pybridge is about to change on it."""
        link = await self.kernel.get_link(name)
        if link is None:
            return True, (), BridgeSettings()
        foreign = await self.check_adoption(link, subnets, routes, network_id, options)
        return False, foreign, await self.settings_before(link, internal, options)

    async def check_adoption(
        self,
        link: Link,
        subnets: tuple[Subnet, ...],
        routes: Sequence[HostRoute],
        network_id: str,
        options: NetworkOptions,
    ) -> tuple[IPInterface, ...]:
        """Refuse to take over an existing interface that is not free for a network; returns
        the gateway addresses that are already on it (they stay when the network goes)."""
        name = link.name
        if link.kind != "bridge":
            raise Conflict(f"interface {name} already exists and is not a bridge")
        if is_pybridge_bridge(name):
            # pybridge deletes unknown pyb-* bridges at start-up: one it did not make for this
            # network would be deleted as a leftover once the network is gone.
            raise Conflict(
                f"bridge {name} already exists and was not made by pybridge for network "
                f"{short(network_id)}; names starting with pyb- are pybridge's own: remove it "
                "or choose another name"
            )
        for route in routes:
            if route.device == name and route.destination.prefixlen == 0:
                raise Conflict(
                    f"bridge {name} carries the host's default IPv{route.destination.version} "
                    "route; pybridge does not take over the host's uplink: choose another "
                    "bridge name"
                )
        # Another interface on it (a NIC, a VM's tap) would reach every container port: to a
        # bridge, that is traffic within the network.
        others = sorted(
            other.name
            for other in await self.kernel.links()
            if other.master == link.index and not is_pybridge_veth(other.name)
        )
        if others:
            raise Conflict(
                f"bridge {name} already has {', '.join(others[:3])} on it, which would reach "
                "every container of the network directly; pybridge adopts only a bridge with "
                "nothing else on it: choose another bridge name"
            )
        present = await self.kernel.link_addresses(name)
        for address in present:
            if address.version == 6 and address.ip.is_link_local:
                continue  # every IPv6 interface has one (isolated: disable_ipv6 takes it away)
            if not any(address.ip in s.pool for s in subnets):
                raise Conflict(
                    f"bridge {name} has the address {address}, outside the network's subnets; "
                    "pybridge adopts only a bridge with no addresses but the network's own: "
                    "choose another bridge name or subnet"
                )
            if options.gateway_mode(4 if address.version == 4 else 6) == "isolated":
                raise Conflict(
                    f"bridge {name} has the address {address}, but gateway mode isolated keeps "
                    f"the host off the network's IPv{address.version} subnet: remove the "
                    "address or choose another bridge name"
                )
        return tuple(a for a in addresses_on_bridge(subnets, options) if a in present)

    async def settings_before(
        self, link: Link, internal: bool, options: NetworkOptions
    ) -> BridgeSettings:
        """What pybridge is about to change on a bridge it did not create (see ``ensure``), as
        it is now: only what will change is recorded."""
        name = link.name
        accept_ra = await self.settings.interface_setting(name, "accept_ra")
        route_localnet = (
            None if internal else await self.settings.interface_setting(name, "route_localnet")
        )
        disable_ipv6 = (
            await self.settings.interface_setting(name, "disable_ipv6")
            if options.gateway_mode_v6 == "isolated"
            else None
        )
        return BridgeSettings(
            route_localnet=route_localnet if route_localnet not in (None, "1") else None,
            accept_ra=accept_ra if accept_ra not in (None, "0") else None,
            mtu=link.mtu if options.mtu and link.mtu != options.mtu else None,
            up=False if not link.up else None,
            disable_ipv6=disable_ipv6 if disable_ipv6 not in (None, "1") else None,
        )

    # -- making it work ------------------------------------------------------------------------

    async def ensure(self, network: Network) -> None:
        """The bridge, up, with pybridge's settings and the gateway addresses (of the families
        that have theirs on the bridge: not an isolated one, nor IPv4 with inhibit_ipv4)."""
        mtu = network.options.mtu
        await self.kernel.ensure_bridge(network.bridge, bridge_mac(network.id), mtu)
        if mtu:
            await self.kernel.set_link(network.bridge, mtu=mtu)
        await self.settings.disable_accept_ra(network.bridge)
        if network.options.gateway_mode_v6 == "isolated":
            # Not even a link-local address: the host is not on the network at all over IPv6
            # (as Docker does, before the bridge comes up and would get one).
            await self.settings.disable_ipv6(network.bridge)
        if not network.internal:
            # Lets 127.0.0.1:PORT reach published ports (DNAT'd in OUTPUT, routed out here).
            await self.settings.enable_route_localnet(network.bridge)
        for address in network.bridge_addresses:
            await self.kernel.ensure_address(network.bridge, address)
        await self.kernel.set_link(network.bridge, up=True)

    async def ensure_forwarding(self, network: Network) -> None:
        families: tuple[Family, ...] = (4, 6) if network.subnets_v6 else (4,)
        for family in families:
            if await self.settings.forwarding_enabled(family):
                continue
            # Forwarding turns the host into a router between all its interfaces. Docker sets
            # the FORWARD policy to DROP when it is the one enabling it, and only then: when
            # pybridge does it first (it starts before dockerd), the policy must still be DROP.
            await self.firewall.drop_forwarded_by_default(family)
            await self.settings.enable_forwarding(family)

    # -- giving it up --------------------------------------------------------------------------

    async def remove(self, network: Network, *, delete_after_answer: bool) -> None:
        """Delete pybridge's own bridge; or, when it is deleted after the answer (see
        ``delete_after_answer``) or is the user's, take off the addresses pybridge added (and
        with them their routes) and, on the user's, put back the settings it changed."""
        if network.bridge_owned and not delete_after_answer:
            await self.kernel.delete_link(network.bridge)
            return
        for address in network.bridge_addresses:
            if address not in network.foreign_addresses:
                await self.kernel.remove_address(network.bridge, address)
        if not network.bridge_owned:
            await self.restore_settings(network)

    async def delete_after_answer(self, name: str) -> None:
        """Delete a bridge in the background (the kernel needs 30-70 ms; nothing waits for
        it). Until it is gone, a new network that wants its name waits (``wait_until_gone``)."""
        self.leaving.add(name)
        await self.background.run(self._delete(name), f"removing bridge {name}")

    async def _delete(self, name: str) -> None:
        try:
            await self.kernel.delete_link(name)
        finally:
            self.leaving.discard(name)

    async def restore_settings(self, network: Network) -> None:
        """Put back what pybridge changed on a bridge it did not create (its addresses are
        already gone)."""
        saved = network.previous_settings
        if saved == BridgeSettings() or not await self.kernel.exists(network.bridge):
            return
        if saved.route_localnet is not None:
            await self.settings.restore_interface_setting(
                network.bridge, "route_localnet", saved.route_localnet
            )
        if saved.accept_ra is not None:
            await self.settings.restore_interface_setting(
                network.bridge, "accept_ra", saved.accept_ra
            )
        if saved.disable_ipv6 is not None:
            await self.settings.restore_interface_setting(
                network.bridge, "disable_ipv6", saved.disable_ipv6
            )
        if saved.mtu is not None:
            await self.kernel.set_link(network.bridge, mtu=saved.mtu)
        if saved.up is False:
            await self.kernel.set_link(network.bridge, up=False)
