"""One pybridge per state directory.

Two pybridges on one host (the host service and a managed plugin left enabled, which mounts the
same /var/lib/pydriver) would each rewrite the same firewall chains from their own view and
each take the other's bridges for orphans. The serving process holds an exclusive flock on a
file in the state directory for as long as it runs: the kernel lets go of it when the process
ends, however it ends, so a crash never leaves the directory claimed. flock works across mount
namespaces (the managed plugin's mount is the same inode)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pydriver.errors import HostError

LOCK_NAME = "pydriver.lock"


def claim_state_dir(state_dir: Path, who: str) -> int:
    """Take the state directory for this process; returns the descriptor to keep open. ``who``
    (e.g. "the host service, pid 42") is written into the lock file for the next one to read.
    Raises HostError, naming the holder, if another pybridge has it."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise HostError(f"cannot open the state directory {state_dir}: {err.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise HostError(
            f"another pybridge ({holder}) is running with the state directory {state_dir}: "
            "run one pybridge per host, the host service or the managed plugin, not both "
            "(stop the other first: scripts/pybridge-service.sh stop, or docker plugin "
            "disable -f)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{who}\n".encode(), 0)
    return fd
