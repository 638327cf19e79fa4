"""Docker 28's bridge options (issue 14) in the driver's decisions, over fakes: which addresses
go on the bridge, what Join gives, what the firewall is told, what GwAllocCheck answers, and
which endpoint options are refused. (The rules themselves: test_rules.py; ports: test_ports.py;
the packets: tests/privileged/test_bridge_options.py.)"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from pydriver import protocol as p
from pydriver.errors import Conflict, InvalidRequest
from pydriver.model import BridgeSettings
from pydriver.naming import bridge_name, host_veth_name
from pydriver.options import (
    BRIDGE_NAME,
    ENDPOINT_IFNAME,
    ENDPOINT_SYSCTLS,
    GATEWAY_MODE_IPV4,
    GATEWAY_MODE_IPV6,
    HOST_IPV4,
    HOST_IPV6,
    INHIBIT_IPV4,
    TRUSTED_HOST_INTERFACES,
)

from .conftest import Env
from .fakes import create_endpoint_body, create_network_body, hexid, join_body

NET = hexid("options-net")
EP = hexid("options-ep")
BR = bridge_name(NET)
V6: dict[str, Any] = {"v6_subnet": "fd00:50::/64", "v6_gateway": "fd00:50::1/64"}
ISOLATED = {GATEWAY_MODE_IPV4: "isolated", GATEWAY_MODE_IPV6: "isolated"}


def iface(text: str) -> Any:
    return ipaddress.ip_interface(text)


async def create(env: Env, generic: dict[str, str], **kw: Any) -> None:
    body = create_network_body(NET, generic=generic, **kw)
    await env.driver.create_network(p.parse_create_network(body))


async def endpoint_joined(env: Env, **kw: Any) -> Any:
    body = create_endpoint_body(NET, EP, address_v6="fd00:50::2/64", **kw)
    await env.driver.create_endpoint(p.parse_create_endpoint(body))
    return await env.driver.join(p.parse_join(join_body(NET, EP)))


async def delete(env: Env) -> None:
    await env.driver.delete_network(p.parse_network_ref({"NetworkID": NET}))


async def test_inhibit_ipv4_keeps_the_gateway_off_the_bridge_but_in_join(env: Env) -> None:
    """As Docker's own driver: the IPv4 gateway address is not put on the bridge, and still
    given in Join (the containers' gateway is elsewhere on the bridge's LAN)."""
    await create(env, {INHIBIT_IPV4: "true"}, **V6)
    assert env.kernel.addresses[BR] == [iface("fd00:50::1/64")]
    joined = await endpoint_joined(env)
    assert str(joined.gateway) == "10.50.0.1"
    assert str(joined.gateway_v6) == "fd00:50::1"
    assert env.firewall.last[0].gateways == (ipaddress.ip_address("fd00:50::1"),)
    await delete(env)
    assert BR not in env.kernel.names()


async def test_isolated_families_have_no_address_on_the_bridge(env: Env) -> None:
    """An older daemon (no GwAllocCheck) still sends gateways: they stay off the bridge, IPv6
    is disabled on it (not even link-local), and Join gives none (the network is internal)."""
    await create(env, ISOLATED, internal=True, **V6)
    assert env.kernel.addresses.get(BR, []) == []
    assert env.sysctl.value(BR, "disable_ipv6") == "1"
    joined = await endpoint_joined(env)
    assert (joined.gateway, joined.gateway_v6) == (None, None)
    view = env.firewall.last[0]
    assert (view.mode_v4, view.mode_v6, view.gateways) == ("isolated", "isolated", ())
    # After a restart the bridge is set up the same way again.
    env.sysctl.values[(BR, "disable_ipv6")] = "0"
    driver = await env.restart()
    await driver.reconcile()
    assert env.sysctl.value(BR, "disable_ipv6") == "1"
    assert env.kernel.addresses.get(BR, []) == []


async def test_one_isolated_family_leaves_the_other_on_the_bridge(env: Env) -> None:
    await create(env, {GATEWAY_MODE_IPV6: "isolated"}, internal=True, **V6)
    assert env.kernel.addresses[BR] == [iface("10.50.0.1/24")]
    assert env.sysctl.value(BR, "disable_ipv6") == "1"
    assert env.firewall.last[0].gateways == (ipaddress.ip_address("10.50.0.1"),)


async def test_an_adopted_bridge_gets_ipv6_back_after_an_isolated_network(env: Env) -> None:
    env.kernel.add_link("br-user", "bridge", up=True)
    await create(env, {**ISOLATED, BRIDGE_NAME: "br-user"}, internal=True, **V6)
    assert env.driver.networks[NET].previous_settings == BridgeSettings(
        accept_ra="1", disable_ipv6="0"
    )
    assert env.sysctl.value("br-user", "disable_ipv6") == "1"
    await delete(env)
    assert env.sysctl.value("br-user", "disable_ipv6") == "0"
    assert "br-user" in env.kernel.names()


@pytest.mark.parametrize(
    ("address", "mode_key"),
    [("10.50.0.254/24", GATEWAY_MODE_IPV4), ("fd00:50::fe/64", GATEWAY_MODE_IPV6)],
)
async def test_an_adopted_bridge_with_an_address_in_an_isolated_subnet_is_refused(
    env: Env, address: str, mode_key: str
) -> None:
    """The host on an isolated family's subnet would not be isolated from it."""
    env.kernel.add_link("br-user", "bridge", up=True)
    env.kernel.addresses["br-user"] = [iface(address)]
    with pytest.raises(Conflict) as err:
        await create(env, {mode_key: "isolated", BRIDGE_NAME: "br-user"}, internal=True, **V6)
    assert "gateway mode isolated keeps the host off" in str(err.value)
    assert env.kernel.addresses["br-user"] == [iface(address)]
    assert env.driver.networks == {}


async def test_routed_and_unprotected_networks_keep_their_gateways(env: Env) -> None:
    """Only isolated and inhibit_ipv4 take the gateway off the bridge: a routed network's
    containers route via it (their traffic is forwarded, not masqueraded)."""
    await create(env, {GATEWAY_MODE_IPV4: "routed", GATEWAY_MODE_IPV6: "nat-unprotected"}, **V6)
    assert env.kernel.addresses[BR] == [iface("10.50.0.1/24"), iface("fd00:50::1/64")]
    joined = await endpoint_joined(env)
    assert (str(joined.gateway), str(joined.gateway_v6)) == ("10.50.0.1", "fd00:50::1")
    view = env.firewall.last[0]
    assert (view.mode_v4, view.mode_v6) == ("routed", "nat-unprotected")


async def test_the_firewall_is_told_each_option(env: Env) -> None:
    await create(
        env,
        {TRUSTED_HOST_INTERFACES: "eth1:wg0", HOST_IPV4: "192.0.2.5", HOST_IPV6: "2001:db8::5"},
        **V6,
    )
    view = env.firewall.last[0]
    assert view.trusted == ("eth1", "wg0")
    assert (str(view.snat_v4), str(view.snat_v6)) == ("192.0.2.5", "2001:db8::5")


async def test_gw_alloc_check(env: Env) -> None:
    def check(generic: dict[str, str], internal: bool) -> tuple[bool, bool]:
        body = create_network_body(NET, generic=generic, internal=internal, **V6)
        return env.driver.gw_alloc_check(p.parse_gw_alloc_check(body))

    assert check({}, False) == (False, False)
    assert check(ISOLATED, True) == (True, True)
    assert check({INHIBIT_IPV4: "1"}, True) == (True, False)
    assert check({INHIBIT_IPV4: "1"}, False) == (False, False)
    with pytest.raises(InvalidRequest, match="only be used for an internal network"):
        check(ISOLATED, False)
    assert env.driver.networks == {}


async def test_endpoint_options(env: Env) -> None:
    """Sysctls (dockerd applies them) are accepted; the interface name, which a plugin never
    sees, is refused before anything is made."""
    await create(env, {})
    body = create_endpoint_body(NET, EP)
    body["Options"] = {ENDPOINT_SYSCTLS: "net.ipv4.conf.IFNAME.forwarding=1"}
    await env.driver.create_endpoint(p.parse_create_endpoint(body))
    other = hexid("options-ep-2")
    body = create_endpoint_body(NET, other, "10.50.0.3/24")
    body["Options"] = {ENDPOINT_IFNAME: "lan7"}
    with pytest.raises(InvalidRequest, match="cannot be honoured by a network plugin"):
        await env.driver.create_endpoint(p.parse_create_endpoint(body))
    assert host_veth_name(other) not in env.kernel.names()
    assert other not in env.driver.endpoints
