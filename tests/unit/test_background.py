"""What the driver leaves to the background in production: the firewall writer (coalescing,
errors reported to whoever waits) and veth removal."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from pydriver import protocol as p
from pydriver.errors import DriverError, HostError
from pydriver.firewall_writer import FirewallWriter
from pydriver.naming import host_veth_name
from pydriver.rules import NetworkRules

from .conftest import Env
from .fakes import create_endpoint_body, create_network_body, hexid, join_body

NET, EP = hexid("bg-net"), hexid("bg-ep")


class SlowFirewall:
    def __init__(self) -> None:
        self.writes: list[int] = []
        self.fail: Exception | None = None

    async def apply(self, networks: Sequence[NetworkRules], *, force: bool = False) -> None:
        await asyncio.sleep(0.01)
        if self.fail is not None:
            raise self.fail
        self.writes.append(len(networks))


async def test_writer_coalesces_a_burst_into_few_writes() -> None:
    firewall = SlowFirewall()
    state = {"n": 0}
    writer = FirewallWriter(
        firewall.apply, lambda: [NetworkRules(f"b{i}") for i in range(state["n"])]
    )
    generations = []
    for n in range(1, 31):
        state["n"] = n
        generations.append(writer.request())
    await writer.wait(generations[-1])
    assert firewall.writes[-1] == 30  # the last write saw the final state
    assert len(firewall.writes) <= 3
    await writer.stop()


async def test_writer_reports_failures_to_whoever_waits() -> None:
    firewall = SlowFirewall()
    writer = FirewallWriter(firewall.apply, list)
    firewall.fail = HostError("iptables-restore refused")
    with pytest.raises(HostError, match="refused"):
        await writer.write()
    firewall.fail = None
    await writer.write()  # the next write succeeds and clears the failure
    assert firewall.writes == [0]
    await writer.stop()


async def test_writer_writes_a_state_once() -> None:
    """A request for the very state last written needs no write (start-up, say, where the
    endpoints of vanished containers went with one write and reconcile asks again); a forced
    one is made anyway (self-healing), and one after a failed write is made again."""
    firewall = SlowFirewall()
    views = [NetworkRules("b0")]
    writer = FirewallWriter(firewall.apply, lambda: list(views))
    await writer.write()
    await writer.write()
    assert firewall.writes == [1]
    await writer.write(force=True)
    assert firewall.writes == [1, 1]
    views.append(NetworkRules("b1"))
    firewall.fail = HostError("iptables-restore refused")
    with pytest.raises(HostError):
        await writer.write()
    firewall.fail = None
    await writer.write()  # the same state as the failed write: made now
    assert firewall.writes == [1, 1, 2]
    await writer.stop()


async def test_writer_survives_an_unexpected_exception() -> None:
    """A bug in a write (not a DriverError) must not kill the writer: the waiter gets a plain
    sentence, and the next write goes through."""
    firewall = SlowFirewall()
    writer = FirewallWriter(firewall.apply, list)
    firewall.fail = RuntimeError("boom\nTraceback: not for Docker")
    with pytest.raises(DriverError) as caught:
        await asyncio.wait_for(writer.write(), 2)
    assert str(caught.value) == (
        "pybridge could not write its firewall rules because of an internal error "
        "(RuntimeError); see the pybridge log"
    )
    # Several waiters at once, all told; none left hanging.
    results = await asyncio.wait_for(
        asyncio.gather(*(writer.write() for _ in range(3)), return_exceptions=True), 2
    )
    assert all(isinstance(r, DriverError) for r in results)
    firewall.fail = None
    await asyncio.wait_for(writer.write(), 2)
    assert firewall.writes == [0]
    await asyncio.wait_for(writer.settle(), 2)
    await writer.stop()


async def test_stopping_the_writer_releases_its_waiters() -> None:
    started = asyncio.Event()
    never = asyncio.Event()

    async def stuck(networks: Sequence[NetworkRules], *, force: bool = False) -> None:
        started.set()
        await never.wait()

    writer = FirewallWriter(stuck, list)
    waiter = asyncio.create_task(writer.write())
    settled = asyncio.create_task(writer.settle())
    await asyncio.wait_for(started.wait(), 2)
    await asyncio.wait_for(writer.stop(), 2)
    with pytest.raises(HostError, match="shutting down"):
        await asyncio.wait_for(waiter, 2)
    await asyncio.wait_for(settled, 2)
    with pytest.raises(HostError, match="shutting down"):  # and nothing starts again
        await asyncio.wait_for(writer.write(), 2)


async def test_production_mode_answers_before_background_work(env: Env) -> None:
    driver = await env.restart(inline_background=False)
    await driver.create_network(p.parse_create_network(create_network_body(NET)))
    await driver.create_endpoint(p.parse_create_endpoint(create_endpoint_body(NET, EP)))
    await driver.join(p.parse_join(join_body(NET, EP)))
    body = {
        "NetworkID": NET,
        "EndpointID": EP,
        "Options": {
            "com.docker.network.portmap": [
                {"Proto": 6, "Port": 80, "HostPort": 18080, "HostPortEnd": 18080}
            ]
        },
    }
    await driver.program_external_connectivity(p.parse_program_external(body))
    await driver.settle()
    assert [m.host_port for m in env.firewall.last[0].mappings] == [18080]
    await driver.delete_endpoint(p.parse_endpoint_ref({"NetworkID": NET, "EndpointID": EP}))
    await driver.settle()
    assert host_veth_name(EP) not in env.kernel.names()
    assert env.firewall.last[0].mappings == ()
    await driver.close()


async def test_a_removed_endpoints_veth_leaves_its_bridge_before_it_is_deleted(env: Env) -> None:
    """Deleting a veth takes the kernel 15-40 ms; taking it off the bridge frees the port for
    the next container at once (a bridge holds at most 1,023), and the pairs removed by then
    are deleted together later (test_retired_veths.py)."""
    driver = await env.restart(inline_background=False)
    await driver.create_network(p.parse_create_network(create_network_body(NET)))
    await driver.create_endpoint(p.parse_create_endpoint(create_endpoint_body(NET, EP)))
    veth = host_veth_name(EP)
    env.kernel.calls.clear()
    await driver.delete_endpoint(p.parse_endpoint_ref({"NetworkID": NET, "EndpointID": EP}))
    await driver.settle()
    calls = [c for c in env.kernel.calls if c[1] == veth]
    assert ("retire", veth) in calls
    assert ("delete_link", veth) not in calls  # with the others retired, in one request
    assert ("delete_retired", "") in env.kernel.calls
    assert veth not in env.kernel.names()
    await driver.close()
