"""A reboot never takes Docker down: after a simulated host reboot (tests/e2e/reboot.py) dockerd
answers, pybridge serves (the managed plugin is enabled again), and every `--restart always`
container runs again, connected, with its published ports answering."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from tests.e2e.conftest import (
    DRIVER,
    ECHO_TCP,
    MODE,
    PLUGIN_NAME,
    Docker,
    free_subnet,
    ping,
    plugin_socket,
    tcp_from,
    tcp_from_container,
)
from tests.e2e.reboot import boot, power_off, running_daemon
from tests.harness import docker, wait_for
from tests.hostenv import OutsideHost, run


def running(container: str) -> bool:
    return docker("inspect", "-f", "{{.State.Running}}", container, check=False) == "true"


def test_a_reboot_brings_every_restart_always_container_back(
    d: Docker, outside: OutsideHost
) -> None:
    net = d.network("--subnet", free_subnet(80))  # Docker's IPAM
    own_subnet = free_subnet(81)
    own = d.network("--ipam-driver", DRIVER, "--subnet", own_subnet)  # pybridge's IPAM
    always = ("--restart", "always")
    web = d.run(net, *always, "-p", "18600:80", command=ECHO_TCP)
    peer = d.run(net, *always)
    static_ip = str(ipaddress.ip_network(own_subnet)[50])
    static = d.run(own, *always, "--ip", static_ip, "-p", "18601:80", command=ECHO_TCP)
    once = d.run(net)  # no restart policy: stays down
    assert tcp_from(outside, outside.host_ip, 18600, expect=outside.ip) == outside.ip

    power_off(running_daemon())
    boot(service=MODE != "managed")

    if MODE == "managed":
        assert docker("plugin", "inspect", "-f", "{{.Enabled}}", PLUGIN_NAME) == "true"
    assert wait_for(lambda: all(running(c) for c in (web, peer, static)), timeout=90), [
        docker("inspect", "-f", "{{.Name}} {{.State.Status}} {{.State.Error}}", c, check=False)
        for c in (web, peer, static)
    ]
    assert not running(once)
    # Connected: to each other, to the outside (masqueraded), and reachable on their ports.
    ping(d, peer, d.ip(web, net))
    assert tcp_from_container(d, peer, outside.ip, outside.port) == outside.host_ip
    assert tcp_from(outside, outside.host_ip, 18600, expect=outside.ip) == outside.ip
    assert d.ip(static, own) == static_ip
    assert tcp_from(outside, outside.host_ip, 18601, expect=outside.ip) == outside.ip
    assert Path(plugin_socket()).is_socket()
    # pybridge turned forwarding on before dockerd looked (so dockerd left FORWARD alone):
    # the host must not route between its interfaces all the same.
    for tool, forwarding in (
        ("iptables", "ipv4/ip_forward"),
        ("ip6tables", "ipv6/conf/all/forwarding"),
    ):
        if Path(f"/proc/sys/net/{forwarding}").read_text().strip() == "1":
            assert run([tool, "-S", "FORWARD"]).stdout.splitlines()[0] == "-P FORWARD DROP"
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
