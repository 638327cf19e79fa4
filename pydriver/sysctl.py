"""Kernel settings under /proc/sys (an adapter: file writes, done off the event loop)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from .errors import HostError
from .model import Family, InterfaceSetting

log = logging.getLogger(__name__)

PROC_SYS = Path("/proc/sys")
FORWARDING: dict[Family, str] = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}
_FAMILY_DIR: dict[InterfaceSetting, str] = {
    "route_localnet": "ipv4",
    "accept_ra": "ipv6",
    "disable_ipv6": "ipv6",
}


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

    async def forwarding_enabled(self, family: Family) -> bool:
        return await self.read(FORWARDING[family]) == "1"

    async def enable_forwarding(self, family: Family) -> None:
        # IPv6: what Docker does for --ipv6 networks. Hosts that take their IPv6 default route
        # from router advertisements need accept_ra=2 on the uplink (forwarding disables RA).
        await self.ensure(FORWARDING[family], "1")

    def _interface_path(self, ifname: str, setting: InterfaceSetting) -> Path:
        # Interface names may contain dots, so build the path by parts, not from a dotted key.
        return self.root / "net" / _FAMILY_DIR[setting] / "conf" / ifname / setting

    async def enable_route_localnet(self, ifname: str) -> None:
        path = self._interface_path(ifname, "route_localnet")
        if path.exists():
            await asyncio.to_thread(_ensure, path, "1")

    async def disable_accept_ra(self, ifname: str) -> None:
        path = self._interface_path(ifname, "accept_ra")
        if path.exists():
            await asyncio.to_thread(_ensure, path, "0")

    async def disable_ipv6(self, ifname: str) -> None:
        # No IPv6 address at all on the interface, not even link-local (gateway mode isolated).
        path = self._interface_path(ifname, "disable_ipv6")
        if path.exists():
            await asyncio.to_thread(_ensure, path, "1")

    async def interface_setting(self, ifname: str, setting: InterfaceSetting) -> str | None:
        """The current value, or None when the interface (or IPv6 on it) does not exist."""
        return await asyncio.to_thread(_read, self._interface_path(ifname, setting))

    async def restore_interface_setting(
        self, ifname: str, setting: InterfaceSetting, value: str
    ) -> None:
        """Put a value back; nothing to do once the interface is gone."""
        path = self._interface_path(ifname, setting)
        if await asyncio.to_thread(path.exists) and await asyncio.to_thread(_ensure, path, value):
            log.info("restored %s on %s to %s", setting, ifname, value)
