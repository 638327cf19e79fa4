"""Shared fixtures: a NetworkDriver (and IpamDriver) over fakes and a real state database; and
the driver's concerns one by one over fakes alone (``parts``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pydriver.background import Background
from pydriver.bridges import Bridges
from pydriver.driver import NetworkDriver
from pydriver.eviction import Eviction
from pydriver.firewall_writer import FirewallWriter
from pydriver.flows import StaleFlows
from pydriver.ipamdriver import IpamDriver
from pydriver.locks import KeyedLock
from pydriver.model import IPAddress
from pydriver.removal import Removal
from pydriver.state import State
from pydriver.store import SqliteStore
from pydriver.veths import Veths

from .fakes import FakeFirewall, FakeHostPorts, FakeKernel, FakeStore, FakeSysctl


def make_driver(
    store: SqliteStore,
    kernel: FakeKernel,
    firewall: FakeFirewall,
    sysctl: FakeSysctl,
    host_ports: FakeHostPorts,
    inline_background: bool,
) -> tuple[NetworkDriver, IpamDriver]:
    """Both drivers, wired to each other as cli.serve does."""

    async def release_addresses(addresses: Sequence[tuple[str, IPAddress]]) -> None:
        await ipam.release_owned(addresses)

    driver = NetworkDriver(
        store,
        kernel,
        firewall,
        sysctl,
        host_ports=host_ports,
        port_holder=host_ports.holder,
        inline_background=inline_background,
        release_addresses=release_addresses,
        # A conflict with a live endpoint is looked at again for a moment (a dying container's
        # veth); the fakes' veths do not die by themselves, so the tests do not wait long.
        dying_veth_wait=0.05,
    )
    ipam = IpamDriver(store, kernel.routes, endpoint_addresses=driver.state.addresses_in_pool)
    return driver, ipam


@dataclass
class Env:
    state_dir: Path
    kernel: FakeKernel
    firewall: FakeFirewall
    sysctl: FakeSysctl
    store: SqliteStore
    driver: NetworkDriver
    ipam: IpamDriver
    host_ports: FakeHostPorts
    _closed: list[SqliteStore] = field(default_factory=list)

    async def restart(
        self,
        kernel: FakeKernel | None = None,
        inline_background: bool = True,
        host_ports: FakeHostPorts | None = None,
    ) -> NetworkDriver:
        """A daemon restart (or crash): a fresh store, NetworkDriver and IpamDriver on the same
        state directory, loaded but not reconciled. ``kernel`` replaces the host (a reboot);
        ``inline_background=False`` leaves work to the background, as the service does;
        ``host_ports`` replaces the process's sockets (new ones, the host's busy ports kept,
        otherwise)."""
        self.close()
        if kernel is not None:
            self.kernel = kernel
        self.store = SqliteStore(self.state_dir)
        self.host_ports = host_ports or FakeHostPorts(busy=self.host_ports.busy)
        self.driver, self.ipam = make_driver(
            self.store, self.kernel, self.firewall, self.sysctl, self.host_ports, inline_background
        )
        await self.driver.load()
        await self.ipam.load()
        return self.driver

    def close(self) -> None:
        if self.store not in self._closed:
            self.store.close()
            self._closed.append(self.store)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    state_dir = tmp_path / "state"
    kernel = FakeKernel()
    firewall = FakeFirewall()
    sysctl = FakeSysctl()
    store = SqliteStore(state_dir)
    host_ports = FakeHostPorts()
    driver, ipam = make_driver(store, kernel, firewall, sysctl, host_ports, inline_background=True)
    await driver.load()
    await ipam.load()
    environment = Env(state_dir, kernel, firewall, sysctl, store, driver, ipam, host_ports)
    yield environment
    environment.close()


@dataclass
class Parts:
    """The network driver's concerns wired as NetworkDriver wires them, over fakes and an
    in-memory store, background work inline; ``released`` collects what eviction gives back
    to the IPAM."""

    store: FakeStore
    kernel: FakeKernel
    firewall: FakeFirewall
    sysctl: FakeSysctl
    host_ports: FakeHostPorts
    state: State
    locks: KeyedLock
    writer: FirewallWriter
    background: Background
    bridges: Bridges
    veths: Veths
    removal: Removal
    eviction: Eviction
    released: list[tuple[str, IPAddress]]


@pytest.fixture
async def parts() -> AsyncIterator[Parts]:
    store, kernel, firewall = FakeStore(), FakeKernel(), FakeFirewall()
    sysctl, host_ports = FakeSysctl(), FakeHostPorts()
    state = State(store)
    locks = KeyedLock()
    writer = FirewallWriter(firewall.apply, state.firewall_views, firewall.drift)
    background = Background(writer, inline=True)
    bridges = Bridges(kernel, sysctl, firewall, background)
    veths = Veths(kernel, background)
    stale_flows = StaleFlows(store, kernel, inline=True)
    removal = Removal(state, kernel, host_ports, writer, background, bridges, veths, stale_flows)
    released: list[tuple[str, IPAddress]] = []

    async def release(addresses: Sequence[tuple[str, IPAddress]]) -> None:
        released.extend(addresses)

    eviction = Eviction(state, kernel, locks, removal, release)
    yield Parts(
        store,
        kernel,
        firewall,
        sysctl,
        host_ports,
        state,
        locks,
        writer,
        background,
        bridges,
        veths,
        removal,
        eviction,
        released,
    )
    await background.close()
