"""The kernel adapter: the only module that imports pyroute2.

Every ``ensure_*`` is idempotent (EEXIST is success) and every ``remove_*`` treats "already
gone" as success, so any operation can be replayed after a crash.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
from dataclasses import dataclass
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import Conflict, HostError
from .ipam import HostRoute
from .model import IPInterface

log = logging.getLogger(__name__)

IFA_F_NODAD = 0x02
MAIN_TABLE = 254
_RT_UNICAST = 1


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None
    master: int | None
    mtu: int
    up: bool
    mac: str


def _kind(msg: Any) -> str | None:
    info = msg.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def _link(msg: Any) -> Link:
    return Link(
        index=msg["index"],
        name=msg.get_attr("IFLA_IFNAME"),
        kind=_kind(msg),
        master=msg.get_attr("IFLA_MASTER"),
        mtu=msg.get_attr("IFLA_MTU") or 0,
        up=bool(msg["flags"] & 1),
        mac=msg.get_attr("IFLA_ADDRESS") or "",
    )


def _describe(err: NetlinkError) -> str:
    try:
        return os.strerror(err.code)
    except (TypeError, ValueError):
        return str(err)


class Netlink:
    """One netlink socket for the process; calls are serialised (they are short)."""

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns
        self._ipr: AsyncIPRoute | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        if self._ipr is None:
            self._ipr = AsyncIPRoute(netns=self._netns) if self._netns else AsyncIPRoute()
            await self._ipr.setup_endpoint()

    async def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    @property
    def ipr(self) -> AsyncIPRoute:
        if self._ipr is None:
            raise RuntimeError("Netlink.open() was not called")
        return self._ipr

    # -- queries -------------------------------------------------------------------------------

    async def get_link(self, name: str) -> Link | None:
        async with self._lock:
            try:
                msgs = await self.ipr.link("get", ifname=name)
            except NetlinkError as err:
                if err.code == errno.ENODEV:
                    return None
                raise HostError(f"could not look up interface {name}: {_describe(err)}") from None
        return _link(msgs[0])

    async def links(self) -> list[Link]:
        async with self._lock:
            return [_link(msg) async for msg in await self.ipr.link("dump")]

    async def routes(self) -> list[HostRoute]:
        """Unicast routes of the main table, both families, with their device names."""
        names = {link.index: link.name for link in await self.links()}
        found: list[HostRoute] = []
        async with self._lock:
            for family in (2, 10):
                async for msg in await self.ipr.route("dump", family=family):
                    if msg.get("table") != MAIN_TABLE or msg["type"] != _RT_UNICAST:
                        continue
                    dst = msg.get("dst")
                    if not dst:
                        continue
                    net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
                    found.append(HostRoute(net, names.get(msg.get("oif") or 0, "")))
        return found

    async def link_addresses(self, name: str) -> list[IPInterface]:
        link = await self.get_link(name)
        if link is None:
            return []
        async with self._lock:
            return [
                ipaddress.ip_interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
                async for msg in await self.ipr.addr("dump", index=link.index)
            ]

    # -- bridges -------------------------------------------------------------------------------

    async def ensure_bridge(self, name: str, mac: str, mtu: int | None) -> bool:
        """Create the bridge if missing. Returns True if it was created now."""
        existing = await self.get_link(name)
        if existing is not None:
            if existing.kind != "bridge":
                raise Conflict(f"interface {name} already exists and is not a bridge")
            return False
        kwargs: dict[str, Any] = {"ifname": name, "kind": "bridge", "address": mac}
        if mtu:
            kwargs["mtu"] = mtu
        async with self._lock:
            try:
                await self.ipr.link("add", **kwargs)
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    raise HostError(f"could not create bridge {name}: {_describe(err)}") from None
                return False
        return True

    async def set_link(
        self,
        name: str,
        *,
        up: bool | None = None,
        mtu: int | None = None,
        master: str | None = None,
    ) -> None:
        link = await self.get_link(name)
        if link is None:
            raise HostError(f"interface {name} does not exist")
        kwargs: dict[str, Any] = {}
        if up is not None and up != link.up:
            kwargs["state"] = "up" if up else "down"
        if mtu and mtu != link.mtu:
            kwargs["mtu"] = mtu
        if master is not None:
            master_link = await self.get_link(master)
            if master_link is None:
                raise HostError(f"bridge {master} does not exist")
            if link.master != master_link.index:
                kwargs["master"] = master_link.index
        if not kwargs:
            return
        async with self._lock:
            try:
                await self.ipr.link("set", index=link.index, **kwargs)
            except NetlinkError as err:
                raise HostError(f"could not configure interface {name}: {_describe(err)}") from None

    async def ensure_address(self, name: str, address: IPInterface) -> None:
        link = await self.get_link(name)
        if link is None:
            raise HostError(f"interface {name} does not exist")
        kwargs: dict[str, Any] = {
            "index": link.index,
            "address": str(address.ip),
            "prefixlen": address.network.prefixlen,
        }
        if address.version == 6:
            kwargs["flags"] = IFA_F_NODAD  # the gateway must answer at once, as Docker does
        async with self._lock:
            try:
                await self.ipr.addr("add", **kwargs)
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    raise HostError(
                        f"could not add address {address} to {name}: {_describe(err)}"
                    ) from None

    async def remove_address(self, name: str, address: IPInterface) -> None:
        link = await self.get_link(name)
        if link is None:
            return
        async with self._lock:
            try:
                await self.ipr.addr(
                    "del",
                    index=link.index,
                    address=str(address.ip),
                    prefixlen=address.network.prefixlen,
                )
            except NetlinkError as err:
                if err.code not in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT):
                    raise HostError(
                        f"could not remove address {address} from {name}: {_describe(err)}"
                    ) from None

    async def set_hairpin(self, name: str) -> None:
        """Let the bridge send a frame back out the port it came in on: a container reaching
        its own published port through a host address comes back on its own port."""
        link = await self.get_link(name)
        if link is None:
            raise HostError(f"interface {name} does not exist")
        async with self._lock:
            try:
                await self.ipr.brport("set", index=link.index, mode=1)
            except NetlinkError as err:
                raise HostError(f"could not set hairpin mode on {name}: {_describe(err)}") from None

    # -- veths ---------------------------------------------------------------------------------

    async def ensure_veth(self, host: str, peer: str, peer_mac: str, mtu: int | None) -> bool:
        """Create a veth pair unless the host end exists. Returns True if created now."""
        if await self.get_link(host) is not None:
            return False
        peer_spec: dict[str, Any] = {"ifname": peer, "address": peer_mac}
        kwargs: dict[str, Any] = {"ifname": host, "kind": "veth", "peer": peer_spec}
        if mtu:
            kwargs["mtu"] = mtu
            peer_spec["mtu"] = mtu
        async with self._lock:
            try:
                await self.ipr.link("add", **kwargs)
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    raise HostError(
                        f"could not create veth pair {host}/{peer}: {_describe(err)}"
                    ) from None
                return False
        return True

    async def delete_link(self, name: str) -> bool:
        """Delete an interface; returns False if it did not exist."""
        link = await self.get_link(name)
        if link is None:
            return False
        async with self._lock:
            try:
                await self.ipr.link("del", index=link.index)
            except NetlinkError as err:
                if err.code in (errno.ENODEV, errno.ENOENT):
                    return False
                raise HostError(f"could not delete interface {name}: {_describe(err)}") from None
        return True
