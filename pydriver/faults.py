"""Fault injection for the crash tests: ``PYDRIVER_CRASH_AT=<point>`` makes the process kill
itself with SIGKILL when it reaches that point, exactly as a `kill -9` there would.
``PYDRIVER_DELAY_AT=<point>:<seconds>`` pauses there instead (for shutdown tests).

Unset (always, outside tests), each check is one dictionary lookup.
"""

from __future__ import annotations

import asyncio
import os
import signal

CRASH_ENV = "PYDRIVER_CRASH_AT"
DELAY_ENV = "PYDRIVER_DELAY_AT"


def _crash_points() -> frozenset[str]:
    return frozenset(p for p in os.environ.get(CRASH_ENV, "").split(",") if p)


def _delays() -> dict[str, float]:
    delays = {}
    for item in os.environ.get(DELAY_ENV, "").split(","):
        if ":" in item:
            point, seconds = item.rsplit(":", 1)
            delays[point] = float(seconds)
    return delays


_CRASH = _crash_points()
_DELAY = _delays()


async def point(name: str) -> None:
    """A place where a crash (or a pause) can be injected."""
    if name in _CRASH:
        os.kill(os.getpid(), signal.SIGKILL)
    delay = _DELAY.get(name)
    if delay:
        await asyncio.sleep(delay)
