"""Addressing (static addresses, ranges, aux addresses, MACs, full subnets, overlaps) with
Docker's built-in IPAM and with pybridge's, and connect/disconnect of running containers."""

from __future__ import annotations

import ipaddress
import json
import re

import pytest

from tests.e2e.conftest import DRIVER, Docker, default_routes, free_subnet, host_veth, ping
from tests.harness import IMAGE, docker, docker_fails, wait_for
from tests.hostenv import link_names, run

IPAMS = {"docker-ipam": [], "pybridge-ipam": ["--ipam-driver", DRIVER]}


@pytest.fixture(params=list(IPAMS))
def ipam(request: pytest.FixtureRequest) -> list[str]:
    return list(IPAMS[request.param])


def test_static_addresses_v4_and_v6(d: Docker, ipam: list[str]) -> None:
    subnet = free_subnet(40)
    net = d.network(*ipam, "--ipv6", "--subnet", subnet, "--subnet", "fd00:213:40::/64")
    c = d.run(net, "--ip", "10.213.40.40", "--ip6", "fd00:213:40::40")
    assert d.ip(c, net) == "10.213.40.40"
    assert d.ip6(c, net) == "fd00:213:40::40"
    other = d.run(net)
    ping(d, other, "10.213.40.40")
    ping(d, other, "fd00:213:40::40")
    # The same static address twice is refused.
    name = d.name("dup")
    d.containers.append(name)  # a failed start leaves a created container behind
    err = docker_fails(
        "run", "-d", "--name", name, "--network", net, "--ip", "10.213.40.40", IMAGE, "true"
    )
    assert "already in use" in err.lower()
    if ipam:  # pybridge's IPAM names the address
        assert "address 10.213.40.40 is already in use in 10.213.40.0/24" in err


def test_ip_range_aux_addresses_and_gateway_are_respected(d: Docker, ipam: list[str]) -> None:
    subnet = free_subnet(41)
    net = d.network(
        *ipam,
        "--subnet",
        subnet,
        "--gateway",
        "10.213.41.1",
        "--ip-range",
        "10.213.41.0/29",
        "--aux-address",
        "a=10.213.41.2",
        "--aux-address",
        "b=10.213.41.3",
    )
    # .0 network, .1 gateway, .2/.3 aux: only .4, .5, .6 are left in the range (.7 is not the
    # subnet's broadcast address, so it is usable too).
    got = {d.ip(d.run(net), net) for _ in range(4)}
    assert got == {"10.213.41.4", "10.213.41.5", "10.213.41.6", "10.213.41.7"}


def test_full_subnet_fails_clearly_and_recovers(d: Docker, ipam: list[str]) -> None:
    subnet = free_subnet(42).replace("/24", "/29")
    net = d.network(*ipam, "--subnet", subnet)
    containers = [d.run(net) for _ in range(5)]  # .2 .. .6 (.1 is the gateway)
    name = d.name("full")
    result = run(
        ["docker", "run", "-d", "--name", name, "--network", net, IMAGE, "sleep", "60"], check=False
    )
    d.containers.append(name)
    assert result.returncode != 0
    # Docker's IPAM says "no available IPv4 addresses"; pybridge's says "out of addresses".
    assert re.search(r"out of addresses|no available IPv4 addresses", result.stderr), result.stderr
    d.rm_container(name)
    d.rm_container(containers[0])
    d.run(net)


def test_overlapping_subnets_are_refused(d: Docker) -> None:
    subnet = free_subnet(43)
    d.network("--ipam-driver", DRIVER, "--subnet", subnet)
    # pybridge's IPAM knows its pool ...
    err = docker_fails(
        "network",
        "create",
        "-d",
        DRIVER,
        "--ipam-driver",
        DRIVER,
        "--subnet",
        "10.213.43.128/25",
        d.name("bad"),
    )
    assert "overlaps the pool 10.213.43.0/24" in err
    # ... and the driver refuses overlaps even when the other IPAM never saw that pool.
    err = docker_fails(
        "network", "create", "-d", DRIVER, "--subnet", "10.213.43.0/25", d.name("bad")
    )
    assert "overlaps subnet 10.213.43.0/24 of pybridge network" in err


def test_mac_address_is_honoured(d: Docker) -> None:
    # The 28.x client refuses --mac-address against a 20.10 daemon (API 1.41); Debian's own
    # client from docker.io (/usr/bin/docker) speaks that API.
    client = "/usr/bin/docker"
    net = d.network()
    name = d.name("mac")
    d.containers.append(name)
    run(
        [
            client,
            "run",
            "-d",
            "--name",
            name,
            "--network",
            net,
            "--mac-address",
            "02:42:de:ad:be:ef",
            IMAGE,
            "sleep",
            "600",
        ]
    )
    assert "02:42:de:ad:be:ef" in d.exec(name, "ip", "link", "show", "eth0")
    # Without one, pybridge picks a stable locally administered MAC.
    other = d.run(net)
    mac = d.exec(other, "cat", "/sys/class/net/eth0/address")
    assert int(mac.split(":")[0], 16) & 0x02


def test_connect_and_disconnect_running_containers(d: Docker) -> None:
    net_a = d.network("--subnet", free_subnet(44), name=d.prefix + "-a")
    net_b = d.network("--ipam-driver", DRIVER, "--subnet", free_subnet(45), name=d.prefix + "-b")
    net_c = d.network("--subnet", free_subnet(46), name=d.prefix + "-c")
    c = d.run(net_b)
    peer_a, peer_c = d.run(net_a), d.run(net_c)
    assert default_routes(d, c) == ["default via 10.213.45.1 dev eth0"]
    docker("network", "connect", net_a, c)
    docker("network", "connect", net_c, c)
    ping(d, c, peer_a)
    ping(d, c, peer_c)
    ping(d, peer_a, c)
    # Docker picks one gateway (here: the first network by name); it is a pybridge gateway.
    assert default_routes(d, c)[0].startswith("default via 10.213.44.1 ")
    endpoint = json.loads(docker("inspect", c))[0]["NetworkSettings"]["Networks"][net_a]
    veth = host_veth(endpoint["EndpointID"])
    assert veth in link_names()
    docker("network", "disconnect", net_a, c)
    assert wait_for(lambda: veth not in link_names(), timeout=10)  # removed just after
    assert default_routes(d, c)[0].startswith("default via 10.213.45.1 ")
    ping(d, c, peer_c)
    ip_c = ipaddress.ip_address(d.ip(c, net_b))
    assert ip_c in ipaddress.ip_network("10.213.45.0/24")
