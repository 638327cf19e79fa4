"""Docker 28's bridge options (issue 14), by their effect on packets, with Docker's own bridge
driver on the same daemon as the expected result.

Each scenario runs twice, first with `-d bridge`, then with `-d pybridge`, on the same subnets
and container addresses, and returns what it saw: who reaches which port, which source address
the far side sees, which addresses sit on the bridge. The two must agree, except for the facts
a test names as pybridge's stricter choice (checked on their own). The outside host routes the
container subnets to this host where a scenario needs it, as a router on the LAN would.

Skipped where the daemon is older than the one that knows the option (`docker version`)."""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.e2e.conftest import DRIVER, Docker, default_routes, free_subnet, tcp_from
from tests.harness import IMAGE, docker, wait_for
from tests.hostenv import OUTSIDE_HOST_IF, OutsideHost, probe, run

BUILT_IN = "bridge"
ECHO_80_81 = ("pbtest-echo", "tcp", "80", "81")

Facts = dict[str, object]
Scenario = Callable[[Docker, str], Facts]


def server_version() -> tuple[int, int]:
    version = docker("version", "--format", "{{.Server.Version}}")
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return 0, 0


def needs(major: int, minor: int, what: str) -> None:
    if server_version() < (major, minor):
        pytest.skip(f"needs dockerd {major}.{minor} or later ({what})")


def on_both(d: Docker, scenario: Scenario) -> dict[str, Facts]:
    """The scenario's facts with Docker's bridge driver, then with pybridge (each run's
    networks and containers removed before the next, so both use the same addresses)."""
    facts = {}
    for driver in (BUILT_IN, DRIVER):
        try:
            facts[driver] = scenario(d, driver)
        finally:
            d.cleanup()
    return facts


def same(facts: dict[str, Facts], *stricter: str) -> None:
    """Both drivers saw the same, but for the ``stricter`` facts (checked by the caller)."""
    docker_facts = {k: v for k, v in facts[BUILT_IN].items() if k not in stricter}
    ours = {k: v for k, v in facts[DRIVER].items() if k not in stricter}
    differing = {k: (docker_facts.get(k), ours.get(k)) for k in docker_facts | ours}
    differing = {k: v for k, v in differing.items() if v[0] != v[1]}
    assert not differing, f"(bridge, pybridge) differ: {json.dumps(differing, indent=1)}"


# -- what the scenarios look at ----------------------------------------------------------------


def bridge_of(d: Docker, network: str, driver: str) -> str:
    network_id = str(d.network_info(network)["Id"])
    return f"br-{network_id[:12]}" if driver == BUILT_IN else f"pyb-{network_id[:11]}"


def bridge_addresses(d: Docker, network: str, driver: str) -> list[str]:
    """The addresses on the network's bridge; any IPv6 link-local one as "link-local"."""
    out = run(["ip", "-j", "addr", "show", "dev", bridge_of(d, network, driver)]).stdout
    found = set()
    for link in json.loads(out or "[]"):
        for info in link.get("addr_info", []):
            address = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}")
            found.add("link-local" if address.ip.is_link_local else str(address))
    return sorted(found)


def create_must_fail(d: Docker, driver: str, *args: str) -> tuple[bool, str]:
    """`docker network create` of a network that must be refused: (refused, its error). One
    that is made anyway is removed with the test's own."""
    name = d.name("refused")
    result = run(["docker", "network", "create", "-d", driver, *args, name], check=False)
    if result.returncode == 0:
        d.networks.append(name)
    return result.returncode != 0, result.stderr.strip()


def run_with_network_options(d: Docker, network: str, driver_opt: str) -> tuple[str, str]:
    """`docker run --network name=NETWORK,driver-opt=K=V`: (the container if it runs, else
    "", and the error)."""
    name = d.name("c")
    d.containers.append(name)
    result = run(
        [
            *("docker", "run", "-d", "--name", name),
            *("--network", f"name={network},driver-opt={driver_opt}"),
            *(IMAGE, "sleep", "600"),
        ],
        check=False,
    )
    return (name if result.returncode == 0 else ""), result.stderr.strip()


def gateways_in_inspect(d: Docker, network: str) -> list[str]:
    """The gateway of each subnet as `docker network inspect` shows it ("" when none was
    allocated)."""
    configs = d.network_info(network)["IPAM"]["Config"] or []  # type: ignore[index]
    return sorted(str(c.get("Gateway", "")) for c in configs)


def outside_reaches(outside: OutsideHost, ip: str, port: int) -> str:
    """What a TCP client on the outside host gets: the address the server saw, '' if none."""
    return tcp_from(outside, ip, port)


def outside_pings(outside: OutsideHost, ip: str) -> bool:
    out = outside.probe("busybox", "ping", "-c", "1", "-W", "2", ip)
    return " 1 packets received" in out


def source_seen_by_outside(d: Docker, container: str, outside: OutsideHost, v6: bool) -> str:
    """The source address the outside host's server sees for a connection from ``container``
    ('' if nothing answers)."""
    target = outside.ip6 if v6 else outside.ip
    return d.probe(container, "nc", "-w", "3", target, str(outside.port))


# pybridge writes a publication's rules just after answering ProgramExternalConnectivity (README,
# Publishing: a few milliseconds, more on a busy host); Docker's are there before the container
# starts. The facts compare the steady state of both.
RULES_GO_LIVE = 0.5


def listening(d: Docker, container: str, *ports: int) -> None:
    """Wait until ``container``'s echo servers listen on ``ports``, then for the rules."""

    def up() -> bool:
        out = d.exec(container, "netstat", "-ltn", check=False)
        return all(f":{port} " in out for port in ports)

    assert wait_for(up, timeout=15), f"{container} does not listen on {ports}"
    time.sleep(RULES_GO_LIVE)


def warm_up(outside: OutsideHost, *addresses: str) -> None:
    """Neighbour discovery first (the host's own pings pass in every mode), so a port that
    answers does not look closed because its first IPv6 packet waited."""
    for address in addresses:
        run(["busybox", "ping", "-c", "1", "-W", "1", address], check=False)
    for address in (outside.host_ip, outside.host_ip6):
        outside.exec("busybox", "ping", "-c", "1", "-W", "1", address, check=False)


@contextmanager
def outside_routes(outside: OutsideHost, *subnets: str) -> Iterator[None]:
    """The outside host routes ``subnets`` to this host, as a LAN router would."""
    added = []
    try:
        for subnet in subnets:
            via = outside.host_ip6 if ":" in subnet else outside.host_ip
            outside.exec("ip", "route", "add", subnet, "via", via)
            added.append(subnet)
        yield
    finally:
        for subnet in added:
            outside.exec("ip", "route", "del", subnet, check=False)


def dual_stack(third: int) -> tuple[list[str], str, str]:
    """(network create arguments, IPv4 subnet, IPv6 subnet) for 10.213.THIRD.0/24 and
    fd00:213:THIRD::/64."""
    v4, v6 = free_subnet(third), f"fd00:213:{third}::/64"
    return ["--subnet", v4, "--ipv6", "--subnet", v6], v4, v6


def addresses(third: int, last: int) -> tuple[str, str, list[str]]:
    v4, v6 = f"10.213.{third}.{last}", f"fd00:213:{third}::{last}"
    return v4, v6, ["--ip", v4, "--ip6", v6]


def mode_options(v4: str, v6: str) -> list[str]:
    return [
        "-o",
        f"com.docker.network.bridge.gateway_mode_ipv4={v4}",
        "-o",
        f"com.docker.network.bridge.gateway_mode_ipv6={v6}",
    ]


# -- gateway modes ------------------------------------------------------------------------------


def test_gateway_mode_nat_unprotected(d: Docker, outside: OutsideHost) -> None:
    needs(28, 0, "gateway mode nat-unprotected")
    third = 120
    create, subnet4, subnet6 = dual_stack(third)
    web4, web6, at = addresses(third, 10)

    def scenario(d: Docker, driver: str) -> Facts:
        net = d.network(*create, *mode_options("nat-unprotected", "nat-unprotected"), driver=driver)
        web = d.run(net, *at, "-p", "18300:80", command=ECHO_80_81)
        listening(d, web, 80, 81)
        with outside_routes(outside, subnet4, subnet6):
            warm_up(outside, web4, web6)
            return {
                "bridge addresses": bridge_addresses(d, net, driver),
                "outside to published port, IPv4": outside_reaches(outside, web4, 80),
                "outside to unpublished port, IPv4": outside_reaches(outside, web4, 81),
                "outside to unpublished port, IPv6": outside_reaches(outside, web6, 81),
                "outside to host port": outside_reaches(outside, outside.host_ip, 18300),
                "egress source, IPv4": source_seen_by_outside(d, web, outside, v6=False),
                "egress source, IPv6": source_seen_by_outside(d, web, outside, v6=True),
            }

    facts = on_both(d, scenario)
    same(facts)
    assert facts[DRIVER]["outside to unpublished port, IPv6"] == outside.ip6
    assert facts[DRIVER]["egress source, IPv4"] == outside.host_ip


def test_gateway_mode_routed(d: Docker, outside: OutsideHost) -> None:
    needs(27, 0, "gateway mode routed")
    third = 121
    create, subnet4, subnet6 = dual_stack(third)
    web4, web6, at = addresses(third, 10)

    def scenario(d: Docker, driver: str) -> Facts:
        net = d.network(*create, *mode_options("routed", "routed"), driver=driver)
        web = d.run(net, *at, "-p", "18301:80", "-p", "127.0.0.1:18306:81", command=ECHO_80_81)
        listening(d, web, 80, 81)
        other_net = d.network("--subnet", free_subnet(122), driver=driver)
        other = d.run(other_net)
        with outside_routes(outside, subnet4, subnet6):
            warm_up(outside, web4, web6)
            return {
                "bridge addresses": bridge_addresses(d, net, driver),
                "outside to published container port, IPv4": outside_reaches(outside, web4, 80),
                "outside to published container port, IPv6": outside_reaches(outside, web6, 80),
                "outside to a port published on 127.0.0.1": outside_reaches(outside, web4, 81),
                "outside to unpublished port, IPv6": outside_reaches(outside, web6, 81),
                "outside to the -p host port, IPv4": outside_reaches(
                    outside, outside.host_ip, 18301
                ),
                "outside to the -p host port, IPv6": outside_reaches(
                    outside, outside.host_ip6, 18301
                ),
                "outside pings, IPv4": outside_pings(outside, web4),
                "outside pings, IPv6": outside_pings(outside, web6),
                "egress source, IPv4": source_seen_by_outside(d, web, outside, v6=False),
                "egress source, IPv6": source_seen_by_outside(d, web, outside, v6=True),
                "another network to published port": d.probe(other, "nc", "-w", "3", web4, "80"),
                "another network to a port published on 127.0.0.1": d.probe(
                    other, "nc", "-w", "3", web4, "81"
                ),
            }

    facts = on_both(d, scenario)
    # Docker opens a port published on 127.0.0.1 to everyone who routes to the container
    # ("Using address 0.0.0.0 because NAT is disabled"); pybridge opens nothing for it.
    loopback = (
        "outside to a port published on 127.0.0.1",
        "another network to a port published on 127.0.0.1",
    )
    same(facts, *loopback)
    ours = facts[DRIVER]
    assert [ours[fact] for fact in loopback] == ["", ""]
    assert ours["outside to published container port, IPv4"] == outside.ip
    assert ours["outside to unpublished port, IPv6"] == ""
    assert ours["outside to the -p host port, IPv4"] == ""
    assert ours["egress source, IPv4"] == web4


def test_gateway_modes_per_family(d: Docker, outside: OutsideHost) -> None:
    needs(27, 0, "gateway mode routed")
    third = 123
    create, subnet4, subnet6 = dual_stack(third)
    web4, web6, at = addresses(third, 10)

    def scenario(d: Docker, driver: str) -> Facts:
        net = d.network(*create, *mode_options("routed", "nat"), driver=driver)
        web = d.run(net, *at, "-p", "18302:80", command=ECHO_80_81)
        listening(d, web, 80, 81)
        with outside_routes(outside, subnet4, subnet6):
            warm_up(outside, web4, web6)
            return {
                "outside to container port, IPv4": outside_reaches(outside, web4, 80),
                "outside to container port, IPv6": outside_reaches(outside, web6, 80),
                "outside to host port, IPv4": outside_reaches(outside, outside.host_ip, 18302),
                "outside to host port, IPv6": outside_reaches(outside, outside.host_ip6, 18302),
                "egress source, IPv4": source_seen_by_outside(d, web, outside, v6=False),
                "egress source, IPv6": source_seen_by_outside(d, web, outside, v6=True),
            }

    facts = on_both(d, scenario)
    same(facts)
    assert facts[DRIVER]["egress source, IPv6"] == outside.host_ip6


def test_gateway_mode_isolated(d: Docker) -> None:
    needs(28, 0, "gateway mode isolated")
    third = 124
    create, _, _ = dual_stack(third)
    one4, one6, one_at = addresses(third, 10)
    two4, two6, two_at = addresses(third, 11)

    def scenario(d: Docker, driver: str) -> Facts:
        net = d.network("--internal", *create, *mode_options("isolated", "isolated"), driver=driver)
        one = d.run(net, *one_at)
        echo = d.run(net, *two_at, command=("pbtest-echo", "tcp", "80"))
        listening(d, echo, 80)
        refused, error = create_must_fail(d, driver, *mode_options("isolated", "nat"))
        return {
            "bridge addresses": bridge_addresses(d, net, driver),
            "gateways allocated": gateways_in_inspect(d, net),
            "default routes": default_routes(d, one) + default_routes(d, one, "-6"),
            "container to container, IPv4": d.probe(one, "nc", "-w", "3", two4, "80"),
            "container to container, IPv6": d.probe(one, "nc", "-w", "3", two6, "80"),
            "host to container": probe(["busybox", "nc", "-w", "2", two4, "80"]),
            "without --internal, refused": refused
            and "can only be used for an internal network" in error,
        }

    facts = on_both(d, scenario)
    same(facts)
    ours = facts[DRIVER]
    assert ours["bridge addresses"] == []
    assert ours["gateways allocated"] == ["", ""]
    assert ours["container to container, IPv4"] == one4
    assert ours["container to container, IPv6"] == one6
    assert ours["without --internal, refused"] is True


# -- the other options --------------------------------------------------------------------------


def test_inhibit_ipv4(d: Docker) -> None:
    third = 125
    create, _, _ = dual_stack(third)
    one4, _, one_at = addresses(third, 10)
    two4, _, two_at = addresses(third, 11)

    def scenario(d: Docker, driver: str) -> Facts:
        net = d.network(*create, "-o", "com.docker.network.bridge.inhibit_ipv4=true", driver=driver)
        one = d.run(net, *one_at)
        echo = d.run(net, *two_at, command=("pbtest-echo", "tcp", "80"))
        listening(d, echo, 80)
        return {
            "bridge addresses": bridge_addresses(d, net, driver),
            "gateways allocated": gateways_in_inspect(d, net),
            "IPv4 default route": default_routes(d, one),
            "container to container": d.probe(one, "nc", "-w", "3", two4, "80"),
            "host to container": probe(["busybox", "nc", "-w", "2", two4, "80"]),
        }

    facts = on_both(d, scenario)
    same(facts)
    ours = facts[DRIVER]
    assert ours["bridge addresses"] == ["fd00:213:125::1/64", "link-local"]
    assert ours["container to container"] == one4


def test_trusted_host_interfaces(d: Docker, outside: OutsideHost) -> None:
    needs(28, 2, "trusted_host_interfaces")
    trusting, subnet4, subnet6 = dual_stack(126)
    plain, plain4, plain6 = dual_stack(127)
    web4, web6, web_at = addresses(126, 10)
    other4, other6, other_at = addresses(127, 10)

    def scenario(d: Docker, driver: str) -> Facts:
        option = f"com.docker.network.bridge.trusted_host_interfaces=eth9:{OUTSIDE_HOST_IF}"
        net = d.network(*trusting, "-o", option, driver=driver)
        web = d.run(net, *web_at, "-p", "18303:80", command=ECHO_80_81)
        listening(d, web, 80, 81)
        other_net = d.network(*plain, driver=driver)
        echo = d.run(other_net, *other_at, "-p", "18304:80", command=ECHO_80_81)
        listening(d, echo, 80, 81)
        with outside_routes(outside, subnet4, subnet6, plain4, plain6):
            warm_up(outside, web4, web6, other4, other6)
            return {
                "trusted, published container port, IPv4": outside_reaches(outside, web4, 80),
                "trusted, published container port, IPv6": outside_reaches(outside, web6, 80),
                "trusted, unpublished port, IPv4": outside_reaches(outside, web4, 81),
                "trusted, unpublished port, IPv6": outside_reaches(outside, web6, 81),
                "not trusted, published container port, IPv4": outside_reaches(outside, other4, 80),
                "not trusted, published container port, IPv6": outside_reaches(outside, other6, 80),
                "published host port": outside_reaches(outside, outside.host_ip, 18303),
                "egress source": source_seen_by_outside(d, web, outside, v6=False),
            }

    facts = on_both(d, scenario)
    same(facts)
    ours = facts[DRIVER]
    assert ours["trusted, published container port, IPv4"] == outside.ip
    assert ours["trusted, unpublished port, IPv4"] == ""
    assert ours["not trusted, published container port, IPv4"] == ""


@contextmanager
def extra_host_addresses(*addresses: str) -> Iterator[None]:
    """More addresses on the host's side of the outside link (the test's own interface)."""
    added = []
    try:
        for address in addresses:
            extra = ["nodad"] if ":" in address else []
            run(["ip", "addr", "add", address, "dev", OUTSIDE_HOST_IF, *extra])
            added.append(address)
        yield
    finally:
        for address in added:
            run(["ip", "addr", "del", address, "dev", OUTSIDE_HOST_IF], check=False)


def test_host_ipv4_and_host_ipv6(d: Docker, outside: OutsideHost) -> None:
    needs(25, 0, "host_ipv6")
    create, _, _ = dual_stack(128)
    source4, source6 = "198.51.100.5", "2001:db8:5100::5"

    def scenario(d: Docker, driver: str) -> Facts:
        net = d.network(
            *create,
            "-o",
            f"com.docker.network.host_ipv4={source4}",
            "-o",
            f"com.docker.network.host_ipv6={source6}",
            driver=driver,
        )
        c = d.run(net)
        return {
            "egress source, IPv4": source_seen_by_outside(d, c, outside, v6=False),
            "egress source, IPv6": source_seen_by_outside(d, c, outside, v6=True),
        }

    with extra_host_addresses(f"{source4}/24", f"{source6}/64"):
        facts = on_both(d, scenario)
    # Before 27.0 Docker's own driver writes no IPv6 NAT rules unless the daemon runs with
    # the experimental ip6tables (off here): its IPv6 egress is unanswered, so only pybridge's
    # IPv6 source is checked there.
    same(facts, *(("egress source, IPv6",) if server_version() < (27, 0) else ()))
    assert facts[DRIVER] == {"egress source, IPv4": source4, "egress source, IPv6": source6}


@pytest.mark.parametrize("binding", ["0.0.0.0", "::", "2001:db8:5100::1"])
def test_host_binding_ipv4(d: Docker, outside: OutsideHost, binding: str) -> None:
    needs(28, 0, "host_binding_ipv4 semantics of Docker 28")
    create, _, _ = dual_stack(129)

    def scenario(d: Docker, driver: str) -> Facts:
        option = f"com.docker.network.bridge.host_binding_ipv4={binding}"
        net = d.network(*create, "-o", option, driver=driver)
        echo = d.run(net, "-p", "18305:80", command=("pbtest-echo", "tcp", "80"))
        listening(d, echo, 80)
        warm_up(outside)
        return {
            "IPv4 host address": outside_reaches(outside, outside.host_ip, 18305),
            "IPv6 host address": outside_reaches(outside, outside.host_ip6, 18305),
        }

    facts = on_both(d, scenario)
    same(facts)
    expected_v4 = outside.ip if binding == "0.0.0.0" else ""
    assert facts[DRIVER] == {"IPv4 host address": expected_v4, "IPv6 host address": outside.ip6}


# -- keys dockerd applies itself ----------------------------------------------------------------


def test_keys_dockerd_applies_itself(d: Docker) -> None:
    """advertise_addr_nmsgs/_ms and the endpoint's sysctls: dockerd validates and applies them
    for every driver; pybridge accepts them. The endpoint's interface name reaches only
    Docker's own driver: pybridge refuses it in one sentence rather than ignore it."""
    needs(28, 0, "advertise_addr_* and endpoint ifname")
    create, _, _ = dual_stack(130)

    def scenario(d: Docker, driver: str) -> Facts:
        net = d.network(
            *create,
            "-o",
            "com.docker.network.advertise_addr_nmsgs=1",
            "-o",
            "com.docker.network.advertise_addr_ms=200",
            driver=driver,
        )
        sysctl = "com.docker.network.endpoint.sysctls=net.ipv4.conf.IFNAME.log_martians=1"
        c, _ = run_with_network_options(d, net, sysctl)
        refused, _ = create_must_fail(d, driver, "-o", "com.docker.network.advertise_addr_nmsgs=9")
        named, error = run_with_network_options(d, net, "com.docker.network.endpoint.ifname=lan7")
        links = d.exec(named, "ip", "-o", "link", "show", check=False) if named else ""
        return {
            "sysctl applied": d.exec(c, "cat", "/proc/sys/net/ipv4/conf/eth0/log_martians")
            if c
            else "",
            "nmsgs out of range refused": refused,
            "ifname": " lan7" in links,
            "ifname error": error,
        }

    facts = on_both(d, scenario)
    same(facts, "ifname", "ifname error")
    assert facts[DRIVER]["sysctl applied"] == "1"
    assert facts[BUILT_IN]["ifname"] is True
    assert facts[DRIVER]["ifname"] is False
    assert "cannot be honoured by a network plugin" in str(facts[DRIVER]["ifname error"])
