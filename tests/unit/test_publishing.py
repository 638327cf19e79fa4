"""Published ports (publishing.py) over the fakes alone: choosing and holding host ports,
naming who has one, giving them back, and the flows that go with a publication."""

from __future__ import annotations

import pytest

from pydriver.errors import Conflict
from pydriver.model import PortBinding
from pydriver.publishing import Publisher

from .conftest import Parts
from .test_state import EP1, EP2, endpoint, mapping, network


def publisher(parts: Parts, ephemeral: tuple[int, int] = (40000, 40009)) -> Publisher:
    return Publisher(
        parts.state,
        parts.kernel,
        parts.host_ports,
        parts.host_ports.holder,
        parts.writer,
        parts.background,
        parts.eviction,
        ephemeral,
        dying_veth_wait=0.0,
    )


def binding(port: int, host_port: int = 0, proto: str = "tcp") -> PortBinding:
    return PortBinding(proto, port, None, host_port, host_port)  # type: ignore[arg-type]


async def test_a_publication_is_held_recorded_and_written(parts: Parts) -> None:
    ports = publisher(parts)
    await parts.state.put_network(network())
    one = endpoint(EP1, "10.50.0.2/24")
    await parts.state.put_endpoint(one)
    await ports.publish(network(), one, (binding(80, 8080), binding(81)))
    published = parts.state.endpoints[EP1].mappings
    assert [m.describe() for m in published] == [
        "0.0.0.0:8080/tcp -> 10.50.0.2:80",
        "0.0.0.0:40000/tcp -> 10.50.0.2:81",  # the first of the ephemeral range
    ]
    assert parts.host_ports.held == set(published)
    assert parts.firewall.last[0].mappings == published
    stored = {e.id: e for e in await parts.store.load_endpoints()}
    assert stored[EP1].mappings == published


async def test_a_port_taken_is_refused_naming_who_has_it(parts: Parts) -> None:
    ports = publisher(parts)
    await parts.state.put_network(network())
    one, two = endpoint(EP1, "10.50.0.2/24"), endpoint(EP2, "10.50.0.3/24")
    await parts.state.put_endpoint(one)
    await parts.state.put_endpoint(two)
    await ports.publish(network(), one, (binding(80, 8080),))
    with pytest.raises(Conflict, match=f"already published by pybridge for endpoint {EP1[:12]}"):
        await ports.publish(network(), two, (binding(80, 8080),))
    parts.host_ports.busy[("tcp", 9090)] = "nginx (pid 7)"
    with pytest.raises(Conflict, match=r"9090/tcp is already in use by nginx \(pid 7\)"):
        await ports.publish(network(), two, (binding(80, 9090),))
    assert parts.state.endpoints[EP2].mappings == ()


async def test_revoking_gives_ports_back_and_forgets_datagram_flows(parts: Parts) -> None:
    ports = publisher(parts)
    await parts.state.put_network(network())
    one = endpoint(EP1, "10.50.0.2/24")
    await parts.state.put_endpoint(one)
    await ports.publish(network(), one, (binding(53, 5353, "udp"), binding(80, 8080)))
    parts.kernel.calls.clear()
    await ports.revoke(parts.state.endpoints[EP1])
    assert parts.state.endpoints[EP1].mappings == ()
    assert parts.host_ports.held == set()
    assert parts.firewall.last[0].mappings == ()
    # UDP flows outlive the rule; TCP ones end by themselves.
    assert [c for c in parts.kernel.calls if c[0] == "forget_flows"] == [
        ("forget_flows", "10.50.0.2 17/53")
    ]


async def test_ports_held_again_at_start_up_say_who_took_them(parts: Parts) -> None:
    ports = publisher(parts)
    one = endpoint(EP1, "10.50.0.2/24")
    mapping_a, mapping_b = mapping(8080), mapping(8081)
    parts.host_ports.busy[("tcp", 8081)] = "nc (pid 9)"
    problems = await ports.hold_again(one.with_changes(mappings=(mapping_a, mapping_b)))
    assert problems == [
        "host port 0.0.0.0:8081/tcp is already in use by nc (pid 9) while pybridge was down"
    ]
    assert parts.host_ports.held == {mapping_a}
