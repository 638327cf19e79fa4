"""Spare veth pairs (spares.py): made in the background, taken by endpoints with their names,
deleted when no endpoint is to come; over the fake kernel."""

from __future__ import annotations

import pytest

from pydriver import protocol as p
from pydriver.driver import NetworkDriver
from pydriver.errors import HostError
from pydriver.naming import host_veth_name, is_spare_veth
from pydriver.spares import SpareVeths

from .conftest import Env
from .fakes import FakeKernel, create_endpoint_body, create_network_body, hexid

NET = hexid("spare-net")
EP1, EP2, EP3 = hexid("spare-ep1"), hexid("spare-ep2"), hexid("spare-ep3")


def spares_in(kernel: FakeKernel) -> set[str]:
    return {name for name in kernel.names() if is_spare_veth(name)}


async def test_spares_are_made_after_the_first_take_and_refilled() -> None:
    """The taker asks for the refill once done with the kernel (refill)."""
    kernel = FakeKernel()
    spares = SpareVeths(kernel, 2)
    assert spares.take() is None  # none made yet: the caller makes its own pair
    spares.refill()
    await spares.settle()
    assert len(spares.ready) == 2
    assert len(spares_in(kernel)) == 4  # two pairs, both ends
    for host, peer in spares.ready:
        link = kernel.links_by_name[host]
        assert link.peer == peer
        assert link.master is None
        assert not link.up
    host, peer = taken = spares.take() or ("", "")
    spares.refill()
    assert taken not in spares.ready
    await spares.settle()
    assert len(spares.ready) == 2  # made again
    assert {host, peer} <= spares_in(kernel)  # the taken pair is the taker's now
    await spares.close()
    assert spares_in(kernel) == {host, peer}


async def test_release_all_deletes_the_spares_until_the_next_take() -> None:
    kernel = FakeKernel()
    spares = SpareVeths(kernel, 3)
    spares.take()
    spares.refill()
    await spares.settle()
    spares.release_all()
    await spares.settle()
    assert spares.ready == []
    assert spares_in(kernel) == set()
    assert spares.take() is None
    spares.refill()
    await spares.settle()
    assert len(spares.ready) == 3
    await spares.close()
    assert spares_in(kernel) == set()


async def test_a_pair_being_made_at_shutdown_is_deleted() -> None:
    kernel = FakeKernel()
    spares = SpareVeths(kernel, 2)
    spares.take()  # starts making, does not wait
    spares.refill()
    await spares.close()
    assert spares_in(kernel) == set()
    assert spares.take() is None
    spares.refill()


async def test_a_failure_to_make_one_gives_up_until_the_next_take(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kernel = FakeKernel()
    kernel.fail["create_spare_veth"] = HostError("no memory")
    spares = SpareVeths(kernel, 2)
    spares.take()
    spares.refill()
    await spares.settle()
    assert spares.ready == []
    assert "could not make a spare veth pair: no memory" in caplog.text
    del kernel.fail["create_spare_veth"]
    spares.take()
    spares.refill()
    await spares.settle()
    assert len(spares.ready) == 2
    await spares.close()


async def test_no_spares_when_turned_off() -> None:
    kernel = FakeKernel()
    spares = SpareVeths(kernel, 0)
    assert spares.take() is None
    spares.refill()
    await spares.settle()
    assert kernel.names() == set()


# -- the driver ------------------------------------------------------------------------------


async def with_spares(env: Env, size: int = 2) -> NetworkDriver:
    driver = env.driver
    driver.spares = SpareVeths(env.kernel, size)
    body = create_network_body(NET, generic={"com.docker.network.driver.mtu": "1400"})
    await driver.create_network(p.parse_create_network(body))
    return driver


async def create_endpoint(driver: NetworkDriver, endpoint_id: str, address: str) -> None:
    body = create_endpoint_body(NET, endpoint_id, address)
    await driver.create_endpoint(p.parse_create_endpoint(body))


async def test_an_endpoint_takes_a_spare_pair_and_keeps_its_names(env: Env) -> None:
    driver = await with_spares(env)
    await create_endpoint(driver, EP1, "10.50.0.2/24")  # none ready yet: its own names
    assert driver.endpoints[EP1].host_veth == host_veth_name(EP1)
    await driver.spares.settle()
    host, peer = driver.spares.ready[0]
    await create_endpoint(driver, EP2, "10.50.0.3/24")
    endpoint = driver.endpoints[EP2]
    assert (endpoint.host_veth, endpoint.container_veth) == (host, peer)
    assert (await env.store.load_endpoints())[1].host_veth == host  # on disk before the answer
    bridge = driver.networks[NET].bridge
    link, peer_link = env.kernel.links_by_name[host], env.kernel.links_by_name[peer]
    assert (link.master, link.up, link.hairpin, link.mtu) == (bridge, True, True, 1400)
    assert (peer_link.mac, peer_link.mtu) == (endpoint.mac_address, 1400)
    await driver.delete_endpoint(p.EndpointRef(NET, EP2))
    assert host not in env.kernel.names()
    assert peer not in env.kernel.names()


async def test_a_spare_that_vanished_is_made_again_under_its_names(env: Env) -> None:
    driver = await with_spares(env, 1)
    await create_endpoint(driver, EP1, "10.50.0.2/24")
    await driver.spares.settle()
    host, peer = driver.spares.ready[0]
    await env.kernel.delete_link(host)  # the peer goes with it
    assert peer not in env.kernel.names()
    await create_endpoint(driver, EP2, "10.50.0.3/24")
    endpoint = driver.endpoints[EP2]
    assert (endpoint.host_veth, endpoint.container_veth) == (host, peer)
    assert env.kernel.links_by_name[host].master == driver.networks[NET].bridge


async def test_a_retried_create_keeps_the_names_its_first_attempt_recorded(env: Env) -> None:
    driver = await with_spares(env, 1)
    await create_endpoint(driver, EP1, "10.50.0.2/24")
    await driver.spares.settle()
    host, _ = driver.spares.ready[0]
    env.kernel.fail["attach_veth"] = HostError("interrupted")
    with pytest.raises(HostError):
        await create_endpoint(driver, EP2, "10.50.0.3/24")
    del env.kernel.fail["attach_veth"]
    assert EP2 not in driver.endpoints
    assert host not in env.kernel.names()
    await driver.spares.settle()
    await create_endpoint(driver, EP2, "10.50.0.3/24")
    assert is_spare_veth(driver.endpoints[EP2].host_veth)


async def test_the_last_network_going_deletes_the_spares(env: Env) -> None:
    driver = await with_spares(env)
    await create_endpoint(driver, EP1, "10.50.0.2/24")
    await driver.spares.settle()
    assert spares_in(env.kernel)
    await driver.delete_network(p.NetworkRef(NET))
    await driver.spares.settle()
    assert spares_in(env.kernel) == set()


async def test_start_up_removes_the_spares_a_stopped_run_left(env: Env) -> None:
    driver = await with_spares(env)
    await create_endpoint(driver, EP1, "10.50.0.2/24")
    await driver.spares.settle()
    await create_endpoint(driver, EP2, "10.50.0.3/24")  # takes one
    taken = driver.endpoints[EP2].host_veth
    left = {name for pair in driver.spares.ready for name in pair}
    assert left  # a kill -9 now leaves them
    driver = await env.restart()
    await driver.reconcile()
    assert not left & env.kernel.names()
    assert taken in env.kernel.names()  # an endpoint's pair stays


async def test_a_spare_taken_by_a_create_that_failed_before_using_it_is_kept(env: Env) -> None:
    driver = await with_spares(env, 1)
    await create_endpoint(driver, EP1, "10.50.0.2/24")
    await driver.spares.settle()
    [pair] = driver.spares.ready
    put = driver.state.put_endpoint

    async def failing_put(endpoint: object) -> None:
        raise HostError("disk full")

    driver.state.put_endpoint = failing_put  # type: ignore[method-assign]
    with pytest.raises(HostError, match="disk full"):
        await create_endpoint(driver, EP2, "10.50.0.3/24")
    driver.state.put_endpoint = put  # type: ignore[method-assign]
    assert driver.spares.ready == [pair]  # back, not leaked
    await create_endpoint(driver, EP2, "10.50.0.3/24")
    assert driver.endpoints[EP2].host_veth == pair[0]


async def test_a_spare_given_back_after_shutdown_is_deleted() -> None:
    kernel = FakeKernel()
    spares = SpareVeths(kernel, 1)
    spares.take()
    spares.refill()
    await spares.settle()
    pair = spares.take()
    assert pair is not None
    await spares.close()
    spares.give_back(pair)
    await spares.settle()
    assert spares_in(kernel) == set()
