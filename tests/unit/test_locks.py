"""Per-key locks, and kernel work kept apart from spare veth pairs being made."""

from __future__ import annotations

import asyncio

from pydriver.locks import KernelWork, KeyedLock


async def test_same_key_is_serialised_and_other_keys_are_not() -> None:
    locks = KeyedLock()
    events: list[str] = []
    gate = asyncio.Event()

    async def holder(key: str, name: str, wait: bool) -> None:
        async with locks.hold(key):
            events.append(f"{name} in")
            if wait:
                await gate.wait()
            events.append(f"{name} out")

    first = asyncio.create_task(holder("a", "first", True))
    await asyncio.sleep(0)
    second = asyncio.create_task(holder("a", "second", False))
    other = asyncio.create_task(holder("b", "other", False))
    await asyncio.sleep(0.01)
    # "other" ran to completion while "first" held "a"; "second" is still waiting
    assert events == ["first in", "other in", "other out"]
    gate.set()
    await asyncio.gather(first, second, other)
    assert events[3:] == ["first out", "second in", "second out"]


async def test_idle_locks_are_forgotten() -> None:
    locks = KeyedLock()
    async with locks.hold("x"), locks.hold("y"):
        assert set(locks._locks) == {"x", "y"}
    assert locks._locks == {}
    assert locks._users == {}


async def test_lock_is_released_on_error() -> None:
    locks = KeyedLock()
    try:
        async with locks.hold("x"):
            raise ValueError("boom")
    except ValueError:
        pass
    async with asyncio.timeout(1):
        async with locks.hold("x"):
            pass


async def test_kernel_work_and_a_spare_being_made_never_overlap() -> None:
    work = KernelWork()
    events: list[str] = []
    release_walk = asyncio.Event()

    async def walk(name: str, until: asyncio.Event | None = None) -> None:
        async with work.busy():
            events.append(f"{name} start")
            if until is not None:
                await until.wait()
            await asyncio.sleep(0)
            events.append(f"{name} end")

    async def spare() -> None:
        async with work.quiet():
            events.append("spare start")
            await asyncio.sleep(0)
            events.append("spare end")

    first = asyncio.create_task(walk("walk1", release_walk))
    await asyncio.sleep(0)
    making = asyncio.create_task(spare())
    await asyncio.sleep(0)
    # Work that comes while a spare is wanted waits for it: back to back, the work in progress
    # would otherwise never pause.
    second = asyncio.create_task(walk("walk2"))
    await asyncio.sleep(0.01)
    assert events == ["walk1 start"]
    release_walk.set()
    await asyncio.gather(first, making, second)
    assert events == [
        "walk1 start",
        "walk1 end",
        "spare start",
        "spare end",
        "walk2 start",
        "walk2 end",
    ]


async def test_kernel_work_runs_side_by_side() -> None:
    work = KernelWork()
    inside = 0
    most = 0

    async def walk() -> None:
        nonlocal inside, most
        async with work.busy():
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.01)
            inside -= 1

    await asyncio.gather(walk(), walk(), walk())
    assert most == 3


async def test_a_quiet_section_given_up_lets_kernel_work_go_at_once() -> None:
    work = KernelWork()
    release = asyncio.Event()

    async def long_write() -> None:
        async with work.busy():
            await release.wait()

    writing = asyncio.create_task(long_write())
    await asyncio.sleep(0)
    quiet = asyncio.create_task(work.quiet().__aenter__())
    await asyncio.sleep(0)
    quiet.cancel()
    await asyncio.gather(quiet, return_exceptions=True)
    started = asyncio.get_running_loop().time()
    async with work.busy():  # nobody wants a quiet moment any more: no yielding
        pass
    assert asyncio.get_running_loop().time() - started < work.YIELD_AT_MOST
    release.set()
    await writing


async def test_kernel_work_yields_to_a_waiting_quiet_section_only_for_a_moment() -> None:
    """A quiet section stuck behind a long rule write (iptables waiting for the xtables lock)
    must not hold up the next rule writes for long."""
    work = KernelWork()
    release = asyncio.Event()

    async def long_write() -> None:
        async with work.busy():
            await release.wait()

    async def spare() -> None:
        async with work.quiet():
            pass

    writing = asyncio.create_task(long_write())
    await asyncio.sleep(0)
    making = asyncio.create_task(spare())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with work.busy():
        waited = loop.time() - started
    assert work.YIELD_AT_MOST <= waited < work.YIELD_AT_MOST + 0.05
    assert not making.done()  # still waiting for the long write
    release.set()
    await asyncio.gather(writing, making)
