"""pybridge next to Docker's own firewall, with real packets: Docker 28's iptables layout and
Docker 29's native nftables backend, each built in a miniature host (minihost.py) around a
"Docker bridge" with a container on it, and a pybridge network made by the real driver.

What must hold under each: pybridge's containers reach each other and, masqueraded, the
outside; a Docker-bridge container and a pybridge container cannot reach each other's address
(from either side, the way a hostile container would try), only each other's published ports
through a host address; the outside reaches no pybridge container port but through a published
one; pybridge turns forwarding on itself (29 does not).

The Docker rules are copied from moby's own test goldens (file names below), with the bridge,
addresses and port filled in.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import pytest

from pydriver.firewall import Backend, tool
from pydriver.rules import FORWARD_CHAIN
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
)
from tests.privileged.netns_sysctl import NetnsSysctl

pytestmark = pytest.mark.privileged

BACKENDS = pytest.mark.parametrize("backend", ["nft", "legacy"])
OUTSIDE_PORT = 7000
PYB_PUBLISHED = 18090  # pybridge container: -p 18090:80
DOCKER_PUBLISHED = 18091  # Docker-bridge container: -p 18091:80

# moby v28.5.2 libnetwork/drivers/bridge/internal/iptabler/testdata/
# TestIptabler_hairpin=false,internal=false,icc=true,masq=true,snat=false,gwm=nat,
# bindlh=false__iptables.golden, plus DOCKER-USER (libnetwork/firewall_linux.go) and the jumps
# inserted first as EnsureJumpRule does when dockerd starts.
DOCKER28_IPTABLES = """\
*raw
-A PREROUTING -d {ip}/32 ! -i {br} -j DROP
COMMIT
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
-A DOCKER -d {ip}/32 ! -i {br} -o {br} -p tcp -m tcp --dport 80 -j ACCEPT
-A DOCKER ! -i {br} -o {br} -j DROP
-A DOCKER-BRIDGE -o {br} -j DOCKER
-A DOCKER-CT -o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A DOCKER-FORWARD -j DOCKER-CT
-A DOCKER-FORWARD -j DOCKER-ISOLATION-STAGE-1
-A DOCKER-FORWARD -j DOCKER-BRIDGE
-A DOCKER-FORWARD -i {br} -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i {br} ! -o {br} -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-2 -o {br} -j DROP
COMMIT
*nat
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s {subnet} ! -o {br} -j MASQUERADE
-A DOCKER -i {br} -j RETURN
-A DOCKER ! -i {br} -p tcp -m tcp --dport {port} -j DNAT --to-destination {ip}:80
COMMIT
"""

# What dockerd 28 does to FORWARD when it starts again (or firewalld reloads): its two jumps
# deleted and inserted first once more (iptables.EnsureJumpRule), above pybridge's.
DOCKER28_RESTART = """\
*filter
-D FORWARD -j DOCKER-FORWARD
-I FORWARD 1 -j DOCKER-FORWARD
-D FORWARD -j DOCKER-USER
-I FORWARD 1 -j DOCKER-USER
COMMIT
"""

# docker-v29.0.3 daemon/libnetwork/drivers/bridge/internal/nftabler/testdata/TestNftabler/
# hairpin=false,internal=false,icc=true,masq=true,snat=false,gwm=nat,bindlh=false__ip.golden
# and __ip6.golden (counters left out), for one bridge network with one container publishing
# a port; every base chain has policy accept. (nat-OUTPUT's priority is written as -100, which
# is what dstnat means: Debian 12's nft 1.0.6 takes the name only on prerouting.)
DOCKER29_TABLE = """\
table {family} docker-bridges {{
	map filter-forward-in-jumps {{
		type ifname : verdict
		elements = {{ "{br}" : jump filter-forward-in__{br} }}
	}}
	map filter-forward-out-jumps {{
		type ifname : verdict
		elements = {{ "{br}" : jump filter-forward-out__{br} }}
	}}
	map nat-postrouting-in-jumps {{
		type ifname : verdict
		elements = {{ "{br}" : jump nat-postrouting-in__{br} }}
	}}
	map nat-postrouting-out-jumps {{
		type ifname : verdict
		elements = {{ "{br}" : jump nat-postrouting-out__{br} }}
	}}
	chain filter-FORWARD {{
		type filter hook forward priority filter; policy accept;
		oifname vmap @filter-forward-in-jumps
		iifname vmap @filter-forward-out-jumps
	}}
	chain nat-OUTPUT {{
		type nat hook output priority -100; policy accept;
		{addr} daddr != {loopback} fib daddr type local counter jump nat-prerouting-and-output
	}}
	chain nat-POSTROUTING {{
		type nat hook postrouting priority srcnat; policy accept;
		iifname vmap @nat-postrouting-out-jumps
		oifname vmap @nat-postrouting-in-jumps
	}}
	chain nat-PREROUTING {{
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local counter jump nat-prerouting-and-output
	}}
	chain nat-prerouting-and-output {{
		iifname != "{br}" tcp dport {port} counter dnat to {dnat_to} comment "DNAT"
	}}
	chain raw-PREROUTING {{
		type filter hook prerouting priority raw; policy accept;
		{addr} daddr {ip} iifname != "{br}" counter drop comment "DROP DIRECT ACCESS"
	}}
	chain filter-forward-in__{br} {{
		ct state established,related counter accept
		iifname "{br}" counter accept comment "ICC"
		{addr} daddr {ip} tcp dport 80 counter accept
		counter drop comment "UNPUBLISHED PORT DROP"
	}}
	chain filter-forward-out__{br} {{
		ct state established,related counter accept
		counter accept comment "OUTGOING"
	}}
	chain nat-postrouting-in__{br} {{
	}}
	chain nat-postrouting-out__{br} {{
		oifname != "{br}" {addr} saddr {subnet} counter masquerade comment "MASQUERADE"
	}}
}}
"""


@dataclass
class DockerBridge:
    """A bridge network Docker made (br-<12 hex>) with one container on it."""

    bridge: str
    gateway: str
    gateway6: str | None
    container: Container


def docker_bridge(host: MiniHost, prefix: str, v6: str | None = None) -> DockerBridge:
    """A bridge br-<12 hex> on PREFIX.0/24 (and V6::/64) with a container at .2 (::2): the
    kernel side of what dockerd makes; its firewall is added by the test."""
    bridge = "br-" + secrets.token_hex(6)
    in_ns(host.ns, "ip", "link", "add", bridge, "type", "bridge")
    in_ns(host.ns, "ip", "addr", "add", f"{prefix}.1/24", "dev", bridge)
    if v6:
        in_ns(host.ns, "ip", "-6", "addr", "add", f"{v6}::1/64", "dev", bridge, "nodad")
    in_ns(host.ns, "ip", "link", "set", bridge, "up")
    ns = netns_add()
    host.namespaces.append(ns)
    host_end, inside = "pbt-dv" + secrets.token_hex(3), "pbt-dc" + secrets.token_hex(3)
    in_ns(host.ns, "ip", "link", "add", host_end, "type", "veth", "peer", "name", inside)
    in_ns(host.ns, "ip", "link", "set", host_end, "master", bridge, "up")
    in_ns(host.ns, "ip", "link", "set", inside, "netns", ns)
    in_ns(ns, "ip", "link", "set", inside, "name", "eth0")
    in_ns(ns, "ip", "addr", "add", f"{prefix}.2/24", "dev", "eth0")
    if v6:
        in_ns(ns, "ip", "-6", "addr", "add", f"{v6}::2/64", "dev", "eth0", "nodad")
    in_ns(ns, "ip", "link", "set", "eth0", "up")
    in_ns(ns, "ip", "route", "add", "default", "via", f"{prefix}.1")
    if v6:
        in_ns(ns, "ip", "-6", "route", "add", "default", "via", f"{v6}::1")
    container = Container(ns, f"{prefix}.2", f"{v6}::2" if v6 else None, "", "")
    return DockerBridge(bridge, f"{prefix}.1", f"{v6}::1" if v6 else None, container)


def restore(host: MiniHost, backend: Backend, text: str) -> None:
    run(
        ["ip", "netns", "exec", host.ns, tool(backend, 4, "restore"), "-w", "5", "--noflush"],
        input=text,
    )


def forward_chain(host: MiniHost, backend: Backend) -> list[str]:
    save = in_ns(host.ns, tool(backend, 4, "save"), "-t", "filter")
    return [line for line in save.splitlines() if line.startswith("-A FORWARD ")]


@dataclass
class Scene:
    host: MiniHost
    net: Net
    one: Container
    two: Container
    docker: DockerBridge
    outside: str


async def scene(host: MiniHost, docker: DockerBridge, *, v6: bool) -> Scene:
    """A pybridge network (10.213.90.0/24, and fd00:213:90::/64 with ``v6``) with two
    containers, the first publishing port 80 as 18090; servers on ports 80 and 81 of every
    container, and on the outside host."""
    net = await host.network("10.213.90", v6="fd00:213:90" if v6 else None)
    one = await host.container(
        net, "10.213.90.10", "fd00:213:90::10" if v6 else None, ports=(("", PYB_PUBLISHED, 80),)
    )
    two = await host.container(net, "10.213.90.11", "fd00:213:90::11" if v6 else None)
    outside = host.outside(v6=v6)
    for container in (one, two, docker.container):
        host.serve(container.ns, 80)
        host.serve(container.ns, 81)
    host.serve(outside, OUTSIDE_PORT)
    return Scene(host, net, one, two, docker, outside)


def check(s: Scene, *, v6: bool) -> None:
    one, two, theirs = s.one, s.two, s.docker.container
    # pybridge's containers reach each other, and the outside (masqueraded).
    assert ping(one.ns, two.ip)
    assert connect(one.ns, two.ip, 81) == one.ip
    assert connect(one.ns, OUTSIDE_IP, OUTSIDE_PORT) == OUTSIDE_HOST_IP
    # The Docker container works too (the rules built for it are live), out and in.
    assert connect(theirs.ns, OUTSIDE_IP, OUTSIDE_PORT) == OUTSIDE_HOST_IP
    assert connect(s.outside, OUTSIDE_HOST_IP, DOCKER_PUBLISHED) == OUTSIDE_IP
    # Neither side reaches the other's address, whatever the port.
    for port in (80, 81):
        assert connect(theirs.ns, one.ip, port) == "", port
        assert connect(one.ns, theirs.ip, port) == "", port
    assert not ping(theirs.ns, one.ip)
    assert not ping(one.ns, theirs.ip)
    # Published ports through a host address do work, both ways (each side masqueraded to the
    # gateway of the network it arrives on).
    assert connect(theirs.ns, OUTSIDE_HOST_IP, PYB_PUBLISHED) == s.net.gateway
    assert connect(one.ns, OUTSIDE_HOST_IP, DOCKER_PUBLISHED) == s.docker.gateway
    # The outside reaches the published port, and no pybridge container port directly, even
    # with a route to the subnet.
    assert connect(s.outside, OUTSIDE_HOST_IP, PYB_PUBLISHED) == OUTSIDE_IP
    for port in (80, 81):
        assert connect(s.outside, one.ip, port) == "", port
    if v6:
        assert one.ip6
        assert two.ip6
        assert theirs.ip6
        assert connect(one.ns, two.ip6, 81) == one.ip6
        assert connect(one.ns, OUTSIDE_IP6, OUTSIDE_PORT) == OUTSIDE_HOST_IP6
        for port in (80, 81):
            assert connect(theirs.ns, one.ip6, port) == "", port
            assert connect(one.ns, theirs.ip6, port) == "", port
            assert connect(s.outside, one.ip6, port) == "", port


def route_outside_to_pybridge(s: Scene, *, v6: bool) -> None:
    in_ns(s.outside, "ip", "route", "add", "10.213.90.0/24", "via", OUTSIDE_HOST_IP)
    if v6:
        in_ns(s.outside, "ip", "-6", "route", "add", "fd00:213:90::/64", "via", OUTSIDE_HOST_IP6)


@BACKENDS
async def test_next_to_docker_28_iptables(backend: Backend, tmp_path: Path) -> None:
    """Docker 28's layout (FORWARD DROP, DOCKER-USER, DOCKER-FORWARD with its CT, isolation
    and bridge chains and `-i br -j ACCEPT`, raw direct-access drops), Docker first; then as
    after dockerd restarts (its jumps above pybridge's, before the self-healing check has run:
    isolation must not depend on the order), then after the check."""
    async with MiniHost(backend, tmp_path) as host:
        docker = docker_bridge(host, "10.213.91")
        restore(
            host,
            backend,
            DOCKER28_IPTABLES.format(
                br=docker.bridge,
                ip=docker.container.ip,
                subnet="10.213.91.0/24",
                port=DOCKER_PUBLISHED,
            ),
        )
        s = await scene(host, docker, v6=False)
        route_outside_to_pybridge(s, v6=False)
        ours = f"-A FORWARD -j {FORWARD_CHAIN}"
        assert forward_chain(host, backend) == [
            "-A FORWARD -j DOCKER-USER",
            ours,
            "-A FORWARD -j DOCKER-FORWARD",
        ]
        check(s, v6=False)

        restore(host, backend, DOCKER28_RESTART)
        assert forward_chain(host, backend)[2] == ours
        check(s, v6=False)

        problems = await host.driver.heal_firewall(confirm_delay=0)
        assert f"IPv4 filter: jump '{ours}' missing, duplicated or out of place" in problems
        assert forward_chain(host, backend)[:3] == [
            "-A FORWARD -j DOCKER-USER",
            ours,
            "-A FORWARD -j DOCKER-FORWARD",
        ]
        check(s, v6=False)


@BACKENDS
async def test_next_to_docker_29_nftables(backend: Backend, tmp_path: Path) -> None:
    """Docker 29's nftables backend: tables `ip docker-bridges` and `ip6 docker-bridges` whose
    base chains all accept, the FORWARD policy left at ACCEPT, no DOCKER-USER. 29 does not turn
    forwarding on and creates no network unless the admin did: forwarding is on, so pybridge
    leaves the FORWARD policy alone (a DROP there would drop Docker's own traffic, whose
    accepts live in another table) and keeps its isolation, IPv4 and IPv6, with nothing of
    Docker's to lean on."""
    if not run(["nft", "--version"], check=False).stdout:
        pytest.fail("nft (Debian's nftables package) is needed to build Docker 29's tables")
    async with MiniHost(backend, tmp_path, forward_policy="ACCEPT") as host:
        sysctl = NetnsSysctl(host.ns)
        for key in ("ipv4/ip_forward", "ipv6/conf/all/forwarding"):
            run(["ip", "netns", "exec", host.ns, "tee", f"/proc/sys/net/{key}"], input="1\n")
        docker = docker_bridge(host, "10.213.91", v6="fd00:213:91")
        tables = "".join(
            DOCKER29_TABLE.format(
                family=family,
                addr=addr,
                loopback=loopback,
                br=docker.bridge,
                ip=ip,
                subnet=subnet,
                port=DOCKER_PUBLISHED,
                dnat_to=dnat_to,
            )
            for family, addr, loopback, ip, subnet, dnat_to in (
                ("ip", "ip", "127.0.0.0/8", "10.213.91.2", "10.213.91.0/24", "10.213.91.2:80"),
                (
                    "ip6",
                    "ip6",
                    "::1",
                    "fd00:213:91::2",
                    "fd00:213:91::/64",
                    "[fd00:213:91::2]:80",
                ),
            )
        )
        run(["ip", "netns", "exec", host.ns, "nft", "-f", "-"], input=tables)
        assert "docker-bridges" in in_ns(host.ns, "nft", "list", "tables")

        s = await scene(host, docker, v6=True)
        route_outside_to_pybridge(s, v6=True)
        assert sysctl.read("/proc/sys/net/ipv4/ip_forward") == "1"
        assert sysctl.read("/proc/sys/net/ipv6/conf/all/forwarding") == "1"
        assert forward_chain(host, backend) == [f"-A FORWARD -j {FORWARD_CHAIN}"]
        assert ":FORWARD ACCEPT" in in_ns(host.ns, tool(backend, 4, "save"), "-t", "filter")
        check(s, v6=True)
        # Docker published a port over IPv6 too; pybridge's container reaches it that way.
        assert s.one.ip6 is not None
        got = connect(s.one.ns, OUTSIDE_HOST_IP6, DOCKER_PUBLISHED)
        assert got == docker.gateway6, got
