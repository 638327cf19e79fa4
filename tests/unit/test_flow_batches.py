"""netlink.py: addresses whose conntrack entries are to go are forgotten in batches (one walk
for all that wait), whatever a caller does meanwhile; and no request can become a flush of
the whole table. No kernel here: the walk is replaced."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from pydriver.errors import HostError
from pydriver.model import IPAddress
from pydriver.netlink import Flow, _NetlinkCore, delete_flows, flush_flows

A, B, C = (ipaddress.ip_address(f"10.213.9.{n}") for n in (1, 2, 3))


class Walks:
    """Stands in for _NetlinkCore._forget_addresses: records each batch, each walk waits for
    ``go`` (set at first) and raises ``fail`` (when set)."""

    def __init__(self) -> None:
        self.batches: list[set[IPAddress]] = []
        self.go = asyncio.Event()
        self.go.set()
        self.fail: Exception | None = None

    async def __call__(self, family: int, addresses: list[IPAddress]) -> int:
        self.batches.append(set(addresses))
        await self.go.wait()
        if self.fail is not None:
            raise self.fail
        return len(addresses)


def core_with(walks: Walks) -> _NetlinkCore:
    core = _NetlinkCore()
    core._forget_addresses = walks  # type: ignore[method-assign]
    return core


async def walking(address: IPAddress) -> tuple[Walks, _NetlinkCore, asyncio.Task[int]]:
    """A core whose first walk, for ``address``, is under way and waits for ``walks.go``."""
    walks = Walks()
    walks.go = asyncio.Event()
    core = core_with(walks)
    first = asyncio.create_task(core.forget_flows(address))
    await asyncio.sleep(0)
    return walks, core, first


async def test_addresses_asked_for_during_a_walk_share_the_next_one() -> None:
    walks, core, first = await walking(A)
    others = [asyncio.create_task(core.forget_flows(a)) for a in (B, C, B)]
    await asyncio.sleep(0)
    walks.go.set()
    assert await first == 1
    assert await asyncio.gather(*others) == [2, 2, 2]
    assert walks.batches == [{A}, {B, C}]


async def test_a_failed_walk_reaches_every_waiter_of_its_batch() -> None:
    walks = Walks()
    walks.fail = HostError("no memory")
    core = core_with(walks)
    results = await asyncio.gather(*(core.forget_flows(a) for a in (A, B)), return_exceptions=True)
    assert [str(r) for r in results] == ["no memory", "no memory"]


async def test_a_cancelled_leader_leaves_its_batch_to_the_next_holder() -> None:
    """X walks; A and B wait; A leads the batch {A, B} and is cancelled mid-walk: B is still
    forgotten (by the next holder of the lock), and does not wait forever."""
    walks, core, x = await walking(C)
    a = asyncio.create_task(core.forget_flows(A))
    b = asyncio.create_task(core.forget_flows(B))
    await asyncio.sleep(0)
    x_walk, walks.go = walks.go, asyncio.Event()  # A's walk waits for a new event
    x_walk.set()
    await x
    for _ in range(3):  # A takes the lock and starts the walk of {A, B}
        await asyncio.sleep(0)
    assert walks.batches[1] == {A, B}
    a.cancel()
    await asyncio.gather(a, return_exceptions=True)
    assert a.cancelled()
    walks.go.set()
    assert await asyncio.wait_for(b, 1) >= 1
    assert walks.batches[2] >= {B}


async def test_a_caller_that_gives_up_does_not_cancel_the_others() -> None:
    walks, core, x = await walking(C)
    impatient = asyncio.create_task(core.forget_flows(A))
    patient = asyncio.create_task(core.forget_flows(A))  # the same address: the same wait
    await asyncio.sleep(0)
    impatient.cancel()
    walks.go.set()
    await x
    assert await asyncio.wait_for(patient, 1) == 1


def test_a_delete_request_without_the_original_tuple_is_never_sent() -> None:
    """The kernel reads such a request as "flush the whole table"."""
    only_an_id = Flow(b"\n\xd5\t\x01", b"", b"\x08\x00\x0c\x00\x00\x00\x00\x01")
    assert delete_flows(socket.AF_INET, [only_an_id, Flow(b"", b"", b"")]) == 0


def test_the_filtered_flush_is_never_used_for_ipv6() -> None:
    with pytest.raises(ValueError, match="only right for IPv4"):
        flush_flows(socket.AF_INET6, bytes(16))
