"""kill -9 at every injected point of every operation, in a loop (one scenario per point).

A dockerd-like client drives a whole container lifecycle. When the plugin dies mid-request,
the client does what dockerd does: it waits for the plugin to come back and sends the same
request again. After every restart the state and the kernel must agree; at the end nothing
may be left, and no address may ever have been handed out twice."""

from __future__ import annotations

import secrets
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from pydriver.store import DB_NAME, read_state
from tests.crashpoints import crash_points
from tests.hostenv import require_root, run
from tests.privileged.serving import Plugin, PluginDied, netns

pytestmark = pytest.mark.privileged

# Every faults.point(...) of pydriver, read from its source: a new point is covered at once.
# Each scenario below asserts that its point was reached, so a point the lifecycle never
# passes through fails here rather than going untested.
CRASH_POINTS = crash_points()


class Dockerd:
    """Sends requests like dockerd: a request that dies with the plugin is sent again."""

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        self.crashes = 0
        self.problems_after_restart: list[str] = []

    def call(self, method: str, body: dict[str, Any] | None = None) -> Any:
        try:
            status, reply = self.plugin.post(method, body)
        except PluginDied:
            assert self.plugin.wait_dead() == -signal.SIGKILL
            self.crashes += 1
            self.plugin.start()  # without the crash point: it fires once
            self.problems_after_restart += self.plugin.consistent()
            status, reply = self.plugin.post(method, body)
        assert status == 200, (method, reply)
        return reply


def lifecycle(docker: Dockerd, sandbox: str) -> list[str]:
    """network create, run -p, stop, rm, network rm (with pybridge as IPAM too)."""
    nid, eid = secrets.token_hex(32), secrets.token_hex(32)
    pool = docker.call(
        "IpamDriver.RequestPool",
        {
            "AddressSpace": "PybridgeLocal",
            "Pool": "10.213.70.0/24",
            "SubPool": "",
            "Options": {},
            "V6": False,
        },
    )
    gateway = docker.call(
        "IpamDriver.RequestAddress",
        {
            "PoolID": pool["PoolID"],
            "Address": "",
            "Options": {"RequestAddressType": "com.docker.network.gateway"},
        },
    )["Address"]
    docker.call(
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": nid,
            "Options": {"com.docker.network.enable_ipv6": False, "com.docker.network.generic": {}},
            "IPv4Data": [
                {"AddressSpace": "PybridgeLocal", "Pool": pool["Pool"], "Gateway": gateway}
            ],
            "IPv6Data": [],
        },
    )
    address = docker.call(
        "IpamDriver.RequestAddress",
        {
            "PoolID": pool["PoolID"],
            "Address": "",
            "Options": None,
        },
    )["Address"]
    ports = {
        "com.docker.network.endpoint.exposedports": [{"Proto": 6, "Port": 80}],
        "com.docker.network.portmap": [
            {
                "Proto": 6,
                "IP": "",
                "Port": 80,
                "HostIP": "",
                "HostPort": 18500,
                "HostPortEnd": 18500,
            },
        ],
    }
    docker.call(
        "NetworkDriver.CreateEndpoint",
        {
            "NetworkID": nid,
            "EndpointID": eid,
            "Interface": {"Address": address, "AddressIPv6": "", "MacAddress": ""},
            "Options": ports,
        },
    )
    docker.call(
        "NetworkDriver.Join",
        {
            "NetworkID": nid,
            "EndpointID": eid,
            "SandboxKey": sandbox,
            "Options": ports,
        },
    )
    docker.call(
        "NetworkDriver.ProgramExternalConnectivity",
        {
            "NetworkID": nid,
            "EndpointID": eid,
            "Options": ports,
        },
    )
    handed_out = [gateway, address]
    middle = docker.plugin.consistent()
    ref = {"NetworkID": nid, "EndpointID": eid}
    docker.call("NetworkDriver.RevokeExternalConnectivity", ref)
    docker.call("NetworkDriver.Leave", ref)
    docker.call("NetworkDriver.DeleteEndpoint", ref)
    docker.call("IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": address})
    docker.call("IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": gateway})
    docker.call("IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]})
    docker.call("NetworkDriver.DeleteNetwork", {"NetworkID": nid})
    assert len(set(handed_out)) == len(handed_out), handed_out
    assert gateway == "10.213.70.1/24", handed_out
    assert address == "10.213.70.2/24", handed_out
    return middle


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_9_at_every_point_then_docker_retries(point: str, tmp_path: Path) -> None:
    require_root()
    with netns() as ns, netns() as sandbox_ns:
        plugin = Plugin(ns, tmp_path)
        plugin.start(PYDRIVER_CRASH_AT=point)
        docker = Dockerd(plugin)
        try:
            middle = lifecycle(docker, f"/run/netns/{sandbox_ns}")
            assert docker.crashes == 1, f"the crash point {point} was never reached"
            assert docker.problems_after_restart == []
            assert middle == []
            # Nothing left: kernel, firewall and state are empty again.
            assert plugin.consistent() == []
            links = run(["ip", "netns", "exec", ns, "ip", "-o", "link", "show"]).stdout
            assert "pyb-" not in links
            assert "pyv" not in links
            assert "pyc" not in links
            assert "PYBRIDGE" not in run(["ip", "netns", "exec", ns, "iptables-nft-save"]).stdout
            networks, endpoints = read_state(plugin.state)
            assert networks == []
            assert endpoints == []
        finally:
            plugin.stop()


class StopScenario(Exception):
    pass


class DockerdGivingUp(Dockerd):
    """dockerd whose retries ran out (the plugin stayed down too long): no second attempt."""

    def call(self, method: str, body: dict[str, Any] | None = None) -> Any:
        try:
            status, reply = self.plugin.post(method, body)
        except PluginDied:
            assert self.plugin.wait_dead() == -signal.SIGKILL
            self.crashes += 1
            self.plugin.start()
            raise StopScenario from None
        assert status == 200, (method, reply)
        return reply


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_9_without_retry_leaves_state_and_kernel_agreeing(point: str, tmp_path: Path) -> None:
    """After the restart, whatever the interrupted operation was is either complete or undone,
    and state and kernel agree."""
    require_root()
    with netns() as ns, netns() as sandbox_ns:
        plugin = Plugin(ns, tmp_path)
        plugin.start(PYDRIVER_CRASH_AT=point)
        try:
            with pytest.raises(StopScenario):
                lifecycle(DockerdGivingUp(plugin), f"/run/netns/{sandbox_ns}")
            assert plugin.consistent() == []
        finally:
            plugin.stop()


# -- an IPAM answer Docker may hold is never handed out again ---------------------------------

SUBNET = "10.213.71.0/24"
ENDPOINT_NAME = "com.docker.network.endpoint.name"


def allocated(plugin: Plugin) -> set[str]:
    """Every address pybridge's IPAM has handed out, from its state database."""
    db = sqlite3.connect(f"file:{plugin.state / DB_NAME}?mode=ro", uri=True)
    try:
        return {row[0] for row in db.execute("SELECT address FROM addresses")}
    finally:
        db.close()


def ok(plugin: Plugin, method: str, body: dict[str, Any]) -> Any:
    status, reply = plugin.post(method, body)
    assert status == 200, (method, reply)
    return reply


def dynamic(plugin: Plugin, pool_id: str, name: str | None) -> str:
    options = {ENDPOINT_NAME: name} if name else None
    body = {"PoolID": pool_id, "Address": "", "Options": options}
    return str(ok(plugin, "IpamDriver.RequestAddress", body)["Address"])


def network_with_pool(plugin: Plugin, with_network: bool) -> tuple[str, str]:
    """A pool and its gateway from pybridge's IPAM; with ``with_network`` a pybridge network on
    it, otherwise the pool serves a network of another driver (pybridge sees no endpoints)."""
    pool = ok(
        plugin,
        "IpamDriver.RequestPool",
        {"AddressSpace": "PybridgeLocal", "Pool": SUBNET, "SubPool": "", "V6": False},
    )
    gateway = ok(
        plugin,
        "IpamDriver.RequestAddress",
        {
            "PoolID": pool["PoolID"],
            "Address": "",
            "Options": {"RequestAddressType": "com.docker.network.gateway"},
        },
    )["Address"]
    nid = secrets.token_hex(32)
    if with_network:
        ok(
            plugin,
            "NetworkDriver.CreateNetwork",
            {
                "NetworkID": nid,
                "Options": {"com.docker.network.generic": {}},
                "IPv4Data": [
                    {"AddressSpace": "PybridgeLocal", "Pool": pool["Pool"], "Gateway": gateway}
                ],
                "IPv6Data": [],
            },
        )
    return pool["PoolID"], nid


@pytest.mark.parametrize("docker29", [False, True], ids=["docker<29", "docker29"])
@pytest.mark.parametrize("with_network", [True, False], ids=["pybridge-network", "other-driver"])
def test_an_answer_sent_just_before_a_crash_goes_to_nobody_else(
    with_network: bool, docker29: bool, tmp_path: Path
) -> None:
    """kill -9 after a dynamic RequestAddress answer was written, before its acknowledgement
    was recorded. Docker has the address and does not retry (it got a whole answer); it goes
    on with CreateEndpoint. Other containers' requests must never get that address."""
    require_root()
    with netns() as ns:
        plugin = Plugin(ns, tmp_path)
        plugin.start()
        try:
            pool_id, nid = network_with_pool(plugin, with_network)
            plugin.stop()
            plugin.start(PYDRIVER_CRASH_AT="ipam.address.sent")
            held = dynamic(plugin, pool_id, "web" if docker29 else None)  # Docker has it
            assert plugin.wait_dead() == -signal.SIGKILL
            plugin.start()
            # Another container starts before Docker's CreateEndpoint for "web" arrives ...
            before = dynamic(plugin, pool_id, "db" if docker29 else None)
            assert before != held
            if with_network:
                ok(
                    plugin,
                    "NetworkDriver.CreateEndpoint",
                    {
                        "NetworkID": nid,
                        "EndpointID": secrets.token_hex(32),
                        "Interface": {"Address": held, "AddressIPv6": "", "MacAddress": ""},
                        "Options": {},
                    },
                )
            # ... and after it (or, under another driver, with no endpoint ever seen).
            after = dynamic(plugin, pool_id, "cache" if docker29 else None)
            assert after not in (held, before)
            # A restart in between changes nothing.
            plugin.stop()
            plugin.start()
            again = dynamic(plugin, pool_id, "web2" if docker29 else None)
            assert again not in (held, before, after)
            assert {held.split("/")[0], before.split("/")[0]} <= allocated(plugin)
            assert plugin.consistent() == []
        finally:
            plugin.stop()


def test_docker29_retry_of_a_request_that_died_gets_the_same_answer(tmp_path: Path) -> None:
    """kill -9 after the answer was recorded, before it was sent: Docker 29 retries the same
    request (same endpoint name) and gets the same address, so nothing leaks."""
    require_root()
    with netns() as ns:
        plugin = Plugin(ns, tmp_path)
        plugin.start()
        try:
            pool_id, _ = network_with_pool(plugin, True)
            plugin.stop()
            plugin.start(PYDRIVER_CRASH_AT="ipam.address.recorded")
            body = {"PoolID": pool_id, "Address": "", "Options": {ENDPOINT_NAME: "web"}}
            with pytest.raises(PluginDied):
                plugin.post("IpamDriver.RequestAddress", body)
            assert plugin.wait_dead() == -signal.SIGKILL
            plugin.start()
            retried = ok(plugin, "IpamDriver.RequestAddress", body)["Address"]
            assert retried == "10.213.71.2/24"
            assert allocated(plugin) == {"10.213.71.1", "10.213.71.2"}
            assert dynamic(plugin, pool_id, "db") == "10.213.71.3/24"
        finally:
            plugin.stop()
