"""Endpoints whose containers are gone (eviction.py): how that is told, and that whoever finds
one (start-up, CreateEndpoint, ProgramExternalConnectivity, the collector) removes it the same
way: record, host ports, rules, then flows, then its address."""

from __future__ import annotations

import pytest

from pydriver import protocol as p
from pydriver.errors import HostError
from pydriver.model import IPAddress

from .conftest import Env, Parts
from .fakes import create_endpoint_body
from .test_gone import (
    EP1,
    EP2,
    NET,
    address,
    allocated,
    collect,
    container_dies,
    network,
    pybridge_pool,
    start,
)
from .test_state import endpoint
from .test_state import network as network_record

# -- is the container gone? ----------------------------------------------------------------------


async def test_only_a_joined_endpoint_whose_veth_is_gone_is_gone(parts: Parts) -> None:
    never_joined = endpoint(EP1, "10.50.0.2/24")
    joined = never_joined.with_changes(sandbox_key="/var/run/docker/netns/x")
    assert not await parts.eviction.container_gone(never_joined)
    assert await parts.eviction.container_gone(joined)  # no such veth in the fake kernel
    assert not await parts.eviction.container_gone(joined.with_changes(state="creating"))
    parts.kernel.add_veth_pair(joined.host_veth, joined.container_veth)
    assert not await parts.eviction.container_gone(joined)


async def test_a_veth_that_cannot_be_looked_at_is_not_gone(parts: Parts) -> None:
    joined = endpoint(EP1, "10.50.0.2/24", sandbox_key="/var/run/docker/netns/x")
    parts.kernel.fail["exists"] = HostError("netlink is broken")
    assert not await parts.eviction.container_gone(joined)


async def test_addresses_go_back_only_when_asked(parts: Parts) -> None:
    await parts.state.put_network(network_record())
    one, two = endpoint(EP1, "10.50.0.2/24"), endpoint(EP2, "10.50.0.3/24")
    await parts.state.put_endpoint(one)
    await parts.state.put_endpoint(two)
    await parts.eviction.remove_gone([one], release_addresses=False)
    assert parts.released == []
    await parts.eviction.remove_gone([two])
    assert [(pool, str(ip)) for pool, ip in parts.released] == [("10.50.0.0/24", "10.50.0.3")]
    assert parts.state.endpoints == {}


# -- one way out, whoever finds it ---------------------------------------------------------------

PATHS = ("start-up", "CreateEndpoint", "ProgramExternalConnectivity", "collector")


@pytest.mark.parametrize("path", PATHS)
async def test_every_path_removes_a_gone_endpoint_the_same_way(
    env: Env, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool_id = await pybridge_pool(env)
    await network(env)
    gone = await address(env, pool_id)  # 10.50.0.2
    await start(env, EP1, gone, port=18100)
    mac = env.driver.endpoints[EP1].mac_address
    await container_dies(env, EP1)
    events: list[str] = []

    def rules_written() -> None:
        ports = {m.host_port for rules in env.firewall.last for m in rules.mappings}
        events.append("rules with 18100" if 18100 in ports else "rules")

    real_forget = env.kernel.forget_flows

    async def forget(ip: IPAddress, proto: int | None = None, port: int | None = None) -> int:
        events.append(f"flows of {ip}")
        return await real_forget(ip, proto, port)

    env.firewall.on_apply = rules_written
    monkeypatch.setattr(env.kernel, "forget_flows", forget)
    if path == "start-up":
        driver = await env.restart()
        await driver.reconcile()
    elif path == "CreateEndpoint":  # a new container gets the dead one's MAC
        body = create_endpoint_body(NET, EP2, await address(env, pool_id), mac=mac)
        await env.driver.create_endpoint(p.parse_create_endpoint(body))
    elif path == "ProgramExternalConnectivity":  # a new container wants its host port
        await start(env, EP2, await address(env, pool_id), port=18100)
    else:
        await collect(env)
    assert EP1 not in env.driver.endpoints
    assert EP1 not in {e.id for e in await env.store.load_endpoints()}
    assert not any(str(m.container_ip) == "10.50.0.2" for m in env.host_ports.held)
    # Its rules went, then its flows (no new flow can be NATed to the address once they are
    # forgotten), then the address, which a new container may get, went back to the IPAM.
    assert "flows of 10.50.0.2" in events
    writes = [e for e in events[: events.index("flows of 10.50.0.2")] if e.startswith("rules")]
    assert writes
    assert writes[-1] == "rules"
    assert "10.50.0.2" not in allocated(env, pool_id)
