"""How pybridge removes what it made, in an order that is safe at every step: the record goes
first (after a crash, start-up removes what is left as leftovers), then whatever would let
traffic reach what is going (rules) before the answer, and the kernel objects and stale
flows nobody waits for after it (flows: see StaleFlows for who does wait)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence

from . import faults
from .background import Background
from .bridges import Bridges
from .errors import DriverError
from .firewall_writer import FirewallWriter
from .flows import StaleFlows
from .interfaces import Kernel, PortReservations
from .model import Endpoint, Network
from .naming import is_pybridge_bridge, short
from .ports import held
from .state import State
from .veths import Veths

log = logging.getLogger(__name__)


class Removal:
    def __init__(
        self,
        state: State,
        kernel: Kernel,
        host_ports: PortReservations,
        writer: FirewallWriter,
        background: Background,
        bridges: Bridges,
        veths: Veths,
        stale_flows: StaleFlows,
    ) -> None:
        self.state = state
        self.kernel = kernel
        self.host_ports = host_ports
        self.writer = writer
        self.background = background
        self.bridges = bridges
        self.veths = veths
        self.stale_flows = stale_flows

    async def endpoint(self, endpoint: Endpoint, *, wait: bool = True) -> None:
        await self.endpoints([endpoint], wait=wait)

    async def endpoints(self, endpoints: Sequence[Endpoint], *, wait: bool = True) -> None:
        """Remove endpoints: their records, host ports, published-port rules and flows, then
        their veths (after the answer, in the background, unless ``wait``)."""
        addresses = [a.ip for e in endpoints for a in (e.address, e.address_v6) if a is not None]
        await self.stale_flows.record(addresses)
        try:
            for endpoint in endpoints:
                # Forget first: if we crash after this, reconcile removes the veth as an orphan.
                await self.state.drop_endpoint(endpoint.id)
                await faults.point("endpoint.delete.forgotten")
                for mapping in held(endpoint.mappings):
                    self.host_ports.release(mapping)
            if any(endpoint.mappings for endpoint in endpoints):
                # Their DNAT rules go first: until then a new flow could still be NATed to them.
                await self.writer.write()
        finally:
            # After the rules (no new flow is NATed to them any more), and after the answer:
            # an endpoint given one of the addresses meanwhile waits for it (StaleFlows). Even
            # when a step failed: Docker releases the addresses whatever pybridge answers.
            await self.stale_flows.forget(addresses)
        if wait:
            await self.stale_flows.settled(addresses)
            for endpoint in endpoints:
                await self.veths.delete(endpoint)
            return
        # The kernel takes tens of milliseconds to delete a veth; nobody needs to wait. Off
        # the bridge in a job of its own (1-2 ms): the port is free for the next container
        # (one waiting for a port on a full bridge waits for a job to end); deleted later,
        # with the others removed by then (Veths.retire).
        what = (
            f"the veth of {short(endpoints[0].id)}"
            if len(endpoints) == 1
            else f"the veths of {len(endpoints)} endpoints"
        )
        await self.background.run(self._retire_veths(endpoints), f"removing {what}")

    async def _retire_veths(self, endpoints: Sequence[Endpoint]) -> None:
        for endpoint in endpoints:
            await self.veths.retire(endpoint)

    async def network(self, network: Network, *, best_effort: bool = False) -> None:
        """Remove every trace of ``network``: endpoints, rules, bridge (or only the addresses
        pybridge added to a bridge the user owns), then the record. Safe to repeat.

        ``best_effort`` (rollback of a failed create) carries on past failing steps and always
        drops the record, so the same request can be retried; the next firewall apply or
        start-up removes whatever a failed step left.

        Otherwise the rules go before the answer, and a bridge named by pybridge only loses its
        addresses (and so its routes) before the record goes, and is deleted just after the
        answer: the kernel needs 30-70 ms to delete a bridge, and nothing needs to wait for
        that. A crash in between leaves an unrecorded pyb-* bridge, which start-up removes.
        A bridge pybridge did not create keeps its other addresses and gets its settings back
        (BridgeSettings)."""
        await self.state.put_network(network.with_changes(state="deleting"))
        await faults.point("network.delete.recorded")
        bridge_after_answer = (
            not best_effort
            and not self.background.inline
            and network.bridge_owned
            and is_pybridge_bridge(network.bridge)
        )
        steps: list[Callable[[], Awaitable[None]]] = [
            functools.partial(self.endpoint, e, wait=not bridge_after_answer)
            for e in self.state.endpoints_of(network.id)
        ]
        steps += [
            # Waited for even when the bridge goes later: once Docker has its answer, it may
            # give the subnet (or the bridge name) to another network at once, which stale
            # rules (masquerade, isolation drops) would catch.
            self.writer.write,
            functools.partial(faults.point, "network.delete.firewall"),
            functools.partial(
                self.bridges.remove, network, delete_after_answer=bridge_after_answer
            ),
            functools.partial(faults.point, "network.delete.bridge"),
        ]
        try:
            for step in steps:
                try:
                    await step()
                except DriverError as err:
                    if not best_effort:
                        raise
                    log.warning("while removing network %s: %s", short(network.id), err)
        finally:
            # Once Docker has the answer (an error included), any driver may give the subnet's
            # addresses to others.
            await self.stale_flows.settled_in(s.pool for s in network.subnets)
        await self.state.drop_network(network.id)
        if bridge_after_answer:
            await self.bridges.delete_after_answer(network.bridge)
