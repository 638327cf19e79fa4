"""The foundation, driven as a user would with the docker CLI against a real dockerd."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess

from tests.e2e.conftest import (
    DRIVER,
    Docker,
    Plugin,
    default_routes,
    free_subnet,
    ping,
    pybridge_veths,
)
from tests.harness import docker, wait_for
from tests.hostenv import OutsideHost, all_addresses, firewall_dump, link_names, routes


def _bridge_of(d: Docker, network: str) -> str:
    network_id = str(d.network_info(network)["Id"])
    matches = [n for n in link_names() if n == "pyb-" + network_id[:11]]
    assert matches, f"no bridge for network {network} ({network_id[:12]})"
    return matches[0]


def test_two_containers_ping_by_ip_and_by_name(d: Docker) -> None:
    net = d.network()
    a = d.run(net)
    b = d.run(net)
    ping(d, a, d.ip(b, net))
    ping(d, b, d.ip(a, net))
    ping(d, a, b)  # Docker's embedded DNS works on pybridge networks
    ping(d, b, a)


def test_default_route_via_gateway_and_gateway_reachable(d: Docker) -> None:
    subnet = free_subnet(10)
    net = d.network("--subnet", subnet, "--gateway", "10.213.10.254")
    c = d.run(net)
    assert default_routes(d, c) == ["default via 10.213.10.254 dev eth0"], default_routes(d, c)
    ping(d, c, "10.213.10.254")
    assert "10.213.10.254/24" in all_addresses()


def test_egress_is_masqueraded(d: Docker, outside: OutsideHost) -> None:
    net = d.network()
    c = d.run(net)
    seen = d.exec(c, "nc", "-w", "5", outside.ip, str(outside.port))
    # The outside host has no route to the container subnet: an answer at all proves NAT,
    # and the source it saw is the host's own address on that link.
    assert seen == outside.host_ip, seen


def test_network_inspect_shows_ipam_config(d: Docker) -> None:
    subnet = free_subnet(11)
    net = d.network(
        "--subnet",
        subnet,
        "--gateway",
        "10.213.11.1",
        "--ip-range",
        "10.213.11.128/25",
        "--aux-address",
        "printer=10.213.11.130",
    )
    info = d.network_info(net)
    assert info["Driver"] == DRIVER
    config = info["IPAM"]["Config"][0]  # type: ignore[index]
    assert config["Subnet"] == subnet
    assert config["Gateway"] == "10.213.11.1"
    assert config["IPRange"] == "10.213.11.128/25"
    assert config["AuxiliaryAddresses"] == {"printer": "10.213.11.130"}
    c = d.run(net)
    address = ipaddress.ip_address(d.ip(c, net))
    assert address in ipaddress.ip_network("10.213.11.128/25")
    assert str(address) != "10.213.11.130"


def test_auto_subnet_with_docker_ipam_and_pybridge_ipam(d: Docker) -> None:
    before = {str(r.get("dst")) for r in routes()}
    for ipam in ([], ["--ipam-driver", DRIVER]):
        net = d.network(*ipam)
        config = d.network_info(net)["IPAM"]["Config"][0]  # type: ignore[index]
        subnet = ipaddress.ip_network(config["Subnet"])
        for dst in before:
            if dst != "default" and ":" not in dst:
                assert not subnet.overlaps(ipaddress.ip_network(dst, strict=False)), (subnet, dst)
        c = d.run(net)
        assert ipaddress.ip_address(d.ip(c, net)) in subnet
        gateway = default_routes(d, c)[0].split()[2]
        ping(d, c, gateway)
    # Two automatic pybridge-IPAM networks never share a subnet.
    n1 = d.network("--ipam-driver", DRIVER)
    n2 = d.network("--ipam-driver", DRIVER)
    s1 = d.network_info(n1)["IPAM"]["Config"][0]["Subnet"]  # type: ignore[index]
    s2 = d.network_info(n2)["IPAM"]["Config"][0]["Subnet"]  # type: ignore[index]
    assert not ipaddress.ip_network(s1).overlaps(ipaddress.ip_network(s2))


def test_pybridge_ipam_with_pybridge_driver(d: Docker) -> None:
    subnet = free_subnet(12)
    net = d.network("--ipam-driver", DRIVER, "--subnet", subnet)
    info = d.network_info(net)
    assert info["IPAM"]["Driver"] == DRIVER  # type: ignore[index]
    a = d.run(net)
    b = d.run(net, "--ip", "10.213.12.77")
    assert d.ip(a, net) == "10.213.12.2"  # gateway took .1
    assert d.ip(b, net) == "10.213.12.77"
    ping(d, a, b)
    ping(d, b, "10.213.12.1")


def test_pybridge_ipam_with_builtin_bridge_driver(d: Docker) -> None:
    subnet = free_subnet(13)
    net = d.network("--ipam-driver", DRIVER, "--subnet", subnet, driver="bridge")
    info = d.network_info(net)
    assert info["Driver"] == "bridge"
    assert info["IPAM"]["Driver"] == DRIVER  # type: ignore[index]
    a = d.run(net)
    b = d.run(net)
    ips = {d.ip(a, net), d.ip(b, net)}
    assert ips == {"10.213.13.2", "10.213.13.3"}
    ping(d, a, b)
    # An automatic pool works for the built-in driver too.
    auto = d.network("--ipam-driver", DRIVER, driver="bridge")
    c = d.run(auto)
    config = d.network_info(auto)["IPAM"]["Config"][0]  # type: ignore[index]
    assert ipaddress.ip_address(d.ip(c, auto)) in ipaddress.ip_network(config["Subnet"])


def test_container_restart_keeps_connectivity(d: Docker) -> None:
    net = d.network("--ipam-driver", DRIVER)
    a = d.run(net)
    b = d.run(net)
    docker("restart", "-t", "0", b)
    ping(d, a, b)
    ping(d, b, a)
    docker("stop", "-t", "0", a)
    docker("start", a)
    ping(d, a, b)


def _addresses_in(d: Docker, net: str, containers: list[str]) -> list[str]:
    return [d.ip(c, net) for c in containers]


def test_plugin_restart_with_running_containers(d: Docker, plugin: Plugin) -> None:
    nets = [d.network(), d.network("--ipam-driver", DRIVER)]
    running = {net: [d.run(net), d.run(net)] for net in nets}
    before = {net: _addresses_in(d, net, cs) for net, cs in running.items()}
    net0_first = running[nets[0]][0]
    # Pings keep flowing while the plugin restarts: the data plane does not depend on it.
    pinger = subprocess.Popen(
        [
            "docker",
            "exec",
            net0_first,
            "ping",
            "-c",
            "40",
            "-i",
            "0.1",
            "-W",
            "1",
            running[nets[0]][1],
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    plugin.restart()
    plugin.kill9_and_start()
    out, _ = pinger.communicate(timeout=60)
    assert "40 packets received" in out, out
    for net, containers in running.items():
        assert _addresses_in(d, net, containers) == before[net]
        ping(d, containers[0], containers[1])
        # Later containers get fresh, unique addresses.
        late = d.run(net)
        late_ip = d.ip(late, net)
        assert late_ip not in before[net]
        ping(d, late, containers[0])


def test_network_rm_leaves_nothing_behind(d: Docker, outside: OutsideHost) -> None:
    subnet = free_subnet(14)
    net = d.network("--subnet", subnet)
    network_id = str(d.network_info(net)["Id"])
    bridge = _bridge_of(d, net)
    containers = [d.run(net), d.run(net)]
    endpoint_ids = [
        str(json.loads(docker("inspect", c))[0]["NetworkSettings"]["Networks"][net]["EndpointID"])
        for c in containers
    ]
    assert d.exec(containers[0], "nc", "-w", "5", outside.ip, str(outside.port))
    rules = firewall_dump()
    assert bridge in rules
    assert subnet in rules
    for c in containers:
        d.rm_container(c)
    d.rm_network(net)

    # Addresses and routes go before the answer; the bridge, veths and rules just after it.
    assert not any(a.startswith("10.213.14.") for a in all_addresses())
    assert not any(str(r.get("dst", "")).startswith("10.213.14.") for r in routes())
    wait_for(lambda: bridge not in link_names() and bridge not in firewall_dump(), timeout=5)
    names = link_names()
    assert bridge not in names
    for eid in endpoint_ids:
        assert not any(eid[:12] in n for n in names), (eid, names)
    rules = firewall_dump()
    assert bridge not in rules
    assert subnet not in rules
    assert network_id[:11] not in rules


def test_no_pybridge_rules_or_links_once_every_network_is_gone(d: Docker) -> None:
    net = d.network()
    d.run(net)
    assert "PYBRIDGE-FORWARD" in firewall_dump()
    d.cleanup()
    # Networks someone else made with pybridge may exist; everything else must be gone (bridges
    # and rules go just after `docker network rm` answers).
    wait_for(lambda: not re.search(r"pyb-|PYBRIDGE", " ".join(link_names()) + firewall_dump()), 5)
    remaining = docker("network", "ls", "--filter", f"driver={DRIVER}", "-q", "--no-trunc").split()
    expected_bridges = {"pyb-" + network_id[:11] for network_id in remaining}
    leftover = {n for n in link_names() if re.match(r"^pyb-", n)} - expected_bridges
    assert leftover == set(), leftover
    if remaining:
        assert "PYBRIDGE-FORWARD" in firewall_dump()
    else:
        assert "PYBRIDGE" not in firewall_dump()
        # (Spare pairs go just after the last network.)
        wait_for(lambda: not pybridge_veths(), 10)
        assert not pybridge_veths()
