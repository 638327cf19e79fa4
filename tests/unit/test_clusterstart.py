"""Joining the cluster at start-up: this host's id and the underlay's interface and address."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from pydriver.clusterstart import find_underlay, host_id
from pydriver.errors import InvalidRequest
from pydriver.model import HostRoute, IPInterface, Link


class Kernel:
    def __init__(self, routes: list[HostRoute], addresses: dict[str, list[str]]) -> None:
        self._routes = routes
        self._addresses = addresses

    async def links(self) -> list[Link]:
        return [
            Link(i, name, None, None, 9000 if name == "eth1" else 1500, True, "")
            for i, name in enumerate(self._addresses)
        ]

    async def routes(self) -> list[HostRoute]:
        return self._routes

    async def link_addresses(self, name: str) -> list[IPInterface]:
        return [ipaddress.ip_interface(a) for a in self._addresses.get(name, [])]


KERNEL = Kernel(
    [
        HostRoute(ipaddress.ip_network("0.0.0.0/0"), "eth0"),
        HostRoute(ipaddress.ip_network("10.0.0.0/24"), "eth1"),
    ],
    {"lo": ["127.0.0.1/8"], "eth0": ["fe80::1/64", "192.0.2.10/24"], "eth1": ["10.0.0.5/24"]},
)


async def test_the_default_routes_interface_and_its_ipv4_address() -> None:
    underlay = await find_underlay(KERNEL, "")  # type: ignore[arg-type]
    assert (underlay.interface, str(underlay.address), underlay.mtu) == ("eth0", "192.0.2.10", 1500)


async def test_an_advertised_address_picks_its_interface() -> None:
    underlay = await find_underlay(KERNEL, "10.0.0.5")  # type: ignore[arg-type]
    assert (underlay.interface, underlay.mtu) == ("eth1", 9000)


async def test_addresses_that_are_not_this_hosts_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="not an address of any interface of this host"):
        await find_underlay(KERNEL, "10.0.0.6")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="is not an IP address"):
        await find_underlay(KERNEL, "eth0")  # type: ignore[arg-type]
    no_default = Kernel([], {"eth0": ["192.0.2.10/24"]})
    with pytest.raises(InvalidRequest, match="no IPv4 default route"):
        await find_underlay(no_default, "")  # type: ignore[arg-type]


def test_the_host_id_is_made_once_and_kept(tmp_path: Path) -> None:
    first = host_id(tmp_path)
    assert len(first) == 16
    assert host_id(tmp_path) == first
    assert (tmp_path / "host-id").read_text().strip() == first
