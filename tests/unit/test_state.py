"""The driver's records in memory, written through to the store (state.py), and the firewall's
view of them (rules.firewall_views)."""

from __future__ import annotations

import dataclasses
import ipaddress
import random

import pytest

from pydriver.errors import HostError, NotFound
from pydriver.model import Endpoint, Network, PortMapping, Subnet
from pydriver.naming import container_veth_name, host_veth_name
from pydriver.ports import find_conflict
from pydriver.rules import firewall_view, firewall_views
from pydriver.state import State

from .fakes import FakeStore, hexid

NET, NET2 = hexid("state-net"), hexid("state-net-2")
EP1, EP2, EP3 = hexid("state-ep-1"), hexid("state-ep-2"), hexid("state-ep-3")
NET3 = hexid("state-net-3")


def network(network_id: str = NET, subnet: str = "10.50.0.0/24", **changes: object) -> Network:
    pool = ipaddress.ip_network(subnet)
    gateway = ipaddress.ip_interface(f"{pool[1]}/{pool.prefixlen}")
    record = Network(
        id=network_id,
        bridge="pyb-" + network_id[:11],
        bridge_owned=True,
        subnets_v4=(Subnet(pool, gateway, ipam_pool=str(pool)),),
        subnets_v6=(),
    )
    return record.with_changes(**changes)


def endpoint(endpoint_id: str, address: str, network_id: str = NET, **changes: object) -> Endpoint:
    record = Endpoint(
        id=endpoint_id,
        network_id=network_id,
        host_veth=host_veth_name(endpoint_id),
        container_veth=container_veth_name(endpoint_id),
        mac_address="02:50:0a:32:00:02",
        mac_generated=True,
        address=ipaddress.IPv4Interface(address),
    )
    return record.with_changes(**changes)


def mapping(host_port: int, container: str = "10.50.0.2") -> PortMapping:
    return PortMapping("tcp", None, host_port, ipaddress.ip_address(container), 80)


async def test_every_change_is_stored_before_it_is_seen() -> None:
    store = FakeStore()
    state = State(store)
    await state.put_network(network())
    await state.put_endpoint(endpoint(EP1, "10.50.0.2/24"))
    assert [n.id for n in await store.load_networks()] == [NET]
    assert [e.id for e in await store.load_endpoints()] == [EP1]
    # What the store refused is not seen either.
    store.fail["put_endpoint"] = HostError("disk full")
    with pytest.raises(HostError):
        await state.put_endpoint(endpoint(EP2, "10.50.0.3/24"))
    assert set(state.endpoints) == {EP1}
    store.fail["delete_endpoint"] = HostError("disk full")
    with pytest.raises(HostError):
        await state.drop_endpoint(EP1)
    assert set(state.endpoints) == {EP1}
    # A restart sees what was stored.
    again = State(store)
    await again.load()
    assert again.networks == state.networks
    assert again.endpoints == state.endpoints


async def test_dropping_a_network_drops_its_endpoints_as_the_store_does() -> None:
    store = FakeStore()
    state = State(store)
    await state.put_network(network())
    await state.put_network(network(NET2, "10.60.0.0/24"))
    await state.put_endpoint(endpoint(EP1, "10.50.0.2/24"))
    await state.put_endpoint(endpoint(EP2, "10.60.0.2/24", NET2))
    await state.drop_network(NET)
    assert set(state.networks) == {NET2}
    assert set(state.endpoints) == {EP2}
    assert [e.id for e in await store.load_endpoints()] == [EP2]


async def test_queries() -> None:
    state = State(FakeStore())
    await state.put_network(network())
    await state.put_network(network(NET2, "10.60.0.0/24", state="creating"))
    one = endpoint(EP1, "10.50.0.2/24", mappings=(mapping(8080),))
    two = endpoint(EP2, "10.50.0.3/24", mappings=(mapping(8081, "10.50.0.3"),))
    await state.put_endpoint(one)
    await state.put_endpoint(two)
    assert state.ready_network(NET).id == NET
    with pytest.raises(NotFound, match="is not known to pybridge"):
        state.ready_network(NET2)  # still being created
    assert state.endpoint_on(NET, EP1) == one
    assert state.endpoint_on(NET2, EP1) is None  # the ids Docker sends must agree
    assert state.endpoints_of(NET) == [one, two]
    assert list(state.mappings_of_others(EP1)) == [mapping(8081, "10.50.0.3")]
    assert state.publisher_of(mapping(8080)) == one
    assert state.publisher_of(mapping(9999)) is None


async def test_addresses_of_pybridge_ipam_pools() -> None:
    state = State(FakeStore())
    await state.put_network(network())
    pool = ipaddress.ip_network("10.60.0.0/24")
    gateway = ipaddress.ip_interface("10.60.0.1/24")
    # Docker's own IPAM gave this one: no pybridge pool is named.
    await state.put_network(network(NET2, subnets_v4=(Subnet(pool, gateway),)))
    await state.put_endpoint(endpoint(EP1, "10.50.0.2/24"))
    await state.put_endpoint(endpoint(EP2, "10.60.0.2/24", NET2))
    assert state.addresses_in_pool("10.50.0.0/24") == {ipaddress.ip_address("10.50.0.2")}
    assert state.addresses_in_pool("10.60.0.0/24") is None  # not pybridge's pool
    owned = state.owned_addresses([state.endpoints[EP1], state.endpoints[EP2]])
    assert owned == [("10.50.0.0/24", ipaddress.ip_address("10.50.0.2"))]


async def test_the_firewall_sees_every_network_but_those_being_deleted() -> None:
    state = State(FakeStore())
    await state.put_network(network())
    await state.put_network(network(NET2, "10.60.0.0/24", state="deleting"))
    await state.put_endpoint(endpoint(EP1, "10.50.0.2/24", mappings=(mapping(8080),)))
    await state.put_endpoint(endpoint(EP3, "10.60.0.2/24", NET2, mappings=(mapping(8081),)))
    assert state.firewall_views() == [firewall_view(state.networks[NET], [mapping(8080)])]
    assert firewall_views(state.networks.values(), state.endpoints.values()) == (
        state.firewall_views()
    )
    view = state.firewall_views()[0]
    assert view.gateways == (ipaddress.ip_address("10.50.0.1"),)
    assert view.subnets_v4 == (ipaddress.ip_network("10.50.0.0/24"),)


async def test_the_holders_of_an_address_or_a_mac_follow_every_change() -> None:
    """What a new endpoint's checks look up instead of going through every endpoint."""
    ip = ipaddress.ip_address
    store = FakeStore()
    state = State(store)
    await state.put_network(network())
    await state.put_network(network(NET2, "10.60.0.0/24"))
    await state.put_endpoint(endpoint(EP1, "10.50.0.2/24"))
    await state.put_endpoint(endpoint(EP2, "10.50.0.3/24", mac_address="02:00:00:00:00:02"))
    await state.put_endpoint(endpoint(EP3, "10.50.0.2/24", network_id=NET2))
    assert [e.id for e in state.holders(NET, [ip("10.50.0.2")])] == [EP1]  # not NET2's
    assert {e.id for e in state.holders(NET, [ip("10.50.0.2"), "02:00:00:00:00:02"])} == {
        EP1,
        EP2,
    }
    assert state.mac_taken(NET, "02:50:0a:32:00:02", but=EP2)
    assert not state.mac_taken(NET, "02:50:0a:32:00:02", but=EP1)  # only its own
    # Replaced: the old address and MAC are no longer held.
    await state.put_endpoint(endpoint(EP1, "10.50.0.9/24", mac_address="02:00:00:00:00:09"))
    assert state.holders(NET, [ip("10.50.0.2"), "02:50:0a:32:00:02"]) == []
    assert [e.id for e in state.holders(NET, [ip("10.50.0.9")])] == [EP1]
    await state.drop_endpoint(EP1)
    assert state.holders(NET, [ip("10.50.0.9"), "02:00:00:00:00:09"]) == []
    await state.drop_network(NET2)
    assert state.holders(NET2, [ip("10.50.0.2")]) == []
    # Loaded from the store: the same answers.
    again = State(store)
    await again.load()
    assert [e.id for e in again.holders(NET, [ip("10.50.0.3")])] == [EP2]
    assert again.mac_taken(NET, "02:00:00:00:00:02", but=EP1)


async def test_the_indexes_answer_as_a_pass_over_every_endpoint_would() -> None:
    """Port checks, the firewall's views and the IPAM's "is this address in use" look at
    indexes kept beside the endpoints (the same cost with 1 and 1,000 endpoints); through a
    random sequence of changes they answer what a pass over every endpoint answers."""
    ip, net = ipaddress.ip_address, ipaddress.ip_network
    rng = random.Random(17)
    store = FakeStore()
    state = State(store)
    v6 = Subnet(
        net("fd00:50::/64"), ipaddress.ip_interface("fd00:50::1/64"), ipam_pool="fd00:50::/64"
    )
    two_pools = (  # one network, a subnet from each of two pools
        Subnet(net("10.70.0.0/25"), ipaddress.ip_interface("10.70.0.1/25"), ipam_pool="pool-a"),
        Subnet(net("10.70.0.128/25"), ipaddress.ip_interface("10.70.0.129/25"), ipam_pool="pool-b"),
    )
    networks = {
        NET: network(subnets_v6=(v6,)),
        NET2: network(NET2, "10.60.0.0/24"),
        NET3: network(NET3, subnets_v4=two_pools),
    }
    prefixes = {NET: "10.50.0", NET2: "10.60.0", NET3: "10.70.0"}
    pools = {"10.50.0.0/24": [NET], "fd00:50::/64": [NET], "10.60.0.0/24": [NET2]}
    pools |= {"pool-a": [NET3], "pool-b": [NET3]}
    for record in networks.values():
        await state.put_network(record)
    ids = [hexid(f"index-ep-{n}") for n in range(12)]
    ports = [mapping(8000 + n, f"10.50.0.{n + 2}") for n in range(6)]
    for step in range(500):
        endpoint_id = rng.choice(ids)
        roll = rng.random()
        if roll < 0.03:  # a network goes, with its endpoints, and comes back
            gone = rng.choice(list(networks))
            await state.drop_network(gone)
            await state.put_network(networks[gone])
        elif roll < 0.25:
            await state.drop_endpoint(endpoint_id)
        else:
            network_id = rng.choice(list(networks))
            last = rng.choice([2, 3, 4, 5, 100, 130, 140, 200])
            changes: dict[str, object] = {
                "mappings": tuple(rng.sample(ports, rng.choice([0, 0, 1, 2])))
            }
            if network_id == NET and rng.random() < 0.5:
                changes["address_v6"] = ipaddress.IPv6Interface(f"fd00:50::{last:x}/64")
            address = f"{prefixes[network_id]}.{last}/24"
            await state.put_endpoint(endpoint(endpoint_id, address, network_id, **changes))
        if step % 50 == 49:  # as loaded from the store, into the same State
            await state.load()
        everyone = list(state.endpoints.values())
        for other in ids:
            assert list(state.mappings_of_others(other)) == [
                m for e in everyone if e.id != other for m in e.mappings
            ]
        for port in ports:
            assert state.publisher_of(port) == next(
                (e for e in everyone if port in e.mappings), None
            )
            clashing = dataclasses.replace(port, container_ip=ip("10.50.0.250"))
            for other in ids:
                others = [m for e in everyone if e.id != other for m in e.mappings]
                found = state.ports.conflict([clashing], ignore=other)
                assert found == find_conflict([clashing], others)
        assert state.firewall_views() == firewall_views(state.networks.values(), everyone)
        for pool_id, holders in pools.items():
            pool_subnets = [
                s.pool for n in holders for s in state.networks[n].subnets if s.ipam_pool == pool_id
            ]
            used = {
                a.ip
                for e in everyone
                if e.network_id in holders
                for a in (e.address, e.address_v6)
                if a is not None and any(a.ip in pool for pool in pool_subnets)
            }
            in_use = state.addresses_in_pool(pool_id)
            assert in_use is not None
            assert set(in_use) == used
            assert in_use == used
            assert len(in_use) == len(used)
            assert (in_use & used) == used  # the set operators give plain sets
            candidates = [ip(f"{p}.{n}") for p in prefixes.values() for n in (2, 3, 100, 130)]
            for candidate in [*candidates, ip("fd00:50::2"), ip("fd00:50::82")]:
                assert (candidate in in_use) == (candidate in used), (pool_id, candidate)
