"""Endpoints whose containers are gone without Docker telling pybridge (a dockerd crash, a
reboot, a restart while pybridge was down): how that is told, and the one way such an
endpoint is removed (``remove_gone``), whoever finds it: start-up, a CreateEndpoint or a
ProgramExternalConnectivity that needs what it holds, or the collector.

Never asks Docker: a joined endpoint is gone when its host veth vanished, since the pair dies
with the container's network namespace. (Docker's netns files are no evidence: dockerd
leaves empty ones behind, and a managed plugin cannot see them at all.)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .errors import DriverError
from .interfaces import AddressReleaser, Kernel, SandboxCheck
from .locks import KeyedLock
from .model import Endpoint, IPAddress, Network
from .naming import endpoint_mac, short
from .removal import Removal
from .state import State

log = logging.getLogger(__name__)


class Eviction:
    def __init__(
        self,
        state: State,
        kernel: Kernel,
        locks: KeyedLock,
        removal: Removal,
        release_addresses: AddressReleaser | None,
        sandbox_released: SandboxCheck | None = None,
    ) -> None:
        self.state = state
        self.kernel = kernel
        self.locks = locks
        self.removal = removal
        self.release_addresses = release_addresses
        self.sandbox_released = sandbox_released

    async def container_gone(self, endpoint: Endpoint) -> bool:
        """A joined endpoint whose host-side veth is gone lost its container: the pair dies
        with the container's network namespace. So did one whose sandbox Docker destroyed (its
        namespace is no longer mounted on its SandboxKey; the kernel may take seconds more to
        tear the namespace and the veth down). An endpoint not yet joined is never gone by
        these tests. Call it under the endpoint's network lock, so no Join or Leave runs
        meanwhile."""
        if endpoint.state != "ready" or not endpoint.sandbox_key:
            return False
        try:
            if not await self.kernel.exists(endpoint.host_veth):
                return True
        except DriverError as err:
            log.warning("cannot check the veth of endpoint %s: %s", short(endpoint.id), err)
            return False
        if self.sandbox_released is None:
            return False
        return await self.sandbox_released(endpoint.sandbox_key)

    async def remove_gone(
        self, endpoints: Sequence[Endpoint], *, release_addresses: bool = True
    ) -> None:
        """Remove endpoints nobody will ever use again: their records, host ports,
        published-port rules and flows, what is left of their veths, and (unless told not to)
        the addresses pybridge's IPAM gave them, in one transaction.

        Releasing those addresses is safe: Docker deletes an endpoint before it releases its
        address, so an endpoint Docker deleted is not here, and one it failed to delete (it
        could not reach pybridge) either had its release fail too, or gets it sent later,
        which pybridge's IPAM ignores while another endpoint uses the address."""
        await self.removal.endpoints(endpoints, wait=False)
        if release_addresses:
            await self._release_owned(endpoints)

    async def _release_owned(self, endpoints: Sequence[Endpoint]) -> None:
        owned = self.state.owned_addresses(endpoints)
        if owned and self.release_addresses is not None:
            try:
                await self.release_addresses(owned)
            except DriverError as err:  # the addresses leak: safe, unlike a duplicate
                log.warning("could not release the addresses of vanished containers: %s", err)

    async def evict(self, endpoint: Endpoint, why: str) -> None:
        """Remove an endpoint whose container is gone (``container_gone``), saying why."""
        log.warning(
            "endpoint %s on network %s: its container is gone (%s); removing it",
            short(endpoint.id),
            short(endpoint.network_id),
            why,
        )
        await self.remove_gone([endpoint])

    async def evict_if_gone(self, endpoint_id: str, why: str) -> bool:
        """Evict the endpoint if its container is gone, checked now under its network's lock.
        Never evicts a live endpoint (veth present, or not joined)."""
        seen = self.state.endpoints.get(endpoint_id)
        if seen is None:
            return False
        async with self.locks.hold(seen.network_id):
            current = self.state.endpoints.get(endpoint_id)
            if current is None or not await self.container_gone(current):
                return False
            await self.evict(current, why)
            return True

    async def evict_holders(
        self,
        network: Network,
        endpoint_id: str,
        addresses: set[IPAddress],
        address: IPAddress | None,
        mac_address: str | None,
    ) -> None:
        """Evict endpoints of this network whose containers are gone and that hold a new
        endpoint's ``addresses`` or the MAC it gets (given, or derived from its first
        ``address``): Docker's IPAM gives a restarted container's address again once it forgot
        the dead endpoint. Runs under the network's lock. A live holder stays; the address is
        then logged as used twice."""
        mac = mac_address or (endpoint_mac(endpoint_id, address) if address else None)
        wanted: list[object] = [*addresses, *([mac] if mac is not None else [])]
        for other in self.state.holders(network.id, wanted):
            if other.id == endpoint_id:
                continue
            shared = {a.ip for a in (other.address, other.address_v6) if a is not None}
            if not (shared & addresses or (mac is not None and other.mac_address == mac)):
                continue
            if await self.container_gone(other):
                why = f"its address or MAC is wanted by endpoint {short(endpoint_id)}"
                await self.evict(other, why)
            elif shared & addresses:
                log.warning(
                    "endpoint %s: address %s is also used by endpoint %s on network %s",
                    short(endpoint_id),
                    ", ".join(str(a) for a in sorted(shared & addresses, key=str)),
                    short(other.id),
                    short(network.id),
                )

    async def collect(
        self, suspects: set[str], now: float, unjoined_grace: float = 600.0
    ) -> tuple[set[str], list[Endpoint]]:
        """Remove endpoints whose container is gone without Docker telling pybridge: a joined
        one whose host veth vanished (``container_gone``); one never joined long after it
        was made. Only what two scans in a row (``suspects`` from the last one) agree on is
        removed. Returns the new suspects and the removed endpoints.

        Addresses: Docker sends DeleteEndpoint, then ReleaseAddress, whenever it reaches
        pybridge; an endpoint still here is one Docker never deleted. A joined one whose
        container is gone gets its pybridge-IPAM address released (with Docker's own IPAM, or
        pybridge's under another driver, nothing is released). One never joined is only
        forgotten: it may be the leftover of a start that failed half-way, whose address
        Docker still releases itself, so releasing it here could free it twice (a leak is
        safe, a duplicate is not)."""
        found: set[str] = set()
        for endpoint in list(self.state.endpoints.values()):
            if await self.container_gone(endpoint):
                found.add(endpoint.id)
        for endpoint in self.state.endpoints.values():
            never_joined = endpoint.state == "ready" and not endpoint.sandbox_key
            if never_joined and now - endpoint.created_at > unjoined_grace:
                found.add(endpoint.id)
        removed: list[Endpoint] = []
        for endpoint_id in sorted(found & suspects):
            seen = self.state.endpoints.get(endpoint_id)
            if seen is None:
                continue
            async with self.locks.hold(seen.network_id):
                if self.state.endpoints.get(endpoint_id) != seen:
                    continue  # changed meanwhile (joined, say): leave it for the next scan
                if seen.sandbox_key:
                    if not await self.container_gone(seen):
                        continue
                    await self.evict(seen, f"sandbox {seen.sandbox_key}, veth gone")
                else:
                    log.warning(
                        "endpoint %s on network %s: never joined, long after it was made; "
                        "removing it",
                        short(seen.id),
                        short(seen.network_id),
                    )
                    await self.remove_gone([seen], release_addresses=False)
                removed.append(seen)
        return found - {e.id for e in removed}, removed
