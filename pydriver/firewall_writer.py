"""One writer for the firewall: changes ask for a write, one task makes it.

Requests bump a generation; the writer renders the state as it is when it runs, so many
requests in a burst (thirty containers starting at once) become one write, and a request for
the state last written (nothing changed since) none. A caller that must
not go on before its rules are in place (creating or removing a network) waits for its
generation; one that need not (publishing ports: they go live a few milliseconds after the
answer) does not. A failed write is reported to whoever waits for it, and logged; the
self-healing check (``repair``, run by upkeep.py) finds rules that are not in place and
writes them again.

The writer must outlive anything a write raises: if its task died, every later waiter would
wait forever (and every network change with it). Unexpected errors are logged with their
traceback and reported to the waiters as a plain sentence; stopping the writer fails the
waiters that are left instead of abandoning them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager

from .errors import DriverError, HostError
from .rules import NetworkRules

log = logging.getLogger(__name__)


class FirewallWriteFailed(HostError):
    """A firewall write failed for a reason pybridge did not foresee (a bug, not the host)."""


Drift = Callable[[Sequence[NetworkRules]], Awaitable[list[str]]]


class FirewallWriter:
    def __init__(
        self,
        apply: Callable[..., Awaitable[None]],
        views: Callable[[], Sequence[NetworkRules]],
        drift: Drift | None = None,
    ) -> None:
        self._apply = apply
        self._views = views
        self._drift = drift
        # The views last written: a request for the very same state is done already (the state
        # did not change since; damage done meanwhile is repair's business, which forces).
        self._written: list[NetworkRules] | None = None
        self._wanted = 0
        self._done = 0  # every generation up to this one is written
        self._force = False
        self._failed: tuple[int, DriverError] | None = None
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def request(self, *, force: bool = False) -> int:
        """Ask for the current state to be written; returns the generation to wait for."""
        self._wanted += 1
        self._force = self._force or force
        if not self._stopped and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run(), name="pydriver-firewall-writer")
        self._wake.set()
        return self._wanted

    async def wait(self, generation: int) -> None:
        """Return once ``generation`` is written; raise the error if its write failed."""
        async with self._changed:
            while True:
                if self._failed is not None and self._failed[0] >= generation:
                    raise self._failed[1]
                if self._done >= generation:
                    return
                if self._stopped:
                    raise HostError(
                        "pybridge is shutting down and stopped writing firewall rules before "
                        "this change was written; it writes them when it starts again"
                    )
                await self._changed.wait()

    async def write(self, *, force: bool = False) -> None:
        await self.wait(self.request(force=force))

    async def settle(self) -> None:
        """Wait until everything asked for so far is written (or has failed)."""
        generation = self._wanted
        async with self._changed:
            while (
                self._done < generation
                and not (self._failed is not None and self._failed[0] >= generation)
                and not self._stopped
            ):
                await self._changed.wait()

    async def repair(
        self,
        quiet: Callable[[], AbstractAsyncContextManager[None]],
        confirm_delay: float = 0.5,
    ) -> list[str]:
        """Restore pybridge's rules and jumps if something removed or reordered them (a
        firewall reload, `iptables -F`, dockerd rebuilding its chains); returns what differed.
        Touches nothing else.

        A difference must still be there after ``confirm_delay``, looked at again inside
        ``quiet`` (while no network is being created or removed), so a change that is being
        applied right now is not mistaken for damage."""
        if self._drift is None:
            return []
        problems = await self._drift(self._views())
        if not problems:
            return []
        await asyncio.sleep(confirm_delay)
        async with quiet():
            problems = await self._drift(self._views())
            if problems:
                for problem in problems:
                    log.warning("firewall: %s; restoring pybridge's rules", problem)
                await self.write(force=True)
        return problems

    async def stop(self) -> None:
        """Stop writing. Whoever still waits gets an error rather than waiting forever."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        async with self._changed:
            self._changed.notify_all()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            generation, force = self._wanted, self._force
            self._force = False
            views = list(self._views())
            try:
                if force or views != self._written:
                    self._written = None  # unknown until this write succeeds
                    await self._apply(views, force=force)
                    self._written = views
            except Exception as exc:
                err = _as_driver_error(exc)
                async with self._changed:
                    self._failed = (generation, err)
                    self._changed.notify_all()
                continue
            async with self._changed:
                self._done = max(self._done, generation)
                if self._failed is not None and self._failed[0] <= generation:
                    self._failed = None
                self._changed.notify_all()


def _as_driver_error(exc: Exception) -> DriverError:
    """Log a failed write and turn it into the error its waiters get."""
    if isinstance(exc, DriverError):
        log.warning("firewall: could not write pybridge's rules: %s", exc)
        return exc
    log.error("firewall: writing pybridge's rules failed unexpectedly", exc_info=exc)
    return FirewallWriteFailed(
        f"pybridge could not write its firewall rules because of an internal error "
        f"({type(exc).__name__}); see the pybridge log"
    )
