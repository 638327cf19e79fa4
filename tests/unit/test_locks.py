"""Per-key locks."""

from __future__ import annotations

import asyncio

from pydriver.locks import KeyedLock


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
