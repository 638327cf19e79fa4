"""Docker 28's bridge options (issue 14), with real packets in a miniature host
(tests/privileged/minihost.py), both iptables backends: who reaches which port, which source
address the far side sees, which addresses sit on the bridge. The outside namespace plays a
LAN neighbour that routes the container subnets to the host, as a router would; each promise
that something cannot be reached is tried from the side that must not reach it."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest

from pydriver import protocol as p
from pydriver.firewall import Backend, IptablesFirewall
from pydriver.model import PortMapping
from pydriver.options import (
    GATEWAY_MODE_IPV4,
    GATEWAY_MODE_IPV6,
    HOST_BINDING_IPV4,
    HOST_IPV4,
    HOST_IPV6,
    INHIBIT_IPV4,
    TRUSTED_HOST_INTERFACES,
)
from pydriver.rules import NetworkRules
from tests.hostenv import run
from tests.privileged.minihost import (
    OUTSIDE_HOST_IP,
    OUTSIDE_HOST_IP6,
    OUTSIDE_IP,
    OUTSIDE_IP6,
    Container,
    MiniHost,
    Net,
    connect,
    in_ns,
    netns_add,
    ping,
    route_to,
)
from tests.privileged.netns_sysctl import NetnsSysctl
from tests.privileged.test_coexistence import docker_bridge, restore

pytestmark = pytest.mark.privileged

BACKENDS = pytest.mark.parametrize("backend", ["nft", "legacy"])
PUBLISHED = 18090  # the host port of -p 18090:80
OUTSIDE_PORT = 7001  # a server on the outside host, answering with the client's address
OUTSIDE_HOST_IF = "pbt-up"  # the host's side of its link to the outside (minihost.outside)


def bridge_of(host: MiniHost, net: Net) -> str:
    return host.driver.networks[net.id].bridge


def bridge_addresses(host: MiniHost, net: Net) -> list[str]:
    """Every address on the network's bridge, IPv6 link-local included."""
    out = in_ns(host.ns, "ip", "-o", "addr", "show", "dev", bridge_of(host, net))
    return [line.split()[3] for line in out.splitlines()]


def answer(ns: str, ip: str, port: int, expected: str) -> str:
    """What connecting from ``ns`` gets, tried again for a few seconds until it is
    ``expected``: a first IPv6 packet waits for neighbour discovery on each hop."""
    deadline = time.monotonic() + 6
    while True:
        got = connect(ns, ip, port)
        if got == expected or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def pings_soon(ns: str, ip: str) -> bool:
    """Whether ``ip`` answers a ping from ``ns`` within a few seconds (a link just made)."""
    deadline = time.monotonic() + 6
    while not ping(ns, ip):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def warm_up(host: MiniHost, outside: str | None, *containers: Container) -> None:
    """Let neighbour discovery settle on every hop before a test says something does not
    answer (and the host's pings are allowed whatever the mode): a refusal must come from the
    rules, not from a slow first IPv6 packet."""
    for c in containers:
        for address in (c.ip, c.ip6):
            if address is not None:
                ping(host.ns, address)
                ping(host.ns, address)
    if outside is not None:
        for address in (OUTSIDE_HOST_IP, OUTSIDE_HOST_IP6):
            ping(outside, address)
            ping(outside, address)


def container_on_foreign_bridge(host: MiniHost, bridge: str, prefix: str) -> str:
    """A namespace behind a bridge pybridge does not manage (Docker's docker0, say): BRIDGE
    gets PREFIX.1/24, the namespace PREFIX.2 with its default route via it."""
    ns = netns_add()
    host.namespaces.append(ns)
    peer = f"pbt-f{len(host.namespaces)}"
    in_ns(host.ns, "ip", "link", "add", bridge, "type", "bridge")
    in_ns(host.ns, "ip", "addr", "add", f"{prefix}.1/24", "dev", bridge)
    in_ns(host.ns, "ip", "link", "add", peer, "type", "veth", "peer", "name", "eth0")
    in_ns(host.ns, "ip", "link", "set", "eth0", "netns", ns)
    in_ns(host.ns, "ip", "link", "set", peer, "master", bridge, "up")
    in_ns(host.ns, "ip", "link", "set", bridge, "up")
    in_ns(ns, "ip", "addr", "add", f"{prefix}.2/24", "dev", "eth0")
    in_ns(ns, "ip", "link", "set", "eth0", "up")
    in_ns(ns, "ip", "route", "add", "default", "via", f"{prefix}.1")
    return ns


def outside_routing_to(host: MiniHost, *subnets: str) -> str:
    """The outside host, with routes to ``subnets`` via this host, running its own server."""
    outside = host.outside(v6=True)
    for subnet in subnets:
        route_to(outside, subnet, OUTSIDE_HOST_IP6 if ":" in subnet else OUTSIDE_HOST_IP)
    host.serve(outside, OUTSIDE_PORT)
    return outside


@BACKENDS
async def test_nat_unprotected_opens_every_port_to_the_outside_only(
    backend: Backend, tmp_path: Path
) -> None:
    """nat-unprotected: a host that routes to the subnet reaches every container port, at the
    container's own address (it sees the client's address); egress is still masqueraded; a
    container of another network still reaches none of them. The same packets to a network in
    mode nat reach nothing."""
    async with MiniHost(backend, tmp_path) as host:
        modes = {GATEWAY_MODE_IPV4: "nat-unprotected", GATEWAY_MODE_IPV6: "nat-unprotected"}
        open_net = await host.network("10.213.70", v6="fd00:213:70", options=modes)
        web = await host.container(open_net, "10.213.70.10", "fd00:213:70::10")
        nat_net = await host.network("10.213.71", v6="fd00:213:71")
        guarded = await host.container(nat_net, "10.213.71.10", "fd00:213:71::10")
        for c in (web, guarded):
            host.serve(c.ns, 81)  # never published
        outside = outside_routing_to(
            host, "10.213.70.0/24", "fd00:213:70::/64", "10.213.71.0/24", "fd00:213:71::/64"
        )
        warm_up(host, outside, web, guarded)
        assert answer(outside, web.ip, 81, OUTSIDE_IP) == OUTSIDE_IP
        assert answer(outside, f"{web.ip6}", 81, OUTSIDE_IP6) == OUTSIDE_IP6
        assert connect(outside, guarded.ip, 81) == ""
        assert connect(outside, f"{guarded.ip6}", 81) == ""
        # Another container network is not "the outside": pybridge's, nor Docker's.
        assert connect(guarded.ns, web.ip, 81) == ""
        assert connect(guarded.ns, f"{web.ip6}", 81) == ""
        assert not ping(guarded.ns, web.ip)
        host.serve(host.ns, 5557)
        for bridge, prefix in (("docker0", "172.31.250"), ("docker_gwbridge", "172.31.251")):
            foreign = container_on_foreign_bridge(host, bridge, prefix)
            mine = f"{prefix}.2"
            assert answer(foreign, f"{prefix}.1", 5557, mine) == mine  # (its network works)
            assert connect(foreign, web.ip, 81) == "", bridge
        # Egress is NAT as usual.
        assert answer(web.ns, OUTSIDE_IP, OUTSIDE_PORT, OUTSIDE_HOST_IP) == OUTSIDE_HOST_IP
        assert answer(web.ns, OUTSIDE_IP6, OUTSIDE_PORT, OUTSIDE_HOST_IP6) == OUTSIDE_HOST_IP6


@BACKENDS
async def test_routed_opens_published_container_ports_without_nat(
    backend: Backend, tmp_path: Path
) -> None:
    """routed: no masquerade (the outside sees the container's own address), the published
    container port reachable at the container's address from whoever routes to it (the
    client's address seen), the host port of -p ignored (nothing on the host's addresses),
    unpublished ports closed; echo requests answered. Another network's container reaches
    the published port too (as Docker lets its own), not the unpublished one."""
    async with MiniHost(backend, tmp_path) as host:
        modes = {GATEWAY_MODE_IPV4: "routed", GATEWAY_MODE_IPV6: "routed"}
        net = await host.network("10.213.72", v6="fd00:213:72", options=modes)
        # -p 127.0.0.1:...:81 opens nothing (Docker would open 81 to everyone who routes).
        web = await host.container(
            net,
            "10.213.72.10",
            "fd00:213:72::10",
            ports=(("", PUBLISHED, 80), ("127.0.0.1", PUBLISHED + 1, 81)),
        )
        host.serve(web.ns, 80)
        host.serve(web.ns, 81)
        outside = outside_routing_to(host, "10.213.72.0/24", "fd00:213:72::/64")
        warm_up(host, outside, web)
        assert answer(outside, web.ip, 80, OUTSIDE_IP) == OUTSIDE_IP
        assert answer(outside, f"{web.ip6}", 80, OUTSIDE_IP6) == OUTSIDE_IP6
        assert ping(outside, web.ip)
        assert ping(outside, f"{web.ip6}")
        for address in (web.ip, f"{web.ip6}"):
            assert connect(outside, address, 81) == "", address
        for address in (OUTSIDE_HOST_IP, OUTSIDE_HOST_IP6):
            assert connect(outside, address, PUBLISHED) == "", address
        assert connect(host.ns, "127.0.0.1", PUBLISHED) == ""
        # Egress keeps the container's address.
        assert answer(web.ns, OUTSIDE_IP, OUTSIDE_PORT, web.ip) == web.ip
        assert answer(web.ns, OUTSIDE_IP6, OUTSIDE_PORT, f"{web.ip6}") == web.ip6
        other_net = await host.network("10.213.73", v6="fd00:213:73")
        other = await host.container(other_net, "10.213.73.10", "fd00:213:73::10")
        warm_up(host, None, other)
        assert (
            answer(other.ns, web.ip, 80, net.gateway) == net.gateway
        )  # masqueraded out of its network
        assert connect(other.ns, web.ip, 81) == ""
        assert connect(other.ns, f"{web.ip6}", 81) == ""


@BACKENDS
async def test_gateway_modes_are_per_family(backend: Backend, tmp_path: Path) -> None:
    """IPv4 routed, IPv6 nat: the IPv4 port is at the container's address, the IPv6 one on the
    host's addresses; egress keeps its IPv4 source and is masqueraded over IPv6."""
    async with MiniHost(backend, tmp_path) as host:
        net = await host.network(
            "10.213.74", v6="fd00:213:74", options={GATEWAY_MODE_IPV4: "routed"}
        )
        web = await host.container(
            net, "10.213.74.10", "fd00:213:74::10", ports=(("", PUBLISHED, 80),)
        )
        host.serve(web.ns, 80)
        outside = outside_routing_to(host, "10.213.74.0/24", "fd00:213:74::/64")
        warm_up(host, outside, web)
        assert answer(outside, web.ip, 80, OUTSIDE_IP) == OUTSIDE_IP
        assert connect(outside, OUTSIDE_HOST_IP, PUBLISHED) == ""
        assert answer(outside, OUTSIDE_HOST_IP6, PUBLISHED, OUTSIDE_IP6) == OUTSIDE_IP6
        assert connect(outside, f"{web.ip6}", 80) == ""
        assert answer(web.ns, OUTSIDE_IP, OUTSIDE_PORT, web.ip) == web.ip
        assert answer(web.ns, OUTSIDE_IP6, OUTSIDE_PORT, OUTSIDE_HOST_IP6) == OUTSIDE_HOST_IP6


@BACKENDS
async def test_isolated_networks_leave_the_host_off_the_network(
    backend: Backend, tmp_path: Path
) -> None:
    """isolated (internal): no address on the bridge, not even IPv6 link-local, whether the
    daemon asked GwAllocCheck (no gateway allocated) or not (one sent, left off); containers
    reach each other and nothing of the host, even with routes of their own making."""
    async with MiniHost(backend, tmp_path) as host:
        host.outside()
        host.serve(host.ns, 5557)
        modes = {GATEWAY_MODE_IPV4: "isolated", GATEWAY_MODE_IPV6: "isolated"}
        for third, asked in ((75, True), (76, False)):
            net = await host.network(
                f"10.213.{third}",
                v6=f"fd00:213:{third}",
                internal=True,
                options=modes,
                gw_alloc_check=asked,
            )
            assert bridge_addresses(host, net) == []
            one = await host.container(net, f"10.213.{third}.10", f"fd00:213:{third}::10")
            two = await host.container(net, f"10.213.{third}.11", f"fd00:213:{third}::11")
            host.serve(two.ns, 80)
            assert answer(one.ns, two.ip, 80, one.ip) == one.ip
            assert answer(one.ns, f"{two.ip6}", 80, f"{one.ip6}") == one.ip6
            # A hostile container sends everything out of its interface, to whatever answers.
            in_ns(one.ns, "ip", "route", "add", "default", "dev", "eth0")
            in_ns(one.ns, "ip", "-6", "route", "add", "default", "dev", "eth0")
            for address in (OUTSIDE_HOST_IP, net.gateway, f"fd00:213:{third}::1"):
                assert connect(one.ns, address, 5557) == "", address
            # ... and the host has no way in either.
            assert connect(host.ns, two.ip, 80) == ""
        assert bridge_addresses(host, net) == []


@BACKENDS
async def test_inhibit_ipv4_leaves_the_gateway_to_another_router(
    backend: Backend, tmp_path: Path
) -> None:
    """inhibit_ipv4: no IPv4 address on the bridge (IPv6 keeps its gateway); containers get
    their addresses and a default route via the gateway address, which a router plugged into
    the bridge answers; the host itself is not on the IPv4 subnet."""
    async with MiniHost(backend, tmp_path) as host:
        net = await host.network("10.213.77", v6="fd00:213:77", options={INHIBIT_IPV4: "true"})
        addresses = bridge_addresses(host, net)
        assert "fd00:213:77::1/64" in addresses
        assert not [a for a in addresses if "." in a]
        one = await host.container(net, "10.213.77.10", "fd00:213:77::10")
        two = await host.container(net, "10.213.77.11", "fd00:213:77::11")
        host.serve(two.ns, 80)
        assert answer(one.ns, two.ip, 80, one.ip) == one.ip
        assert "default via 10.213.77.1" in in_ns(one.ns, "ip", "route", "show")
        assert not ping(one.ns, net.gateway)  # nobody has it yet
        assert connect(host.ns, two.ip, 80) == ""  # the host has no route to the subnet
        # The LAN's own router, on the bridge.
        router = netns_add()
        host.namespaces.append(router)
        in_ns(host.ns, "ip", "link", "add", "pbt-rt", "type", "veth", "peer", "name", "eth0")
        in_ns(host.ns, "ip", "link", "set", "eth0", "netns", router)
        in_ns(host.ns, "ip", "link", "set", "pbt-rt", "master", bridge_of(host, net), "up")
        in_ns(router, "ip", "addr", "add", "10.213.77.1/24", "dev", "eth0")
        in_ns(router, "ip", "link", "set", "eth0", "up")
        assert pings_soon(one.ns, net.gateway)


@BACKENDS
async def test_trusted_host_interfaces_reach_published_container_ports(
    backend: Backend, tmp_path: Path
) -> None:
    """A trusted host interface reaches the published container ports directly at the
    container's address (the client's address seen), and nothing else of it; an interface
    that is not trusted reaches none, and neither does another container network."""
    async with MiniHost(backend, tmp_path) as host:
        trusting = await host.network(
            "10.213.78", v6="fd00:213:78", options={TRUSTED_HOST_INTERFACES: OUTSIDE_HOST_IF}
        )
        web = await host.container(
            trusting, "10.213.78.10", "fd00:213:78::10", ports=(("", PUBLISHED, 80),)
        )
        plain = await host.network(
            "10.213.79", v6="fd00:213:79", options={TRUSTED_HOST_INTERFACES: "pbt-other"}
        )
        other = await host.container(
            plain, "10.213.79.10", "fd00:213:79::10", ports=(("", PUBLISHED + 1, 80),)
        )
        for c in (web, other):
            host.serve(c.ns, 80)
            host.serve(c.ns, 81)
        outside = outside_routing_to(
            host, "10.213.78.0/24", "fd00:213:78::/64", "10.213.79.0/24", "fd00:213:79::/64"
        )
        warm_up(host, outside, web, other)
        assert answer(outside, web.ip, 80, OUTSIDE_IP) == OUTSIDE_IP
        assert answer(outside, f"{web.ip6}", 80, OUTSIDE_IP6) == OUTSIDE_IP6
        for address in (web.ip, f"{web.ip6}"):
            assert connect(outside, address, 81) == "", address
        for address in (other.ip, f"{other.ip6}"):
            assert connect(outside, address, 80) == "", address
        assert connect(other.ns, web.ip, 80) == ""
        # The published host port works as ever.
        assert answer(outside, OUTSIDE_HOST_IP, PUBLISHED, OUTSIDE_IP) == OUTSIDE_IP


@BACKENDS
async def test_host_ip_is_the_source_of_egress(backend: Backend, tmp_path: Path) -> None:
    """host_ipv4 / host_ipv6: traffic leaving the network comes from that address (SNAT),
    where it would otherwise come from the outgoing interface's."""
    async with MiniHost(backend, tmp_path) as host:
        outside = outside_routing_to(host, "10.213.80.0/24")
        in_ns(host.ns, "ip", "addr", "add", "198.51.100.5/24", "dev", OUTSIDE_HOST_IF)
        in_ns(
            host.ns,
            "ip",
            "-6",
            "addr",
            "add",
            "2001:db8:5100::5/64",
            "dev",
            OUTSIDE_HOST_IF,
            "nodad",
        )
        sources = {HOST_IPV4: "198.51.100.5", HOST_IPV6: "2001:db8:5100::5"}
        net = await host.network("10.213.80", v6="fd00:213:80", options=sources)
        c = await host.container(net, "10.213.80.10", "fd00:213:80::10")
        assert answer(c.ns, OUTSIDE_IP, OUTSIDE_PORT, "198.51.100.5") == "198.51.100.5"
        assert answer(c.ns, OUTSIDE_IP6, OUTSIDE_PORT, "2001:db8:5100::5") == "2001:db8:5100::5"
        plain_net = await host.network("10.213.81", v6="fd00:213:81")
        plain = await host.container(plain_net, "10.213.81.10", "fd00:213:81::10")
        assert answer(plain.ns, OUTSIDE_IP, OUTSIDE_PORT, OUTSIDE_HOST_IP) == OUTSIDE_HOST_IP
        # And nothing gets in: c listens (it answers itself), the outside gets no answer.
        host.serve(c.ns, 80)
        assert connect(c.ns, c.ip, 80) == c.ip
        assert connect(outside, c.ip, 80) == ""


@BACKENDS
@pytest.mark.parametrize(
    ("binding", "v4", "v6"),
    [("0.0.0.0", True, True), ("::", False, True), (OUTSIDE_HOST_IP6, False, True)],
)
async def test_host_binding_ipv4_families(
    backend: Backend, tmp_path: Path, binding: str, v4: bool, v6: bool
) -> None:
    """host_binding_ipv4: 0.0.0.0 publishes -p on every IPv4 and IPv6 address, :: on the IPv6
    ones only, an IPv6 address on that address only."""
    async with MiniHost(backend, tmp_path) as host:
        outside = host.outside(v6=True)
        net = await host.network(
            "10.213.82", v6="fd00:213:82", options={HOST_BINDING_IPV4: binding}
        )
        web = await host.container(
            net, "10.213.82.10", "fd00:213:82::10", ports=(("", PUBLISHED, 80),)
        )
        host.serve(web.ns, 80)
        warm_up(host, outside, web)
        assert (answer(outside, OUTSIDE_HOST_IP, PUBLISHED, OUTSIDE_IP) == OUTSIDE_IP) is v4
        assert (answer(outside, OUTSIDE_HOST_IP6, PUBLISHED, OUTSIDE_IP6) == OUTSIDE_IP6) is v6


async def test_isolated_ipv6_is_given_back_to_an_adopted_bridge(tmp_path: Path) -> None:
    """disable_ipv6 on a bridge pybridge did not create is put back when the network goes."""
    async with MiniHost("nft", tmp_path) as host:
        in_ns(host.ns, "ip", "link", "add", "pbt-iso", "type", "bridge")
        in_ns(host.ns, "ip", "link", "set", "pbt-iso", "up")
        sysctl = NetnsSysctl(host.ns)
        path = "/proc/sys/net/ipv6/conf/pbt-iso/disable_ipv6"
        options = {"com.docker.network.bridge.name": "pbt-iso", GATEWAY_MODE_IPV6: "isolated"}
        net = await host.network("10.213.83", v6="fd00:213:83", internal=True, options=options)
        assert sysctl.read(path) == "1"
        assert bridge_addresses(host, net) == ["10.213.83.1/24"]
        await host.driver.delete_network(p.parse_network_ref({"NetworkID": net.id}))
        await host.driver.settle()
        assert sysctl.read(path) == "0"


# -- Docker's own networks and pybridge's openings ---------------------------------------------

# moby v28.5.2 iptabler testdata "hairpin=false,internal=true,icc=true" for bridge BR, plus
# DOCKER-USER and the two jumps dockerd inserts first when it starts.
DOCKER28_INTERNAL = """\
*filter
:DOCKER - [0:0]
:DOCKER-BRIDGE - [0:0]
:DOCKER-CT - [0:0]
:DOCKER-FORWARD - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-I FORWARD 1 -j DOCKER-FORWARD
-I FORWARD 1 -j DOCKER-USER
-A DOCKER-FORWARD -j DOCKER-CT
-A DOCKER-FORWARD -j DOCKER-ISOLATION-STAGE-1
-A DOCKER-FORWARD -j DOCKER-BRIDGE
-A DOCKER-FORWARD -i {br} -o {br} -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 ! -s {subnet} -o {br} -j DROP
-A DOCKER-ISOLATION-STAGE-1 ! -d {subnet} -i {br} -j DROP
COMMIT
*nat
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
COMMIT
"""

# The same bridge as an ordinary (not internal) Docker 28 network: accepted by Docker.
DOCKER28_OPEN = """\
*filter
-F DOCKER-ISOLATION-STAGE-1
-A DOCKER-FORWARD -i {br} -j ACCEPT
COMMIT
"""


@BACKENDS
async def test_a_docker_internal_container_reaches_no_pybridge_port(
    backend: Backend, tmp_path: Path
) -> None:
    """A container on Docker 28's own --internal network connects to its gateway address at a
    port pybridge publishes (no capabilities needed), and with a route of its own (NET_ADMIN)
    to a routed network's published container port. Docker drops both for its own ports
    (DOCKER-ISOLATION-STAGE-1 `-i br ! -d subnet -j DROP`); pybridge leaves traffic from
    Docker's bridges to Docker's chains, so it is dropped there too."""
    async with MiniHost(backend, tmp_path) as host:
        docker = docker_bridge(host, "10.213.95")  # its container: 10.213.95.2
        in_ns(docker.container.ns, "ip", "route", "del", "default")  # internal: no way out
        restore(host, backend, DOCKER28_INTERNAL.format(br=docker.bridge, subnet="10.213.95.0/24"))
        net = await host.network("10.213.96")
        web = await host.container(net, "10.213.96.10", ports=(("", 18090, 80),))
        host.serve(web.ns, 80)
        routed_net = await host.network("10.213.97", options={GATEWAY_MODE_IPV4: "routed"})
        routed = await host.container(routed_net, "10.213.97.10", ports=(("", 18091, 80),))
        host.serve(routed.ns, 80)
        warm_up(host, None, web, routed)
        theirs = docker.container.ns
        published = connect(theirs, docker.gateway, 18090)
        in_ns(theirs, "ip", "route", "add", "10.213.97.0/24", "via", docker.gateway)
        got = connect(theirs, routed.ip, 80)
        assert (published, got) == ("", ""), (
            f"Docker --internal container reached {published=} {got=}"
        )
        # Docker's other networks still reach the published port, Docker deciding (its
        # `-i br -j ACCEPT`): the same host, the network made non-internal.
        in_ns(theirs, "ip", "route", "del", "10.213.97.0/24")
        restore(host, backend, DOCKER28_OPEN.format(br=docker.bridge))
        assert connect(theirs, docker.gateway, 18090) == docker.container.ip


@BACKENDS
async def test_no_pybridge_container_reaches_a_docker_gwbridge_container(
    backend: Backend, tmp_path: Path
) -> None:
    """Containers behind docker_gwbridge (Docker's bridge for containers whose networks give
    them no way out) are out of a pybridge container's reach, as docker0's are."""
    async with MiniHost(backend, tmp_path) as host:
        net = await host.network("10.213.98")
        mine = await host.container(net, "10.213.98.10")
        neighbour = await host.container(net, "10.213.98.11")
        gw = container_on_foreign_bridge(host, "docker_gwbridge", "172.31.252")
        d0 = container_on_foreign_bridge(host, "docker0", "172.31.253")
        host.serve(gw, 81)
        host.serve(d0, 81)
        host.serve(neighbour.ns, 81)
        warm_up(host, None, mine, neighbour)
        assert connect(mine.ns, neighbour.ip, 81) == mine.ip  # (the probe itself works)
        assert connect(mine.ns, "172.31.253.2", 81) == ""  # docker0: dropped
        got = connect(mine.ns, "172.31.252.2", 81)
        assert got == "", f"pybridge container reached a docker_gwbridge container ({got})"


@BACKENDS
async def test_every_mode_reads_back_as_written(backend: Backend) -> None:
    """Every rule the gateway modes add must read back from iptables-save as written, or the
    self-healing check rewrites the chains every cycle."""
    ns = netns_add()
    try:
        ip = ipaddress.ip_address
        c4, c6 = ip("10.213.60.2"), ip("fd00:213:60::2")
        maps = (
            PortMapping("tcp", None, 0, c4, 80),
            PortMapping("udp", None, 0, c6, 53),
            PortMapping("tcp", None, 8080, c4, 81),
            PortMapping("tcp", None, 8080, c6, 81),
        )
        nets = [
            NetworkRules(
                "pyb-routed",
                (ipaddress.ip_network("10.213.60.0/24"),),
                (ipaddress.ip_network("fd00:213:60::/64"),),
                mappings=maps,
                mode_v4="routed",
                mode_v6="routed",
            ),
            NetworkRules(
                "pyb-unprot",
                (ipaddress.ip_network("10.213.61.0/24"),),
                (ipaddress.ip_network("fd00:213:61::/64"),),
                mode_v4="nat-unprotected",
                mode_v6="nat-unprotected",
                snat_v4=ipaddress.IPv4Address("198.51.100.9"),
                snat_v6=ipaddress.IPv6Address("2001:db8::9"),
            ),
            NetworkRules(
                "pyb-trust",
                (ipaddress.ip_network("10.213.62.0/24"),),
                (ipaddress.ip_network("fd00:213:62::/64"),),
                mappings=(
                    PortMapping("tcp", None, 9090, ip("10.213.62.2"), 80),
                    PortMapping("tcp", None, 9090, ip("fd00:213:62::2"), 80),
                ),
                trusted=("flannel.1", "wg-0_x"),
            ),
            NetworkRules(
                "pyb-iso",
                (ipaddress.ip_network("10.213.63.0/24"),),
                (ipaddress.ip_network("fd00:213:63::/64"),),
                internal=True,
                mode_v4="isolated",
                mode_v6="isolated",
            ),
        ]
        firewall = IptablesFirewall(backend, netns=ns)
        await firewall.apply(nets)
        assert await firewall.drift(nets) == []
    finally:
        run(["ip", "netns", "del", ns], check=False)
