"""Work per request stays bounded whatever the input's size: the event loop never stalls on
thousands of routes, pools, busy ports or published ports."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydriver import protocol as p
from pydriver.errors import Conflict, Exhausted
from pydriver.ipam import Pool, choose_subnet, choose_v6_subnet, v6_candidates
from pydriver.ipamdriver import LOCAL_ADDRESS_SPACE, IpamDriver
from pydriver.model import HostRoute, IPNetwork
from pydriver.store import SqliteStore

from .conftest import Env
from .fakes import create_endpoint_body, create_network_body, hexid, join_body

NET = hexid("bounds-net")
EP1, EP2 = hexid("bounds-ep-1"), hexid("bounds-ep-2")
ULA = ipaddress.IPv6Network("fd12:3456:789a::/48")

# -- automatic IPv6 subnets --------------------------------------------------------------------


def brute_force(
    prefix: ipaddress.IPv6Network, pools: list[IPNetwork], routes: list[HostRoute]
) -> IPNetwork | None:
    """What pybridge chose before: every candidate tested against everything."""
    try:
        return choose_subnet(v6_candidates(prefix), pools, routes)
    except Exhausted:
        return None


def fast(
    prefix: ipaddress.IPv6Network, pools: list[IPNetwork], routes: list[HostRoute]
) -> IPNetwork | None:
    try:
        return choose_v6_subnet(prefix, pools, routes)
    except Exhausted:
        return None


@st.composite
def v6_cases(draw: st.DrawFn) -> tuple[ipaddress.IPv6Network, list[IPNetwork], list[HostRoute]]:
    # Short prefixes (up to 255 candidates) so that brute force stays quick and a random
    # network often lands on, across or around the candidates.
    prefix = ipaddress.IPv6Network((int(ULA.network_address), draw(st.sampled_from([56, 58, 60]))))
    base = int(prefix.network_address)

    def network() -> IPNetwork:
        if draw(st.integers(0, 9)) == 0:  # other families, and default routes, count for nothing
            return draw(st.sampled_from([ipaddress.ip_network("10.0.0.0/8"), ULA.supernet(48)]))
        # Mostly /62 to /68 (a few /64s, or part of one), sometimes a wide one.
        wide = draw(st.integers(0, 15)) == 0
        length = draw(st.integers(40, 61) if wide else st.integers(62, 68))
        span = 1 << (128 - prefix.prefixlen)
        offset = draw(st.integers(-(span >> 4), span + (span >> 4)))
        return ipaddress.IPv6Network((base + offset, length), strict=False)

    pools = [network() for _ in range(draw(st.integers(0, 12)))]
    routes = [HostRoute(network(), "eth0") for _ in range(draw(st.integers(0, 12)))]
    return prefix, pools, routes


@settings(max_examples=400, deadline=None)
@given(v6_cases())
def test_v6_choice_agrees_with_brute_force(
    case: tuple[ipaddress.IPv6Network, list[IPNetwork], list[HostRoute]],
) -> None:
    prefix, pools, routes = case
    assert fast(prefix, pools, routes) == brute_force(prefix, pools, routes)


def test_v6_choice_examples() -> None:
    def n(text: str) -> IPNetwork:
        return ipaddress.ip_network(text)

    assert choose_v6_subnet(ULA, [], []) == n("fd12:3456:789a:1::/64")
    taken = [n("fd12:3456:789a:1::/64"), n("fd12:3456:789a:2::/63")]  # /64s 1, 2 and 3
    assert choose_v6_subnet(ULA, taken, []) == n("fd12:3456:789a:4::/64")
    routes = [HostRoute(n("fd12:3456:789a:4::/62"), "eth0"), HostRoute(n("::/0"), "eth0")]
    assert choose_v6_subnet(ULA, taken, routes) == n("fd12:3456:789a:8::/64")
    with pytest.raises(Exhausted, match=r"no free /64 is left in pybridge's IPv6 prefix"):
        choose_v6_subnet(ULA, [n("fd12:3456:789a:1::/64")], [HostRoute(ULA, "")])


@pytest.fixture
async def ipam(tmp_path: Path) -> AsyncIterator[tuple[IpamDriver, list[HostRoute]]]:
    routes: list[HostRoute] = []

    async def provider() -> list[HostRoute]:
        return routes

    store = SqliteStore(tmp_path / "state")
    driver = IpamDriver(store, provider)
    await driver.load()
    driver.ula_prefix = ULA
    yield driver, routes
    store.close()


async def test_v6_choice_is_fast_with_thousands_of_routes_and_pools(
    ipam: tuple[IpamDriver, list[HostRoute]],
) -> None:
    driver, routes = ipam
    subnets = list(ULA.subnets(new_prefix=64))
    # The first 3000 /64s are taken, half by pools and half by routes, interleaved.
    for index in range(1, 3001):
        if index % 2:
            routes.append(HostRoute(subnets[index], f"br{index}"))
        else:
            driver.pools[str(subnets[index])] = Pool(id=str(subnets[index]), subnet=subnets[index])
    routes += [
        HostRoute(ipaddress.ip_network(f"10.{i // 250}.{i % 250}.0/24"), "x") for i in range(2000)
    ]
    request = p.parse_request_pool({"AddressSpace": LOCAL_ADDRESS_SPACE, "V6": True})
    started = time.perf_counter()
    _, subnet, _ = await driver.request_pool(request)
    elapsed = time.perf_counter() - started
    assert subnet == subnets[3001]
    assert elapsed < 0.2, f"choosing a /64 took {elapsed:.2f} s"


# -- host port ranges with many busy ports ------------------------------------------------------


def entry(port: int, host_port: int, end: int) -> dict[str, object]:
    return {"Proto": 6, "Port": port, "HostPort": host_port, "HostPortEnd": end}


async def program(env: Env, endpoint: str, *entries: dict[str, object]) -> None:
    body = {
        "NetworkID": NET,
        "EndpointID": endpoint,
        "Options": {"com.docker.network.portmap": list(entries)},
    }
    await env.driver.program_external_connectivity(p.parse_program_external(body))


@pytest.fixture
async def net(env: Env) -> Env:
    body = create_network_body(NET, v6_subnet="fd00:77::/64", v6_gateway="fd00:77::1/64")
    await env.driver.create_network(p.parse_create_network(body))
    for endpoint, v4, v6 in ((EP1, "10.50.0.2/24", "fd00:77::2/64"), (EP2, "10.50.0.3/24", "")):
        req = create_endpoint_body(NET, endpoint, v4, address_v6=v6)
        await env.driver.create_endpoint(p.parse_create_endpoint(req))
        await env.driver.join(p.parse_join(join_body(NET, endpoint)))
    return env


class CountingHolder:
    def __init__(self, env: Env) -> None:
        self.env = env
        self.calls: list[int] = []

    async def __call__(self, proto: str, port: int) -> str | None:
        self.calls.append(port)
        return self.env.host_ports.busy.get((proto, port))


async def test_a_range_with_a_thousand_busy_ports_asks_for_no_holder(net: Env) -> None:
    env = net
    holder = CountingHolder(env)
    env.driver.publisher.port_holder = holder
    for port in range(20000, 21000):
        env.host_ports.busy[("tcp", port)] = f"squatter (pid {port})"
    started = time.perf_counter()
    await program(env, EP1, entry(80, 20000, 21000))
    assert time.perf_counter() - started < 0.5
    assert {m.host_port for m in env.driver.endpoints[EP1].mappings} == {21000}
    assert holder.calls == []  # the port was found: nobody needed to be named


async def test_a_full_range_asks_for_one_holder_the_last_busy_port(net: Env) -> None:
    env = net
    holder = CountingHolder(env)
    env.driver.publisher.port_holder = holder
    for port in range(20000, 21000):
        env.host_ports.busy[("tcp", port)] = f"squatter (pid {port})"
    with pytest.raises(Conflict) as err:
        await program(env, EP1, entry(80, 20000, 20999))
    assert holder.calls == [20999]
    assert str(err.value) == (
        "no free host port in 20000-20999/tcp for container port 80 (last: host port "
        "0.0.0.0:20999/tcp is already in use by squatter (pid 20999))"
    )
    assert env.host_ports.held == set()
    assert env.driver.endpoints[EP1].mappings == ()
    with pytest.raises(Conflict, match=r"20500/tcp is already in use by squatter \(pid 20500\)"):
        await program(env, EP1, entry(80, 20500, 20500))
    assert holder.calls == [20999, 20500]


async def test_a_range_published_by_another_endpoint_is_named_once(net: Env) -> None:
    env = net
    await program(env, EP2, *(entry(p, p, p) for p in range(20000, 21000)))
    holder = CountingHolder(env)
    env.driver.publisher.port_holder = holder
    with pytest.raises(Conflict, match=f"already published by pybridge for endpoint {EP2[:12]}"):
        await program(env, EP1, entry(80, 20000, 20999))
    assert holder.calls == []


async def test_thousands_of_published_ports_are_quick(net: Env) -> None:
    """`-p 20000-22999:20000-22999` on a dual-stack container: 6000 mappings."""
    env = net
    started = time.perf_counter()
    await program(env, EP1, *(entry(port, port, port) for port in range(20000, 23000)))
    elapsed = time.perf_counter() - started
    assert len(env.driver.endpoints[EP1].mappings) == 6000
    assert len(env.host_ports.held) == 6000
    assert elapsed < 1.5, f"publishing 3000 ports took {elapsed:.2f} s"


def test_finding_which_endpoints_publish_wanted_ports_is_quick() -> None:
    """At Program time pybridge looks for dead endpoints holding the ports asked for: 6000
    mappings against 3000 bindings (dockerd sends a range port by port) must not stall."""
    from pydriver.model import PortBinding, PortMapping
    from pydriver.publishing import publishes_any

    container = ipaddress.ip_address("10.50.0.2")
    mappings = [PortMapping("tcp", None, 30000 + i, container, 80) for i in range(6000)]
    bindings = [PortBinding("tcp", 80, None, 20000 + i, 20000 + i) for i in range(3000)]
    started = time.perf_counter()
    assert not publishes_any(mappings, bindings)
    assert publishes_any([*mappings, PortMapping("tcp", None, 22999, container, 80)], bindings)
    assert not publishes_any([PortMapping("udp", None, 22999, container, 80)], bindings)
    assert time.perf_counter() - started < 0.1
    # Ranges and overlaps.
    spans = [PortBinding("tcp", 80, None, 100, 200), PortBinding("tcp", 80, None, 150, 300)]
    assert publishes_any([PortMapping("tcp", None, 300, container, 80)], spans)
    assert not publishes_any([PortMapping("tcp", None, 301, container, 80)], spans)
    assert not publishes_any([PortMapping("tcp", None, 99, container, 80)], spans)
