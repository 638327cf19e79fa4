"""Publishing ports (-p, -P) on pybridge networks, reached from everywhere a user expects.

Containers run pbtest-echo, which answers with the address the connection came from, so each
test also shows the source address the container sees."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    ECHO_TCP,
    MODE,
    Docker,
    Plugin,
    default_routes,
    free_subnet,
    tcp_from,
    tcp_from_container,
)
from tests.harness import IMAGE, docker, wait_for
from tests.hostenv import OutsideHost, firewall_dump, run

PYDRIVER = [sys.executable, "-m", "pydriver.cli"]


def tcp_from_host(ip: str, port: int, timeout: float = 3.0) -> str:
    """Connect from the host itself; '' if nothing answers."""
    try:
        with socket.create_connection((ip, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(200).decode().strip()
    except (TimeoutError, ConnectionRefusedError):
        return ""
    except OSError as error:  # went out, but no way there
        if error.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return ""
        raise


def udp_from(outside: OutsideHost, ip: str, port: int) -> str:
    code = (
        "import socket,sys; fam=socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET;"
        "s=socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(3);"
        "s.sendto(b'x', (sys.argv[1], int(sys.argv[2])));"
        "print(s.recvfrom(200)[0].decode().strip())"
    )
    return outside.probe("python3", "-c", code, ip, str(port))


def ports_json() -> list[dict[str, object]]:
    out = run([*PYDRIVER, "ports", "--json"]).stdout
    return list(json.loads(out))


def published_for(container: str) -> list[dict[str, object]]:
    return [r for r in ports_json() if r["container"] == container]


def gateway_of(d: Docker, container: str) -> str:
    return default_routes(d, container)[0].split()[2]


@contextmanager
def host_listener(port: int) -> Iterator[int]:
    """A process on the host holding a TCP port (like any service would)."""
    code = (
        "import socket,sys,time; s=socket.socket(); s.bind(('0.0.0.0', int(sys.argv[1])));"
        "s.listen(); print('ready', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_tcp_reachable_from_everywhere(d: Docker, outside: OutsideHost) -> None:
    net = d.network("--subnet", free_subnet(50))
    web = d.run(net, "-p", "18200:80", command=ECHO_TCP)
    web_ip = d.ip(web, net)
    gateway = gateway_of(d, web)
    # From another host: the container sees the real client address.
    assert tcp_from(outside, outside.host_ip, 18200, outside.ip) == outside.ip
    # From the host itself, through loopback and through its own addresses.
    assert tcp_from_host("127.0.0.1", 18200) == gateway
    assert tcp_from_host(outside.host_ip, 18200) == outside.host_ip
    # Hairpin: a container of the same network through the host's address (and the
    # container itself) sees the gateway as the source.
    neighbour = d.run(net)
    assert tcp_from_container(d, neighbour, outside.host_ip, 18200) == gateway
    assert tcp_from_container(d, web, outside.host_ip, 18200) == gateway
    # From a container on another pybridge network (its egress is masqueraded, as Docker
    # does between its own networks): the gateway.
    other_net = d.network()
    other = d.run(other_net)
    assert tcp_from_container(d, other, outside.host_ip, 18200) == gateway
    # From a container on Docker's default bridge (Docker masquerades it to our gateway).
    on_docker0 = d.run("bridge")
    assert tcp_from_container(d, on_docker0, outside.host_ip, 18200) == gateway
    # The container port itself is not reachable directly, even with a route to it.
    outside.exec("ip", "route", "add", "10.213.50.0/24", "via", outside.host_ip)
    try:
        assert tcp_from(outside, web_ip, 80) == ""
    finally:
        outside.exec("ip", "route", "del", "10.213.50.0/24", check=False)


def test_unpublished_ports_are_not_reachable(d: Docker, outside: OutsideHost) -> None:
    net = d.network("--subnet", free_subnet(51))
    c = d.run(net, "-p", "18201:80", command=("pbtest-echo", "tcp", "80", "81"))
    outside.exec("ip", "route", "add", "10.213.51.0/24", "via", outside.host_ip)
    try:
        # (the published port first: it waits until the server, which listens on both, is up)
        assert tcp_from(outside, outside.host_ip, 18201, outside.ip) == outside.ip
        assert tcp_from(outside, d.ip(c, net), 81) == ""
    finally:
        outside.exec("ip", "route", "del", "10.213.51.0/24", check=False)


def test_udp_and_ranges(d: Docker, outside: OutsideHost) -> None:
    net = d.network()
    udp = d.run(net, "-p", "18210:53/udp", command=("pbtest-echo", "udp", "53"))
    assert udp_from(outside, outside.host_ip, 18210) == outside.ip
    ranged = d.run(net, "-p", "18220-18222:90-92", command=("pbtest-echo", "tcp", "90", "91", "92"))
    for port in (18220, 18221, 18222):
        assert tcp_from(outside, outside.host_ip, port, outside.ip) == outside.ip
    hosts = sorted(str(r["host"]) for r in published_for(ranged))
    assert hosts == ["0.0.0.0:18220", "0.0.0.0:18221", "0.0.0.0:18222"]
    assert [r["proto"] for r in published_for(udp)] == ["udp"]


def test_one_host_address_v4_and_v6(d: Docker, outside: OutsideHost) -> None:
    net = d.network("--ipv6", "--subnet", free_subnet(52), "--subnet", "fd00:213:52::/64")
    c = d.run(
        net,
        "-p",
        f"{outside.host_ip}:18230:80",
        "-p",
        f"[{outside.host_ip6}]:18231:80",
        command=ECHO_TCP,
    )
    assert tcp_from(outside, outside.host_ip, 18230, outside.ip) == outside.ip
    assert tcp_from_host("127.0.0.1", 18230) == ""  # only that address
    assert tcp_from(outside, outside.host_ip6, 18231, outside.ip6) == outside.ip6
    assert tcp_from(outside, outside.host_ip, 18231) == ""
    assert sorted(str(r["host"]) for r in published_for(c)) == [
        "198.51.100.1:18230",
        f"[{outside.host_ip6}]:18231",
    ]
    # A wildcard binding on a dual-stack network publishes on both families.
    both = d.run(net, "-p", "18232:80", command=ECHO_TCP)
    assert tcp_from(outside, outside.host_ip, 18232, outside.ip) == outside.ip
    assert tcp_from(outside, outside.host_ip6, 18232, outside.ip6) == outside.ip6
    assert len(published_for(both)) == 2


def test_ephemeral_ports(d: Docker, outside: OutsideHost) -> None:
    net = d.network()
    c = d.run(net, "-p", "80", "-P", "--expose", "81", command=("pbtest-echo", "tcp", "80", "81"))
    rows = published_for(c)
    assert sorted(str(r["target"]).split(":")[-1] for r in rows) == ["80", "81"]
    port_range = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
    low, high = (int(v) for v in port_range.split())
    host_ports = [int(str(r["host"]).rsplit(":", 1)[1]) for r in rows]
    assert len(set(host_ports)) == 2
    assert all(low <= p <= high for p in host_ports)
    for port in host_ports:
        assert tcp_from(outside, outside.host_ip, port, outside.ip) == outside.ip
    # The ports are held: a host process cannot take them.
    with socket.socket() as s, pytest.raises(OSError, match="Address already in use"):
        s.bind(("0.0.0.0", host_ports[0]))


def test_host_binding_ipv4_option(d: Docker, outside: OutsideHost) -> None:
    net = d.network("-o", f"com.docker.network.bridge.host_binding_ipv4={outside.host_ip}")
    c = d.run(net, "-p", "18240:80", command=ECHO_TCP)
    assert [r["host"] for r in published_for(c)] == [f"{outside.host_ip}:18240"]
    assert tcp_from(outside, outside.host_ip, 18240, outside.ip) == outside.ip
    assert tcp_from_host("127.0.0.1", 18240) == ""


def test_taken_ports_fail_docker_run_by_name(d: Docker) -> None:
    net = d.network()
    first = d.run(net, "-p", "18250:80", command=ECHO_TCP)
    endpoint = str(published_for(first)[0]["endpoint_id"])[:12]
    name = d.name("clash")
    d.containers.append(name)
    result = run(
        [
            "docker",
            "run",
            "-d",
            "--name",
            name,
            "--network",
            net,
            "-p",
            "18250:80",
            IMAGE,
            *ECHO_TCP,
        ],
        check=False,
    )
    assert result.returncode != 0
    assert (
        "host port 0.0.0.0:18250/tcp is already published by pybridge for endpoint "
        f"{endpoint}" in result.stderr
    ), result.stderr
    with host_listener(18251) as pid:
        name2 = d.name("clash")
        d.containers.append(name2)
        result = run(
            [
                "docker",
                "run",
                "-d",
                "--name",
                name2,
                "--network",
                net,
                "-p",
                "18251:80",
                IMAGE,
                *ECHO_TCP,
            ],
            check=False,
        )
        assert result.returncode != 0
        if MODE == "managed":
            # A managed plugin lives in its own pid namespace and cannot see host processes.
            assert (
                "host port 0.0.0.0:18251/tcp is already in use by another program on the "
                "host (`ss -ltunp 'sport = :18251'` names it)" in result.stderr
            ), result.stderr
        else:
            assert "host port 0.0.0.0:18251/tcp is already in use by python" in result.stderr
            assert f"pid {pid}" in result.stderr, result.stderr


def test_stop_start_rm_and_plugin_restart(d: Docker, outside: OutsideHost, plugin: Plugin) -> None:
    net = d.network()
    c = d.run(net, "-p", "18260:80", command=ECHO_TCP)
    assert tcp_from(outside, outside.host_ip, 18260, outside.ip) == outside.ip
    docker("stop", "-t", "0", c)
    assert published_for(c) == []
    assert tcp_from(outside, outside.host_ip, 18260) == ""
    assert wait_for(lambda: "18260" not in firewall_dump(), timeout=5)
    docker("start", c)
    assert tcp_from(outside, outside.host_ip, 18260, outside.ip) == outside.ip
    # The data plane does not need the plugin: with it stopped, containers still talk to each
    # other, to the outside and through published ports. A restart keeps every mapping.
    neighbour = d.run(net)
    plugin.stop()
    try:
        assert tcp_from(outside, outside.host_ip, 18260, outside.ip) == outside.ip
        assert tcp_from_container(d, neighbour, d.ip(c, net), 80) == d.ip(neighbour, net)
        assert tcp_from_container(d, neighbour, outside.ip, outside.port) == outside.host_ip
    finally:
        plugin.start()
    plugin.kill9_and_start()
    assert tcp_from(outside, outside.host_ip, 18260, outside.ip) == outside.ip
    assert [r["host"] for r in published_for(c)] == ["0.0.0.0:18260"]
    d.rm_container(c)
    assert wait_for(lambda: "18260" not in firewall_dump(), timeout=5)
    d.rm_container(neighbour)
    d.rm_network(net)
    assert wait_for(lambda: "18260" not in firewall_dump(), timeout=5)


def test_pydriver_ports_table(d: Docker) -> None:
    net = d.network(name=d.prefix + "-tbl")
    c = d.run(net, "-p", "18270:80", "-p", "18271:53/udp", name=d.prefix + "-web", command=ECHO_TCP)
    out = run([*PYDRIVER, "ports"], check=True).stdout
    lines = [line for line in out.splitlines() if c in line]
    assert len(lines) == 2, out
    assert any(
        "tcp" in line and "0.0.0.0:18270" in line and f"{d.ip(c, net)}:80" in line and net in line
        for line in lines
    ), out
    assert out.splitlines()[0].split()[:4] == ["CONTAINER", "NETWORK", "ENDPOINT", "PROTO"]
