"""Docker's sandbox files, as evidence that a container is gone (an adapter: file metadata).

dockerd bind-mounts each container's network namespace on a file under its exec root
(``SandboxKey``, e.g. /var/run/docker/netns/1a2b3c4d5e6f) and unmounts it when it destroys the
sandbox -- also when it cleans up after a crash, before restarting any container. It leaves the
empty file behind, so the file's existence says nothing; a file with no namespace mounted on
it says the sandbox is gone, even while the kernel is still tearing the namespace down (which
can take seconds on a busy host, so the veth is still there). A managed plugin does not see
dockerd's files at all: nothing is concluded from a file it cannot see."""

from __future__ import annotations

import asyncio
import os
import stat


def _released(key: str) -> bool:
    try:
        found = os.lstat(key)
        parent = os.stat(os.path.dirname(key) or "/")
    except OSError:
        return False  # not visible here: no evidence either way
    # A namespace mounted on the file shows the nsfs device, not its directory's.
    return stat.S_ISREG(found.st_mode) and found.st_dev == parent.st_dev


async def sandbox_released(key: str) -> bool:
    """True when ``key`` is a sandbox file that no namespace is mounted on any more."""
    return await asyncio.to_thread(_released, key)
