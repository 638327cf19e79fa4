"""Background upkeep while pybridge serves: firewall self-healing, garbage collection of
endpoints whose containers vanished, and event-loop lag measurement. Never calls Docker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .driver import NetworkDriver
from .errors import DriverError
from .ipamdriver import IpamDriver
from .metrics import Metrics

log = logging.getLogger(__name__)

SCHEDSTAT = "/proc/thread-self/schedstat"


def _run_delay() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (0 if unknown)."""
    try:
        with open(SCHEDSTAT) as stat:
            return int(stat.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass(frozen=True)
class Intervals:
    heal: float = 2.0  # firewall drift checks
    gc: float = 10.0  # endpoint collection scans (two in a row must agree)
    lag: float = 0.1  # event loop probes


async def _every(seconds: float, job: Callable[[], Awaitable[None]], what: str) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except DriverError as err:
            log.warning("%s: %s", what, err)
        except Exception:  # upkeep must never stop for good
            log.exception("%s failed", what)


class Upkeep:
    def __init__(
        self, driver: NetworkDriver, ipam: IpamDriver, metrics: Metrics, intervals: Intervals
    ) -> None:
        self.driver = driver
        self.ipam = ipam
        self.metrics = metrics
        self.intervals = intervals
        self._suspects: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        jobs = [
            (self.intervals.heal, self.heal, "firewall check"),
            (self.intervals.gc, self.collect, "endpoint collection"),
        ]
        self._tasks = [asyncio.create_task(_every(s, job, what)) for s, job, what in jobs if s > 0]
        self._tasks.append(asyncio.create_task(self._measure_lag()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def heal(self) -> None:
        problems = await self.driver.heal_firewall()
        self.metrics.count_repairs("firewall", len(problems))

    async def collect(self) -> None:
        # The driver releases the IPAM addresses of what it removes (see collect_garbage).
        self._suspects, removed = await self.driver.collect_garbage(self._suspects, time.time())
        self.metrics.count_repairs("stale_endpoint", len(removed))
        released = await self.ipam.release_unclaimed()
        self.metrics.count_repairs("unclaimed_address", len(released))

    async def _measure_lag(self) -> None:
        """How late a timer fires, minus the time the kernel kept this thread waiting for a
        CPU (schedstat run_delay): what is left is time the loop itself was busy or blocked,
        which is what a handler that blocks would cause. Raw lateness is kept as well."""
        loop = asyncio.get_running_loop()
        interval = self.intervals.lag
        while True:
            started, waited = loop.time(), _run_delay()
            await asyncio.sleep(interval)
            late = max(0.0, loop.time() - started - interval)
            starved = max(0.0, _run_delay() - waited)
            self.metrics.observe_lag(max(0.0, late - starved), raw=late)
