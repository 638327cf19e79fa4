"""Networks that span hosts, end to end (issue 16): three Docker hosts on this machine, each its
own dockerd and pybridge in the cluster, etcd on their underlay; everything driven with the
docker CLI as a user would, on each host."""

from __future__ import annotations

import json
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest

from tests.harness import IMAGE
from tests.hostenv import probed
from tests.multihost.harness import Cluster, DockerHost

pytestmark = pytest.mark.e2e

LEASE_GONE = 25  # seconds: a lease of 10 s expires, the watch reports it, tunnels follow


@pytest.fixture(scope="module")
def hosts(cluster: Cluster) -> Iterator[list[DockerHost]]:
    """The three hosts, each with pybridge in the cluster."""
    for host in cluster.hosts:
        host.start_pybridge(env=host.cluster_env)
    yield cluster.hosts
    for host in cluster.hosts:
        if host.pybridge is not None:
            host.stop_pybridge()


@pytest.fixture(autouse=True)
def clean(hosts: list[DockerHost]) -> Iterator[None]:
    yield
    for host in hosts:
        if host.dockerd is None:
            continue
        found = host.docker("ps", "-aq", "--filter", "name=pbt", check=False).split()
        if found:
            host.docker("rm", "-f", *found, check=False)
        for network in host.docker(
            "network", "ls", "-q", "--filter", "name=pbt", check=False
        ).split():
            host.docker("network", "rm", network, check=False)


def name(what: str) -> str:
    return f"pbt-{what}-{secrets.token_hex(3)}"


def segment(hosts: list[DockerHost], subnet: str, *extra: str, net: str | None = None) -> str:
    """One network of the same name and segment on each host: the first names the subnet,
    the others take the segment's (--ipam-opt)."""
    net = net or name("seg")
    for i, host in enumerate(hosts):
        where = ["--subnet", subnet] if i == 0 else ["--ipam-opt", f"pybridge.segment={net}"]
        host.docker("network", "create", "-d", "pybridge", "--ipam-driver", "pybridge",
                    "-o", f"pybridge.segment={net}", *where, *extra, net)  # fmt: skip
    return net


def start(
    host: DockerHost, network: str, *cmd: str, what: str = "c", run_args: tuple[str, ...] = ()
) -> tuple[str, str]:
    """A container on ``network`` of ``host``: (its name, its address)."""
    container = name(what)
    host.docker("run", "-d", "--name", container, "--network", network, *run_args, IMAGE,
                *(cmd or ("sleep", "3600")))  # fmt: skip
    return container, address(host, container, network)


def address(host: DockerHost, container: str, network: str) -> str:
    return host.docker(
        "inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}',
        container,
    )  # fmt: skip


def pings(host: DockerHost, container: str, target: str, count: int = 1) -> bool:
    result = host.docker_result("exec", container, "ping", "-c", str(count), "-W", "1", target)
    probed(result, f"ping from {container} on {host.name}")  # (it ran, answered or not)
    return result.returncode == 0


def fetch(host: DockerHost, container: str, target: str, port: int = 80) -> str:
    return host.docker(
        "exec", container, "sh", "-c",
        f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {target} {port}",
    )  # fmt: skip


def eventually(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``check()`` held."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)
    return time.monotonic() - started


def status(host: DockerHost) -> dict[str, object]:
    out = host.exec_ns(sys.executable, "-m", "pydriver.cli", "status", "--json", "--no-names",
                       "--state-dir", str(host.state_dir)).stdout  # fmt: skip
    report = json.loads(out)["cluster"]
    assert isinstance(report, dict)
    return report


def agrees(host: DockerHost) -> bool:
    """pybridge status: the store was read and no tunnel entry disagrees with it."""
    report = status(host)
    segments = report["segments"]
    assert isinstance(segments, list)
    return report["store_error"] is None and all(
        s["device"] and not s["disagreements"] for s in segments
    )


def fdb_vteps(host: DockerHost) -> set[str]:
    out = host.exec_ns("bridge", "fdb", "show").stdout
    return set(re.findall(r" dst (\S+) ", out))


# -- reachability ------------------------------------------------------------------------------


def test_containers_on_three_hosts_reach_each_other(hosts: list[DockerHost]) -> None:
    net = segment(hosts, "10.70.0.0/16")
    web = [start(h, net, "httpd", "-f", "-p", "80", "-h", "/www", what="web") for h in hosts]
    addresses = [a for _, a in web]
    assert len(set(addresses)) == 3
    for i, host in enumerate(hosts):
        container = web[i][0]
        for j, (_, target) in enumerate(web):
            if i == j:
                continue
            eventually(
                f"{host.name} -> {hosts[j].name}",
                partial(pings, host, container, target),
                5,
            )
            assert "200 OK" in fetch(host, container, target)
    # The containers' MTU leaves room for the encapsulation.
    mtu = hosts[0].docker("exec", web[0][0], "cat", "/sys/class/net/eth0/mtu")
    assert int(mtu) == 1450


def test_a_new_container_is_reached_from_another_host_within_a_second(
    hosts: list[DockerHost],
) -> None:
    net = segment(hosts, "10.71.0.0/16")
    prober, _ = start(hosts[0], net)
    container = name("new")
    hosts[1].docker("run", "-d", "--name", container, "--network", net, IMAGE, "sleep", "3600")
    started = time.monotonic()  # docker run has returned: the container runs
    target = address(hosts[1], container, net)
    took = eventually("first reply", lambda: pings(hosts[0], prober, target), 5)
    assert time.monotonic() - started <= 1.5, took


def test_fifty_containers_started_in_parallel_on_three_hosts_have_unique_addresses(
    hosts: list[DockerHost],
) -> None:
    net = segment(hosts, "10.72.0.0/16")
    jobs = [(hosts[i % 3], f"pbt-par-{i}") for i in range(51)]

    def run_one(job: tuple[DockerHost, str]) -> str:
        host, container = job
        host.docker("run", "-d", "--name", container, "--network", net, IMAGE, "sleep", "3600",
                    timeout=180)  # fmt: skip
        return address(host, container, net)

    with ThreadPoolExecutor(max_workers=12) as pool:
        addresses = list(pool.map(run_one, jobs))
    assert len(set(addresses)) == 51, sorted(addresses)
    # A few of them, across hosts.
    for a, b in ((0, 1), (1, 2), (2, 0), (3, 50)):
        host, container = jobs[a]
        assert pings(host, container, addresses[b]) or pings(host, container, addresses[b], 3)
    for host in hosts:
        eventually(f"{host.name} agrees with etcd", partial(agrees, host), 15)


# -- isolation ---------------------------------------------------------------------------------


def test_segments_are_isolated_from_each_other_and_from_local_networks(
    hosts: list[DockerHost],
) -> None:
    red = segment(hosts[:2], "10.73.0.0/24")
    blue = segment(hosts[:2], "10.74.0.0/24")
    local = name("local")
    hosts[1].docker("network", "create", "-d", "pybridge", "--subnet", "10.75.0.0/24", local)
    red1, _ = start(hosts[0], red)
    _, red2 = start(hosts[1], red)
    blue1, _ = start(hosts[0], blue)
    _, blue2 = start(hosts[1], blue)
    _, local2 = start(hosts[1], local)
    neighbour, _ = start(hosts[1], local)
    assert pings(hosts[1], neighbour, local2, 2)  # (local2 answers what may reach it)
    assert pings(hosts[0], red1, red2, 2)
    assert pings(hosts[0], blue1, blue2, 2)
    assert not pings(hosts[0], red1, blue2, 2)
    assert not pings(hosts[0], blue1, red2, 2)
    assert not pings(hosts[0], red1, local2, 2)


def test_an_internal_segment_spans_hosts_without_egress(hosts: list[DockerHost]) -> None:
    net = segment(hosts[:2], "10.76.0.0/24", "--internal")
    one, _ = start(hosts[0], net)
    _, two = start(hosts[1], net)
    assert pings(hosts[0], one, two, 2)
    # The other host's underlay address is "outside" for a container: not reachable.
    assert not pings(hosts[0], one, hosts[1].address, 2)


def test_egress_and_published_ports_stay_on_each_host(hosts: list[DockerHost]) -> None:
    net = segment(hosts[:2], "10.77.0.0/24")
    web, _ = start(hosts[0], net, "httpd", "-f", "-p", "80", "-h", "/www", what="web",
                   run_args=("-p", "8080:80"))  # fmt: skip
    # Published on host 1 only.
    got = hosts[1].exec_ns("sh", "-c", f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | "
                           f"busybox nc -w 3 {hosts[0].address} 8080", check=False)  # fmt: skip
    assert "200 OK" in got.stdout, got
    refused = hosts[0].exec_ns("sh", "-c", f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | "
                               f"busybox nc -w 3 {hosts[1].address} 8080", check=False)  # fmt: skip
    assert "200 OK" not in probed(refused, "the request to host 2's unpublished port")
    # Egress leaves through the container's own host (masqueraded to its address).
    assert pings(hosts[0], web, hosts[2].address, 2)


# -- failures ----------------------------------------------------------------------------------


def test_pybridge_killed_and_restarted_on_one_host(hosts: list[DockerHost]) -> None:
    net = segment(hosts[:2], "10.78.0.0/16")
    one, a1 = start(hosts[0], net)
    _, a2 = start(hosts[1], net)
    assert pings(hosts[0], one, a2, 2)
    hosts[1].kill9_pybridge()
    assert pings(hosts[0], one, a2, 2)  # the data plane does not need pybridge
    hosts[1].start_pybridge(env=hosts[1].cluster_env)
    _, a3 = start(hosts[1], net)
    assert len({a1, a2, a3}) == 3
    eventually("the new container from host 1", lambda: pings(hosts[0], one, a3), 5)
    eventually("host 2 agrees with etcd", lambda: agrees(hosts[1]), 15)


def test_etcd_down_and_back(cluster: Cluster, hosts: list[DockerHost]) -> None:
    net = segment(hosts[:2], "10.79.0.0/16")
    one, a1 = start(hosts[0], net)
    _, a2 = start(hosts[1], net)
    cluster.etcd.kill()
    try:
        assert pings(hosts[0], one, a2, 2)  # the data plane keeps working
        # Containers keep starting from the blocks a host holds.
        late, a3 = start(hosts[1], net)
        assert a3 not in (a1, a2)
    finally:
        cluster.etcd.restart()
    eventually("the container started while etcd was down", lambda: pings(hosts[0], one, a3), 20)
    assert pings(hosts[1], late, a1, 2)
    for host in hosts[:2]:
        eventually(f"{host.name} agrees with etcd", partial(agrees, host), 15)


def test_a_host_that_dies_leaves_the_others_and_keeps_its_addresses(
    cluster: Cluster, hosts: list[DockerHost]
) -> None:
    net = segment(hosts, "10.80.0.0/16")
    one, _ = start(hosts[0], net)
    _, a3 = start(hosts[2], net)
    assert pings(hosts[0], one, a3, 2)
    assert hosts[2].address in fdb_vteps(hosts[0])
    hosts[2].kill_all()  # a power cut: pybridge, dockerd, containers
    eventually(
        "host 3's entries gone from host 1",
        lambda: hosts[2].address not in fdb_vteps(hosts[0]),
        LEASE_GONE,
    )
    # Its addresses are not handed out while it may come back.
    others = [start(hosts[i % 2], net)[1] for i in range(6)]
    assert a3 not in others
    # An operator frees its blocks (`pydriver cluster forget`, refused while it is up) ...
    gone = (hosts[2].state_dir / "host-id").read_text().strip()
    freed = hosts[0].exec_ns(sys.executable, "-m", "pydriver.cli", "cluster", "forget", gone,
                             "--state-dir", str(hosts[0].state_dir)).stdout  # fmt: skip
    assert f"/blocks/{net}/" in freed, freed
    # ... and then it comes back after all (pybridge before dockerd, as its unit orders it):
    # its blocks are claimed again (or given up, had another host taken them), never shared.
    hosts[2].reboot()
    hosts[2].start_pybridge(env=hosts[2].cluster_env)
    hosts[2].start_dockerd()
    back, b3 = start(hosts[2], net)
    assert b3 not in others
    eventually("host 3 again", lambda: pings(hosts[0], one, b3), 10)
    assert "claimed again" in hosts[2].log("pydriver", tail=20000)
    assert pings(hosts[2], back, others[0], 2)


def test_a_partitioned_host_rejoins(hosts: list[DockerHost]) -> None:
    net = segment(hosts[:2], "10.81.0.0/16")
    one, a1 = start(hosts[0], net)
    two, a2 = start(hosts[1], net)
    assert pings(hosts[0], one, a2, 2)
    hosts[1].exec_ns("ip", "link", "set", "eth0", "down")
    try:
        eventually(
            "host 2 gone from host 1",
            lambda: hosts[1].address not in fdb_vteps(hosts[0]),
            LEASE_GONE,
        )
        # Both sides keep starting containers meanwhile; never on the same address.
        _, b1 = start(hosts[0], net)
        _, b2 = start(hosts[1], net)
    finally:
        hosts[1].exec_ns("ip", "link", "set", "eth0", "up")
    assert len({a1, a2, b1, b2}) == 4
    eventually("host 2 back", lambda: pings(hosts[0], one, b2), LEASE_GONE)
    assert pings(hosts[1], two, b1, 2)
    for host in hosts[:2]:
        eventually(f"{host.name} agrees with etcd", partial(agrees, host), 15)
