"""Running host tools: always without a shell, with a time limit, and off the event loop.

A fork and exec from the event loop thread stalls it for a millisecond or more per process
(plus a watcher thread each), so processes are started and waited for on worker threads;
the loop only awaits the result."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import HostError

COMMAND_TIMEOUT = 30.0


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


def _run_blocking(argv: Sequence[str], stdin: str | None) -> CommandResult:
    try:
        done = subprocess.run(
            list(argv),
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise HostError(f"{argv[0]} did not finish within {COMMAND_TIMEOUT:.0f} seconds") from None
    except OSError as err:
        raise HostError(f"could not run {argv[0]}: {err.strerror or err}") from None
    return CommandResult(done.returncode, done.stdout, done.stderr)


async def run(argv: Sequence[str], stdin: str | None = None) -> CommandResult:
    """Run a command (no shell) and return its exit status and output."""
    return await asyncio.to_thread(_run_blocking, argv, stdin)
