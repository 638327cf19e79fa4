"""Firewall self-healing without root: NetworkDriver.heal_firewall and the upkeep loop that
runs it, over the fake firewall (whose drift() reports what ``damaged`` says)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pydriver import protocol as p
from pydriver.errors import DriverError
from pydriver.metrics import Metrics
from pydriver.naming import bridge_name
from pydriver.upkeep import Intervals, Upkeep, _every

from .conftest import Env
from .fakes import create_network_body, hexid

NET = hexid("heal-net")
DAMAGE = "filter: pybridge rules differ (1 missing, 0 unexpected)"


async def with_network(env: Env) -> int:
    """A network, its rules written; how many writes that took."""
    await env.driver.create_network(p.parse_create_network(create_network_body(NET)))
    return len(env.firewall.applied)


async def test_nothing_wrong_writes_nothing(env: Env) -> None:
    writes = await with_network(env)
    assert await env.driver.heal_firewall(confirm_delay=0) == []
    assert len(env.firewall.applied) == writes


async def test_damage_that_stays_is_repaired_by_a_forced_write_and_logged(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    writes = await with_network(env)
    env.firewall.damaged = [DAMAGE]
    with caplog.at_level(logging.WARNING, logger="pydriver.firewall_writer"):
        assert await env.driver.heal_firewall(confirm_delay=0) == [DAMAGE]
    assert len(env.firewall.applied) == writes + 1
    assert env.firewall.forced == 1
    assert env.firewall.last_bridges() == {bridge_name(NET)}
    assert [r.getMessage() for r in caplog.records] == [
        f"firewall: {DAMAGE}; restoring pybridge's rules"
    ]
    # Repaired: the next look finds nothing.
    assert await env.driver.heal_firewall(confirm_delay=0) == []
    assert env.firewall.forced == 1


async def test_a_difference_gone_at_the_second_look_is_not_damage(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write under way (ours, or Docker's) can look like damage for a moment: only a
    difference still there after the confirmation delay is repaired."""
    writes = await with_network(env)
    looks: list[int] = []

    async def passing(networks: object) -> list[str]:
        looks.append(1)
        return [DAMAGE] if len(looks) == 1 else []

    monkeypatch.setattr(env.driver.firewall_writer, "_drift", passing)
    assert await env.driver.heal_firewall(confirm_delay=0) == []
    assert len(looks) == 2
    assert len(env.firewall.applied) == writes
    assert env.firewall.forced == 0


async def test_upkeep_counts_each_repair(env: Env) -> None:
    await with_network(env)
    upkeep = Upkeep(env.driver, env.ipam, Metrics(), Intervals())
    await upkeep.heal()
    assert upkeep.metrics.repairs["firewall"] == 0
    env.firewall.damaged = [DAMAGE, "raw: chain(s) PYBRIDGE-PREROUTING missing"]
    await upkeep.heal()
    assert upkeep.metrics.repairs["firewall"] == 2


async def test_an_upkeep_job_that_fails_runs_again(caplog: pytest.LogCaptureFixture) -> None:
    """Upkeep must never stop for good: a refused repair (DriverError) is a warning, anything
    else is logged with its traceback, and the job runs again at the next interval."""
    failures: list[BaseException] = [DriverError("iptables-restore failed"), RuntimeError("bug")]
    third = asyncio.Event()

    async def job() -> None:
        if failures:
            raise failures.pop(0)
        third.set()

    with caplog.at_level(logging.WARNING, logger="pydriver.upkeep"):
        task = asyncio.create_task(_every(0.001, job, "firewall check"))
        try:
            await asyncio.wait_for(third.wait(), timeout=5)
        finally:
            task.cancel()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "firewall check: iptables-restore failed"),
        ("ERROR", "firewall check failed"),
    ]
    assert caplog.records[1].exc_info is not None
