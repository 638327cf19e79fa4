"""Stale flows (issue 17, with issue 12's promise kept): DeleteEndpoint answers before the
removed endpoint's connection-tracking entries are forgotten, and nothing gets its address
before they are: a CreateEndpoint for it waits, so does DeleteNetwork, and a run that stopped
in between has them forgotten at the next start."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import Any

import pytest

from pydriver import protocol as p
from pydriver.errors import HostError
from pydriver.flows import META_KEY, StaleFlows
from pydriver.model import IPAddress
from pydriver.naming import container_veth_name

from .conftest import Env
from .fakes import FakeKernel, FakeStore, create_endpoint_body, endpoint_ref_body
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


async def test_a_refusal_is_tried_again_then_logged_and_the_address_freed() -> None:
    """A busy socket or a memory shortage passes: tried again. A kernel that keeps refusing
    is logged, and the address freed: the entries time out on their own, and nothing may wait
    forever for them."""
    store, kernel = FakeStore(), FakeKernel()
    kernel.fail["forget_flows"] = HostError("busy")
    flows = StaleFlows(store, kernel, retry_delays=(0, 0))
    await flows.record([ADDRESS])
    await flows.forget([ADDRESS])
    await asyncio.wait_for(flows.settled([ADDRESS]), 1)
    assert kernel.calls == [("forget_flows", str(ADDRESS))] * 3
    assert flows.pending == []
    assert json.loads(await store.get_meta(META_KEY) or "") == []


async def test_any_error_is_tried_again_and_never_escapes_the_task() -> None:
    store, kernel = FakeStore(), FakeKernel()
    kernel.fail["forget_flows"] = RuntimeError("a bug")  # type: ignore[assignment]
    flows = StaleFlows(store, kernel, retry_delays=(0,))
    await flows.record([ADDRESS])
    await flows.forget([ADDRESS])
    await asyncio.wait_for(flows.settled([ADDRESS]), 1)
    del kernel.fail["forget_flows"]
    await flows.forget([ADDRESS])  # recorded again by the next removal: a new task
    await flows.settled_all()
    assert flows.pending == []


async def test_an_address_asked_for_again_while_its_flows_are_read_is_read_again() -> None:
    """Its task may have read the table before the newer holder's last flows existed."""
    store, kernel = FakeStore(), FakeKernel()
    gate = hold_forgetting(kernel)
    flows = StaleFlows(store, kernel)
    await flows.record([ADDRESS])
    await flows.forget([ADDRESS])
    await asyncio.sleep(0)
    await flows.forget([ADDRESS])  # a second removal of the address meanwhile
    gate.set()
    await flows.settled_all()
    assert kernel.calls == [("forget_flows", str(ADDRESS))] * 2


async def test_delete_network_waits_only_for_its_own_subnets() -> None:
    store, kernel = FakeStore(), FakeKernel()
    gate = hold_forgetting(kernel)
    flows = StaleFlows(store, kernel)
    elsewhere = ipaddress.ip_address("10.60.0.7")
    await flows.record([elsewhere])
    await flows.forget([elsewhere])
    await asyncio.wait_for(flows.settled_in([ipaddress.ip_network("10.50.0.0/24")]), 1)
    waiting = asyncio.create_task(flows.settled_in([ipaddress.ip_network("10.60.0.0/24")]))
    await asyncio.sleep(0.02)
    assert not waiting.done()
    gate.set()
    await asyncio.wait_for(waiting, 1)


async def test_an_unreadable_record_is_ignored() -> None:
    store, kernel = FakeStore(), FakeKernel()
    await store.set_meta(META_KEY, "not json")
    flows = StaleFlows(store, kernel)
    await flows.load()
    assert flows.pending == []


async def test_the_flows_go_even_when_the_removal_fails_half_way(env: Env) -> None:
    """Docker releases the address whatever DeleteEndpoint answers: a failed rule write must
    not leave the flows for the next holder."""
    await create_network(env.driver, NET_A)
    await create_endpoint(env.driver, NET_A, EP_1, ports=True)
    body = {**endpoint_ref_body(NET_A, EP_1)}
    body["Options"] = create_endpoint_body(NET_A, EP_1, ports=True)["Options"]
    await env.driver.program_external_connectivity(p.parse_program_external(body))
    env.kernel.calls.clear()
    env.firewall.fail = HostError("iptables-restore failed")
    with pytest.raises(HostError):
        await env.driver.delete_endpoint(ref(NET_A, EP_1))
    assert ("forget_flows", str(ADDRESS)) in env.kernel.calls


async def test_an_address_recorded_again_stays_on_disk_until_handed_over() -> None:
    """A removal records the address while an earlier task for it is still running (a start
    after a crash, say); that task ends before the removal hands the address over: a crash
    then must still find it on disk."""
    store, kernel = FakeStore(), FakeKernel()
    gate = hold_forgetting(kernel)
    flows = StaleFlows(store, kernel)
    await flows.record([ADDRESS])
    await flows.forget([ADDRESS])
    await flows.record([ADDRESS])  # the next removal of the address, not handed over yet
    gate.set()
    await flows.settled_all()
    assert json.loads(await store.get_meta(META_KEY) or "") == [str(ADDRESS)]
    await flows.forget([ADDRESS])
    await flows.settled_all()
    assert json.loads(await store.get_meta(META_KEY) or "") == []


async def test_shutdown_leaves_what_is_slow_for_the_next_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("pydriver.flows.CLOSE_WAIT", 0.05)
    store, kernel = FakeStore(), FakeKernel()
    hold_forgetting(kernel)  # never released
    flows = StaleFlows(store, kernel)
    await flows.record([ADDRESS])
    await flows.forget([ADDRESS])
    await asyncio.wait_for(flows.close(), 1)
    await asyncio.sleep(0)
    assert flows.pending == []
    assert json.loads(await store.get_meta(META_KEY) or "") == [str(ADDRESS)]
