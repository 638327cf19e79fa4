"""A network's bridge and an endpoint's veths (bridges.py, veths.py), and taking them down
(removal.py), each over the fakes alone."""

from __future__ import annotations

import ipaddress

import pytest

from pydriver.bridges import check_bridge_name, check_subnets
from pydriver.errors import Conflict, InvalidRequest
from pydriver.model import HostRoute, NetworkOptions, PortMapping
from pydriver.naming import bridge_mac, endpoint_mac
from pydriver.veths import MAC_ATTEMPTS, check_addresses, free_mac

from .conftest import Parts
from .test_state import EP1, EP2, NET, NET2, endpoint, mapping, network


def route(destination: str, device: str) -> HostRoute:
    return HostRoute(ipaddress.ip_network(destination), device)


# -- checks (pure) --------------------------------------------------------------------------------


def test_a_bridge_name_belongs_to_one_network() -> None:
    check_bridge_name(NET, "pyb-x", [network(NET, bridge="pyb-x")])  # its own
    with pytest.raises(Conflict, match="already used by pybridge network"):
        check_bridge_name(NET2, "pyb-x", [network(NET, bridge="pyb-x")])


def test_subnets_are_checked_against_other_networks_and_host_routes() -> None:
    ours = network(NET)
    new = network(NET2, "10.50.0.128/25")
    with pytest.raises(Conflict, match=r"overlaps subnet 10\.50\.0\.0/24 of pybridge network"):
        check_subnets(NET2, new.bridge, new.subnets, [ours], [])
    # A network is not in its own way (a replay), nor are routes of pybridge's own bridges,
    # nor default routes.
    routes = [route("10.50.0.0/24", ours.bridge), route("0.0.0.0/0", "eth0")]
    check_subnets(NET, ours.bridge, ours.subnets, [ours], routes)
    with pytest.raises(Conflict, match=r"overlaps the host route 10\.50\.0\.0/16 on eth1"):
        check_subnets(NET, ours.bridge, ours.subnets, [], [route("10.50.0.0/16", "eth1")])


def test_macs_derive_from_the_address_and_skip_taken_ones() -> None:
    address = ipaddress.ip_address("10.50.0.2")
    first = endpoint_mac(EP1, address, 0)
    assert free_mac(network(), EP1, address, set()) == first == "02:50:0a:32:00:02"
    assert free_mac(network(), EP1, address, {first}) == endpoint_mac(EP1, address, 1)
    every = {endpoint_mac(EP1, address, attempt) for attempt in range(MAC_ATTEMPTS)}
    with pytest.raises(Conflict, match="no free MAC address"):
        free_mac(network(), EP1, address, every)
    assert free_mac(network(), EP1, None, set()) != bridge_mac(NET)


def test_endpoint_addresses_must_be_in_the_network() -> None:
    check_addresses(network(), ipaddress.IPv4Interface("10.50.0.2/24"), None)
    with pytest.raises(InvalidRequest, match=r"outside the network's subnets \(10.50.0.0/24\)"):
        check_addresses(network(), ipaddress.IPv4Interface("10.60.0.2/24"), None)
    # A family the network has no subnet of is not checked here (Docker's own IPAM decides).
    check_addresses(network(), None, ipaddress.IPv6Interface("fd00::2/64"))


# -- bridges --------------------------------------------------------------------------------------


async def test_a_new_bridge_is_pybridges_and_an_existing_one_is_adopted(parts: Parts) -> None:
    ours = network()
    owned, foreign, previous = await parts.bridges.take(
        ours.bridge, NET, ours.subnets, [], False, NetworkOptions()
    )
    assert owned
    assert foreign == ()
    parts.kernel.add_link("br0", "bridge", up=True)
    gateway = ours.subnets[0].gateway
    assert gateway is not None
    await parts.kernel.ensure_address("br0", gateway)
    owned, foreign, previous = await parts.bridges.take(
        "br0", NET, ours.subnets, [], False, NetworkOptions(mtu=9000)
    )
    assert not owned
    assert foreign == (gateway,)
    assert (previous.mtu, previous.accept_ra, previous.route_localnet) == (1500, "1", "0")


async def test_a_bridge_is_made_and_given_back(parts: Parts) -> None:
    ours = network(options=NetworkOptions(mtu=1400))
    await parts.bridges.ensure(ours)
    link = parts.kernel.links_by_name[ours.bridge]
    assert (link.up, link.mtu) == (True, 1400)
    assert parts.kernel.addresses[ours.bridge] == [ours.subnets[0].gateway]
    assert parts.sysctl.accept_ra_disabled == [ours.bridge]
    await parts.bridges.remove(ours, delete_after_answer=False)
    assert ours.bridge not in parts.kernel.names()


async def test_a_bridge_deleted_after_the_answer_loses_its_addresses_first(
    parts: Parts,
) -> None:
    ours = network()
    await parts.bridges.ensure(ours)
    await parts.bridges.remove(ours, delete_after_answer=True)
    assert parts.kernel.addresses[ours.bridge] == []  # and with them its routes
    assert ours.bridge in parts.kernel.names()
    await parts.bridges.delete_after_answer(ours.bridge)  # inline here
    assert ours.bridge not in parts.kernel.names()
    assert not parts.bridges.leaving


# -- removal --------------------------------------------------------------------------------------


async def test_endpoints_go_with_one_firewall_write_then_their_flows(parts: Parts) -> None:
    ours = network()
    await parts.state.put_network(ours)
    await parts.bridges.ensure(ours)
    one = endpoint(EP1, "10.50.0.2/24", mappings=(mapping(8080),))
    two = endpoint(EP2, "10.50.0.3/24", mappings=(mapping(8081, "10.50.0.3"),))
    for each in (one, two):
        await parts.state.put_endpoint(each)
        await parts.veths.ensure(ours, each, fresh=True)
        for published in each.mappings:
            parts.host_ports.reserve(published)
    order: list[str] = []
    parts.firewall.on_apply = lambda: order.append("rules")
    real = parts.kernel.forget_flows

    async def forget(address: object, proto: int | None = None, port: int | None = None) -> int:
        order.append(f"flows {address}")
        return await real(address, proto, port)  # type: ignore[arg-type]

    parts.kernel.forget_flows = forget  # type: ignore[method-assign]
    await parts.removal.endpoints([one, two], wait=False)
    assert order == ["rules", "flows 10.50.0.2", "flows 10.50.0.3"]
    assert parts.firewall.last[0].mappings == ()
    assert parts.state.endpoints == {}
    assert await parts.store.load_endpoints() == []
    assert parts.host_ports.held == set()
    assert not {one.host_veth, two.host_veth} & parts.kernel.names()


async def test_an_endpoint_without_ports_needs_no_firewall_write(parts: Parts) -> None:
    ours = network()
    await parts.state.put_network(ours)
    await parts.bridges.ensure(ours)
    one = endpoint(EP1, "10.50.0.2/24")
    await parts.state.put_endpoint(one)
    await parts.veths.ensure(ours, one, fresh=True)
    await parts.removal.endpoint(one)
    assert parts.firewall.applied == []
    assert one.host_veth not in parts.kernel.names()


async def test_a_network_goes_with_its_endpoints_and_rules(parts: Parts) -> None:
    ours = network()
    await parts.state.put_network(ours)
    await parts.bridges.ensure(ours)
    await parts.writer.write()
    one = endpoint(
        EP1, "10.50.0.2/24", mappings=(PortMapping("udp", None, 53, ip("10.50.0.2"), 53),)
    )
    await parts.state.put_endpoint(one)
    await parts.veths.ensure(ours, one, fresh=True)
    await parts.removal.network(ours)
    assert parts.state.networks == {}
    assert parts.state.endpoints == {}
    assert await parts.store.load_networks() == []
    assert parts.firewall.last == []
    assert parts.kernel.names() == set()


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)
