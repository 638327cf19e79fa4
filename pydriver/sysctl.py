"""Kernel settings under /proc/sys (an adapter: file writes, done off the event loop)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from .errors import HostError

log = logging.getLogger(__name__)

PROC_SYS = Path("/proc/sys")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _ensure(path: Path, value: str) -> bool:
    """Write ``value`` unless it is already set. Returns True if it changed."""
    if _read(path) == value:
        return False
    try:
        path.write_text(value + "\n")
    except OSError as err:
        raise HostError(f"could not set {path} to {value}: {err.strerror or err}") from None
    return True


class Sysctl:
    def __init__(self, root: Path = PROC_SYS) -> None:
        self.root = root

    async def ensure(self, key: str, value: str) -> bool:
        path = self.root / key.replace(".", "/")
        changed = await asyncio.to_thread(_ensure, path, value)
        if changed:
            log.info("set %s = %s", key, value)
        return changed

    async def read(self, key: str) -> str | None:
        return await asyncio.to_thread(_read, self.root / key.replace(".", "/"))

    async def ensure_ipv4_forwarding(self) -> None:
        await self.ensure("net.ipv4.ip_forward", "1")

    async def ensure_ipv6_forwarding(self) -> None:
        # What Docker does for --ipv6 networks. Hosts that take their IPv6 default route from
        # router advertisements need accept_ra=2 on the uplink (forwarding disables RA there).
        await self.ensure("net.ipv6.conf.all.forwarding", "1")

    async def enable_route_localnet(self, ifname: str) -> None:
        path = self.root / "net" / "ipv4" / "conf" / ifname / "route_localnet"
        if path.exists():
            await asyncio.to_thread(_ensure, path, "1")

    async def disable_accept_ra(self, ifname: str) -> None:
        # Interface names may contain dots, so build the path by parts, not from a dotted key.
        path = self.root / "net" / "ipv6" / "conf" / ifname / "accept_ra"
        if path.exists():
            await asyncio.to_thread(_ensure, path, "0")
