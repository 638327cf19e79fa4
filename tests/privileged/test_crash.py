"""kill -9 at every injected point of every operation, in a loop (one scenario per point).

A dockerd-like client drives a whole container lifecycle. When the plugin dies mid-request,
the client does what dockerd does: it waits for the plugin to come back and sends the same
request again. After every restart the state and the kernel must agree; at the end nothing
may be left, and no address may ever have been handed out twice."""

from __future__ import annotations

import secrets
import signal
from pathlib import Path
from typing import Any

import pytest

from pydriver.store import read_state
from tests.hostenv import require_root, run
from tests.privileged.serving import Plugin, PluginDied, netns

pytestmark = pytest.mark.privileged

CRASH_POINTS = [
    "ipam.pool.recorded",
    "ipam.address.recorded",
    "network.create.recorded",
    "network.create.bridge",
    "network.create.firewall",
    "network.create.ready",
    "endpoint.create.recorded",
    "endpoint.create.veth",
    "endpoint.create.ready",
    "join.recorded",
    "ports.publish.recorded",
    "ports.publish.firewall",
    "ports.revoke.recorded",
    "endpoint.delete.forgotten",
    "network.delete.recorded",
    "network.delete.firewall",
    "network.delete.bridge",
]


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
    assert gateway == "10.213.70.1/24" and address == "10.213.70.2/24", handed_out
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
            assert "pyb-" not in links and "pyv" not in links and "pyc" not in links
            assert "PYBRIDGE" not in run(["ip", "netns", "exec", ns, "iptables-nft-save"]).stdout
            networks, endpoints = read_state(plugin.state)
            assert networks == [] and endpoints == []
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
