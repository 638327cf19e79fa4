"""NetworkDriver over an in-memory kernel, firewall and sysctl, with a real state database."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest

from pydriver import protocol as p
from pydriver.driver import NetworkDriver
from pydriver.errors import (
    BridgeFull,
    Conflict,
    HostError,
    InvalidRequest,
    NotFound,
    Unsupported,
)
from pydriver.ipam import LOCAL_ADDRESS_SPACE
from pydriver.model import BridgeSettings, Endpoint, HostRoute, Network, NetworkOptions, Subnet
from pydriver.naming import (
    RETIRED_LINK_GROUP,
    bridge_mac,
    bridge_name,
    container_veth_name,
    endpoint_mac,
    host_veth_name,
    short,
)
from pydriver.options import BRIDGE_NAME, CONTAINER_IFACE_PREFIX, ENABLE_ICC
from pydriver.rules import NetworkRules, firewall_view

from .conftest import Env
from .fakes import (
    FakeKernel,
    create_endpoint_body,
    create_network_body,
    endpoint_ref_body,
    hexid,
    join_body,
)

NET_A = hexid("network-a")
NET_B = hexid("network-b")
EP_1 = hexid("endpoint-1")
EP_2 = hexid("endpoint-2")
BR_A = bridge_name(NET_A)
BR_B = bridge_name(NET_B)


def iface(text: str) -> Any:
    return ipaddress.ip_interface(text)


async def create_network(driver: NetworkDriver, network_id: str, *args: Any, **kw: Any) -> None:
    body = create_network_body(network_id, *args, **kw)
    await driver.create_network(p.parse_create_network(body))


async def create_endpoint(
    driver: NetworkDriver, network_id: str, endpoint_id: str, **kw: Any
) -> str | None:
    return await driver.create_endpoint(
        p.parse_create_endpoint(create_endpoint_body(network_id, endpoint_id, **kw))
    )


async def join(driver: NetworkDriver, network_id: str, endpoint_id: str) -> Any:
    return await driver.join(p.parse_join(join_body(network_id, endpoint_id)))


def ref(network_id: str, endpoint_id: str) -> p.EndpointRef:
    return p.parse_endpoint_ref(endpoint_ref_body(network_id, endpoint_id))


def net_ref(network_id: str) -> p.NetworkRef:
    return p.parse_network_ref({"NetworkID": network_id})


async def stored_networks(env: Env) -> dict[str, Network]:
    return {n.id: n for n in await env.store.load_networks()}


async def stored_endpoints(env: Env) -> dict[str, Endpoint]:
    return {e.id: e for e in await env.store.load_endpoints()}


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


async def test_create_network(env: Env) -> None:
    await create_network(env.driver, NET_A)
    link = env.kernel.links_by_name[BR_A]
    assert link.kind == "bridge"
    assert link.up is True
    assert link.mac == bridge_mac(NET_A)
    assert env.kernel.addresses[BR_A] == [iface("10.50.0.1/24")]
    assert env.firewall.last == [
        NetworkRules(
            bridge=BR_A,
            subnets_v4=(ipaddress.ip_network("10.50.0.0/24"),),
            gateways=(ipaddress.ip_address("10.50.0.1"),),
        )
    ]
    assert env.sysctl.forwarding >= 1
    assert BR_A in env.sysctl.accept_ra_disabled
    stored = (await stored_networks(env))[NET_A]
    assert stored.state == "ready"
    assert stored.bridge == BR_A
    assert stored.bridge_owned is True
    assert stored == env.driver.networks[NET_A]
    assert stored.gateway_v4 == ipaddress.ip_address("10.50.0.1")


async def test_create_network_replay_is_a_no_op(env: Env) -> None:
    await create_network(env.driver, NET_A)
    calls, applied = list(env.kernel.calls), len(env.firewall.applied)
    await create_network(env.driver, NET_A)
    assert env.kernel.calls == calls
    assert len(env.firewall.applied) == applied
    assert list(env.driver.networks) == [NET_A]


async def test_create_network_records_options(env: Env) -> None:
    await create_network(
        env.driver,
        NET_A,
        generic={"mtu": "1400", ENABLE_ICC: "false", CONTAINER_IFACE_PREFIX: "lan"},
        aux={"a": "10.50.0.5/24"},
    )
    network = env.driver.networks[NET_A]
    assert network.options == NetworkOptions(
        mtu=1400, enable_icc=False, container_iface_prefix="lan"
    )
    assert network.subnets_v4[0].aux_addresses == (ipaddress.ip_address("10.50.0.5"),)
    assert env.kernel.links_by_name[BR_A].mtu == 1400
    assert env.firewall.last[0].icc is False
    assert (await stored_networks(env))[NET_A].options == network.options


async def test_create_dual_stack_network(env: Env) -> None:
    await create_network(
        env.driver, NET_A, v6_subnet="fd00:216:1::/64", v6_gateway="fd00:216:1::1/64"
    )
    assert env.kernel.addresses[BR_A] == [iface("10.50.0.1/24"), iface("fd00:216:1::1/64")]
    rules = env.firewall.last[0]
    assert rules.subnets_v6 == (ipaddress.ip_network("fd00:216:1::/64"),)
    assert env.driver.networks[NET_A].enable_ipv6 is True


async def test_create_network_without_subnet(env: Env) -> None:
    with pytest.raises(InvalidRequest, match="--subnet"):
        await create_network(env.driver, NET_A, subnet=None)
    assert env.kernel.names() == set()


async def test_create_network_with_unknown_option(env: Env) -> None:
    with pytest.raises(Unsupported, match=r"com\.example\.x"):
        await create_network(env.driver, NET_A, generic={"com.example.x": "1"})
    assert env.kernel.names() == set()
    assert await stored_networks(env) == {}


async def test_bridge_name_option(env: Env) -> None:
    await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "recbr"})
    assert env.kernel.links_by_name["recbr"].kind == "bridge"
    assert env.driver.networks[NET_A].bridge == "recbr"
    assert env.driver.networks[NET_A].bridge_owned is True
    assert env.firewall.last_bridges() == {"recbr"}
    await env.driver.delete_network(net_ref(NET_A))
    assert "recbr" not in env.kernel.names()


async def test_existing_user_bridge_is_adopted_and_kept(env: Env) -> None:
    env.kernel.add_link("br-user", "bridge", up=True, mac="02:00:00:00:00:01")
    # Addresses of its own within the subnet, and IPv6 link-local, are fine.
    env.kernel.addresses["br-user"] = [iface("10.50.0.254/24"), iface("fe80::1/64")]
    await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "br-user"})
    network = env.driver.networks[NET_A]
    assert network.bridge == "br-user"
    assert network.bridge_owned is False
    assert (await stored_networks(env))[NET_A].bridge_owned is False
    assert env.kernel.addresses["br-user"] == [
        iface("10.50.0.254/24"),
        iface("fe80::1/64"),
        iface("10.50.0.1/24"),
    ]

    await env.driver.delete_network(net_ref(NET_A))
    assert "br-user" in env.kernel.names()
    assert env.kernel.links_by_name["br-user"].mac == "02:00:00:00:00:01"
    assert env.kernel.addresses["br-user"] == [iface("10.50.0.254/24"), iface("fe80::1/64")]
    assert ("delete_link", "br-user") not in env.kernel.calls
    assert env.driver.networks == {}
    assert await stored_networks(env) == {}


async def test_an_adopted_bridge_gets_its_settings_back(env: Env) -> None:
    link = env.kernel.add_link("br-user", "bridge", up=False, mtu=9000)
    env.sysctl.values[("br-user", "accept_ra")] = "2"
    await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "br-user", "mtu": "1400"})
    stored = (await stored_networks(env))[NET_A]
    assert stored.previous_settings == BridgeSettings(
        route_localnet="0", accept_ra="2", mtu=9000, up=False
    )
    assert env.sysctl.value("br-user", "route_localnet") == "1"
    assert env.sysctl.value("br-user", "accept_ra") == "0"
    assert (link.mtu, link.up) == (1400, True)

    await env.driver.delete_network(net_ref(NET_A))
    assert env.sysctl.value("br-user", "route_localnet") == "0"
    assert env.sysctl.value("br-user", "accept_ra") == "2"
    assert (link.mtu, link.up) == (9000, False)
    assert "br-user" in env.kernel.names()


async def test_an_adopted_bridge_already_set_as_pybridge_wants_is_left_alone(env: Env) -> None:
    env.kernel.add_link("br-user", "bridge", up=True)
    env.sysctl.values[("br-user", "accept_ra")] = "0"
    # An internal network never sets route_localnet, so it has nothing to restore.
    await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "br-user"}, internal=True)
    assert env.driver.networks[NET_A].previous_settings == BridgeSettings()
    assert env.sysctl.value("br-user", "route_localnet") == "0"
    await env.driver.delete_network(net_ref(NET_A))
    assert env.sysctl.restored == []


async def test_a_replayed_create_keeps_the_settings_found_the_first_time(env: Env) -> None:
    env.kernel.add_link("br-user", "bridge", up=True)
    env.sysctl.values[("br-user", "accept_ra")] = "2"
    await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "br-user"})
    # A crash before the answer: the record is "creating", the bridge has pybridge's settings.
    network = env.driver.networks[NET_A].with_changes(state="creating")
    await env.store.put_network(network)
    driver = await env.restart()
    await create_network(driver, NET_A, generic={BRIDGE_NAME: "br-user"})
    assert driver.networks[NET_A].previous_settings.accept_ra == "2"
    await driver.delete_network(net_ref(NET_A))
    assert env.sysctl.value("br-user", "accept_ra") == "2"


async def test_an_interrupted_delete_of_an_adopted_network_restores_its_bridge(env: Env) -> None:
    env.kernel.add_link("br-user", "bridge", up=True)
    env.sysctl.values[("br-user", "accept_ra")] = "2"
    await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "br-user"})
    network = env.driver.networks[NET_A].with_changes(state="deleting")
    await env.store.put_network(network)
    driver = await env.restart()
    await driver.reconcile()
    assert driver.networks == {}
    assert env.sysctl.value("br-user", "accept_ra") == "2"
    assert env.sysctl.value("br-user", "route_localnet") == "0"
    assert env.kernel.addresses["br-user"] == []
    assert "br-user" in env.kernel.names()


async def test_a_bridge_with_addresses_outside_the_subnets_is_refused(env: Env) -> None:
    env.kernel.add_link("br-user", "bridge", up=True)
    env.kernel.addresses["br-user"] = [iface("192.168.77.1/24")]
    with pytest.raises(Conflict) as info:
        await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "br-user"})
    assert str(info.value) == (
        "bridge br-user has the address 192.168.77.1/24, outside the network's subnets; "
        "pybridge adopts only a bridge with no addresses but the network's own: choose another "
        "bridge name or subnet"
    )
    assert await stored_networks(env) == {}
    assert env.sysctl.values == {}
    # A global IPv6 address counts too.
    env.kernel.addresses["br-user"] = [iface("2001:db8::1/64")]
    with pytest.raises(Conflict, match="2001:db8::1/64"):
        await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "br-user"})


async def test_a_bridge_with_other_interfaces_on_it_is_refused(env: Env) -> None:
    """A NIC or a VM's tap on the bridge would reach every container port directly (to the
    bridge that is traffic within the network), whatever the firewall says."""
    env.kernel.add_link("br-lan", "bridge", up=True)
    env.kernel.add_link("eth1", "device", master="br-lan")
    with pytest.raises(Conflict) as info:
        await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "br-lan"})
    assert str(info.value) == (
        "bridge br-lan already has eth1 on it, which would reach every container of the "
        "network directly; pybridge adopts only a bridge with nothing else on it: choose "
        "another bridge name"
    )
    assert await stored_networks(env) == {}


async def test_the_bridge_of_the_default_route_is_refused(env: Env) -> None:
    env.kernel.add_link("br-up", "bridge", up=True)
    for default, family in (("0.0.0.0/0", 4), ("::/0", 6)):
        env.kernel.extra_routes = [HostRoute(ipaddress.ip_network(default), "br-up")]
        with pytest.raises(Conflict) as info:
            await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "br-up"})
        assert str(info.value) == (
            f"bridge br-up carries the host's default IPv{family} route; pybridge does not take "
            "over the host's uplink: choose another bridge name"
        )
    assert await stored_networks(env) == {}
    assert env.kernel.addresses.get("br-up", []) == []


async def test_a_pyb_bridge_pybridge_did_not_make_is_refused(env: Env) -> None:
    # Start-up deletes unknown pyb-* bridges, so adopting one would delete it later.
    env.kernel.add_link("pyb-handmade", "bridge", up=True)
    with pytest.raises(Conflict, match="names starting with pyb- are pybridge's own"):
        await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "pyb-handmade"})
    assert "pyb-handmade" in env.kernel.names()


async def test_lo_is_refused_as_a_bridge_name(env: Env) -> None:
    env.kernel.add_link("lo", None)
    with pytest.raises(Conflict, match="interface lo already exists and is not a bridge"):
        await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "lo"})


async def test_bridge_name_of_a_non_bridge_interface(env: Env) -> None:
    env.kernel.add_link("eth1", None)
    with pytest.raises(Conflict, match="eth1"):
        await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "eth1"})
    assert "eth1" in env.kernel.names()
    assert await stored_networks(env) == {}


async def test_bridge_name_clash(env: Env) -> None:
    await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "recbr"})
    with pytest.raises(Conflict) as info:
        await create_network(
            env.driver, NET_B, "10.51.0.0/24", "10.51.0.1/24", generic={BRIDGE_NAME: "recbr"}
        )
    assert "recbr" in str(info.value)
    assert short(NET_A) in str(info.value)
    assert list(env.driver.networks) == [NET_A]
    assert env.kernel.addresses["recbr"] == [iface("10.50.0.1/24")]


async def test_subnet_overlap_with_another_network(env: Env) -> None:
    await create_network(env.driver, NET_A, "10.50.0.0/16", "10.50.0.1/16")
    with pytest.raises(Conflict) as info:
        await create_network(env.driver, NET_B, "10.50.7.0/24", "10.50.7.1/24")
    assert str(info.value) == (
        f"subnet 10.50.7.0/24 overlaps subnet 10.50.0.0/16 of pybridge network {short(NET_A)} "
        f"(bridge {BR_A})"
    )
    assert BR_B not in env.kernel.names()
    assert list(await stored_networks(env)) == [NET_A]


async def test_subnets_of_different_families_do_not_overlap(env: Env) -> None:
    await create_network(env.driver, NET_A, v6_subnet="fd00:1::/64", v6_gateway="fd00:1::1/64")
    await create_network(env.driver, NET_B, "10.51.0.0/24", "10.51.0.1/24", v6_subnet="fd00:2::/64")
    assert set(env.driver.networks) == {NET_A, NET_B}
    assert env.firewall.last_bridges() == {BR_A, BR_B}


async def test_subnet_overlap_with_a_host_route(env: Env) -> None:
    env.kernel.extra_routes.append(HostRoute(ipaddress.ip_network("10.70.0.0/16"), "eth1"))
    with pytest.raises(Conflict) as info:
        await create_network(env.driver, NET_A, "10.70.3.0/24", "10.70.3.1/24")
    assert str(info.value) == "subnet 10.70.3.0/24 overlaps the host route 10.70.0.0/16 on eth1"
    assert env.kernel.names() == set()
    assert await stored_networks(env) == {}


async def test_routes_on_pybridge_bridges_and_default_routes_are_ignored(env: Env) -> None:
    # the connected route of network A's own bridge must not block A's replay after a crash,
    # and the default routes in FakeKernel overlap everything
    await create_network(env.driver, NET_A)
    assert any(r.device == BR_A for r in await env.kernel.routes())
    network = env.driver.networks[NET_A]
    await env.store.put_network(network.with_changes(state="creating"))
    env.driver.state.networks[NET_A] = network.with_changes(state="creating")
    await create_network(env.driver, NET_A)
    assert env.driver.networks[NET_A].state == "ready"


async def test_concurrent_creates_with_overlapping_subnets(env: Env) -> None:
    results = await asyncio.gather(
        create_network(env.driver, NET_A, "10.50.0.0/24", "10.50.0.1/24"),
        create_network(env.driver, NET_B, "10.50.0.0/25", "10.50.0.1/25"),
        return_exceptions=True,
    )
    assert results[0] is None
    assert isinstance(results[1], Conflict)
    assert list(env.driver.networks) == [NET_A]
    assert env.kernel.names() == {BR_A}


async def test_concurrent_endpoints_on_two_networks(env: Env) -> None:
    await create_network(env.driver, NET_A)
    await create_network(env.driver, NET_B, "10.51.0.0/24", "10.51.0.1/24")
    macs = await asyncio.gather(
        create_endpoint(env.driver, NET_A, EP_1),
        create_endpoint(env.driver, NET_B, EP_2, address="10.51.0.2/24"),
    )
    assert list(macs) == ["02:50:0a:32:00:02", "02:50:0a:33:00:02"]  # from the addresses
    assert env.kernel.links_by_name[host_veth_name(EP_1)].master == BR_A
    assert env.kernel.links_by_name[host_veth_name(EP_2)].master == BR_B


async def test_delete_network(env: Env) -> None:
    await create_network(env.driver, NET_A)
    await create_network(env.driver, NET_B, "10.51.0.0/24", "10.51.0.1/24")
    await create_endpoint(env.driver, NET_A, EP_1)
    await env.driver.delete_network(net_ref(NET_A))
    assert BR_A not in env.kernel.names()
    assert host_veth_name(EP_1) not in env.kernel.names()
    assert container_veth_name(EP_1) not in env.kernel.names()
    assert env.firewall.last_bridges() == {BR_B}
    assert list(env.driver.networks) == [NET_B]
    assert env.driver.endpoints == {}
    assert list(await stored_networks(env)) == [NET_B]
    assert await stored_endpoints(env) == {}
    # idempotent
    await env.driver.delete_network(net_ref(NET_A))
    await env.driver.delete_network(net_ref(NET_B))
    await env.driver.delete_network(net_ref(NET_B))
    assert env.kernel.names() == set()
    assert env.firewall.last == []
    assert await stored_networks(env) == {}


async def test_delete_unknown_network(env: Env) -> None:
    await env.driver.delete_network(net_ref(NET_A))
    assert env.firewall.applied == []


# ---------------------------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------------------------


async def test_create_endpoint(env: Env) -> None:
    await create_network(env.driver, NET_A)
    mac = await create_endpoint(env.driver, NET_A, EP_1, ports=True)
    assert mac == endpoint_mac(EP_1, ipaddress.ip_address("10.50.0.2")) == "02:50:0a:32:00:02"
    host, peer = host_veth_name(EP_1), container_veth_name(EP_1)
    assert env.kernel.links_by_name[host].kind == "veth"
    assert env.kernel.links_by_name[host].master == BR_A
    assert env.kernel.links_by_name[host].up is True
    assert env.kernel.links_by_name[host].peer == peer
    assert env.kernel.links_by_name[peer].mac == mac
    endpoint = (await stored_endpoints(env))[EP_1]
    assert endpoint.state == "ready"
    assert endpoint.network_id == NET_A
    assert endpoint.address == ipaddress.IPv4Interface("10.50.0.2/24")
    assert endpoint.mac_generated is True
    assert [b.host_port for b in endpoint.port_bindings] == [18100]
    assert endpoint.exposed_ports == (("tcp", 80),)


async def test_create_endpoint_with_docker_mac(env: Env) -> None:
    await create_network(env.driver, NET_A)
    assert await create_endpoint(env.driver, NET_A, EP_1, mac="02:42:AC:11:00:09") is None
    assert env.kernel.links_by_name[container_veth_name(EP_1)].mac == "02:42:ac:11:00:09"
    assert env.driver.endpoints[EP_1].mac_generated is False
    # replay: still nothing to report
    assert await create_endpoint(env.driver, NET_A, EP_1, mac="02:42:AC:11:00:09") is None


async def test_create_endpoint_replay(env: Env) -> None:
    await create_network(env.driver, NET_A)
    first = await create_endpoint(env.driver, NET_A, EP_1)
    calls = list(env.kernel.calls)
    assert await create_endpoint(env.driver, NET_A, EP_1) == first
    assert env.kernel.calls == calls


async def test_create_endpoint_mtu_follows_network(env: Env) -> None:
    await create_network(env.driver, NET_A, generic={"mtu": "1400"})
    await create_endpoint(env.driver, NET_A, EP_1)
    assert env.kernel.links_by_name[host_veth_name(EP_1)].mtu == 1400
    assert env.kernel.links_by_name[container_veth_name(EP_1)].mtu == 1400


async def test_create_endpoint_on_unknown_network(env: Env) -> None:
    with pytest.raises(NotFound) as info:
        await create_endpoint(env.driver, NET_A, EP_1)
    assert short(NET_A) in str(info.value)
    assert env.kernel.names() == set()


async def test_create_endpoint_address_outside_subnet(env: Env) -> None:
    await create_network(env.driver, NET_A)
    with pytest.raises(InvalidRequest, match=r"10\.99\.0\.2"):
        await create_endpoint(env.driver, NET_A, EP_1, address="10.99.0.2/24")
    assert env.driver.endpoints == {}


async def test_endpoint_id_reused_on_another_network(env: Env) -> None:
    await create_network(env.driver, NET_A)
    await create_network(env.driver, NET_B, "10.51.0.0/24", "10.51.0.1/24")
    await create_endpoint(env.driver, NET_A, EP_1)
    with pytest.raises(Conflict):
        await create_endpoint(env.driver, NET_B, EP_1, address="10.51.0.2/24")


async def test_create_endpoint_failure_leaves_nothing(env: Env) -> None:
    await create_network(env.driver, NET_A)
    env.kernel.fail["set_hairpin"] = HostError("injected set_hairpin failure")
    with pytest.raises(HostError, match="injected"):
        await create_endpoint(env.driver, NET_A, EP_1)
    assert host_veth_name(EP_1) not in env.kernel.names()
    assert container_veth_name(EP_1) not in env.kernel.names()
    assert env.driver.endpoints == {}
    assert await stored_endpoints(env) == {}


async def test_create_endpoint_over_leftover_veth(env: Env) -> None:
    # a crashed earlier attempt left only the container end behind
    await create_network(env.driver, NET_A)
    env.kernel.add_link(container_veth_name(EP_1), "veth")
    mac = await create_endpoint(env.driver, NET_A, EP_1)
    assert env.kernel.links_by_name[container_veth_name(EP_1)].mac == mac
    assert env.kernel.links_by_name[host_veth_name(EP_1)].master == BR_A


async def test_join(env: Env) -> None:
    await create_network(env.driver, NET_A)
    await create_endpoint(env.driver, NET_A, EP_1)
    result = await join(env.driver, NET_A, EP_1)
    assert result.src_name == container_veth_name(EP_1)
    assert result.dst_prefix == "eth"
    assert result.gateway == ipaddress.ip_address("10.50.0.1")
    assert result.gateway_v6 is None
    assert result.internal is False
    stored = (await stored_endpoints(env))[EP_1]
    assert stored.sandbox_key == "/var/run/docker/netns/e61ac536cf4e"


async def test_join_dual_stack_with_prefix(env: Env) -> None:
    await create_network(
        env.driver,
        NET_A,
        v6_subnet="fd00:216:1::/64",
        v6_gateway="fd00:216:1::1/64",
        generic={CONTAINER_IFACE_PREFIX: "lan"},
    )
    await create_endpoint(env.driver, NET_A, EP_1, address_v6="fd00:216:1::2/64")
    result = await join(env.driver, NET_A, EP_1)
    assert result.dst_prefix == "lan"
    assert result.gateway == ipaddress.ip_address("10.50.0.1")
    assert result.gateway_v6 == ipaddress.ip_address("fd00:216:1::1")


async def test_join_internal_network_has_no_gateway(env: Env) -> None:
    await create_network(
        env.driver,
        NET_A,
        internal=True,
        v6_subnet="fd00:216:1::/64",
        v6_gateway="fd00:216:1::1/64",
    )
    assert env.firewall.last[0].internal is True
    await create_endpoint(env.driver, NET_A, EP_1)
    result = await join(env.driver, NET_A, EP_1)
    assert result.gateway is None
    assert result.gateway_v6 is None
    assert result.internal is True
    # the bridge still has its gateway addresses (the host side of the network)
    assert iface("10.50.0.1/24") in env.kernel.addresses[BR_A]


async def test_join_unknown_endpoint(env: Env) -> None:
    await create_network(env.driver, NET_A)
    with pytest.raises(NotFound, match=short(EP_1)):
        await join(env.driver, NET_A, EP_1)
    with pytest.raises(NotFound):
        await join(env.driver, NET_B, EP_1)


async def test_join_with_the_wrong_network_is_refused(env: Env) -> None:
    # BUG (driver.py join): the endpoint is looked up by EndpointID alone, so a Join naming
    # network B with an endpoint of network A succeeds, re-masters A's veth onto B's bridge
    # (bypassing the isolation between the two) and returns B's gateway.
    await create_network(env.driver, NET_A)
    await create_network(env.driver, NET_B, "10.51.0.0/24", "10.51.0.1/24")
    await create_endpoint(env.driver, NET_A, EP_1)
    with pytest.raises(NotFound):
        await join(env.driver, NET_B, EP_1)
    assert env.kernel.links_by_name[host_veth_name(EP_1)].master == BR_A


async def test_join_replay_after_docker_moved_the_interface(env: Env) -> None:
    await create_network(env.driver, NET_A)
    await create_endpoint(env.driver, NET_A, EP_1)
    await join(env.driver, NET_A, EP_1)
    env.kernel.move_to_container(container_veth_name(EP_1))
    result = await join(env.driver, NET_A, EP_1)
    assert result.src_name == container_veth_name(EP_1)
    assert container_veth_name(EP_1) in env.kernel.names()
    assert env.kernel.links_by_name[host_veth_name(EP_1)].master == BR_A


async def test_join_updates_ports_only_when_sent(env: Env) -> None:
    await create_network(env.driver, NET_A)
    await create_endpoint(env.driver, NET_A, EP_1, ports=True)
    await join(env.driver, NET_A, EP_1)  # no port options in this Join
    assert [b.port for b in env.driver.endpoints[EP_1].port_bindings] == [80]
    body = join_body(NET_A, EP_1)
    body["Options"] = {p.EXPOSED_PORTS: [], p.PORT_MAP: []}
    await env.driver.join(p.parse_join(body))
    assert env.driver.endpoints[EP_1].port_bindings == ()


async def test_leave(env: Env) -> None:
    await create_network(env.driver, NET_A)
    await create_endpoint(env.driver, NET_A, EP_1)
    await join(env.driver, NET_A, EP_1)
    await env.driver.leave(ref(NET_A, EP_1))
    assert env.driver.endpoints[EP_1].sandbox_key is None
    assert (await stored_endpoints(env))[EP_1].sandbox_key is None
    # the veth stays until DeleteEndpoint
    assert host_veth_name(EP_1) in env.kernel.names()
    await env.driver.leave(ref(NET_A, EP_1))
    await env.driver.leave(ref(NET_A, EP_2))


async def test_program_and_revoke_external_connectivity(env: Env) -> None:
    await create_network(env.driver, NET_A)
    await create_endpoint(env.driver, NET_A, EP_1, ports=True)
    body = endpoint_ref_body(NET_A, EP_1)
    body["Options"] = create_endpoint_body(NET_A, EP_1, ports=True)["Options"]
    await env.driver.program_external_connectivity(p.parse_program_external(body))
    await env.driver.revoke_external_connectivity(ref(NET_A, EP_1))
    with pytest.raises(NotFound):
        await env.driver.program_external_connectivity(
            p.parse_program_external(endpoint_ref_body(NET_A, EP_2))
        )


async def test_delete_endpoint(env: Env) -> None:
    await create_network(env.driver, NET_A)
    await create_endpoint(env.driver, NET_A, EP_1)
    await create_endpoint(env.driver, NET_A, EP_2, address="10.50.0.3/24")
    await env.driver.delete_endpoint(ref(NET_A, EP_1))
    assert host_veth_name(EP_1) not in env.kernel.names()
    assert container_veth_name(EP_1) not in env.kernel.names()
    assert host_veth_name(EP_2) in env.kernel.names()
    assert set(env.driver.endpoints) == {EP_2}
    assert set(await stored_endpoints(env)) == {EP_2}
    await env.driver.delete_endpoint(ref(NET_A, EP_1))
    await env.driver.delete_endpoint(ref(NET_B, EP_1))
    assert set(env.driver.endpoints) == {EP_2}


async def test_delete_endpoint_forgets_its_flows_before_answering(env: Env) -> None:
    """Connection-tracking entries outlive the container: an established-state entry would
    let the next holder of the address receive traffic nobody allowed (the replies rule).
    An endpoint that still publishes (Docker skipped the Revoke) loses its DNAT rules first,
    or a new flow could be NATed to the address in between."""
    await create_network(env.driver, NET_A)
    await create_endpoint(env.driver, NET_A, EP_1, ports=True)
    await env.driver.program_external_connectivity(
        p.parse_program_external(
            {
                **endpoint_ref_body(NET_A, EP_1),
                "Options": create_endpoint_body(NET_A, EP_1, ports=True)["Options"],
            }
        )
    )
    assert env.firewall.last[0].mappings
    env.kernel.calls.clear()
    env.firewall.on_apply = lambda: env.kernel.calls.append(("firewall", ""))
    await env.driver.delete_endpoint(ref(NET_A, EP_1))
    assert env.kernel.calls.index(("firewall", "")) < env.kernel.calls.index(
        ("forget_flows", "10.50.0.2")
    )
    assert env.firewall.last[0].mappings == ()


async def test_publishing_or_revoking_a_udp_port_forgets_its_flows_once_the_rule_is_written(
    env: Env,
) -> None:
    await create_network(env.driver, NET_A)
    await create_endpoint(env.driver, NET_A, EP_1)
    body = endpoint_ref_body(NET_A, EP_1)
    body["Options"] = {
        "com.docker.network.portmap": [
            {"Proto": 17, "IP": "", "Port": 53, "HostIP": "", "HostPort": 8053, "HostPortEnd": 8053}
        ]
    }
    await env.driver.program_external_connectivity(p.parse_program_external(body))
    # Flows to the port from before its DNAT rule (to pybridge's own socket) are forgotten.
    assert ("forget_port_flows", "17/8053/v4") in env.kernel.calls
    assert env.firewall.last[0].mappings  # (after the rule was written)
    env.kernel.calls.clear()
    await env.driver.revoke_external_connectivity(ref(NET_A, EP_1))
    assert env.kernel.calls == [("forget_flows", "10.50.0.2 17/53")]
    assert env.firewall.last[0].mappings == ()  # written before the flows were forgotten


async def test_delete_endpoint_after_container_end_moved(env: Env) -> None:
    await create_network(env.driver, NET_A)
    await create_endpoint(env.driver, NET_A, EP_1)
    await join(env.driver, NET_A, EP_1)
    env.kernel.move_to_container(container_veth_name(EP_1))
    await env.driver.leave(ref(NET_A, EP_1))
    await env.driver.delete_endpoint(ref(NET_A, EP_1))
    assert env.kernel.names() == {BR_A}


async def test_endpoint_oper_info_never_raises(env: Env) -> None:
    assert env.driver.endpoint_oper_info(ref(NET_A, EP_1)) == {}
    await create_network(env.driver, NET_A)
    await create_endpoint(env.driver, NET_A, EP_1, address_v6="")
    info = env.driver.endpoint_oper_info(ref(NET_A, EP_1))
    assert info == {
        "bridge": BR_A,
        "veth_host": host_veth_name(EP_1),
        "mac_address": endpoint_mac(EP_1, ipaddress.ip_address("10.50.0.2")),
        "address": "10.50.0.2/24",
    }
    assert env.driver.endpoint_oper_info(ref(NET_B, EP_1)) == {}
    assert env.driver.endpoint_oper_info(ref(NET_A, EP_2)) == {}


# ---------------------------------------------------------------------------------------------
# Failure injection
# ---------------------------------------------------------------------------------------------


async def test_create_network_failure_rolls_back(env: Env) -> None:
    await create_network(env.driver, NET_B, "10.51.0.0/24", "10.51.0.1/24")
    env.kernel.fail["ensure_address"] = HostError("injected: could not add address")
    with pytest.raises(HostError, match="injected"):
        await create_network(env.driver, NET_A)
    assert BR_A not in env.kernel.names()
    assert NET_A not in env.driver.networks
    assert list(await stored_networks(env)) == [NET_B]
    assert env.firewall.last_bridges() == {BR_B}
    assert all(BR_A not in {n.bridge for n in applied} for applied in env.firewall.applied)
    # once the kernel behaves again, Docker's retry succeeds
    del env.kernel.fail["ensure_address"]
    await create_network(env.driver, NET_A)
    assert env.firewall.last_bridges() == {BR_A, BR_B}


async def test_create_network_failure_keeps_an_adopted_bridge(env: Env) -> None:
    env.kernel.add_link("br-user", "bridge", up=True)
    env.kernel.fail["set_link"] = HostError("injected: could not set link up")
    with pytest.raises(HostError):
        await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "br-user"})
    assert "br-user" in env.kernel.names()
    assert env.kernel.addresses.get("br-user", []) == []
    assert await stored_networks(env) == {}


async def test_firewall_failure_on_create_can_be_retried(env: Env) -> None:
    # BUG (driver.py create_network/_remove_network): the rollback re-applies the firewall,
    # which fails again for the same reason; the rollback then stops half way: the bridge stays
    # and the network stays in memory (and in the store) as "deleting", so its subnet and bridge
    # name stay taken until pybridge restarts and Docker's retry is refused with a Conflict.
    env.firewall.fail = HostError("injected: iptables-restore failed")
    with pytest.raises(HostError, match="iptables-restore"):
        await create_network(env.driver, NET_A)
    env.firewall.fail = None
    await create_network(env.driver, NET_B)  # Docker's retry has a new id, same subnet
    assert env.firewall.last_bridges() == {BR_B}
    assert BR_A not in env.kernel.names()
    assert NET_A not in env.driver.networks


# ---------------------------------------------------------------------------------------------
# Reconcile after a crash or a reboot
# ---------------------------------------------------------------------------------------------


def network_record(network_id: str, state: Any, subnet: str = "10.60.0.0/24") -> Network:
    pool = ipaddress.ip_network(subnet)
    return Network(
        id=network_id,
        bridge=bridge_name(network_id),
        bridge_owned=True,
        subnets_v4=(
            Subnet(pool=pool, gateway=ipaddress.ip_interface(f"{pool[1]}/{pool.prefixlen}")),
        ),
        subnets_v6=(),
        state=state,
    )


def endpoint_record(endpoint_id: str, network_id: str, state: Any = "ready") -> Endpoint:
    return Endpoint(
        id=endpoint_id,
        network_id=network_id,
        host_veth=host_veth_name(endpoint_id),
        container_veth=container_veth_name(endpoint_id),
        mac_address=endpoint_mac(endpoint_id),
        mac_generated=True,
        address=ipaddress.IPv4Interface("10.60.0.2/24"),
        state=state,
    )


async def test_reconcile_clean_state_repairs_nothing(env: Env) -> None:
    await create_network(env.driver, NET_A)
    await create_endpoint(env.driver, NET_A, EP_1)
    names = env.kernel.names()
    driver = await env.restart()
    assert await driver.reconcile() == []
    assert env.kernel.names() == names
    assert env.firewall.last_bridges() == {BR_A}


async def test_reconcile_rolls_back_an_interrupted_create(env: Env) -> None:
    await env.store.put_network(network_record(NET_A, "creating"))
    await env.store.put_endpoint(endpoint_record(EP_1, NET_A, "creating"))
    env.kernel.add_link(BR_A, "bridge")
    env.kernel.addresses[BR_A] = [iface("10.60.0.1/24")]
    env.kernel.add_veth_pair(host_veth_name(EP_1), container_veth_name(EP_1))
    driver = await env.restart()
    repairs = await driver.reconcile()
    assert f"finished an interrupted creating of network {short(NET_A)}" in repairs
    assert env.kernel.names() == set()
    assert driver.networks == {}
    assert driver.endpoints == {}
    assert await stored_networks(env) == {}
    assert await stored_endpoints(env) == {}
    assert env.firewall.last == []


async def test_reconcile_finishes_an_interrupted_delete(env: Env) -> None:
    await create_network(env.driver, NET_B, "10.51.0.0/24", "10.51.0.1/24")
    await env.store.put_network(network_record(NET_A, "deleting"))
    await env.store.put_endpoint(endpoint_record(EP_1, NET_A))
    env.kernel.add_link(BR_A, "bridge", up=True)
    env.kernel.add_veth_pair(host_veth_name(EP_1), container_veth_name(EP_1))
    driver = await env.restart()
    repairs = await driver.reconcile()
    assert f"finished an interrupted deleting of network {short(NET_A)}" in repairs
    assert env.kernel.names() == {BR_B}
    assert list(driver.networks) == [NET_B]
    assert list(await stored_networks(env)) == [NET_B]
    assert await stored_endpoints(env) == {}
    assert env.firewall.last_bridges() == {BR_B}


async def test_reconcile_removes_interrupted_endpoints(env: Env) -> None:
    await create_network(env.driver, NET_A)
    await env.store.put_endpoint(endpoint_record(EP_1, NET_A, "creating"))
    await env.store.put_endpoint(endpoint_record(EP_2, NET_B))  # its network is unknown
    env.kernel.add_veth_pair(host_veth_name(EP_1), container_veth_name(EP_1))
    driver = await env.restart()
    repairs = await driver.reconcile()
    assert f"removed an interrupted endpoint {short(EP_1)}" in repairs
    assert f"removed an interrupted endpoint {short(EP_2)}" in repairs
    assert env.kernel.names() == {BR_A}
    assert await stored_endpoints(env) == {}


async def test_reconcile_removes_orphans(env: Env) -> None:
    await create_network(env.driver, NET_A)
    await create_endpoint(env.driver, NET_A, EP_1)
    stray_bridge = bridge_name(hexid("forgotten"))
    stray = hexid("stray-endpoint")
    env.kernel.add_link(stray_bridge, "bridge")
    env.kernel.add_veth_pair(host_veth_name(stray), container_veth_name(stray))
    env.kernel.add_link(container_veth_name(hexid("lonely")), "veth")
    foreign = {"eth0", "docker0", "br-0123456789ab", "veth1a2b3c4", "pyb-notabridge"}
    for name in foreign:
        env.kernel.add_link(name, "veth" if name.startswith(("veth", "pyb-")) else "bridge")
    env.kernel.links_by_name["eth0"].kind = None
    ours = (
        env.kernel.names()
        - foreign
        - {stray_bridge}
        - {
            host_veth_name(stray),
            container_veth_name(stray),
            container_veth_name(hexid("lonely")),
        }
    )
    driver = await env.restart()
    repairs = await driver.reconcile()
    assert f"removed leftover bridge {stray_bridge}" in repairs
    assert f"removed leftover veth {host_veth_name(stray)}" in repairs
    assert f"removed leftover veth {container_veth_name(hexid('lonely'))}" in repairs
    assert len(repairs) == 3  # the stray pair is reported once
    assert env.kernel.names() == ours | foreign
    assert ours == {BR_A, host_veth_name(EP_1), container_veth_name(EP_1)}


async def test_reconcile_recreates_a_missing_bridge(env: Env) -> None:
    await create_network(env.driver, NET_A, generic={"mtu": "1400"})
    await create_endpoint(env.driver, NET_A, EP_1)  # created, never joined
    await create_endpoint(env.driver, NET_A, EP_2, address="10.50.0.3/24")
    await join(env.driver, NET_A, EP_2)
    env.kernel.move_to_container(container_veth_name(EP_2))
    env.firewall.applied.clear()
    forwarding = env.sysctl.forwarding

    rebooted = FakeKernel()
    env.sysctl.forwarding_on = {4: False, 6: False}  # the reboot reset it
    env.firewall.forward_policy_dropped.clear()
    driver = await env.restart(kernel=rebooted)
    repairs = await driver.reconcile()
    assert f"recreated bridge {BR_A}" in repairs
    assert f"recreated veth {host_veth_name(EP_1)}" in repairs
    # EP_2's container is gone with the reboot: its endpoint goes, its veth is not recreated
    assert any(r.startswith(f"removed endpoint {short(EP_2)}") for r in repairs)
    assert host_veth_name(EP_2) not in rebooted.names()
    bridge = rebooted.links_by_name[BR_A]
    assert bridge.kind == "bridge"
    assert bridge.up is True
    assert bridge.mtu == 1400
    assert bridge.mac == bridge_mac(NET_A)
    assert rebooted.addresses[BR_A] == [iface("10.50.0.1/24")]
    veth = rebooted.links_by_name[host_veth_name(EP_1)]
    assert veth.master == BR_A
    assert veth.up is True
    assert rebooted.links_by_name[container_veth_name(EP_1)].mac == endpoint_mac(
        EP_1, ipaddress.ip_address("10.50.0.2")
    )
    assert env.firewall.last == [firewall_view(driver.networks[NET_A])]
    assert env.sysctl.forwarding > forwarding
    # pybridge turned forwarding on (before dockerd, which then leaves FORWARD alone): the
    # FORWARD policy went to DROP first, as Docker does when it turns forwarding on itself.
    assert env.firewall.forward_policy_dropped == [4]
    assert set(driver.endpoints) == {EP_1}
    # a second reconcile finds nothing to do
    assert await driver.reconcile() == []


@pytest.mark.parametrize(("master", "up"), [(None, False), (None, True), (BR_A, False)])
async def test_reconcile_reattaches_a_detached_veth(env: Env, master: str | None, up: bool) -> None:
    await create_network(env.driver, NET_A)
    await create_endpoint(env.driver, NET_A, EP_1)
    link = env.kernel.links_by_name[host_veth_name(EP_1)]
    link.master = master
    link.up = up
    driver = await env.restart()
    await driver.reconcile()
    assert link.master == BR_A
    assert link.up is True


async def test_state_survives_a_restart(env: Env) -> None:
    await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "recbr", "mtu": "1400"})
    await create_endpoint(env.driver, NET_A, EP_1, ports=True)
    await join(env.driver, NET_A, EP_1)
    networks, endpoints = dict(env.driver.networks), dict(env.driver.endpoints)
    driver = await env.restart()
    assert driver.networks == networks
    assert driver.endpoints == endpoints


async def test_gateway_already_on_a_user_bridge_is_left_there(env: Env) -> None:
    env.kernel.add_link("br-user", "bridge", up=True)
    env.kernel.addresses["br-user"] = [iface("10.50.0.1/24")]
    await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "br-user"})
    assert env.driver.networks[NET_A].foreign_addresses == (iface("10.50.0.1/24"),)
    await env.driver.delete_network(net_ref(NET_A))
    assert env.kernel.addresses["br-user"] == [iface("10.50.0.1/24")]


async def test_vanished_user_bridge_is_recreated_but_never_deleted(env: Env) -> None:
    env.kernel.add_link("br-user", "bridge", up=True)
    env.kernel.addresses["br-user"] = [iface("10.50.0.1/24")]
    env.sysctl.values[("br-user", "accept_ra")] = "2"
    await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "br-user"})
    await env.kernel.delete_link("br-user")
    env.sysctl.values.clear()  # the bridge went, and its settings with it
    env.kernel.calls.clear()
    driver = await env.restart()
    repairs = await driver.reconcile()
    assert repairs == [
        "recreated bridge br-user, which pybridge did not create: it stays when the network "
        "is removed"
    ]
    assert env.kernel.addresses["br-user"] == [iface("10.50.0.1/24")]
    network = driver.networks[NET_A]
    assert network.bridge_owned is False
    # What a new bridge has is what it gets back; the gateway is no longer the user's.
    assert network.previous_settings == BridgeSettings(route_localnet="0", accept_ra="1", up=False)
    assert network.foreign_addresses == ()
    assert (await stored_networks(env))[NET_A] == network
    await driver.delete_network(net_ref(NET_A))
    assert "br-user" in env.kernel.names()
    assert ("delete_link", "br-user") not in env.kernel.calls
    assert env.kernel.addresses["br-user"] == []
    assert env.sysctl.value("br-user", "accept_ra") == "1"
    assert env.kernel.links_by_name["br-user"].up is False


async def test_reconcile_carries_on_past_a_broken_network(env: Env) -> None:
    await create_network(env.driver, NET_A)
    await create_network(env.driver, NET_B, "10.60.0.0/24", "10.60.0.1/24")
    await env.kernel.delete_link(BR_A)
    await env.kernel.delete_link(BR_B)
    driver = await env.restart()
    env.kernel.fail["ensure_address"] = HostError("address refused")
    repairs = await driver.reconcile()
    assert any(r.startswith(f"could not restore network {short(NET_A)}") for r in repairs)
    assert any(r.startswith(f"could not restore network {short(NET_B)}") for r in repairs)
    # Both bridges exist again and the firewall was still applied for both networks.
    assert {BR_A, BR_B} <= env.kernel.names()
    assert env.firewall.last_bridges() == {BR_A, BR_B}


async def test_reconcile_serves_even_when_interfaces_cannot_be_listed(env: Env) -> None:
    await create_network(env.driver, NET_A)
    driver = await env.restart()
    env.kernel.fail["links"] = HostError("netlink is broken")
    repairs = await driver.reconcile()
    assert repairs == ["could not restore bridges and veths: netlink is broken"]
    assert env.firewall.last_bridges() == {BR_A}


async def test_ipv6_network_turns_on_ipv6_forwarding(env: Env) -> None:
    await create_network(env.driver, NET_A)
    assert env.sysctl.forwarding_v6 == 0
    await create_network(
        env.driver,
        NET_B,
        "10.60.0.0/24",
        "10.60.0.1/24",
        v6_subnet="fd00:60::/64",
        v6_gateway="fd00:60::1/64",
    )
    assert env.sysctl.forwarding_v6 == 1


# ---------------------------------------------------------------------------------------------
# Garbage collection of endpoints whose containers vanished
# ---------------------------------------------------------------------------------------------


async def _joined(env: Env, endpoint_id: str, sandbox: str, address: str) -> None:
    await create_endpoint(env.driver, NET_A, endpoint_id, address=address)
    await env.driver.join(p.parse_join(join_body(NET_A, endpoint_id, sandbox)))


async def test_collector_needs_two_scans_and_spares_live_endpoints(env: Env, tmp_path) -> None:
    await create_network(env.driver, NET_A)
    # Docker's netns files prove nothing: dockerd leaves empty ones behind, and a managed
    # plugin cannot see them at all. Only the veth counts.
    await _joined(env, EP_1, str(tmp_path / "netns" / "missing"), "10.50.0.2/24")
    await _joined(env, EP_2, "/var/run/docker/netns/abc", "10.50.0.3/24")
    suspects, removed = await env.driver.collect_garbage(set(), now=0)
    assert suspects == set()
    assert removed == []
    # Its veth vanished with the container's namespace: gone, after two scans in a row.
    await env.kernel.delete_link(host_veth_name(EP_1))
    suspects, removed = await env.driver.collect_garbage(set(), now=0)
    assert suspects == {EP_1}
    assert removed == []
    suspects, removed = await env.driver.collect_garbage(suspects, now=0)
    assert [e.id for e in removed] == [EP_1]
    assert suspects == set()
    assert set(env.driver.endpoints) == {EP_2}


async def test_collector_removes_endpoints_never_joined(env: Env) -> None:
    await create_network(env.driver, NET_A)
    await create_endpoint(env.driver, NET_A, EP_1)
    created = env.driver.endpoints[EP_1].created_at
    suspects, _ = await env.driver.collect_garbage(set(), now=created + 60)
    assert suspects == set()  # still young: Docker joins right after creating
    suspects, _ = await env.driver.collect_garbage(set(), now=created + 3600)
    _, removed = await env.driver.collect_garbage(suspects, now=created + 3600)
    assert [e.id for e in removed] == [EP_1]


async def test_upkeep_collect_releases_the_ipam_address(env: Env, tmp_path) -> None:
    from pydriver.metrics import Metrics
    from pydriver.upkeep import Intervals, Upkeep

    pool_id, _, ack = await env.ipam.request_pool(
        p.parse_request_pool({"Pool": "10.50.0.0/24", "V6": False})
    )
    await ack()
    address, _ = await env.ipam.request_address(
        p.parse_request_address({"PoolID": pool_id, "Address": ""})
    )
    await create_network(env.driver, NET_A, address_space=LOCAL_ADDRESS_SPACE)
    await _joined(env, EP_1, str(tmp_path / "netns" / "gone"), str(address))
    await env.kernel.delete_link(host_veth_name(EP_1))
    upkeep = Upkeep(env.driver, env.ipam, Metrics(), Intervals())
    await upkeep.collect()
    await upkeep.collect()
    assert EP_1 not in env.driver.endpoints
    assert int(address.ip) not in env.ipam.pools[pool_id].allocated
    assert upkeep.metrics.repairs["stale_endpoint"] == 1


async def test_a_full_bridge_waits_for_background_removals_then_retries(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create_network(env.driver, NET_A)
    real = env.kernel.ensure_veth
    refusals: list[str] = []

    async def full_once(*args: Any, **kwargs: Any) -> bool:
        if not refusals:
            refusals.append(args[0])
            raise BridgeFull("bridge is full")
        return await real(*args, **kwargs)

    monkeypatch.setattr(env.kernel, "ensure_veth", full_once)
    # A veth being removed in the background (the unit driver otherwise runs background work inline).
    removal = asyncio.create_task(asyncio.sleep(0.01))
    env.driver.background.tasks.add(removal)
    removal.add_done_callback(env.driver.background.tasks.discard)
    await create_endpoint(env.driver, NET_A, EP_1)
    assert removal.done()
    assert refusals == [host_veth_name(EP_1)]
    assert env.kernel.links_by_name[host_veth_name(EP_1)].master == BR_A


async def test_a_full_bridge_is_refused_in_plain_words(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create_network(env.driver, NET_A)

    async def always_full(*args: Any, **kwargs: Any) -> bool:
        raise BridgeFull("bridge is full")

    monkeypatch.setattr(env.kernel, "ensure_veth", always_full)
    with pytest.raises(BridgeFull, match=r"is full: its bridge .* has 1023 interfaces"):
        await create_endpoint(env.driver, NET_A, EP_1)
    assert EP_1 not in env.driver.endpoints


async def test_a_bridge_name_is_reused_only_once_the_old_bridge_is_gone(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    await env.restart(inline_background=False)  # removed networks' bridges go in the background
    await create_network(env.driver, NET_A, generic={BRIDGE_NAME: "pyb-shared"})
    release = asyncio.Event()
    real_delete = env.kernel.delete_link

    async def slow_delete(name: str) -> bool:
        if name == "pyb-shared":
            await release.wait()
        return await real_delete(name)

    monkeypatch.setattr(env.kernel, "delete_link", slow_delete)
    await env.driver.delete_network(net_ref(NET_A))
    assert "pyb-shared" in env.kernel.names()  # still going
    creating = asyncio.create_task(
        create_network(
            env.driver, NET_B, "10.60.0.0/24", "10.60.0.1/24", generic={BRIDGE_NAME: "pyb-shared"}
        )
    )
    await asyncio.sleep(0.05)
    assert not creating.done()  # waits for the old bridge rather than adopt it
    release.set()
    await creating
    await env.driver.settle()
    assert "pyb-shared" in env.kernel.names()
    assert env.driver.networks[NET_B].bridge_owned is True
    await env.driver.close()


async def test_delete_network_answers_once_its_rules_are_gone(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Docker may hand the subnet or the bridge name to another network as soon as `network
    rm` answers: rules of the removed network (masquerade, isolation drops) must be gone by
    then. Only the bridge, which has no address any more, may go just after."""
    real_apply = env.firewall.apply

    async def slow_apply(networks: Any, *, force: bool = False) -> None:
        await asyncio.sleep(0.02)  # iptables-restore takes its time
        await real_apply(networks, force=force)

    monkeypatch.setattr(env.firewall, "apply", slow_apply)
    await env.restart(inline_background=False)  # as the service runs
    await create_network(env.driver, NET_A)
    await create_network(env.driver, NET_B, "10.51.0.0/24", "10.51.0.1/24")
    await create_endpoint(env.driver, NET_A, EP_1, ports=True)
    await env.driver.delete_network(net_ref(NET_A))
    assert env.firewall.last_bridges() == {BR_B}
    assert env.kernel.addresses.get(BR_A, []) == []
    await env.driver.close()
    assert BR_A not in env.kernel.names()


async def test_forwarding_is_never_turned_on_with_a_forward_policy_of_accept(env: Env) -> None:
    """Turning forwarding on makes the host a router between all its interfaces: pybridge
    sets the FORWARD policy to DROP first (per family), and leaves a host that already
    forwards as it is."""
    await create_network(env.driver, NET_A, v6_subnet="fd00:50::/64", v6_gateway="fd00:50::1/64")
    assert env.firewall.forward_policy_dropped == [4, 6]
    assert env.sysctl.forwarding_on == {4: True, 6: True}
    await create_network(env.driver, NET_B, subnet="10.60.0.0/24", gateway="10.60.0.1/24")
    assert env.firewall.forward_policy_dropped == [4, 6]


async def test_retired_pairs_left_by_a_killed_run_go_in_one_request(env: Env) -> None:
    """Removed containers' pairs waiting to be deleted when pybridge was killed (Veths.retire)
    are deleted together at start-up; an endpoint's own pair is never in that group."""
    await create_network(env.driver, NET_A)
    await create_endpoint(env.driver, NET_A, EP_1)
    left = [(host_veth_name(hexid(f"x{i}")), container_veth_name(hexid(f"x{i}"))) for i in range(3)]
    for host, peer in left:
        env.kernel.add_veth_pair(host, peer)
        env.kernel.links_by_name[host].group = RETIRED_LINK_GROUP
    driver = await env.restart()
    env.kernel.calls.clear()
    repairs = await driver.reconcile()
    assert ("delete_retired", "") in env.kernel.calls
    assert "removed 3 leftover retired veth(s)" in repairs
    assert not {name for pair in left for name in pair} & env.kernel.names()
    assert {host_veth_name(EP_1), container_veth_name(EP_1)} <= env.kernel.names()
