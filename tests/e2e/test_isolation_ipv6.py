"""Isolation between networks (pybridge's and Docker's own), and IPv6 / dual stack."""

from __future__ import annotations

from tests.e2e.conftest import DRIVER, Docker, cannot_ping, default_routes, free_subnet, ping
from tests.harness import docker
from tests.hostenv import OutsideHost, firewall_dump


def test_two_pybridge_networks_cannot_reach_each_other(d: Docker) -> None:
    n1, n2 = d.network(), d.network("--ipam-driver", DRIVER)
    a, b = d.run(n1), d.run(n2)
    cannot_ping(d, a, d.ip(b, n2))
    cannot_ping(d, b, d.ip(a, n1))
    # A container on both networks reaches both sides.
    both = d.run(n1)
    docker("network", "connect", n2, both)
    ping(d, both, d.ip(a, n1))
    ping(d, both, d.ip(b, n2))


def test_docker_bridges_and_pybridge_cannot_reach_each_other(d: Docker) -> None:
    ours = d.network()
    theirs = d.network(driver="bridge")  # a br-<id> bridge
    mine = d.run(ours)
    user_bridge = d.run(theirs)
    default_bridge = d.run("bridge")  # docker0
    for other, net in ((user_bridge, theirs), (default_bridge, "bridge")):
        cannot_ping(d, mine, d.ip(other, net))
        cannot_ping(d, other, d.ip(mine, ours))
    # Docker's own isolation is untouched: its networks still reach the gateway and each other
    # exactly as before pybridge (same-network traffic still works).
    second = d.run(theirs)
    ping(d, user_bridge, second)


def test_dual_stack(d: Docker, outside: OutsideHost) -> None:
    subnet4 = free_subnet(30)
    net = d.network("--ipv6", "--subnet", subnet4, "--subnet", "fd00:213:30::/64")
    a, b = d.run(net), d.run(net)
    ip6_b = d.ip6(b, net)
    assert ip6_b.startswith("fd00:213:30::")
    ping(d, a, ip6_b)
    ping(d, a, b)  # by name, either family
    ping(d, a, d.ip(b, net))
    assert default_routes(d, a, "-6")[0].startswith("default via fd00:213:30::1 dev eth0")
    # Out to the world over IPv6, masqueraded like IPv4.
    seen = d.exec(a, "nc", "-w", "5", outside.ip6, str(outside.port))
    assert seen == outside.host_ip6, seen
    assert d.exec(a, "nc", "-w", "5", outside.ip, str(outside.port)) == outside.host_ip
    assert "fd00:213:30::/64" in firewall_dump()


def test_dual_stack_with_pybridge_ipam_automatic_v6(d: Docker) -> None:
    net = d.network("--ipam-driver", DRIVER, "--ipv6")
    configs = d.network_info(net)["IPAM"]["Config"]  # type: ignore[index]
    v6 = [c for c in configs if ":" in c["Subnet"]]
    assert v6
    assert v6[0]["Subnet"].startswith("fd")
    assert v6[0]["Subnet"].endswith("::/64")
    a, b = d.run(net), d.run(net)
    ping(d, a, d.ip6(b, net))


def test_ipv6_isolation_between_networks(d: Docker) -> None:
    n1 = d.network("--ipv6", "--subnet", free_subnet(31), "--subnet", "fd00:213:31::/64")
    n2 = d.network("--ipv6", "--subnet", free_subnet(32), "--subnet", "fd00:213:32::/64")
    a, b = d.run(n1), d.run(n2)
    cannot_ping(d, a, d.ip6(b, n2))
