"""The managed plugin's own life cycle: disable/enable and upgrade keep networks, containers
and state. (Only collected when the suite runs against the managed plugin.)"""

from __future__ import annotations

import json
import sys

from tests.e2e.conftest import DRIVER, PLUGIN_NAME, Docker, ping
from tests.harness import docker, wait_for
from tests.hostenv import ROOT, OutsideHost, run

UPGRADE = ROOT / "plugin" / "upgrade.sh"


def tcp_from(outside: OutsideHost, port: int) -> str:
    return outside.probe("busybox", "nc", "-w", "3", outside.host_ip, str(port))


def status() -> dict[str, object]:
    out = run([sys.executable, "-m", "pydriver.cli", "status", "--json", "--no-names"]).stdout
    return dict(json.loads(out))


def test_disable_enable_keeps_everything(d: Docker, outside: OutsideHost) -> None:
    net = d.network("--ipam-driver", DRIVER)
    a = d.run(net)
    b = d.run(net, "-p", "18900:80", command=("pbtest-echo", "tcp", "80"))
    assert wait_for(lambda: tcp_from(outside, 18900) == outside.ip)
    before = status()
    run(["docker", "plugin", "disable", "-f", PLUGIN_NAME], timeout=60)
    ping(d, a, b)  # the data plane does not need the plugin
    assert tcp_from(outside, 18900) == outside.ip
    run(["docker", "plugin", "enable", PLUGIN_NAME], timeout=60)
    assert status() == before
    c = d.run(net)
    assert len({d.ip(x, net) for x in (a, b, c)}) == 3
    ping(d, c, b)


def test_upgrade_keeps_networks_and_containers(d: Docker, outside: OutsideHost) -> None:
    net = d.network()
    a = d.run(net)
    b = d.run(net, "-p", "18901:80", command=("pbtest-echo", "tcp", "80"))
    assert wait_for(lambda: tcp_from(outside, 18901) == outside.ip)
    old_id = docker("plugin", "inspect", "-f", "{{.Id}}", PLUGIN_NAME)
    settings = docker("plugin", "inspect", "-f", "{{.Settings.Env}}", PLUGIN_NAME)
    done = run([str(UPGRADE), PLUGIN_NAME], timeout=600)
    assert "upgraded and enabled" in done.stdout
    assert docker("plugin", "inspect", "-f", "{{.Id}}", PLUGIN_NAME) != old_id
    assert docker("plugin", "inspect", "-f", "{{.Settings.Env}}", PLUGIN_NAME) == settings
    ping(d, a, b)
    assert tcp_from(outside, 18901) == outside.ip
    c = d.run(net)  # the new plugin serves the network the old one created
    ping(d, c, a)
    docker("stop", "-t", "0", b)
    docker("start", b)
    assert wait_for(lambda: tcp_from(outside, 18901) == outside.ip)
