"""Port publishing: the pure planning in ports.py and the driver's Program/Revoke, over fakes."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from pydriver import protocol as p
from pydriver.errors import Conflict, InvalidRequest
from pydriver.model import PortBinding, PortMapping
from pydriver.ports import PortIndex, PortRequest, PortsOfOthers, find_conflict, overlaps, plan

from .conftest import Env
from .fakes import create_endpoint_body, create_network_body, hexid, join_body

NET = hexid("ports-net")
NET2 = hexid("ports-net-2")
EP1, EP2, EP3 = hexid("ports-ep-1"), hexid("ports-ep-2"), hexid("ports-ep-3")
V4 = ipaddress.ip_address("10.50.0.2")
V6 = ipaddress.ip_address("fd00:50::2")


def binding(
    port: int, host_port: int = 0, end: int = 0, proto: str = "tcp", host_ip: str | None = None
) -> PortBinding:
    return PortBinding(
        proto=proto,  # type: ignore[arg-type]
        port=port,
        host_ip=ipaddress.ip_address(host_ip) if host_ip else None,
        host_port=host_port,
        host_port_end=end or host_port,
    )


# -- pure -------------------------------------------------------------------------------------


def test_plan_wildcard_covers_each_family_the_container_has() -> None:
    [req] = plan([binding(80, 8080)], V4, V6)
    assert req.targets == ((None, V4), (None, V6))
    [req] = plan([binding(80, 8080)], V4, None)
    assert req.targets == ((None, V4),)


def test_plan_host_ip_and_default_binding() -> None:
    [req] = plan([binding(80, 8080, host_ip="192.0.2.2")], V4, V6)
    assert req.targets == ((ipaddress.ip_address("192.0.2.2"), V4),)
    [req] = plan([binding(80, 8080)], V4, V6, ipaddress.ip_address("192.0.2.9"))
    assert req.targets == ((ipaddress.ip_address("192.0.2.9"), V4),)
    [req] = plan([binding(80, 8080, host_ip="0.0.0.0")], V4, V6)
    assert req.targets == ((None, V4),)
    with pytest.raises(InvalidRequest, match="no IPv6 address"):
        plan([binding(80, 8080, host_ip="2001:db8::1")], V4, None)


def test_plan_leaves_a_family_to_the_other_gateway_endpoint() -> None:
    """Docker's no_proxy_6to4: another endpoint is the container's gateway for the family this
    one lacks, and publishes that family's bindings; they are skipped, not refused."""
    bindings = [
        binding(80, 8080),
        binding(81, 8081, host_ip="::"),
        binding(82, 8082, host_ip="2001:db8::1"),
        binding(83, 8083, host_ip="::1"),
    ]
    assert [r.binding.port for r in plan(bindings, V4, None, leave_unserved=True)] == [80]
    v4_only = [binding(80, 8080, host_ip="127.0.0.1"), binding(81, 8081, host_ip="0.0.0.0")]
    assert plan(v4_only, None, V6, leave_unserved=True) == []
    [req] = plan([binding(80, 8080)], None, V6, leave_unserved=True)
    assert req.targets == ((None, V6),)
    with pytest.raises(InvalidRequest) as err:
        plan(bindings[:2], V4, None)
    assert str(err.value) == (
        "cannot publish tcp port 81 on [::]: the container has no IPv6 address on this network"
    )


def test_candidates() -> None:
    fixed = PortRequest(binding(80, 8000, 8003), ((None, V4),))
    assert list(fixed.candidates((40000, 40010), 0)) == [8000, 8001, 8002, 8003]
    ephemeral = PortRequest(binding(80), ((None, V4),))
    assert list(ephemeral.candidates((40000, 40003), 0)) == [40000, 40001, 40002, 40003]
    assert list(ephemeral.candidates((40000, 40003), 40001)) == [40002, 40003, 40000, 40001]


def test_overlaps() -> None:
    a = PortMapping("tcp", None, 8080, V4, 80)
    assert overlaps(a, PortMapping("tcp", ipaddress.ip_address("192.0.2.2"), 8080, V4, 81))
    assert not overlaps(a, PortMapping("udp", None, 8080, V4, 80))
    assert not overlaps(a, PortMapping("tcp", None, 8080, V6, 80))  # other family
    assert not overlaps(
        PortMapping("tcp", ipaddress.ip_address("192.0.2.2"), 8080, V4, 80),
        PortMapping("tcp", ipaddress.ip_address("192.0.2.3"), 8080, V4, 80),
    )
    assert find_conflict([a], [PortMapping("tcp", None, 9090, V4, 80)]) is None


def test_mapping_round_trip_and_text() -> None:
    m = PortMapping("tcp", ipaddress.ip_address("2001:db8::1"), 8443, V6, 443)
    assert PortMapping.from_dict(m.to_dict()) == m
    assert m.describe() == "[2001:db8::1]:8443/tcp -> [fd00:50::2]:443"
    assert PortMapping("udp", None, 53, V4, 53).describe() == "0.0.0.0:53/udp -> 10.50.0.2:53"


# -- driver -----------------------------------------------------------------------------------


def portmap(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"com.docker.network.portmap": list(entries)}


def entry(
    port: int, host_port: int = 0, end: int = 0, proto: int = 6, host_ip: str = ""
) -> dict[str, Any]:
    return {
        "Proto": proto,
        "IP": "",
        "Port": port,
        "HostIP": host_ip,
        "HostPort": host_port,
        "HostPortEnd": end or host_port,
    }


async def start(env: Env, network: str, endpoint: str, address: str, **kw: Any) -> None:
    await env.driver.create_endpoint(
        p.parse_create_endpoint(create_endpoint_body(network, endpoint, address, **kw))
    )
    await env.driver.join(p.parse_join(join_body(network, endpoint)))


async def program(env: Env, network: str, endpoint: str, *entries: dict[str, Any]) -> None:
    body = {"NetworkID": network, "EndpointID": endpoint, "Options": portmap(*entries)}
    await env.driver.program_external_connectivity(p.parse_program_external(body))


async def revoke(env: Env, network: str, endpoint: str) -> None:
    await env.driver.revoke_external_connectivity(
        p.parse_endpoint_ref({"NetworkID": network, "EndpointID": endpoint})
    )


@pytest.fixture
async def net(env: Env) -> Env:
    await env.driver.create_network(p.parse_create_network(create_network_body(NET)))
    await start(env, NET, EP1, "10.50.0.2/24")
    await start(env, NET, EP2, "10.50.0.3/24")
    return env


def published(env: Env, endpoint: str) -> list[str]:
    return [m.describe() for m in env.driver.endpoints[endpoint].mappings]


async def test_publish_and_revoke(net: Env) -> None:
    env = net
    await program(env, NET, EP1, entry(80, 8080), entry(53, 5353, proto=17))
    assert published(env, EP1) == [
        "0.0.0.0:8080/tcp -> 10.50.0.2:80",
        "0.0.0.0:5353/udp -> 10.50.0.2:53",
    ]
    assert len(env.host_ports.held) == 2
    assert {m.host_port for m in env.firewall.last[0].mappings} == {8080, 5353}
    stored = {e.id: e for e in await env.store.load_endpoints()}
    assert stored[EP1].mappings == env.driver.endpoints[EP1].mappings
    await revoke(env, NET, EP1)
    assert published(env, EP1) == []
    assert env.host_ports.held == set()
    assert env.firewall.last[0].mappings == ()


async def test_repeated_program_replaces_and_never_duplicates(net: Env) -> None:
    env = net
    await program(env, NET, EP1, entry(80, 8080))
    await program(env, NET, EP1, entry(80, 8080))  # Docker 29: again, no revoke between
    assert published(env, EP1) == ["0.0.0.0:8080/tcp -> 10.50.0.2:80"]
    await program(env, NET, EP1, entry(80, 9090))
    assert published(env, EP1) == ["0.0.0.0:9090/tcp -> 10.50.0.2:80"]
    assert {m.host_port for m in env.host_ports.held} == {9090}


async def test_a_republished_udp_port_that_goes_loses_its_flows(net: Env) -> None:
    """Program again without Revoke (Docker 29) with a different publication: a UDP mapping
    that went must not keep its conntrack flows NATed to the container, as after a revoke;
    one that stays keeps them."""
    env = net
    await program(env, NET, EP1, entry(53, 8053, proto=17), entry(54, 8054, proto=17))
    env.kernel.calls.clear()
    writes = len(env.firewall.applied)
    await program(env, NET, EP1, entry(53, 8053, proto=17), entry(80, 8080))
    assert published(env, EP1) == [
        "0.0.0.0:8053/udp -> 10.50.0.2:53",
        "0.0.0.0:8080/tcp -> 10.50.0.2:80",
    ]
    assert [c for c in env.kernel.calls if c[0] == "forget_flows"] == [
        ("forget_flows", "10.50.0.2 17/54")
    ]
    assert len(env.firewall.applied) > writes  # the rule went first
    assert not any(m.host_port == 8054 for m in env.firewall.last[0].mappings)


async def test_ephemeral_ports_never_collide(net: Env) -> None:
    env = net
    env.driver.publisher.ephemeral_range = (40000, 40003)
    env.host_ports.busy[("tcp", 40001)] = "nginx (pid 7)"
    await program(env, NET, EP1, entry(80), entry(81))
    await program(env, NET, EP2, entry(80))
    ports = [m.host_port for e in (EP1, EP2) for m in env.driver.endpoints[e].mappings]
    assert sorted(ports) == [40000, 40002, 40003]
    await start(env, NET, EP3, "10.50.0.4/24")
    with pytest.raises(Conflict, match="no free host port is left in the ephemeral range"):
        await program(env, NET, EP3, entry(80))
    assert published(env, EP3) == []


async def test_host_port_range_picks_a_free_one(net: Env) -> None:
    env = net
    await program(env, NET, EP1, entry(80, 8000))
    await program(env, NET, EP2, entry(80, 8000, 8002))
    assert published(env, EP2) == ["0.0.0.0:8001/tcp -> 10.50.0.3:80"]


async def test_port_taken_by_another_endpoint_is_refused_by_name(net: Env) -> None:
    env = net
    await program(env, NET, EP1, entry(80, 8080))
    with pytest.raises(Conflict) as err:
        await program(env, NET, EP2, entry(80, 8080, host_ip="192.0.2.2"))
    assert str(err.value) == (
        f"host port 0.0.0.0:8080/tcp is already published by pybridge for endpoint "
        f"{EP1[:12]} on network {NET[:12]}"
    )
    assert published(env, EP2) == []


async def test_port_held_by_a_host_process_is_refused_by_name(net: Env) -> None:
    env = net
    env.host_ports.busy[("tcp", 8080)] = "python3 (pid 42)"
    with pytest.raises(Conflict) as err:
        await program(env, NET, EP1, entry(80, 8080), entry(81, 8081))
    assert str(err.value) == "host port 0.0.0.0:8080/tcp is already in use by python3 (pid 42)"
    assert env.host_ports.held == set()  # nothing half-published
    assert published(env, EP1) == []


async def test_failed_republish_keeps_the_old_ports(net: Env) -> None:
    env = net
    await program(env, NET, EP1, entry(80, 8080))
    env.host_ports.busy[("tcp", 9090)] = "other"
    with pytest.raises(Conflict):
        await program(env, NET, EP1, entry(80, 9090))
    assert published(env, EP1) == ["0.0.0.0:8080/tcp -> 10.50.0.2:80"]
    assert {m.host_port for m in env.host_ports.held} == {8080}


async def test_host_binding_ipv4_option_is_the_default_address(env: Env) -> None:
    body = create_network_body(
        NET2,
        "10.60.0.0/24",
        "10.60.0.1/24",
        generic={"com.docker.network.bridge.host_binding_ipv4": "192.0.2.2"},
    )
    await env.driver.create_network(p.parse_create_network(body))
    await start(env, NET2, EP1, "10.60.0.2/24")
    await program(env, NET2, EP1, entry(80, 8080))
    assert published(env, EP1) == ["192.0.2.2:8080/tcp -> 10.60.0.2:80"]


async def test_ports_from_create_endpoint_are_used_when_program_has_none(env: Env) -> None:
    await env.driver.create_network(p.parse_create_network(create_network_body(NET)))
    await start(env, NET, EP1, "10.50.0.2/24", ports=True)  # portmap 18100 -> 80
    body = {"NetworkID": NET, "EndpointID": EP1}
    await env.driver.program_external_connectivity(p.parse_program_external(body))
    assert published(env, EP1) == ["0.0.0.0:18100/tcp -> 10.50.0.2:80"]


async def test_delete_endpoint_without_revoke_unpublishes(net: Env) -> None:
    env = net
    await program(env, NET, EP1, entry(80, 8080))
    await env.driver.delete_endpoint(p.parse_endpoint_ref({"NetworkID": NET, "EndpointID": EP1}))
    assert env.host_ports.held == set()
    assert all(not n.mappings for n in env.firewall.last)


async def test_internal_network_publishes_nothing(env: Env) -> None:
    body = create_network_body(NET2, "10.60.0.0/24", "10.60.0.1/24", internal=True)
    await env.driver.create_network(p.parse_create_network(body))
    await start(env, NET2, EP1, "10.60.0.2/24")
    await program(env, NET2, EP1, entry(80, 8080))
    assert published(env, EP1) == []


async def test_restart_keeps_and_re_reserves_mappings(net: Env) -> None:
    env = net
    await program(env, NET, EP1, entry(80, 8080))
    driver = await env.restart()
    assert env.host_ports.held == set()
    await driver.reconcile()
    assert {m.host_port for m in env.host_ports.held} == {8080}
    assert {m.host_port for m in env.firewall.last[0].mappings} == {8080}


async def test_restart_reports_a_port_taken_while_down(net: Env) -> None:
    env = net
    await program(env, NET, EP1, entry(80, 8080))
    env.host_ports.busy[("tcp", 8080)] = "nc (pid 9)"
    driver = await env.restart()
    repairs = await driver.reconcile()
    assert any("8080" in r and "nc (pid 9)" in r for r in repairs), repairs
    # The container keeps its DNAT rule.
    assert {m.host_port for m in env.firewall.last[0].mappings} == {8080}


def test_ipv6_loopback_is_refused_clearly() -> None:
    with pytest.raises(InvalidRequest, match=r"\[::1\]: IPv6 loopback cannot be forwarded"):
        plan([binding(80, 8080, host_ip="::1")], V4, V6)


# -- host_binding_ipv4 and gateway mode routed (issue 14) ---------------------------------------


def ip(text: str) -> Any:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("host_ip", "default", "expected"),
    [
        # -p 8080:80 with the network's host_binding_ipv4 (Docker's defHostIP)
        (None, None, ((None, V4), (None, V6))),
        (None, "0.0.0.0", ((None, V4), (None, V6))),  # every IPv4 and IPv6 address
        (None, "::", ((None, V6),)),  # every IPv6 address only
        (None, "2001:db8::7", (("2001:db8::7", V6),)),
        (None, "192.0.2.9", (("192.0.2.9", V4),)),
        # an address given covers its own family alone, whatever the default
        ("0.0.0.0", "::", ((None, V4),)),
        ("::", "0.0.0.0", ((None, V6),)),
        ("192.0.2.2", "2001:db8::7", (("192.0.2.2", V4),)),
    ],
)
def test_plan_host_addresses_as_docker_reads_them(
    host_ip: str | None, default: str | None, expected: tuple[tuple[str | None, Any], ...]
) -> None:
    [req] = plan([binding(80, 8080, host_ip=host_ip)], V4, V6, ip(default) if default else None)
    assert req.targets == tuple((ip(h) if h else None, c) for h, c in expected)
    assert req.direct == ()


def test_plan_in_a_routed_family_opens_the_container_port_whatever_the_host_address() -> None:
    [req] = plan([binding(80, 8080)], V4, V6, routed=[4])
    assert (req.targets, req.direct) == (((None, V6),), (V4,))
    assert req.mappings(8080) == [
        PortMapping("tcp", None, 8080, V6, 80),
        PortMapping("tcp", None, 0, V4, 80),
    ]
    [req] = plan([binding(80, 8080, host_ip="192.0.2.2")], V4, V6, routed=[4, 6])
    assert (req.targets, req.direct, req.needs_host_port) == ((), (V4,), False)
    # Stricter than Docker, which opens the port to everyone: a loopback binding, meant for
    # the host alone, opens nothing (the host reaches its containers anyway), and is no error.
    assert plan([binding(80, 8080, host_ip="127.0.0.1")], V4, V6, routed=[4, 6]) == []
    assert plan([binding(80, 8080, host_ip="::1")], V4, V6, routed=[6]) == []
    assert plan([binding(80, 8080)], V4, V6, ip("127.0.0.1"), routed=[4]) == []
    # The default host address decides the families as in NAT (2001:db8::7: IPv6 only).
    [req] = plan([binding(80, 8080)], V4, V6, ip("2001:db8::7"), routed=[4, 6])
    assert req.direct == (V6,)


def test_routed_publications_claim_no_host_port() -> None:
    a = PortMapping("tcp", None, 0, V4, 80)
    b = PortMapping("tcp", None, 0, ipaddress.ip_address("10.50.0.3"), 80)
    assert a.direct
    assert not overlaps(a, b)
    assert not overlaps(a, a)
    assert find_conflict([a], [b, PortMapping("tcp", None, 8080, V4, 80)]) is None
    assert a.describe() == "10.50.0.2:80/tcp (routed: no host port)"
    assert a.host_text() == "-"


async def routed_net(env: Env, **generic: str) -> None:
    body = create_network_body(
        NET2,
        "10.60.0.0/24",
        "10.60.0.1/24",
        v6_subnet="fd00:60::/64",
        v6_gateway="fd00:60::1/64",
        generic=generic,
    )
    await env.driver.create_network(p.parse_create_network(body))
    for endpoint, last in ((EP1, 2), (EP2, 3)):
        await start(env, NET2, endpoint, f"10.60.0.{last}/24", address_v6=f"fd00:60::{last}/64")


async def test_a_routed_network_publishes_container_ports_and_holds_no_host_port(
    env: Env,
) -> None:
    """Docker's routed mode ignores -p's host port: no DNAT, no host port reserved, so two
    containers publish the same port and neither conflicts with a host process on it."""
    await routed_net(
        env,
        **{
            "com.docker.network.bridge.gateway_mode_ipv4": "routed",
            "com.docker.network.bridge.gateway_mode_ipv6": "routed",
        },
    )
    env.host_ports.busy[("tcp", 8080)] = "nginx (pid 7)"
    await program(env, NET2, EP1, entry(80, 8080))
    await program(env, NET2, EP2, entry(80, 8080), entry(53, 0, proto=17))
    assert published(env, EP1) == [
        "10.60.0.2:80/tcp (routed: no host port)",
        "[fd00:60::2]:80/tcp (routed: no host port)",
    ]
    assert "10.60.0.3:53/udp (routed: no host port)" in published(env, EP2)
    assert env.host_ports.held == set()
    assert all(m.direct for view in env.firewall.last for m in view.mappings)
    # No flows of a host port to forget; the container's UDP flows go with the publication.
    env.kernel.calls.clear()
    await revoke(env, NET2, EP2)
    assert ("forget_flows", "10.60.0.3 17/53") in env.kernel.calls
    assert not [c for c in env.kernel.calls if c[0] == "forget_port_flows"]
    driver = await env.restart()
    await driver.reconcile()
    assert env.host_ports.held == set()  # nothing to hold again either


async def test_routed_ipv4_and_nat_ipv6_publish_each_their_way(env: Env) -> None:
    await routed_net(env, **{"com.docker.network.bridge.gateway_mode_ipv4": "routed"})
    await program(env, NET2, EP1, entry(80, 8080))
    assert published(env, EP1) == [
        "[::]:8080/tcp -> [fd00:60::2]:80",
        "10.60.0.2:80/tcp (routed: no host port)",
    ]
    assert [m.family for m in env.host_ports.held] == [6]


@pytest.mark.parametrize(
    ("default", "expected"),
    [
        ("0.0.0.0", ["0.0.0.0:8080/tcp -> 10.60.0.2:80", "[::]:8080/tcp -> [fd00:60::2]:80"]),
        ("::", ["[::]:8080/tcp -> [fd00:60::2]:80"]),
        ("2001:db8::7", ["[2001:db8::7]:8080/tcp -> [fd00:60::2]:80"]),
    ],
)
async def test_host_binding_ipv4_takes_ipv6_and_the_unspecified_addresses(
    env: Env, default: str, expected: list[str]
) -> None:
    """Before, 0.0.0.0 published IPv4 only and an IPv6 address could not be given."""
    await routed_net(env, **{"com.docker.network.bridge.host_binding_ipv4": default})
    await program(env, NET2, EP1, entry(80, 8080))
    assert published(env, EP1) == expected


@pytest.mark.parametrize("default", ["::", "2001:db8::7"])
async def test_an_ipv6_host_binding_on_a_network_without_ipv6_is_refused_at_create(
    env: Env, default: str
) -> None:
    """Docker's driver would proxy such ports to IPv4 containers; pybridge cannot, so it says
    so when the network is created rather than failing every `docker run -p` on it."""
    body = create_network_body(
        NET2,
        "10.60.0.0/24",
        "10.60.0.1/24",
        generic={"com.docker.network.bridge.host_binding_ipv4": default},
    )
    with pytest.raises(InvalidRequest, match="has no IPv6 subnet") as refused:
        await env.driver.create_network(p.parse_create_network(body))
    assert "add --ipv6, or use an IPv4 address" in str(refused.value)
    assert NET2 not in env.driver.networks
    # An IPv4 binding is fine there, and so is an IPv6 one with --ipv6 (the test above).
    body = create_network_body(
        NET2,
        "10.60.0.0/24",
        "10.60.0.1/24",
        generic={"com.docker.network.bridge.host_binding_ipv4": "0.0.0.0"},
    )
    await env.driver.create_network(p.parse_create_network(body))


def test_a_publication_clashes_with_others_and_with_itself_not_with_what_it_replaces() -> None:
    """The state's index of published ports, seen by one endpoint publishing again."""
    index = PortIndex()
    mine, theirs = PortMapping("tcp", None, 8080, V4, 80), PortMapping("tcp", None, 9090, V4, 90)
    index.add(mine, "endpoint-a")
    index.add(theirs, "endpoint-b")
    taken = PortsOfOthers(index, "endpoint-a")
    assert taken.conflict([mine]) is None  # its own publication, being replaced
    assert taken.conflict([PortMapping("tcp", None, 9090, V4, 91)]) == theirs
    chosen = PortMapping("udp", None, 7070, V4, 70)
    taken.add(chosen)  # chosen for an earlier binding of the same publication
    assert taken.conflict([PortMapping("udp", None, 7070, V4, 71)]) == chosen
    index.remove(theirs, "endpoint-b")  # that endpoint went meanwhile: seen at once
    assert taken.conflict([PortMapping("tcp", None, 9090, V4, 91)]) is None
    index.remove(theirs, "endpoint-b")  # twice is fine
