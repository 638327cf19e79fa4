"""Stale flows (issue 17, with issue 12's promise kept): DeleteEndpoint answers before the
removed endpoint's connection-tracking entries are forgotten, and nothing gets its address
before they are: a CreateEndpoint for it waits, so does DeleteNetwork, and a run that stopped
in between has them forgotten at the next start."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import Any

from pydriver.flows import META_KEY, StaleFlows
from pydriver.model import IPAddress
from pydriver.naming import container_veth_name

from .conftest import Env
from .fakes import FakeKernel, FakeStore
from .test_driver import EP_1, EP_2, NET_A, create_endpoint, create_network, net_ref, ref

ADDRESS = ipaddress.ip_address("10.50.0.2")


def hold_forgetting(kernel: FakeKernel) -> asyncio.Event:
    """Make the kernel's forget_flows wait until the returned event is set."""
    gate = asyncio.Event()
    forget = kernel.forget_flows

    async def held(address: IPAddress, *args: Any) -> int:
        await gate.wait()
        return await forget(address, *args)

    kernel.forget_flows = held  # type: ignore[method-assign,assignment]
    return gate


async def recorded(env: Env) -> list[str]:
    return list(json.loads(await env.store.get_meta(META_KEY) or "[]"))


async def test_an_address_is_not_used_again_before_the_flows_of_its_last_holder_are_gone(
    env: Env,
) -> None:
    driver = await env.restart(inline_background=False)
    await create_network(driver, NET_A)
    await create_endpoint(driver, NET_A, EP_1)
    gate = hold_forgetting(env.kernel)
    await asyncio.wait_for(driver.delete_endpoint(ref(NET_A, EP_1)), 1)  # answered at once
    assert await recorded(env) == [str(ADDRESS)]  # on disk before the answer
    # Docker's IPAM gives the address to the next container at once.
    creating = asyncio.create_task(create_endpoint(driver, NET_A, EP_2))
    await asyncio.sleep(0.05)
    assert not creating.done()
    assert container_veth_name(EP_2) not in env.kernel.names()
    gate.set()
    await asyncio.wait_for(creating, 1)
    assert ("forget_flows", str(ADDRESS)) in env.kernel.calls
    assert container_veth_name(EP_2) in env.kernel.names()
    await driver.settle()
    assert await recorded(env) == []


async def test_delete_network_waits_for_the_stale_flows(env: Env) -> None:
    """After DeleteNetwork any driver may hand out the subnet's addresses."""
    driver = await env.restart(inline_background=False)
    await create_network(driver, NET_A)
    await create_endpoint(driver, NET_A, EP_1)
    gate = hold_forgetting(env.kernel)
    await driver.delete_endpoint(ref(NET_A, EP_1))
    deleting = asyncio.create_task(driver.delete_network(net_ref(NET_A)))
    await asyncio.sleep(0.05)
    assert not deleting.done()
    gate.set()
    await asyncio.wait_for(deleting, 1)
    assert ("forget_flows", str(ADDRESS)) in env.kernel.calls
    await driver.settle()


async def test_flows_recorded_by_a_run_that_stopped_are_forgotten_at_the_next_start() -> None:
    store, kernel = FakeStore(), FakeKernel()
    await StaleFlows(store, kernel).record([ADDRESS])  # then killed before forgetting
    assert kernel.calls == []
    restarted = StaleFlows(store, kernel)
    await restarted.load()
    assert restarted.pending == [ADDRESS]
    await restarted.settled_all()
    assert kernel.calls == [("forget_flows", str(ADDRESS))]
    assert json.loads(await store.get_meta(META_KEY) or "") == []


async def test_a_failure_to_forget_is_logged_and_the_address_freed() -> None:
    """As before: entries time out on their own; nothing waits forever for them."""
    from pydriver.errors import HostError

    store, kernel = FakeStore(), FakeKernel()
    kernel.fail["forget_flows"] = HostError("no conntrack")
    flows = StaleFlows(store, kernel)
    await flows.record([ADDRESS])
    await flows.forget([ADDRESS])
    await asyncio.wait_for(flows.settled([ADDRESS]), 1)
    assert flows.pending == []


async def test_an_unreadable_record_is_ignored() -> None:
    store, kernel = FakeStore(), FakeKernel()
    await store.set_meta(META_KEY, "not json")
    flows = StaleFlows(store, kernel)
    await flows.load()
    assert flows.pending == []
