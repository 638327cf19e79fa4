"""Network options and flags of the built-in bridge driver, on pybridge networks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.e2e.conftest import (
    DRIVER,
    Docker,
    cannot_ping,
    default_routes,
    free_subnet,
    host_veth,
    ping,
    tcp_from_container,
)
from tests.harness import docker, wait_for
from tests.hostenv import OutsideHost, link_names, run


def network_id(d: Docker, net: str) -> str:
    return str(d.network_info(net)["Id"])


def link(name: str) -> dict[str, object]:
    data = json.loads(run(["ip", "-j", "-d", "link", "show", "dev", name]).stdout)
    return dict(data[0])


def endpoint_id(container: str, net: str) -> str:
    info = json.loads(docker("inspect", container))[0]
    return str(info["NetworkSettings"]["Networks"][net]["EndpointID"])


@contextmanager
def outside_route_to(outside: OutsideHost, subnet: str) -> Iterator[None]:
    """Give the outside host a route back to a container subnet (as a real router might)."""
    outside.exec("ip", "route", "add", subnet, "via", outside.host_ip)
    try:
        yield
    finally:
        outside.exec("ip", "route", "del", subnet, check=False)


def test_bridge_name_option(d: Docker) -> None:
    name = "pbt-br" + d.prefix[-4:]
    net = d.network("-o", f"com.docker.network.bridge.name={name}")
    a, b = d.run(net), d.run(net)
    assert name in link_names()
    assert link(name)["linkinfo"]["info_kind"] == "bridge"  # type: ignore[index]
    ping(d, a, b)
    d.cleanup()
    assert name not in link_names()


def test_bridge_name_reused_at_once_after_network_rm(d: Docker) -> None:
    """A removed network's bridge goes just after `docker network rm` answers; a new network
    asking for the same name at once gets a bridge that stays. (Docker's own delays usually
    hide the race; the unit test test_a_bridge_name_is_reused_only_once_the_old_bridge_is_gone
    forces it.)"""
    name = "pyb-pbt" + d.prefix[-4:]
    net = d.network("-o", f"com.docker.network.bridge.name={name}")
    for _ in range(3):
        d.run(net)
    d.cleanup()
    again = d.network("-o", f"com.docker.network.bridge.name={name}", name=net)
    a, b = d.run(again), d.run(again)
    ping(d, a, b)
    time.sleep(1)  # longer than any deferred removal takes
    assert name in link_names()
    ping(d, a, b)
    d.cleanup()
    assert wait_for(lambda: name not in link_names(), timeout=10)


def test_user_bridge_is_used_and_kept(d: Docker) -> None:
    name = "pbt-ub" + d.prefix[-4:]
    run(["ip", "link", "add", name, "type", "bridge"])
    try:
        net = d.network("--subnet", free_subnet(20), "-o", f"com.docker.network.bridge.name={name}")
        a, b = d.run(net), d.run(net)
        ping(d, a, b)
        d.cleanup()
        assert name in link_names()
        assert "10.213.20.1" not in run(["ip", "-o", "addr", "show", "dev", name]).stdout
    finally:
        run(["ip", "link", "del", name], check=False)


def test_mtu_on_bridge_and_both_veth_ends(d: Docker) -> None:
    net = d.network("-o", "com.docker.network.driver.mtu=1400")
    c = d.run(net)
    bridge = "pyb-" + network_id(d, net)[:11]
    assert link(bridge)["mtu"] == 1400
    host_end = host_veth(endpoint_id(c, net))
    assert link(host_end)["mtu"] == 1400
    assert "mtu 1400" in d.exec(c, "ip", "link", "show", "eth0")
    # the short spelling from the docker docs is accepted too
    net2 = d.network("-o", "mtu=1300")
    c2 = d.run(net2)
    assert "mtu 1300" in d.exec(c2, "ip", "link", "show", "eth0")


def test_container_iface_prefix(d: Docker) -> None:
    net = d.network("-o", "com.docker.network.container_iface_prefix=pbt")
    c = d.run(net)
    assert "pbt0" in d.exec(c, "ip", "link", "show")
    assert "dev pbt0" in default_routes(d, c)[0]


def test_icc_disabled_blocks_containers_but_not_egress(d: Docker, outside: OutsideHost) -> None:
    net = d.network("-o", "com.docker.network.bridge.enable_icc=false")
    a, b = d.run(net), d.run(net)
    cannot_ping(d, a, d.ip(b, net))
    assert tcp_from_container(d, a, outside.ip, outside.port) == outside.host_ip


def test_masquerade_disabled_keeps_container_source(d: Docker, outside: OutsideHost) -> None:
    subnet = free_subnet(21)
    net = d.network(
        "--subnet", subnet, "-o", "com.docker.network.bridge.enable_ip_masquerade=false"
    )
    c = d.run(net)
    # Without NAT, the outside host only answers if it can route back to the container.
    assert tcp_from_container(d, c, outside.ip, outside.port) == ""
    with outside_route_to(outside, subnet):
        assert tcp_from_container(d, c, outside.ip, outside.port) == d.ip(c, net)


def test_invalid_option_values_are_refused(d: Docker) -> None:
    for option, fragment in [
        ("com.docker.network.bridge.enable_icc=maybe", "enable_icc 'maybe' is not valid"),
        ("com.docker.network.driver.mtu=20", "must be a whole number from 68 to 65535"),
        ("com.docker.network.bridge.name=way-too-long-name", "is not a valid interface name"),
        ("com.docker.network.bridge.host_binding_ipv4=nope", "is not an IP address"),
        ("com.docker.network.container_iface_prefix=9x", "container_iface_prefix '9x'"),
    ]:
        result = run(
            ["docker", "network", "create", "-d", DRIVER, "-o", option, d.name("bad")],
            check=False,
        )
        assert result.returncode != 0
        assert fragment in result.stderr, result.stderr


def test_internal_network(d: Docker, outside: OutsideHost) -> None:
    subnet = free_subnet(22)
    net = d.network("--internal", "--subnet", subnet)
    a, b = d.run(net), d.run(net)
    ping(d, a, b)
    assert default_routes(d, a) == []
    assert tcp_from_container(d, a, outside.ip, outside.port) == ""
    # Even a container that is also on a normal network cannot send traffic out through it.
    normal = d.network()
    docker("network", "connect", normal, a)
    with outside_route_to(outside, subnet):
        out = outside.exec("busybox", "ping", "-c", "1", "-W", "1", d.ip(b, net), check=False)
        assert " 0 packets received" in out, out
    rules = run(["iptables", "-t", "nat", "-S"]).stdout
    assert subnet not in rules  # never masqueraded


def test_accept_ra_is_off_on_pybridge_bridges(d: Docker) -> None:
    net = d.network()
    bridge = "pyb-" + network_id(d, net)[:11]
    assert Path(f"/proc/sys/net/ipv6/conf/{bridge}/accept_ra").read_text().strip() == "0"
