"""What dockerd 28 and later let users do that older daemons did not: IPv6-only networks
(`--ipv4=false`). Skipped against dockerd 20.10 and 26.1, which do not send the flag."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import (
    DRIVER,
    ECHO_TCP,
    Docker,
    default_routes,
    ping,
    tcp_from,
    tcp_from_container,
)
from tests.harness import docker, docker_fails
from tests.hostenv import OutsideHost, firewall_dump


def server_major() -> int:
    version = docker("version", "--format", "{{.Server.Version}}")
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


@pytest.fixture
def docker28(environment: None) -> None:
    if server_major() < 28:
        pytest.skip("needs dockerd 28 or later (--ipv4=false)")


def v6_config(d: Docker, network: str) -> tuple[str, str]:
    """The network's (IPv6 subnet, IPv6 gateway) as Docker reports them; it has no IPv4."""
    info = d.network_info(network)
    assert info["EnableIPv4"] is False, info
    configs = info["IPAM"]["Config"]  # type: ignore[index]
    assert [":" in c["Subnet"] for c in configs] == [True], configs
    return configs[0]["Subnet"], configs[0].get("Gateway", "")


def check_ipv6_only(d: Docker, outside: OutsideHost, network: str, port: int) -> None:
    subnet, gateway = v6_config(d, network)
    web = d.run(network, "-p", f"{port}:80", command=ECHO_TCP)
    client = d.run(network)
    # Only IPv6: no IPv4 address, no IPv4 route out.
    assert d.ip(web, network) == ""
    web6, client6 = d.ip6(web, network), d.ip6(client, network)
    assert web6
    assert client6
    prefix = subnet.split("::/")[0]
    assert web6.startswith(prefix), (subnet, web6)
    assert client6.startswith(prefix), (subnet, client6)
    inet = d.exec(client, "ip", "-o", "-4", "addr", "show", "dev", "eth0", check=False)
    assert " inet " not in f" {inet}", inet
    assert default_routes(d, client, "-4") == []
    assert default_routes(d, client, "-6")[0].startswith(f"default via {gateway}".strip())
    # The containers reach each other.
    ping(d, client, web6)
    ping(d, web, client6)
    assert tcp_from_container(d, client, web6, 80) == client6
    # Out to the world over IPv6, masqueraded; there is no IPv4 way out.
    assert d.exec(client, "nc", "-w", "5", outside.ip6, str(outside.port)) == outside.host_ip6
    assert tcp_from_container(d, client, outside.ip, outside.port) == ""
    # -p publishes on the host's IPv6 addresses (the container has nothing else).
    assert tcp_from(outside, outside.host_ip6, port, outside.ip6) == outside.ip6
    assert tcp_from(outside, outside.host_ip, port) == ""
    # Nothing reaches the container's own address from outside, even with a route to it.
    outside.exec("ip", "-6", "route", "add", subnet, "via", outside.host_ip6)
    try:
        assert tcp_from(outside, web6, 80) == ""
    finally:
        outside.exec("ip", "-6", "route", "del", subnet, check=False)
    assert subnet in firewall_dump()


def test_ipv6_only_network_with_dockers_ipam(
    d: Docker, outside: OutsideHost, docker28: None
) -> None:
    net = d.network("--ipv4=false", "--ipv6", "--subnet", "fd00:213:85::/64")
    check_ipv6_only(d, outside, net, 18290)


def test_ipv6_only_network_with_pybridge_ipam(
    d: Docker, outside: OutsideHost, docker28: None
) -> None:
    # No subnet given: pybridge's IPAM picks a /64 of its unique-local /48.
    net = d.network("--ipam-driver", DRIVER, "--ipv4=false", "--ipv6")
    subnet, _ = v6_config(d, net)
    assert subnet.startswith("fd"), subnet
    assert subnet.endswith("::/64"), subnet
    check_ipv6_only(d, outside, net, 18291)


def test_ipv6_only_network_with_pybridge_ipam_and_a_subnet(
    d: Docker, outside: OutsideHost, docker28: None
) -> None:
    net = d.network(
        "--ipam-driver", DRIVER, "--ipv4=false", "--ipv6", "--subnet", "fd00:213:86::/64"
    )
    check_ipv6_only(d, outside, net, 18292)


def test_ipv4_false_without_ipv6_is_one_plain_sentence(d: Docker, docker28: None) -> None:
    for ipam in ((), ("--ipam-driver", DRIVER)):
        name = d.name("net")
        err = docker_fails("network", "create", "-d", DRIVER, *ipam, "--ipv4=false", name)
        assert (
            "the network would have neither IPv4 nor IPv6: use --ipv4=false together with --ipv6"
            in err
        ), err
        assert len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err
        assert docker("network", "ls", "-q", "--filter", f"name=^{name}$") == ""


def test_ip_families_given_as_driver_options(d: Docker, docker28: None) -> None:
    """dockerd 28+ also takes the families as `-o` (the CLI sends --ipv4/--ipv6 only when
    given) and passes the options on next to the flags it derived from them: pybridge
    accepts them rather than refusing unknown options."""
    net = d.network(
        "-o",
        "com.docker.network.enable_ipv4=false",
        "-o",
        "com.docker.network.enable_ipv6=true",
        "--subnet",
        "fd00:213:87::/64",
    )
    v6_config(d, net)
    a, b = d.run(net), d.run(net)
    assert d.ip(a, net) == ""
    ping(d, a, d.ip6(b, net))
