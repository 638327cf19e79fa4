"""Work left until after the answer: deleting veths and bridges (the kernel takes tens of
milliseconds over each, and nobody needs to wait), forgetting flows once rules are written,
and firewall writes nobody waits for.

``inline`` runs all of it at once instead, before the call that asked for it returns: the
unit tests over fakes use it, so they need not wait for anything.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from .errors import DriverError
from .firewall_writer import FirewallWriter

log = logging.getLogger(__name__)


class Background:
    def __init__(self, writer: FirewallWriter, *, inline: bool = False) -> None:
        self.writer = writer
        self.inline = inline
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self, job: Awaitable[None], what: str) -> None:
        """Run ``job`` after the answer; a failure is logged (start-up removes leftovers)."""

        async def run() -> None:
            try:
                await job
            except DriverError as err:
                log.warning("%s: %s", what, err)

        if self.inline:
            await run()
            return
        task = asyncio.create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def write_firewall_soon(self) -> None:
        """Ask for the rules to be written without waiting (published ports go live a few
        milliseconds after the answer; conflicts were already checked)."""
        if self.inline:
            await self.writer.write()
        else:
            self.writer.request()

    async def wait_for_one(self) -> bool:
        """Wait until one background job ends; False if none was running."""
        if not self.tasks:
            return False
        await asyncio.wait(list(self.tasks), return_when=asyncio.FIRST_COMPLETED)
        return True

    async def settle(self) -> None:
        """Wait for everything left to the background so far (tests, shutdown)."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        await self.writer.settle()

    async def close(self) -> None:
        await self.settle()
        await self.writer.stop()
