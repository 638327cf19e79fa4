"""Spare veth pairs in a served pybridge (spares.py), in a throwaway namespace: made after the
first endpoint, taken by the next ones, gone at shutdown, and a killed run's removed by the next
start."""

from __future__ import annotations

import re
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pydriver.naming import is_spare_veth
from pydriver.store import read_state
from tests.hostenv import require_root, run
from tests.privileged.serving import Plugin, netns

pytestmark = pytest.mark.privileged


def call(plugin: Plugin, method: str, body: dict[str, Any]) -> Any:
    status, reply = plugin.post(method, body)
    assert status == 200, (method, reply)
    return reply


def spares_in(ns: str) -> set[str]:
    out = run(["ip", "-n", ns, "-o", "link", "show"]).stdout.split()
    names = {word.rstrip(":").split("@")[0] for word in out}
    return {name for name in names if is_spare_veth(name)}


def wait_for_spares(ns: str, pairs: int, owned: frozenset[str] = frozenset()) -> set[str]:
    """The spare pairs' names once there are ``pairs`` (``owned``: endpoints' pairs that were
    spares)."""
    deadline = time.monotonic() + 10
    while len(found := spares_in(ns) - owned) != 2 * pairs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(found) == 2 * pairs, found
    return found


def create(plugin: Plugin, network: str, last_octet: int) -> str:
    endpoint = secrets.token_hex(32)
    interface = {"Address": f"10.213.71.{last_octet}/24", "AddressIPv6": "", "MacAddress": ""}
    body = {"NetworkID": network, "EndpointID": endpoint, "Interface": interface, "Options": {}}
    call(plugin, "NetworkDriver.CreateEndpoint", body)
    return endpoint


@pytest.fixture
def ns() -> Iterator[str]:
    require_root()
    with netns() as name:
        yield name


def test_endpoints_take_spare_pairs_and_none_outlive_pybridge(ns: str, tmp_path: Path) -> None:
    netns = ns
    plugin = Plugin(netns, tmp_path)
    plugin.start(PYDRIVER_SPARE_VETHS="2")
    try:
        network = secrets.token_hex(32)
        call(
            plugin,
            "NetworkDriver.CreateNetwork",
            {
                "NetworkID": network,
                "Options": {"com.docker.network.generic": {}},
                "IPv4Data": [{"Pool": "10.213.71.0/24", "Gateway": "10.213.71.1/24"}],
            },
        )
        assert spares_in(netns) == set()  # none before an endpoint
        create(plugin, network, 2)
        ready = wait_for_spares(netns, 2)
        second = create(plugin, network, 3)
        _, endpoints = read_state(plugin.state)
        taken = next(e for e in endpoints if e.id == second)
        assert {taken.host_veth, taken.container_veth} <= ready
        master = run(["ip", "-n", netns, "-o", "link", "show", taken.host_veth]).stdout
        assert f"master {network_bridge(plugin, network)}" in master
        assert re.search(r"<[^>]*\bUP\b", master), master  # up (no carrier until Docker's)
        owned = frozenset({taken.host_veth, taken.container_veth})
        wait_for_spares(netns, 2, owned)  # made again
        assert plugin.consistent() == []
        # kill -9: the spares stay behind, the next start removes them.
        assert plugin.proc is not None
        plugin.proc.send_signal(signal.SIGKILL)
        plugin.proc.wait(20)
        left = spares_in(netns) - owned
        assert len(left) == 4
        plugin.start(PYDRIVER_SPARE_VETHS="2")
        assert not left & spares_in(netns)
        assert plugin.consistent() == []
        fourth = create(plugin, network, 4)
        _, endpoints = read_state(plugin.state)
        owned |= {
            name for e in endpoints if e.id == fourth for name in (e.host_veth, e.container_veth)
        }
        wait_for_spares(netns, 2, owned)
        plugin.stop()  # SIGTERM: the spares go, the endpoints' pairs stay
        # The spares went; the pair the second endpoint took is its own.
        assert spares_in(netns) == {name for name in owned if is_spare_veth(name)}
    finally:
        plugin.stop()


def network_bridge(plugin: Plugin, network: str) -> str:
    networks, _ = read_state(plugin.state)
    return next(n.bridge for n in networks if n.id == network)
