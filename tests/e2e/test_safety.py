"""Safe by default (issue 12), through the docker CLI: what a hostile container (one with
NET_ADMIN in its own namespace) or a LAN neighbour tries must fail, and what users rely on must
keep working. tests/privileged/test_safety.py proves the same with namespaces alone."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.e2e.conftest import DRIVER, ECHO_TCP, MODE, Docker, cannot_ping, free_subnet, ping
from tests.harness import wait_for
from tests.hostenv import OUTSIDE_NS_IF, OutsideHost, firewall_dump, link_names, probe, run

# A hostile container: may change its own routes, and accepts replies from 127.0.0.1.
HOSTILE = ("--cap-add", "NET_ADMIN", "--sysctl", "net.ipv4.conf.all.route_localnet=1")
LOOPBACK_SERVICE = 18410  # a host service bound to 127.0.0.1 only (a database, say)
HOST_SERVICE = 18411  # a host service on all the host's addresses
METRICS = 9327  # the host service's metrics, on 127.0.0.1

# Answers each TCP connection with the address it came from.
_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16); print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall((peer[0] + "\n").encode()); c.close()
"""

ROUTE_LOOPBACK_OUT = (
    "ip rule add pref 10 lookup local && ip rule del pref 0 && "
    "ip rule add pref 5 to 127.0.0.0/8 lookup 100 && "
    "ip route add 127.0.0.0/8 via {gateway} dev {dev} table 100"
)


@contextmanager
def host_server(address: str, port: int) -> Iterator[None]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, address, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.kill()
        proc.wait()


def tcp(d: Docker, container: str, ip: str, port: int, request: str = "") -> str:
    """What a TCP connection from ``container`` gets back ("" if nothing answers)."""
    script = f"printf '{request}' | nc -w 2 {ip} {port}"
    return d.probe(container, "sh", "-c", script)


def tcp_from_host(ip: str, port: int) -> str:
    return probe(["busybox", "nc", "-w", "2", ip, str(port)])


def answers_its_neighbour(d: Docker, attacker: str, network: str) -> None:
    """The positive control of a "cannot reach" test: the attacker's packets for 127.0.0.1
    leave through its gateway, and it still reaches a server on its own network, so its empty
    answers are the rules' doing."""
    route = d.exec(attacker, "ip", "route", "get", "127.0.0.1")
    assert " via " in route, route
    assert " dev eth0" in route, route
    neighbour = d.run(network, command=ECHO_TCP)
    address = d.ip(neighbour, network)
    assert wait_for(lambda: tcp(d, attacker, address, 80) == d.ip(attacker, network))


def gateway(subnet: str) -> str:
    return subnet.rsplit(".", 1)[0] + ".1"


def test_a_container_cannot_reach_the_hosts_loopback(d: Docker) -> None:
    """Item 1: route_localnet is on for pybridge's bridges (so the host's own 127.0.0.1:PORT
    works), but a container that routes 127.0.0.0/8 to its gateway reaches nothing there."""
    web_subnet = free_subnet(60)
    web_net = d.network("--subnet", web_subnet)
    d.run(web_net, "-p", "127.0.0.1:18400:80", command=ECHO_TCP)
    assert wait_for(lambda: tcp_from_host("127.0.0.1", 18400) == gateway(web_subnet))

    subnet = free_subnet(61)
    net = d.network("--subnet", subnet)
    attacker = d.run(net, *HOSTILE)
    d.exec(attacker, "sh", "-c", ROUTE_LOOPBACK_OUT.format(gateway=gateway(subnet), dev="eth0"))
    answers_its_neighbour(d, attacker, net)
    with host_server("127.0.0.1", LOOPBACK_SERVICE):
        assert tcp_from_host("127.0.0.1", LOOPBACK_SERVICE) == "127.0.0.1"
        assert tcp(d, attacker, "127.0.0.1", LOOPBACK_SERVICE) == ""
    assert tcp(d, attacker, "127.0.0.1", 18400) == ""
    if MODE == "service":  # pybridge's own metrics listen on 127.0.0.1:9327
        url = f"http://127.0.0.1:{METRICS}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert "pydriver_" in response.read().decode()
        # (stdin stays open a moment: aiohttp drops a connection half-closed before it answers)
        ask = rf"(printf 'GET /metrics HTTP/1.0\r\n\r\n'; sleep 1) | nc -w 2 127.0.0.1 {METRICS}"
        assert d.probe(attacker, "sh", "-c", ask) == ""
    # Still there for the host; published on 127.0.0.1 only, so not through a host address.
    assert tcp_from_host("127.0.0.1", 18400) == gateway(web_subnet)
    assert tcp(d, attacker, gateway(subnet), 18400) == ""


@contextmanager
def loopback_routed_to_host(outside: OutsideHost) -> Iterator[None]:
    """The LAN neighbour sends 127.0.0.0/8 to the host (and accepts replies from it)."""
    steps = ROUTE_LOOPBACK_OUT.format(gateway=outside.host_ip, dev=OUTSIDE_NS_IF)
    try:
        outside.exec("sh", "-c", steps)
        outside.exec("sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
        yield
    finally:
        outside.exec("ip", "rule", "add", "pref", "0", "lookup", "local", check=False)
        outside.exec("ip", "rule", "del", "pref", "10", check=False)
        outside.exec("ip", "rule", "del", "pref", "5", check=False)
        outside.exec("ip", "route", "flush", "table", "100", check=False)
        outside.exec("sysctl", "-qw", "net.ipv4.conf.all.route_localnet=0", check=False)


def test_a_port_published_on_127_answers_the_host_alone(d: Docker, outside: OutsideHost) -> None:
    """Item 2 (moby#45610): a LAN neighbour sending to 127.0.0.1:PORT through the host's
    interface is not answered; nor is a container of another network."""
    subnet = free_subnet(62)
    net = d.network("--subnet", subnet)
    d.run(net, "-p", "127.0.0.1:18401:80", "-p", "18402:80", command=ECHO_TCP)
    assert wait_for(lambda: tcp_from_host("127.0.0.1", 18401) == gateway(subnet))
    with loopback_routed_to_host(outside):
        assert outside.probe("busybox", "nc", "-w", "2", "127.0.0.1", "18401") == ""
        # The port published on every address answers it as before.
        assert outside.probe("busybox", "nc", "-w", "2", outside.host_ip, "18402") == outside.ip
    other_subnet = free_subnet(63)
    other = d.network("--subnet", other_subnet)
    attacker = d.run(other, *HOSTILE)
    d.exec(
        attacker, "sh", "-c", ROUTE_LOOPBACK_OUT.format(gateway=gateway(other_subnet), dev="eth0")
    )
    answers_its_neighbour(d, attacker, other)
    assert tcp(d, attacker, "127.0.0.1", 18401) == ""


def test_an_internal_network_reaches_its_own_and_nothing_else(
    d: Docker, outside: OutsideHost
) -> None:
    """Item 3: a container of an internal network, even one that adds a default route of its
    own, reaches its peers and its own gateway address, and nothing else: not another network's
    published port (through its gateway or a host address), not the host's other addresses."""
    web_subnet = free_subnet(64)
    web_net = d.network("--subnet", web_subnet)
    d.run(web_net, "-p", "18403:80", command=ECHO_TCP)
    assert wait_for(lambda: tcp_from_host(outside.host_ip, 18403) == outside.host_ip)
    subnet = free_subnet(65)
    net = d.network("--internal", "--subnet", subnet)
    peer = d.run(net, command=ECHO_TCP)
    hostile = d.run(net, *HOSTILE)
    me = d.ip(hostile, net)
    assert wait_for(lambda: tcp(d, hostile, d.ip(peer, net), 80) == me)
    ping(d, hostile, gateway(subnet))
    d.exec(hostile, "ip", "route", "add", "default", "via", gateway(subnet))
    with host_server("0.0.0.0", HOST_SERVICE):
        assert tcp(d, hostile, gateway(subnet), HOST_SERVICE) == me
        for address in (outside.host_ip, gateway(web_subnet)):
            assert tcp(d, hostile, address, HOST_SERVICE) == "", address
    for address in (gateway(subnet), outside.host_ip, gateway(web_subnet)):
        assert tcp(d, hostile, address, 18403) == "", address
    cannot_ping(d, hostile, outside.ip)


def test_a_bridge_named_like_dockers_connects_its_own_containers(d: Docker) -> None:
    """Item 4: a pybridge network whose bridge is named br-... is not caught by the drops that
    keep pybridge's networks out of Docker's bridges, and stays isolated from the others."""
    name = "br-pbt" + d.prefix[-4:]
    net = d.network("-o", f"com.docker.network.bridge.name={name}")
    a, b = d.run(net), d.run(net)
    ping(d, a, d.ip(b, net))
    ping(d, a, b)
    other_net = d.network()
    other = d.run(other_net)
    cannot_ping(d, other, d.ip(a, net))
    cannot_ping(d, a, d.ip(other, other_net))


def _link(name: str) -> dict[str, object]:
    return dict(json.loads(run(["ip", "-j", "link", "show", "dev", name]).stdout)[0])


def test_an_adopted_bridge_is_left_as_it_was_found(d: Docker) -> None:
    """Item 4: settings pybridge sets on a bridge it did not create come back when the network
    goes; the bridge and its own addresses stay."""
    name = "pbt-ub" + d.prefix[-4:]
    run(["ip", "link", "add", name, "mtu", "9000", "type", "bridge"])
    accept_ra = Path(f"/proc/sys/net/ipv6/conf/{name}/accept_ra")
    route_localnet = Path(f"/proc/sys/net/ipv4/conf/{name}/route_localnet")
    try:
        accept_ra.write_text("2\n")
        net = d.network(
            "--subnet",
            free_subnet(66),
            "-o",
            f"com.docker.network.bridge.name={name}",
            "-o",
            "com.docker.network.driver.mtu=1400",
        )
        a, b = d.run(net), d.run(net)
        ping(d, a, b)
        assert (accept_ra.read_text().strip(), route_localnet.read_text().strip()) == ("0", "1")
        d.cleanup()
        assert name in link_names()
        assert (accept_ra.read_text().strip(), route_localnet.read_text().strip()) == ("2", "0")
        link = _link(name)
        assert link["mtu"] == 9000
        assert "UP" not in link["flags"]  # type: ignore[operator]
        assert "10.213.66.1" not in run(["ip", "-o", "addr", "show", "dev", name]).stdout
    finally:
        run(["ip", "link", "del", name], check=False)


def test_bridges_that_cannot_be_used_are_refused(d: Docker) -> None:
    """Item 4: names that are /proc/sys directories, and bridges with addresses of their own
    outside the network's subnets, are refused in one sentence."""
    for reserved in ("all", "default"):
        result = run(
            [
                *("docker", "network", "create", "-d", DRIVER),
                *("-o", f"com.docker.network.bridge.name={reserved}", d.name("bad")),
            ],
            check=False,
        )
        assert result.returncode != 0
        assert f"'{reserved}' is not allowed" in result.stderr, result.stderr
    name = "pbt-lan" + d.prefix[-4:]
    run(["ip", "link", "add", name, "type", "bridge"])
    try:
        run(["ip", "addr", "add", "192.0.2.1/24", "dev", name])
        result = run(
            [
                *("docker", "network", "create", "-d", DRIVER, "--subnet", free_subnet(66)),
                *("-o", f"com.docker.network.bridge.name={name}", d.name("bad")),
            ],
            check=False,
        )
        assert result.returncode != 0
        assert "has the address 192.0.2.1/24, outside the network's subnets" in result.stderr
        assert "192.0.2.1/24" in run(["ip", "-o", "addr", "show", "dev", name]).stdout
    finally:
        run(["ip", "link", "del", name], check=False)


def test_network_rm_answers_once_its_rules_are_gone(d: Docker) -> None:
    """Item 5: once `docker network rm` returns, no rule of that network is left to catch a
    network that takes its subnet next (the bridge itself may trail)."""
    subnet = free_subnet(66)
    net = d.network("--subnet", subnet)
    d.run(net, "-p", "18404:80", command=ECHO_TCP)
    bridge = "pyb-" + str(d.network_info(net)["Id"])[:11]
    assert bridge in firewall_dump()
    d.cleanup()
    dump = firewall_dump()
    assert bridge not in dump
    assert subnet not in dump
    assert wait_for(lambda: bridge not in link_names(), timeout=10)


# A UDP peer outside: prints the first sender's (address, port), then, for each line read,
# sends a datagram back to that sender.
_UDP_PEER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", 53)); s.settimeout(20); print("ready", flush=True)
_, peer = s.recvfrom(512)
print(peer[0], peer[1], flush=True)
for line in sys.stdin:
    s.sendto(b"late", peer)
    print("sent", flush=True)
"""


def udp_datagrams_received(d: Docker, container: str) -> int:
    """Datagrams that reached the container's UDP stack, for a socket or for none."""
    lines = [line.split() for line in d.exec(container, "cat", "/proc/net/snmp").splitlines()]
    header, values = [line for line in lines if line and line[0] == "Udp:"][:2]
    counters = dict(zip(header[1:], values[1:], strict=True))
    return int(counters["InDatagrams"]) + int(counters["NoPorts"])


def test_a_container_given_a_removed_containers_address_inherits_none_of_its_flows(
    d: Docker, outside: OutsideHost
) -> None:
    """Container A has a UDP flow to a peer outside (masqueraded). A goes; B gets A's
    address. The peer's next datagram of that flow must not reach B: a connection-tracking
    entry left behind would still turn it back to the address, and the replies rule let it
    in."""
    subnet = free_subnet(96)
    address = str(ipaddress.ip_network(subnet)[5])
    net = d.network("--subnet", subnet)
    peer = subprocess.Popen(
        ["ip", "netns", "exec", outside.ns, sys.executable, "-c", _UDP_PEER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert peer.stdin is not None
        assert peer.stdout is not None
        assert peer.stdout.readline().strip() == "ready"
        a = d.run(net, "--ip", address)
        d.exec(a, "nslookup", "-timeout=1", "example.test", outside.ip, check=False, timeout=10)
        seen_from, _ = peer.stdout.readline().split()
        assert seen_from == outside.host_ip  # masqueraded: the flow has a NAT entry
        d.rm_container(a)
        b = d.run(net, "--ip", address)
        assert d.ip(b, net) == address
        before = udp_datagrams_received(d, b)
        peer.stdin.write("go\n")
        peer.stdin.flush()
        assert peer.stdout.readline().strip() == "sent"
        time.sleep(1)
        assert udp_datagrams_received(d, b) == before
    finally:
        peer.kill()
        peer.wait()
