"""Safe by default, with real packets: what a hostile container or LAN neighbour tries from its
own side must fail, and what users rely on must keep working. Each test runs a miniature host
(tests/privileged/minihost.py) with both iptables backends."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from pydriver import protocol as p
from pydriver.errors import Conflict
from pydriver.firewall import Backend, tool
from pydriver.netlink import Netlink
from pydriver.options import BRIDGE_NAME
from tests.hostenv import run
from tests.privileged.minihost import (
    OUTSIDE_HOST_IP,
    MiniHost,
    connect,
    in_ns,
    netns_add,
    ping,
    route_loopback_out,
)
from tests.privileged.netns_sysctl import NetnsSysctl

pytestmark = pytest.mark.privileged

BACKENDS = pytest.mark.parametrize("backend", ["nft", "legacy"])
HOST_LO_PORT = 5555  # a service the host binds to 127.0.0.1 only (a database, say)
HOST_PORT = 5557  # a service the host binds to all its addresses
PUBLISHED_LO = 18080  # -p 127.0.0.1:18080:80
PUBLISHED = 18081  # -p 18081:80


@BACKENDS
async def test_loopback_belongs_to_the_host_alone(backend: Backend, tmp_path: Path) -> None:
    """Items 1 and 2: route_localnet is on (so the host's 127.0.0.1:PORT works), yet neither
    a container that routes 127.0.0.0/8 to its gateway nor a LAN neighbour that sends to
    127.0.0.1 through the host's interface reaches a loopback service or a port published on
    127.0.0.1."""
    async with MiniHost(backend, tmp_path) as host:
        web_net = await host.network("10.213.60")
        web = await host.container(
            web_net, "10.213.60.10", ports=(("127.0.0.1", PUBLISHED_LO, 80), ("", PUBLISHED, 80))
        )
        host.serve(web.ns, 80)
        host.serve(host.ns, HOST_LO_PORT, "127.0.0.1")
        # The host itself: its loopback service, and the port published on 127.0.0.1 (the
        # container sees the network's gateway: replies come back addressed to it).
        assert connect(host.ns, "127.0.0.1", HOST_LO_PORT) == "127.0.0.1"
        assert connect(host.ns, "127.0.0.1", PUBLISHED_LO) == web_net.gateway
        assert connect(host.ns, "127.0.0.1", PUBLISHED) == web_net.gateway

        attacker_net = await host.network("10.213.61")
        attacker = await host.container(attacker_net, "10.213.61.10")
        route_loopback_out(attacker.ns, attacker_net.gateway, "eth0")
        assert connect(attacker.ns, "127.0.0.1", HOST_LO_PORT) == ""
        assert connect(attacker.ns, "127.0.0.1", PUBLISHED_LO) == ""
        # ... while what it may reach still answers (masqueraded to web's gateway).
        assert connect(attacker.ns, attacker_net.gateway, PUBLISHED) == web_net.gateway

        neighbour = host.outside()
        route_loopback_out(neighbour, OUTSIDE_HOST_IP, "pbt-o")
        assert connect(neighbour, "127.0.0.1", PUBLISHED_LO) == ""
        assert connect(neighbour, "127.0.0.1", HOST_LO_PORT) == ""
        assert connect(neighbour, OUTSIDE_HOST_IP, PUBLISHED) == "198.51.100.2"
        # Still fine for the host after all that.
        assert connect(host.ns, "127.0.0.1", PUBLISHED_LO) == web_net.gateway


@BACKENDS
async def test_an_internal_network_reaches_its_own_and_nothing_else(
    backend: Backend, tmp_path: Path
) -> None:
    """Item 3: an internal network's containers reach each other and their own gateway address
    (IPv4 and IPv6, neighbour discovery included), and nothing else: not another network's
    published port through their gateway or a host address, not the host's other addresses,
    even with a default route of their own making."""
    async with MiniHost(backend, tmp_path) as host:
        web_net = await host.network("10.213.60")
        web = await host.container(web_net, "10.213.60.10", ports=(("", PUBLISHED, 80),))
        host.serve(web.ns, 80)
        host.serve(host.ns, HOST_PORT)
        host.outside()  # gives the host its LAN address
        internal = await host.network("10.213.62", v6="fd00:213:62", internal=True)
        one = await host.container(internal, "10.213.62.10", "fd00:213:62::10")
        two = await host.container(internal, "10.213.62.11", "fd00:213:62::11")
        host.serve(two.ns, 80)
        assert connect(one.ns, two.ip, 80) == one.ip
        assert connect(one.ns, f"{two.ip6}", 80) == one.ip6
        assert connect(one.ns, internal.gateway, HOST_PORT) == one.ip
        assert connect(one.ns, f"{internal.gateway6}", HOST_PORT) == one.ip6
        assert ping(one.ns, f"{internal.gateway6}")
        # A hostile container adds the default route Docker did not give it.
        in_ns(one.ns, "ip", "route", "add", "default", "via", internal.gateway)
        in_ns(one.ns, "ip", "-6", "route", "add", "default", "via", f"{internal.gateway6}")
        for address in (internal.gateway, OUTSIDE_HOST_IP, web_net.gateway):
            assert connect(one.ns, address, PUBLISHED) == "", address
        for address in (OUTSIDE_HOST_IP, web_net.gateway, "127.0.0.1"):
            assert connect(one.ns, address, HOST_PORT) == "", address
        assert connect(one.ns, web.ip, 80) == ""
        # The published port itself still works for everyone else.
        assert connect(host.ns, OUTSIDE_HOST_IP, PUBLISHED) == OUTSIDE_HOST_IP


@BACKENDS
async def test_a_bridge_named_like_dockers_connects_its_own_containers(
    backend: Backend, tmp_path: Path
) -> None:
    """Item 4: a pybridge network whose bridge is named br-... (or docker0) is not caught by
    the drops that keep pybridge's networks out of Docker's bridges, and is still isolated."""
    async with MiniHost(backend, tmp_path) as host:
        name = "br-pbt" + secrets.token_hex(2)
        net = await host.network("10.213.63", options={BRIDGE_NAME: name})
        one = await host.container(net, "10.213.63.10")
        two = await host.container(net, "10.213.63.11")
        host.serve(two.ns, 80)
        assert ping(one.ns, two.ip)
        assert connect(one.ns, two.ip, 80) == one.ip
        other_net = await host.network("10.213.64", options={BRIDGE_NAME: "docker0"})
        other = await host.container(other_net, "10.213.64.10")
        other2 = await host.container(other_net, "10.213.64.11")
        assert ping(other.ns, other2.ip)
        assert not ping(other.ns, two.ip)
        assert not ping(one.ns, other.ip)


@BACKENDS
async def test_network_rm_answers_once_its_rules_are_gone(backend: Backend, tmp_path: Path) -> None:
    """Item 5: once DeleteNetwork answers, Docker may give the subnet to another driver; no
    rule of the removed network may still be there to catch its traffic."""
    async with MiniHost(backend, tmp_path) as host:
        keep = await host.network("10.213.65")
        gone = await host.network("10.213.66", options={BRIDGE_NAME: "pyb-pbtgone"})
        await host.container(gone, "10.213.66.10", ports=(("", PUBLISHED, 80),))
        await host.driver.delete_network(p.parse_network_ref({"NetworkID": gone.id}))
        # Not a moment for the background to run: the answer must come after the rules went.
        for family in (4, 6):
            save = in_ns(host.ns, tool(backend, family, "save"))
            assert "pyb-pbtgone" not in save
            assert "10.213.66." not in save
            assert "PYBRIDGE" in save  # the other network's rules are there
        assert "10.213.66." not in in_ns(host.ns, "ip", "-o", "addr", "show")
        await host.driver.delete_network(p.parse_network_ref({"NetworkID": keep.id}))
        await host.driver.settle()
        assert "pyb-pbtgone" not in in_ns(host.ns, "ip", "-o", "link", "show")


async def test_an_adopted_bridge_gets_its_settings_back(tmp_path: Path) -> None:
    """Item 4: a bridge pybridge did not create is left as it was found."""
    async with MiniHost("nft", tmp_path) as host:
        name = "pbt-ub" + secrets.token_hex(2)
        in_ns(host.ns, "ip", "link", "add", name, "mtu", "9000", "type", "bridge")
        sysctl = NetnsSysctl(host.ns)
        ra = f"/proc/sys/net/ipv6/conf/{name}/accept_ra"
        localnet = f"/proc/sys/net/ipv4/conf/{name}/route_localnet"
        in_ns(host.ns, "sysctl", "-qw", f"net.ipv6.conf.{name}.accept_ra=2")
        net = await host.network(
            "10.213.67", options={BRIDGE_NAME: name, "com.docker.network.driver.mtu": "1400"}
        )
        await host.container(net, "10.213.67.10")
        assert (sysctl.read(ra), sysctl.read(localnet)) == ("0", "1")
        link = await host.nl.get_link(name)
        assert link is not None
        assert link.mtu == 1400
        assert link.up
        await host.driver.delete_network(p.parse_network_ref({"NetworkID": net.id}))
        await host.driver.settle()
        assert (sysctl.read(ra), sysctl.read(localnet)) == ("2", "0")
        link = await host.nl.get_link(name)
        assert link is not None
        assert link.mtu == 9000
        assert not link.up
        assert await host.nl.link_addresses(name) == []


async def test_bridges_that_are_not_free_are_refused(tmp_path: Path) -> None:
    """Item 4: the host's uplink bridge (it carries the default route) and a bridge with
    addresses of its own are never taken over."""
    async with MiniHost("nft", tmp_path) as host:
        in_ns(host.ns, "ip", "link", "add", "pbt-uplink", "type", "bridge")
        in_ns(host.ns, "ip", "link", "set", "pbt-uplink", "up")
        in_ns(host.ns, "ip", "route", "add", "default", "dev", "pbt-uplink")
        with pytest.raises(Conflict, match="pbt-uplink carries the host's default IPv4 route"):
            await host.network("10.213.68", options={BRIDGE_NAME: "pbt-uplink"})
        in_ns(host.ns, "ip", "link", "add", "pbt-lan", "type", "bridge")
        in_ns(host.ns, "ip", "addr", "add", "192.0.2.1/24", "dev", "pbt-lan")
        with pytest.raises(Conflict, match=r"has the address 192\.0\.2\.1/24"):
            await host.network("10.213.68", options={BRIDGE_NAME: "pbt-lan"})
        # Left exactly as they were.
        for name, addresses in (("pbt-uplink", []), ("pbt-lan", ["192.0.2.1/24"])):
            found = [a for a in await host.nl.link_addresses(name) if not a.ip.is_link_local]
            assert found == [ipaddress.ip_interface(a) for a in addresses]
        for name in ("pbt-uplink", "pbt-lan"):
            assert NetnsSysctl(host.ns).read(f"/proc/sys/net/ipv6/conf/{name}/accept_ra") == "1"
        assert host.driver.networks == {}


async def test_routes_include_default_and_multipath_routes() -> None:
    ns = netns_add()
    nl = Netlink(netns=ns)
    await nl.open()
    try:
        for i in (1, 2):
            in_ns(ns, "ip", "link", "add", f"pbt-d{i}", "type", "veth", "peer", "name", f"pbt-e{i}")
            in_ns(ns, "ip", "addr", "add", f"192.0.2.{i}/32", "dev", f"pbt-d{i}")
            in_ns(ns, "ip", "link", "set", f"pbt-e{i}", "up")
            in_ns(ns, "ip", "link", "set", f"pbt-d{i}", "up")
        in_ns(ns, "ip", "-6", "route", "add", "default", "dev", "pbt-d1")
        in_ns(
            ns,
            *("ip", "route", "add", "default"),
            *("nexthop", "dev", "pbt-d1", "nexthop", "dev", "pbt-d2"),
        )
        defaults = {
            (str(r.destination), r.device) for r in await nl.routes() if not r.destination.prefixlen
        }
        assert defaults == {("0.0.0.0/0", "pbt-d1"), ("0.0.0.0/0", "pbt-d2"), ("::/0", "pbt-d1")}
    finally:
        await nl.close()
        run(["ip", "netns", "del", ns], check=False)


@BACKENDS
async def test_forwarding_is_turned_on_only_behind_a_forward_drop(
    backend: Backend, tmp_path: Path
) -> None:
    """pybridge starts before dockerd, so it may be the one that turns forwarding on; Docker
    then leaves the FORWARD policy alone. A host with forwarding on and FORWARD ACCEPT routes
    between all its interfaces: the policy goes to DROP first, per family."""
    async with MiniHost(backend, tmp_path, forward_policy="ACCEPT") as host:
        sysctl = NetnsSysctl(host.ns)
        for key in ("ipv4/ip_forward", "ipv6/conf/all/forwarding"):
            run(["ip", "netns", "exec", host.ns, "tee", f"/proc/sys/net/{key}"], input="0\n")
        await host.network("10.213.69", v6="fd00:213:69")
        assert sysctl.read("/proc/sys/net/ipv4/ip_forward") == "1"
        assert sysctl.read("/proc/sys/net/ipv6/conf/all/forwarding") == "1"
        for family in (4, 6):
            save = in_ns(host.ns, tool(backend, family, "save"), "-t", "filter")
            assert ":FORWARD DROP" in save, save


_UDP_LOG = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
try:
    while True:
        data, peer = s.recvfrom(100)
        print(peer[0], flush=True)
except TimeoutError:
    pass
"""

# A UDP datagram with any source address, written whole through a raw socket (CAP_NET_RAW in
# the container's own namespace is all it takes).
_SPOOF = r"""
import socket, struct, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
udp = struct.pack("!HHHH", 40000, port, 8 + 2, 0) + b"hi"
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(3):
    s.sendto(ip + udp, (dst, 0))
"""


@BACKENDS
async def test_a_container_cannot_pass_as_the_hosts_loopback(
    backend: Backend, tmp_path: Path
) -> None:
    """route_localnet (on for the host's own 127.0.0.1:PORT) also lifts the kernel's check of
    loopback sources on the bridge: a container writing 127.0.0.2 as its source must still not
    reach a host service that trusts loopback clients."""
    async with MiniHost(backend, tmp_path) as host:
        net = await host.network("10.213.68")
        attacker = await host.container(net, "10.213.68.10")
        port = 5558
        listener = await asyncio.create_subprocess_exec(
            *["ip", "netns", "exec", host.ns, sys.executable, "-c", _UDP_LOG, str(port), "3"],
            stdout=subprocess.PIPE,
        )
        await asyncio.sleep(0.5)
        for source in ("127.0.0.2", attacker.ip):  # the spoofed one, then a control
            in_ns(attacker.ns, sys.executable, "-c", _SPOOF, source, net.gateway, str(port))
        output, _ = await asyncio.wait_for(listener.communicate(), timeout=15)
        received = output.decode()
        assert received.split() == [attacker.ip] * 3, received
