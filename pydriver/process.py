"""Running host tools: always without a shell, asynchronously, with a time limit."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import HostError

COMMAND_TIMEOUT = 30.0


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


async def run(argv: Sequence[str], stdin: str | None = None) -> CommandResult:
    """Run a command without a shell, asynchronously, with a time limit."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as err:
        raise HostError(f"could not run {argv[0]}: {err.strerror or err}") from None
    try:
        out, errout = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), COMMAND_TIMEOUT
        )
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise HostError(f"{argv[0]} did not finish within {COMMAND_TIMEOUT:.0f} seconds") from None
    return CommandResult(
        proc.returncode or 0, out.decode(errors="replace"), errout.decode(errors="replace")
    )
