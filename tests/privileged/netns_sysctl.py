"""The driver's sysctl port for a throwaway network namespace: /proc/sys/net shows the settings
of the reader's own namespace, so every access runs inside it (tests only: subprocesses)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.hostenv import run

if TYPE_CHECKING:
    from pydriver.model import Family, InterfaceSetting

_FAMILY_DIR: dict[InterfaceSetting, str] = {
    "route_localnet": "ipv4",
    "accept_ra": "ipv6",
    "disable_ipv6": "ipv6",
}
_FORWARDING: dict[Family, str] = {
    4: "/proc/sys/net/ipv4/ip_forward",
    6: "/proc/sys/net/ipv6/conf/all/forwarding",
}


class NetnsSysctl:
    def __init__(self, netns: str) -> None:
        self.netns = netns

    def _path(self, ifname: str, setting: InterfaceSetting) -> str:
        return f"/proc/sys/net/{_FAMILY_DIR[setting]}/conf/{ifname}/{setting}"

    def _write(self, path: str, value: str) -> None:
        run(["ip", "netns", "exec", self.netns, "tee", path], input=value + "\n")

    def read(self, path: str) -> str | None:
        result = run(["ip", "netns", "exec", self.netns, "cat", path], check=False)
        return result.stdout.strip() if result.returncode == 0 else None

    async def forwarding_enabled(self, family: Family) -> bool:
        return self.read(_FORWARDING[family]) == "1"

    async def enable_forwarding(self, family: Family) -> None:
        self._write(_FORWARDING[family], "1")

    async def enable_route_localnet(self, ifname: str) -> None:
        self._write(self._path(ifname, "route_localnet"), "1")

    async def disable_accept_ra(self, ifname: str) -> None:
        self._write(self._path(ifname, "accept_ra"), "0")

    async def disable_ipv6(self, ifname: str) -> None:
        self._write(self._path(ifname, "disable_ipv6"), "1")

    async def interface_setting(self, ifname: str, setting: InterfaceSetting) -> str | None:
        return self.read(self._path(ifname, setting))

    async def restore_interface_setting(
        self, ifname: str, setting: InterfaceSetting, value: str
    ) -> None:
        if self.read(self._path(ifname, setting)) is not None:
            self._write(self._path(ifname, setting), value)
