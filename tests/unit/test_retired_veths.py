"""Removed containers' veths (Veths.retire): off their bridge at once, deleted together once
no endpoint has been made for RETIRED_IDLE, or when too many or too old; over the fake
kernel, in real (short) time."""

from __future__ import annotations

import asyncio
import time

import pytest

from pydriver import veths as veths_module
from pydriver.background import Background
from pydriver.errors import HostError
from pydriver.firewall_writer import FirewallWriter
from pydriver.model import Endpoint, Network
from pydriver.naming import RETIRED_LINK_GROUP, bridge_name
from pydriver.veths import RETIRED_IDLE, Veths

from .fakes import FakeKernel, hexid
from .test_checks import endpoint, network

NET = hexid("retired-net")


async def no_rules(*_: object, **__: object) -> None:
    return None


def make_veths(kernel: FakeKernel) -> Veths:
    background = Background(FirewallWriter(no_rules, list), inline=False)
    return Veths(kernel, background)


async def on_bridge(kernel: FakeKernel, veths: Veths, n: Network, endpoint_id: str) -> Endpoint:
    e = endpoint(hexid(endpoint_id), n.id)
    await veths.ensure(n, e, fresh=True)
    return e


def deletions(kernel: FakeKernel) -> int:
    return sum(1 for method, _ in kernel.calls if method == "delete_retired")


@pytest.fixture
async def setup() -> tuple[FakeKernel, Veths, Network]:
    kernel = FakeKernel()
    n = network(NET)
    kernel.add_link(bridge_name(NET), "bridge", up=True)
    return kernel, make_veths(kernel), n


async def test_a_retired_pair_leaves_its_bridge_at_once_and_goes_after_a_quiet_moment(
    setup: tuple[FakeKernel, Veths, Network],
) -> None:
    kernel, veths, n = setup
    e = await on_bridge(kernel, veths, n, "one")
    await veths.retire(e)
    host = kernel.links_by_name[e.host_veth]
    assert host.master is None
    assert host.group == kernel.links_by_name[e.container_veth].group == RETIRED_LINK_GROUP
    assert veths.retired == [e.host_veth]
    await asyncio.sleep(RETIRED_IDLE * 3)
    assert e.host_veth not in kernel.names()
    assert e.container_veth not in kernel.names()
    assert veths.retired == []


async def test_pairs_retired_while_endpoints_are_made_wait_and_go_in_one_request(
    setup: tuple[FakeKernel, Veths, Network],
) -> None:
    """Containers started back to back: the removed ones' pairs wait for the stream to pause,
    then go together."""
    kernel, veths, n = setup
    retired = []
    started = time.monotonic()
    for i in range(12):
        e = await on_bridge(kernel, veths, n, f"stream-{i}")
        if i % 2:
            await veths.retire(e)
            retired.append(e.host_veth)
        await asyncio.sleep(RETIRED_IDLE / 5)
    assert time.monotonic() - started > RETIRED_IDLE * 2
    assert set(veths.retired) == set(retired)
    assert set(retired) <= set(kernel.names())
    assert deletions(kernel) == 0
    await asyncio.sleep(RETIRED_IDLE * 3)
    assert not set(retired) & set(kernel.names())
    assert deletions(kernel) == 1


async def test_a_stream_that_does_not_pause_still_gets_its_pairs_deleted(
    setup: tuple[FakeKernel, Veths, Network], monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel, veths, n = setup
    monkeypatch.setattr(veths_module, "RETIRED_WAIT_AT_MOST", RETIRED_IDLE * 4)
    first = await on_bridge(kernel, veths, n, "first")
    await veths.retire(first)
    for i in range(30):
        await on_bridge(kernel, veths, n, f"busy-{i}")
        await asyncio.sleep(RETIRED_IDLE / 5)
    assert first.host_veth not in kernel.names()


async def test_many_retired_pairs_are_deleted_without_waiting_for_a_pause(
    setup: tuple[FakeKernel, Veths, Network], monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel, veths, n = setup
    monkeypatch.setattr(veths_module, "RETIRED_AT_MOST", 3)
    pairs = [await on_bridge(kernel, veths, n, f"many-{i}") for i in range(3)]
    for e in pairs:
        await veths.retire(e)
    await asyncio.sleep(0)  # the deleter runs, though an endpoint was made just now
    await asyncio.sleep(0)
    assert not {e.host_veth for e in pairs} & set(kernel.names())


async def test_when_the_kernel_refuses_the_group_they_are_deleted_one_by_one(
    setup: tuple[FakeKernel, Veths, Network],
) -> None:
    kernel, veths, n = setup
    kernel.fail["delete_retired"] = HostError("group 1887003250 holds a physical interface")
    pairs = [await on_bridge(kernel, veths, n, f"refused-{i}") for i in range(2)]
    for e in pairs:
        await veths.retire(e)
    await veths.settle()
    assert not {e.host_veth for e in pairs} & set(kernel.names())
    assert not {e.container_veth for e in pairs} & set(kernel.names())


async def test_settle_deletes_at_once(setup: tuple[FakeKernel, Veths, Network]) -> None:
    kernel, veths, n = setup
    e = await on_bridge(kernel, veths, n, "settle")
    await veths.retire(e)
    started = time.monotonic()
    await veths.settle()
    assert time.monotonic() - started < RETIRED_IDLE
    assert e.host_veth not in kernel.names()
    assert veths.retired == []


async def test_one_by_one_spares_a_pair_made_again_under_the_same_names(
    setup: tuple[FakeKernel, Veths, Network],
) -> None:
    """An endpoint created again with the same id (a replay) makes its pair again under the
    same names; the old pair's deletion by name must not take the new one."""
    kernel, veths, n = setup
    kernel.fail["delete_retired"] = HostError("group 1887003250 holds a physical interface")
    e = await on_bridge(kernel, veths, n, "again")
    await veths.retire(e)
    await veths.ensure(n, e, fresh=True)  # deletes the retired pair, makes a new one
    assert kernel.links_by_name[e.host_veth].group == 0
    await veths.settle()
    assert kernel.links_by_name[e.host_veth].master == n.bridge


async def test_a_retired_pair_is_down(setup: tuple[FakeKernel, Veths, Network]) -> None:
    """Down, the host end has no link-local address and the container's end no carrier: no
    way to the host through it while it waits (tests/privileged/test_kernel.py tries)."""
    kernel, veths, n = setup
    e = await on_bridge(kernel, veths, n, "down")
    assert kernel.links_by_name[e.host_veth].up
    await veths.retire(e)
    assert not kernel.links_by_name[e.host_veth].up
    assert not kernel.links_by_name[e.container_veth].up
    await veths.settle()


async def test_a_pair_that_cannot_be_retired_is_deleted_at_once(
    setup: tuple[FakeKernel, Veths, Network],
) -> None:
    kernel, veths, n = setup
    kernel.fail["retire"] = HostError("the kernel said no")
    e = await on_bridge(kernel, veths, n, "unretirable")
    await veths.retire(e)
    assert e.host_veth not in kernel.names()
    assert veths.retired == []


async def test_the_deleter_outlives_an_unexpected_failure(
    setup: tuple[FakeKernel, Veths, Network], monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel, veths, n = setup
    monkeypatch.setattr(veths_module, "RETIRED_RETRY", RETIRED_IDLE)
    kernel.fail["delete_retired"] = RuntimeError("a bug")  # type: ignore[assignment]
    e = await on_bridge(kernel, veths, n, "bug")
    await veths.retire(e)
    await veths.settle()  # gives up after one attempt when hurried
    assert veths.retired == [e.host_veth]
    await asyncio.sleep(RETIRED_IDLE * 2)  # tried again, failed again
    del kernel.fail["delete_retired"]
    await asyncio.sleep(RETIRED_IDLE * 3)  # and again, without another retire
    assert e.host_veth not in kernel.names()
    assert veths.retired == []


async def test_a_name_retired_again_is_as_old_as_now(
    setup: tuple[FakeKernel, Veths, Network],
) -> None:
    kernel, veths, n = setup
    first = await on_bridge(kernel, veths, n, "first-again")
    second = await on_bridge(kernel, veths, n, "second-again")
    await veths.retire(first)
    await veths.retire(second)
    await veths.retire(first)
    assert veths.retired == [second.host_veth, first.host_veth]
    await veths.settle()


async def test_close_waits_a_bounded_time(
    setup: tuple[FakeKernel, Veths, Network], monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel, veths, n = setup
    monkeypatch.setattr(veths_module, "CLOSE_WAIT", 0.05)
    stuck = asyncio.Event()

    async def never(*_: object) -> None:
        await stuck.wait()

    e = await on_bridge(kernel, veths, n, "stuck")
    monkeypatch.setattr(kernel, "delete_retired", never)
    await veths.retire(e)
    started = time.monotonic()
    await veths.close()
    assert time.monotonic() - started < 1
    stuck.set()
