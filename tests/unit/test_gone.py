"""Endpoints whose containers are gone (their veth died with the container's namespace, and
Docker never deleted them): removed at start-up, evicted when a new endpoint needs what they
hold, collected in the background, and their addresses released only in the IPAM pool they
came from. Also: MACs unique within a network."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest

from pydriver import protocol as p
from pydriver.errors import Conflict
from pydriver.ipam import LOCAL_ADDRESS_SPACE
from pydriver.metrics import Metrics
from pydriver.model import Subnet
from pydriver.naming import container_veth_name, endpoint_mac, host_veth_name
from pydriver.upkeep import Intervals, Upkeep

from .conftest import Env
from .fakes import (
    create_endpoint_body,
    create_network_body,
    endpoint_ref_body,
    hexid,
    join_body,
)

NET = hexid("gone-net")
NET2 = hexid("gone-net-2")
EP1, EP2, EP3 = hexid("gone-ep-1"), hexid("gone-ep-2"), hexid("gone-ep-3")
SUBNET = "10.50.0.0/24"


def ip(text: str) -> Any:
    return ipaddress.ip_address(text)


async def pybridge_pool(env: Env, subnet: str = SUBNET) -> str:
    """A pool of pybridge's IPAM with its gateway, as Docker asks for it."""
    pool_id, _, ack = await env.ipam.request_pool(
        p.parse_request_pool({"AddressSpace": LOCAL_ADDRESS_SPACE, "Pool": subnet, "V6": False})
    )
    await ack()
    _, ack = await env.ipam.request_address(
        p.parse_request_address(
            {"PoolID": pool_id, "Options": {p.REQUEST_ADDRESS_TYPE: p.GATEWAY_ADDRESS_TYPE}}
        )
    )
    await ack()
    return pool_id


async def address(env: Env, pool_id: str) -> str:
    """A dynamic address from pybridge's IPAM, acknowledged."""
    iface, ack = await env.ipam.request_address(p.parse_request_address({"PoolID": pool_id}))
    await ack()
    return str(iface)


async def network(
    env: Env, network_id: str = NET, *, pybridge_ipam: bool = True, subnet: str = SUBNET
) -> None:
    space = LOCAL_ADDRESS_SPACE if pybridge_ipam else "LocalDefault"
    gateway = str(ipaddress.ip_network(subnet)[1]) + subnet[subnet.index("/") :]
    body = create_network_body(network_id, subnet, gateway, address_space=space)
    await env.driver.create_network(p.parse_create_network(body))


async def start(
    env: Env, endpoint: str, address: str, *, network_id: str = NET, port: int | None = None
) -> None:
    """CreateEndpoint, Join (Docker moves the container end away) and, with ``port``,
    ProgramExternalConnectivity publishing it."""
    await create(env, endpoint, address, network_id=network_id)
    await env.driver.join(p.parse_join(join_body(network_id, endpoint)))
    env.kernel.move_to_container(container_veth_name(endpoint))
    if port is not None:
        await program(env, endpoint, port, network_id=network_id)


async def create(env: Env, endpoint: str, address: str, *, network_id: str = NET) -> str | None:
    body = create_endpoint_body(network_id, endpoint, address)
    return await env.driver.create_endpoint(p.parse_create_endpoint(body))


async def program(env: Env, endpoint: str, port: int, *, network_id: str = NET) -> None:
    body = endpoint_ref_body(network_id, endpoint)
    body["Options"] = {
        p.PORT_MAP: [{"Proto": 6, "Port": 80, "HostPort": port, "HostPortEnd": port}]
    }
    await env.driver.program_external_connectivity(p.parse_program_external(body))


async def collect(env: Env, *, long_after: bool = False) -> None:
    """Two scans of the background collector (driver and upkeep), as the service runs them.
    ``long_after``: an hour after the endpoints were created."""
    if long_after:
        for endpoint in list(env.driver.endpoints.values()):
            env.driver.state.endpoints[endpoint.id] = endpoint.with_changes(created_at=0.0)
    upkeep = Upkeep(env.driver, env.ipam, Metrics(), Intervals())
    await upkeep.collect()
    await upkeep.collect()


async def container_dies(env: Env, endpoint: str) -> None:
    """The container's namespace goes, and the veth pair with it; Docker tells nobody."""
    await env.kernel.delete_link(host_veth_name(endpoint))


def allocated(env: Env, pool_id: str) -> set[str]:
    return {str(ipaddress.ip_address(v)) for v in env.ipam.pools[pool_id].allocated}


def published(env: Env) -> dict[str, list[int]]:
    return {
        e.id: [m.host_port for m in e.mappings] for e in env.driver.endpoints.values() if e.mappings
    }


# -- the network remembers which IPAM gave each subnet -----------------------------------------


async def test_network_records_its_pybridge_pool(env: Env) -> None:
    await network(env, NET)
    body = create_network_body(
        NET2,
        "10.60.0.0/24",
        "10.60.0.1/24",
        v6_subnet="fd00:60::/64",
        v6_gateway="fd00:60::1/64",
        address_space="PybridgeGlobal",
    )
    await env.driver.create_network(p.parse_create_network(body))
    await env.driver.create_network(
        p.parse_create_network(create_network_body(hexid("n3"), "10.70.0.0/24", "10.70.0.1/24"))
    )
    nets = {n.id: n for n in await env.store.load_networks()}
    assert [s.ipam_pool for s in nets[NET].subnets] == ["10.50.0.0/24"]
    assert [s.ipam_pool for s in nets[NET2].subnets] == ["10.60.0.0/24", "fd00:60::/64"]
    assert [s.ipam_pool for s in nets[hexid("n3")].subnets] == [None]  # Docker's IPAM
    # A record of an older pybridge: not pybridge's, so nothing of it is ever released.
    assert Subnet.from_dict({"pool": SUBNET, "gateway": None}).ipam_pool is None


async def test_addresses_in_pool_is_the_view_the_ipam_driver_gets(env: Env) -> None:
    pool_id = await pybridge_pool(env)
    await network(env)
    body = create_network_body(NET2, "10.60.0.0/24", "10.60.0.1/24")  # Docker's IPAM
    await env.driver.create_network(p.parse_create_network(body))
    await start(env, EP1, await address(env, pool_id))
    await start(env, EP2, "10.60.0.2/24", network_id=NET2)
    assert env.driver.state.addresses_in_pool(pool_id) == {ip("10.50.0.2")}
    assert env.driver.state.addresses_in_pool("10.60.0.0/24") is None  # not pybridge's pool


# -- background collection: by pool and address, and only what Docker will not release --------


async def test_collector_releases_nothing_in_another_ipams_pool_of_the_same_subnet(
    env: Env,
) -> None:
    """pybridge's IPAM serves 10.50.0.0/24 to a network of another driver; a pybridge network
    on the same subnet uses Docker's IPAM. A dead container of the latter must not free the
    address of a live container of the former."""
    pool_id = await pybridge_pool(env)
    other_drivers_container = await address(env, pool_id)  # 10.50.0.2, in use elsewhere
    await network(env, pybridge_ipam=False)
    await start(env, EP1, other_drivers_container)  # Docker's IPAM gave it the same address
    await container_dies(env, EP1)
    await collect(env)
    assert EP1 not in env.driver.endpoints
    assert "10.50.0.2" in allocated(env, pool_id)


async def test_collector_releases_a_dead_containers_address_in_its_own_pool(env: Env) -> None:
    pool_id = await pybridge_pool(env)
    await network(env)
    await start(env, EP1, await address(env, pool_id))
    await start(env, EP2, await address(env, pool_id))
    await container_dies(env, EP1)
    await collect(env)
    assert set(env.driver.endpoints) == {EP2}
    assert allocated(env, pool_id) == {"10.50.0.1", "10.50.0.3"}


async def test_collector_never_releases_for_an_endpoint_never_joined(env: Env) -> None:
    """An endpoint never joined may be what is left of a start that failed half-way: Docker
    then releases its address itself."""
    pool_id = await pybridge_pool(env)
    await network(env)
    await create(env, EP1, await address(env, pool_id))
    await collect(env, long_after=True)
    assert env.driver.endpoints == {}
    assert "10.50.0.2" in allocated(env, pool_id)


async def test_dockers_late_release_of_an_evicted_endpoint_spares_the_new_holder(
    env: Env,
) -> None:
    """Docker failed to delete an endpoint while pybridge was down and keeps it; pybridge
    evicted it and gave its address to a new container; when Docker finally deletes the old
    endpoint (at its next start), its ReleaseAddress must not free the new container's."""
    pool_id = await pybridge_pool(env, "10.50.0.0/30")  # one address for containers
    await network(env, subnet="10.50.0.0/30")
    only = await address(env, pool_id)
    await start(env, EP1, only)
    await container_dies(env, EP1)
    await collect(env)
    assert await address(env, pool_id) == only  # the new container gets it
    await start(env, EP2, only)
    await env.driver.delete_endpoint(p.parse_endpoint_ref(endpoint_ref_body(NET, EP1)))
    await env.ipam.release_address(
        p.parse_release_address({"PoolID": pool_id, "Address": only.split("/")[0]})
    )
    assert "10.50.0.2" in allocated(env, pool_id)


# -- start-up: endpoints whose veth is gone are removed before the socket is bound ------------


async def test_startup_removes_joined_endpoints_whose_veth_is_gone(env: Env) -> None:
    pool_id = await pybridge_pool(env)
    await network(env)
    await start(env, EP1, await address(env, pool_id), port=18100)  # its container dies
    await start(env, EP2, await address(env, pool_id), port=18101)  # lives on
    await create(env, EP3, await address(env, pool_id))  # not joined yet
    await container_dies(env, EP1)
    await env.kernel.delete_link(host_veth_name(EP3))
    driver = await env.restart()
    env.firewall.applied.clear()
    repairs = await driver.reconcile()
    assert any(r.startswith("removed endpoint") and host_veth_name(EP1) in r for r in repairs)
    assert set(driver.endpoints) == {EP2, EP3}  # the unjoined one's veth is recreated
    assert host_veth_name(EP3) in env.kernel.names()
    assert {m.host_port for m in env.host_ports.held} == {18101}
    assert len(env.firewall.applied) == 1  # one firewall write for everything
    assert [m.host_port for m in env.firewall.last[0].mappings] == [18101]
    assert allocated(env, pool_id) == {"10.50.0.1", "10.50.0.3", "10.50.0.4"}
    assert EP1 not in {e.id for e in await env.store.load_endpoints()}


async def test_startup_removal_releases_nothing_for_dockers_ipam(env: Env) -> None:
    pool_id = await pybridge_pool(env)
    taken_elsewhere = await address(env, pool_id)
    await network(env, pybridge_ipam=False)
    await start(env, EP1, taken_elsewhere, port=18100)
    await container_dies(env, EP1)
    driver = await env.restart()
    await driver.reconcile()
    assert driver.endpoints == {}
    assert "10.50.0.2" in allocated(env, pool_id)


# -- at run time: a dead endpoint never blocks a new one; a live one is never evicted ---------


async def test_program_evicts_a_dead_owner_of_the_host_port(env: Env) -> None:
    """dockerd crashed and restarted a `--restart always` container: a new endpoint wants the
    host port the old endpoint (its container gone, never deleted) still publishes."""
    pool_id = await pybridge_pool(env)
    await network(env)
    await start(env, EP1, await address(env, pool_id), port=18100)
    await container_dies(env, EP1)
    await start(env, EP2, await address(env, pool_id), port=18100)
    assert published(env) == {EP2: [18100]}
    assert EP1 not in env.driver.endpoints
    assert "10.50.0.2" not in allocated(env, pool_id)
    assert [m.host_port for m in env.firewall.last[0].mappings] == [18100]
    assert {m.container_ip for m in env.host_ports.held} == {ip("10.50.0.3")}


async def test_program_evicts_a_dead_owner_on_another_network(env: Env) -> None:
    await network(env, pybridge_ipam=False)
    body = create_network_body(NET2, "10.60.0.0/24", "10.60.0.1/24")
    await env.driver.create_network(p.parse_create_network(body))
    await start(env, EP1, "10.50.0.2/24", port=18100)
    await container_dies(env, EP1)
    await start(env, EP2, "10.60.0.2/24", network_id=NET2, port=18100)
    assert published(env) == {EP2: [18100]}


async def test_program_never_evicts_a_live_owner(env: Env) -> None:
    env.driver.publisher.dying_veth_wait = 0.3
    await network(env, pybridge_ipam=False)
    await start(env, EP1, "10.50.0.2/24", port=18100)
    started = asyncio.get_running_loop().time()
    with pytest.raises(Conflict, match=r"already published by pybridge for endpoint"):
        await start(env, EP2, "10.50.0.3/24", port=18100)
    assert asyncio.get_running_loop().time() - started >= 0.3  # looked again, then gave up
    assert published(env) == {EP1: [18100]}


async def test_program_waits_briefly_for_a_veth_the_kernel_is_removing(env: Env) -> None:
    """dockerd killed the old container just now: its namespace, and the veth with it, goes a
    moment later."""
    env.driver.publisher.dying_veth_wait = 2.0
    await network(env, pybridge_ipam=False)
    await start(env, EP1, "10.50.0.2/24", port=18100)
    await start(env, EP2, "10.50.0.3/24")

    async def namespace_teardown() -> None:
        await asyncio.sleep(0.3)
        await container_dies(env, EP1)

    teardown = asyncio.create_task(namespace_teardown())
    await program(env, EP2, 18100)
    await teardown
    assert published(env) == {EP2: [18100]}


async def test_program_evicts_an_owner_whose_sandbox_docker_destroyed(env: Env) -> None:
    """dockerd unmounted the old container's namespace from its SandboxKey (its cleanup after
    a crash, before it restarts the container); on a busy host the kernel may take seconds more
    to tear the namespace, and the veth, down: no need to wait for that."""
    released: set[str] = set()

    async def sandbox_released(key: str) -> bool:
        return key in released

    env.driver.eviction.sandbox_released = sandbox_released
    env.driver.publisher.dying_veth_wait = 0.0
    await network(env, pybridge_ipam=False)
    await start(env, EP1, "10.50.0.2/24", port=18100)
    old_key = env.driver.endpoints[EP1].sandbox_key
    assert old_key is not None
    await start(env, EP2, "10.50.0.3/24")
    with pytest.raises(Conflict):  # its sandbox is still there: live
        await program(env, EP2, 18100)
    released.add(old_key)
    await program(env, EP2, 18100)
    assert published(env) == {EP2: [18100]}
    assert EP1 not in env.driver.endpoints


async def test_program_never_evicts_an_owner_not_joined(env: Env) -> None:
    await network(env, pybridge_ipam=False)
    await create(env, EP1, "10.50.0.2/24")
    await program(env, EP1, 18100)  # published, not (yet) joined
    await env.kernel.delete_link(host_veth_name(EP1))
    with pytest.raises(Conflict, match=r"already published by pybridge for endpoint"):
        await start(env, EP2, "10.50.0.3/24", port=18100)
    assert EP1 in env.driver.endpoints


async def test_create_endpoint_evicts_a_dead_holder_of_its_address(env: Env) -> None:
    """Docker's IPAM forgot the dead endpoint and gives its address to the new one, which must
    get that address's usual MAC, not a second choice."""
    await network(env, pybridge_ipam=False)
    await start(env, EP1, "10.50.0.2/24", port=18100)
    await container_dies(env, EP1)
    mac = await create(env, EP2, "10.50.0.2/24")
    assert mac == endpoint_mac(EP2, ip("10.50.0.2")) == "02:50:0a:32:00:02"
    assert set(env.driver.endpoints) == {EP2}
    assert env.host_ports.held == set()


async def test_create_endpoint_keeps_a_live_holder_and_picks_another_mac(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    await network(env, pybridge_ipam=False)
    await start(env, EP1, "10.50.0.2/24")
    mac = await create(env, EP2, "10.50.0.2/24")
    assert set(env.driver.endpoints) == {EP1, EP2}
    assert mac == endpoint_mac(EP2, ip("10.50.0.2"), 1) != env.driver.endpoints[EP1].mac_address
    assert "also used by endpoint" in caplog.text


# -- MACs are unique within a network ------------------------------------------------------------


async def test_ipv6_only_endpoints_differing_above_the_low_32_bits_get_different_macs(
    env: Env,
) -> None:
    body = create_network_body(
        NET, None, None, v6_subnet="fd00:50::/64", v6_gateway="fd00:50::1/64"
    )
    await env.driver.create_network(p.parse_create_network(body))
    macs = []
    for endpoint, address in ((EP1, "fd00:50::1:0:0:2/64"), (EP2, "fd00:50::2:0:0:2/64")):
        body = create_endpoint_body(NET, endpoint, "", address_v6=address)
        macs.append(await env.driver.create_endpoint(p.parse_create_endpoint(body)))
    assert macs[0] != macs[1]
    assert macs[0] == endpoint_mac(EP1, ip("fd00:50::1:0:0:2"))  # from the address alone


async def test_a_mac_taken_in_the_network_is_resolved_deterministically(env: Env) -> None:
    body = create_network_body(
        NET, None, None, v6_subnet="fd00:50::/64", v6_gateway="fd00:50::1/64"
    )
    await env.driver.create_network(p.parse_create_network(body))
    wanted = endpoint_mac(EP2, ip("fd00:50::3"))
    # Another endpoint already has it (here: Docker was given it with --mac-address).
    ep1 = create_endpoint_body(NET, EP1, "", address_v6="fd00:50::2/64", mac=wanted)
    await env.driver.create_endpoint(p.parse_create_endpoint(ep1))
    ep2 = create_endpoint_body(NET, EP2, "", address_v6="fd00:50::3/64")
    mac = await env.driver.create_endpoint(p.parse_create_endpoint(ep2))
    assert mac == endpoint_mac(EP2, ip("fd00:50::3"), 1) != wanted
    # Once it is free again, the address gets its own MAC back.
    for endpoint in (EP1, EP2):
        await env.driver.delete_endpoint(p.parse_endpoint_ref(endpoint_ref_body(NET, endpoint)))
    mac = await env.driver.create_endpoint(p.parse_create_endpoint(ep2))
    assert mac == wanted
