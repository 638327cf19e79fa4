"""Published ports (`-p`, `-P`): choosing host ports, holding them, and the flows that must go
when a publication changes. Docker does nothing for `-p` when a remote driver's endpoint is
the gateway, so this is the whole of port publishing. Host ports are shared by every network:
everything here runs under PORTS_LOCK, taken by the caller (driver.py) after the endpoint's
network lock."""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Iterable, Sequence

from . import faults
from .background import Background
from .errors import Conflict, DriverError, PortInUse
from .eviction import Eviction
from .firewall_writer import FirewallWriter
from .interfaces import Kernel, PortHolder, PortReservations
from .model import Endpoint, Network, PortBinding, PortMapping
from .naming import short
from .ports import PortRequest, PortsOfOthers, held, plan
from .state import State

log = logging.getLogger(__name__)

# IP protocol numbers of the published-port protocols whose flows outlive a revoke.
DATAGRAM_PROTOCOLS = {"udp": 17, "sctp": 132}
# How long a host-port conflict with a joined endpoint whose veth is still there is looked at
# again before it is reported: the kernel tears a dead container's namespace down (veths
# last) asynchronously, so the old endpoint of a container dockerd is restarting right now
# may show its veth for a moment.
DYING_VETH_WAIT = 5.0


def publishes_any(mappings: Iterable[PortMapping], bindings: Iterable[PortBinding]) -> bool:
    """Whether any of ``mappings`` uses a host port that ``bindings`` ask for (any address).
    Bounded whatever the sizes: the asked ports become merged ranges, looked up by bisection."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for b in bindings:
        if b.host_port:
            ranges.setdefault(b.proto, []).append((b.host_port, max(b.host_port, b.host_port_end)))
    lows: dict[str, list[int]] = {}
    highs: dict[str, list[int]] = {}
    for proto, spans in ranges.items():
        merged: list[tuple[int, int]] = []
        for low, high in sorted(spans):
            if merged and low <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], high))
            else:
                merged.append((low, high))
        lows[proto] = [low for low, _ in merged]
        highs[proto] = [high for _, high in merged]
    for m in mappings:
        starts = lows.get(m.proto)
        if starts:
            i = bisect.bisect_right(starts, m.host_port) - 1
            if i >= 0 and m.host_port <= highs[m.proto][i]:
                return True
    return False


class Publisher:
    def __init__(
        self,
        state: State,
        kernel: Kernel,
        host_ports: PortReservations,
        port_holder: PortHolder,
        writer: FirewallWriter,
        background: Background,
        eviction: Eviction,
        ephemeral_range: tuple[int, int],
        dying_veth_wait: float = DYING_VETH_WAIT,
    ) -> None:
        self.state = state
        self.kernel = kernel
        self.host_ports = host_ports
        self.port_holder = port_holder
        self.writer = writer
        self.background = background
        self.eviction = eviction
        self.ephemeral_range = ephemeral_range
        self.dying_veth_wait = dying_veth_wait
        self._ephemeral_cursor = 0

    async def publish(
        self,
        network: Network,
        endpoint: Endpoint,
        bindings: tuple[PortBinding, ...],
        other_gateway: bool = False,
    ) -> None:
        """Publish ``bindings`` for ``endpoint``, replacing what it published before exactly
        (Docker 29 programs again without a Revoke whenever the gateway roles change); on any
        failure, the previous publication stays as it was. ``other_gateway``: see
        NetworkDriver.program_external_connectivity."""
        v4 = endpoint.address.ip if endpoint.address else None
        v6 = endpoint.address_v6.ip if endpoint.address_v6 else None
        if other_gateway and v4 is not None:
            v6 = None  # another endpoint is the IPv6 gateway: host IPv6 ports are its own
        requests = plan(
            bindings,
            v4,
            v6,
            network.options.host_binding_ipv4,
            leave_unserved=other_gateway,
            routed=[f for f in (4, 6) if network.options.gateway_mode(f) == "routed"],
        )
        taken = PortsOfOthers(self.state.ports, endpoint.id)
        for old in held(endpoint.mappings):
            self.host_ports.release(old)
        chosen: list[PortMapping] = []
        try:
            for request in requests:
                mappings = await self._take(endpoint, request, taken)
                chosen.extend(mappings)
                for mapping in mappings:
                    taken.add(mapping)
            published = endpoint.with_changes(
                port_bindings=bindings, mappings=tuple(chosen), other_gateway=other_gateway
            )
            await self.state.put_endpoint(published)
            await faults.point("ports.publish.recorded")
            await self.background.write_firewall_soon()
            await faults.point("ports.publish.firewall")
        except BaseException:
            for mapping in held(chosen):
                self.host_ports.release(mapping)
            for old in held(endpoint.mappings):  # put the previous publication back as it was
                try:
                    self.host_ports.reserve(old)
                except DriverError as err:  # its rule stays; start-up tries again
                    log.warning("endpoint %s: %s", short(endpoint.id), err)
            raise
        # A republication without Revoke (Docker 29) may drop mappings, and new ones may have
        # flows already (see _forget_datagram_flows).
        await self._forget_datagram_flows(
            gone=[m for m in endpoint.mappings if m not in chosen],
            new=[m for m in chosen if m not in endpoint.mappings],
        )
        for mapping in chosen:
            log.info("endpoint %s publishes %s", short(endpoint.id), mapping.describe())
        if not other_gateway and len(requests) < len(bindings):
            log.info(
                "endpoint %s: %d port binding(s) on a loopback address open nothing where the "
                "network routes (gateway mode routed): the host reaches the container directly",
                short(endpoint.id),
                len(bindings) - len(requests),
            )
        if other_gateway and len(requests) < len(bindings):
            log.info(
                "endpoint %s: %d port binding(s) left to the container's other gateway endpoint",
                short(endpoint.id),
                len(bindings) - len(requests),
            )

    async def _take(
        self, endpoint: Endpoint, request: PortRequest, taken: PortsOfOthers
    ) -> list[PortMapping]:
        """One binding's mappings, with the host port it needs reserved."""
        binding = request.binding
        if request.direct and binding.host_port:
            log.info(
                "endpoint %s: host port %d of %s/%d ignored where the network routes (gateway "
                "mode routed): the container's own port is published",
                short(endpoint.id),
                binding.host_port,
                binding.proto,
                binding.port,
            )
        if not request.needs_host_port:
            return request.mappings(0)  # routed alone: the container's port, nothing on the host
        return await self._reserve_binding(request, taken)

    async def revoke(self, endpoint: Endpoint) -> None:
        """Stop publishing the endpoint's ports."""
        await self.state.put_endpoint(endpoint.with_changes(mappings=()))
        await faults.point("ports.revoke.recorded")
        for mapping in held(endpoint.mappings):
            self.host_ports.release(mapping)
        await self.background.write_firewall_soon()
        await self._forget_datagram_flows(gone=endpoint.mappings, new=())

    async def hold_again(self, endpoint: Endpoint) -> list[str]:
        """Hold the endpoint's published host ports again (start-up); what could not be held,
        and who has it (its DNAT rule stays: the container keeps its port)."""
        problems: list[str] = []
        for mapping in held(endpoint.mappings):
            try:
                self.host_ports.reserve(mapping)
            except PortInUse as err:
                holder = await self.port_holder(mapping.proto, mapping.host_port)
                problems.append(f"{err} by {holder or 'another program'} while pybridge was down")
            except DriverError as err:  # out of file descriptors, say: the rule stays too
                problems.append(str(err))
        return problems

    async def evict_dead_owners(self, endpoint: Endpoint, bindings: Sequence[PortBinding]) -> bool:
        """Evict the endpoints publishing a host port ``bindings`` ask for whose containers
        are gone; whether any was. Holds no lock while it looks, then each owner's own network
        lock while it checks and removes (the caller holds no lock, so two requests on two
        networks never wait for each other's)."""
        owners = [
            e.id
            for e in self.state.endpoints.values()
            if e.id != endpoint.id and publishes_any(e.mappings, bindings)
        ]
        why = f"its host ports are wanted by endpoint {short(endpoint.id)}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.dying_veth_wait
        while True:
            evicted = False
            for owner in owners:
                evicted = await self.eviction.evict_if_gone(owner, why) or evicted
            if evicted:
                return True
            # Only joined owners can turn out gone (see DYING_VETH_WAIT); no lock is held
            # while waiting.
            owners = [o for o in owners if (e := self.state.endpoints.get(o)) and e.sandbox_key]
            if not owners or loop.time() >= deadline:
                return False
            await asyncio.sleep(0.1)

    async def _forget_datagram_flows(
        self, *, gone: Sequence[PortMapping], new: Sequence[PortMapping]
    ) -> None:
        """Connection tracking outlives a publication. A UDP or SCTP flow (TCP ones end by
        themselves) of a mapping that is gone stays NATed to the container as long as its
        client keeps sending; one to a port just published may have been set up before the
        DNAT rule existed, to pybridge's own socket holding the port, and would never reach
        the container. Both are forgotten once the rules are written, just after the answer
        (as Docker does for its own ports)."""
        gone = [m for m in gone if m.proto in DATAGRAM_PROTOCOLS]
        # (A routed publication has no host port of its own to have flows to pybridge's socket.)
        new = [m for m in new if m.proto in DATAGRAM_PROTOCOLS and not m.direct]
        if not gone and not new:
            return

        async def forget() -> None:
            await self.writer.write()
            for mapping in gone:
                await self.kernel.forget_flows(
                    mapping.container_ip, DATAGRAM_PROTOCOLS[mapping.proto], mapping.container_port
                )
            for mapping in new:
                await self.kernel.forget_port_flows(
                    DATAGRAM_PROTOCOLS[mapping.proto], mapping.host_port, mapping.family
                )

        await self.background.run(forget(), "forgetting flows of published ports")

    async def _reserve_binding(  # noqa: C901 (one loop over candidate ports, two ways to fail)
        self, request: PortRequest, taken: PortsOfOthers
    ) -> list[PortMapping]:
        """Pick a host port for one binding and reserve it on every address it covers.

        May try every port of a range (or of the ephemeral range), so each try costs a lookup
        and a bind, nothing more: who holds a port (a search of every endpoint, or `ss`, a
        process) is looked up once, for the final error only."""
        binding = request.binding
        single = not request.ephemeral and binding.host_port == binding.host_port_end
        # Why the last port tried could not be had: published by pybridge, or held by a
        # host process.
        last: PortMapping | tuple[PortInUse, int] | None = None
        for tried, port in enumerate(
            request.candidates(self.ephemeral_range, self._ephemeral_cursor)
        ):
            if tried and tried % 256 == 0:
                await asyncio.sleep(0)  # a long walk (a nearly full range) lets others run
            mappings = request.mappings(port)
            clash = taken.conflict(mappings)
            if clash is not None:
                last = clash
                if single:
                    break
                continue
            reserved: list[PortMapping] = []
            try:
                for mapping in held(mappings):
                    self.host_ports.reserve(mapping)
                    reserved.append(mapping)
            except BaseException as err:
                for mapping in reserved:
                    self.host_ports.release(mapping)
                if not isinstance(err, PortInUse):
                    raise  # out of file descriptors, say: no other port would do better
                last = (err, port)
                if single:
                    break
                continue
            if request.ephemeral:
                self._ephemeral_cursor = port
            return mappings
        if request.ephemeral:
            low, high = self.ephemeral_range
            raise Conflict(f"no free host port is left in the ephemeral range {low}-{high}")
        reason = await self._why_taken(binding.proto, last) if last is not None else None
        if single and reason is not None:
            raise reason
        raise Conflict(
            f"no free host port in {binding.host_port}-{binding.host_port_end}/{binding.proto} "
            f"for container port {binding.port}" + (f" (last: {reason})" if reason else "")
        )

    async def _why_taken(self, proto: str, last: PortMapping | tuple[PortInUse, int]) -> Conflict:
        if isinstance(last, PortMapping):
            publisher = self.state.publisher_of(last)
            owner = (
                f"endpoint {short(publisher.id)} on network {short(publisher.network_id)}"
                if publisher is not None
                else "another endpoint"
            )
            return Conflict(
                f"host port {last.host_text()}/{last.proto} is already published by "
                f"pybridge for {owner}"
            )
        in_use, port = last
        holder = await self.port_holder(proto, port)
        who = holder or f"another program on the host (`ss -ltunp 'sport = :{port}'` names it)"
        return Conflict(f"{in_use} by {who}")
