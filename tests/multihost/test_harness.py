"""The multi-host harness itself: three Docker hosts on one machine, each with its own dockerd,
sysfs and pybridge, joined by an underlay with etcd on it. Plain single-host pybridge here
(no --cluster): these tests check the stage the multi-host tests stand on."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator

import pytest

from tests.harness import IMAGE, wait_for
from tests.multihost.harness import ETCD_IP, ETCD_PORT, ETCD_URL, Cluster, DockerHost

pytestmark = pytest.mark.e2e


def _name(what: str) -> str:
    return f"pbt-{what}-{secrets.token_hex(3)}"


def test_each_host_has_its_own_dockerd(cluster: Cluster, cluster_hosts: list[DockerHost]) -> None:
    ids = set()
    for host in cluster_hosts:
        version = host.docker("info", "-f", "{{.ServerVersion}}")
        assert version.startswith(host.daemon.version), (host.name, version)
        ids.add(host.docker("info", "-f", "{{.ID}}"))
        assert host.docker("image", "inspect", "-f", "{{.Id}}", IMAGE)
        # The daemon runs in the host's namespaces, not the machine's.
        assert host.dockerd is not None
        pid = int((host.run_dir / "docker.pid").read_text())
        assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink(f"/proc/{host.anchor_pid}/ns/net")
        assert os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink(f"/proc/{host.anchor_pid}/ns/mnt")
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert len(ids) == len(cluster_hosts)


def test_container_on_the_default_bridge(cluster_hosts: list[DockerHost]) -> None:
    for host in cluster_hosts:
        out = host.docker(
            "run", "--rm", IMAGE, "sh", "-c",
            "ip -4 -o addr show eth0 && ping -c 1 -W 2 172.17.0.1",
        )  # fmt: skip
        assert "inet 172.17." in out, out
        assert "1 packets received" in out, out
        # dockerd set the FORWARD policy of the host's netns, as on a fresh machine.
        assert "-P FORWARD DROP" in host.exec_ns("iptables", "-S", "FORWARD").stdout


def test_each_host_sees_its_own_interfaces_in_sys(cluster_hosts: list[DockerHost]) -> None:
    machine = set(os.listdir("/sys/class/net"))
    for host in cluster_hosts:
        in_sys = set(host.exec_ns("ls", "/sys/class/net").stdout.split())
        links = {
            line.split(": ")[1].split("@")[0]
            for line in host.exec_ns("ip", "-o", "link").stdout.splitlines()
        }
        assert in_sys == links, (host.name, in_sys, links)
        assert {"eth0", "docker0", "lo"} <= in_sys
        assert not {name for name in machine if name.startswith("pbmh")} & in_sys
    # And the machine still sees its own.
    assert set(os.listdir("/sys/class/net")) == machine


@pytest.fixture
def pybridge_hosts(cluster_hosts: list[DockerHost]) -> Iterator[list[DockerHost]]:
    machine_plugins = _machine_plugins()
    for host in cluster_hosts:
        host.start_pybridge()
    try:
        yield cluster_hosts
    finally:
        for host in cluster_hosts:
            host.stop_pybridge()
        # The machine's plugin directory never saw the hosts' sockets.
        assert _machine_plugins() == machine_plugins


def _machine_plugins() -> list[str]:
    try:
        return sorted(os.listdir("/run/docker/plugins"))
    except FileNotFoundError:
        return []


def test_pybridge_serves_each_host(pybridge_hosts: list[DockerHost]) -> None:
    for host in pybridge_hosts:
        assert host.plugin_socket.is_socket()
        net, first, second = _name("n"), _name("a"), _name("b")
        host.docker(
            "network", "create", "-d", "pybridge", "--ipam-driver", "pybridge",
            "--subnet", "10.71.0.0/24", net,
        )  # fmt: skip
        try:
            host.docker("run", "-d", "--name", first, "--network", net, IMAGE, "sleep", "300")
            address = host.docker(
                "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", first
            )
            assert address.startswith("10.71.0."), address
            out = host.docker(
                "run", "--rm", "--name", second, "--network", net, IMAGE,
                "sh", "-c", f"ping -c 2 -W 2 {address} && ping -c 1 -W 2 {first}",
            )  # fmt: skip
            assert out.count("packets received") == 2
            assert " 0 packets received" not in out, out
        finally:
            host.docker("rm", "-f", first, second, check=False)
            host.docker("network", "rm", net, check=False)
        assert net not in host.docker("network", "ls", "--format", "{{.Name}}")


def test_hosts_reach_each_other_on_the_underlay(cluster_hosts: list[DockerHost]) -> None:
    first, *others = cluster_hosts
    for other in others:
        out = first.exec_ns("ping", "-c", "1", "-W", "2", other.address).stdout
        assert "1 received" in out, out
    # A container on a host's default bridge too (masqueraded out of the host's eth0).
    out = first.docker("run", "--rm", IMAGE, "ping", "-c", "1", "-W", "2", others[0].address)
    assert "1 packets received" in out, out
    # No way out: the hosts' only route is the underlay's.
    routes = first.exec_ns("ip", "-4", "route").stdout
    assert "default" not in routes, routes


def test_etcd_answers_every_host(cluster_hosts: list[DockerHost]) -> None:
    key = _name("key")
    for host in cluster_hosts:
        host.exec_ns("etcdctl", "--endpoints", ETCD_URL, "put", key, host.name)
        got = host.exec_ns("etcdctl", "--endpoints", ETCD_URL, "get", "--print-value-only", key)
        assert got.stdout.strip() == host.name
    # With the client pybridge uses (aetcd), from inside the last host.
    pytest.importorskip("aetcd")
    script = (
        "import asyncio, aetcd, sys\n"
        "async def main():\n"
        f"    async with aetcd.Client(host={ETCD_IP!r}, port={ETCD_PORT}) as c:\n"
        f"        got = await c.get({key.encode()!r})\n"
        "        print(got.value.decode())\n"
        f"        await c.delete({key.encode()!r})\n"
        "asyncio.run(main())\n"
    )
    last = cluster_hosts[-1]
    out = last.exec_ns(sys.executable, "-c", script).stdout.strip()
    assert out == last.name


def test_pybridge_kill9_and_restart(cluster_hosts: list[DockerHost]) -> None:
    host = cluster_hosts[0]
    net, first = _name("n"), _name("a")
    host.start_pybridge()
    try:
        host.docker(
            "network", "create", "-d", "pybridge", "--ipam-driver", "pybridge",
            "--subnet", "10.72.0.0/24", net,
        )  # fmt: skip
        host.docker("run", "-d", "--name", first, "--network", net, IMAGE, "sleep", "300")
        host.kill9_pybridge()
        host.start_pybridge()
        out = host.docker(
            "run", "--rm", "--network", net, IMAGE, "ping", "-c", "1", "-W", "2", first
        )
        assert "1 packets received" in out, out
    finally:
        host.docker("rm", "-f", first, check=False)
        host.docker("network", "rm", net, check=False)
        host.stop_pybridge()


def test_reboot_keeps_the_data_root(cluster_hosts: list[DockerHost]) -> None:
    host = cluster_hosts[-1]
    name = _name("r")
    host.docker("run", "-d", "--name", name, "--restart", "always", IMAGE, "sleep", "300")
    assert os.listdir(host.path("/run/docker/netns"))  # the container's sandbox
    host.reboot()
    # A fresh tmpfs: no sandboxes, no plugin sockets, no containerd state.
    assert os.listdir(host.path("/run/docker")) == ["plugins"]
    assert os.listdir(host.path("/run/docker/plugins")) == []
    host.start_dockerd()
    try:
        assert host.docker("image", "inspect", "-f", "{{.Id}}", IMAGE)
        # The data root survived: --restart always brings the container back.
        assert wait_for(
            lambda: host.docker("inspect", "-f", "{{.State.Running}}", name) == "true", timeout=20
        )
    finally:
        host.docker("rm", "-f", name, check=False)


def test_dockerd_kill9_and_restart(cluster_hosts: list[DockerHost]) -> None:
    host = cluster_hosts[1]
    name = _name("k")
    # Stops at once on SIGTERM, which the restarted dockerd sends to what it finds running.
    loop = "trap 'exit 0' TERM; while :; do sleep 0.2; done"
    host.docker("run", "-d", "--name", name, IMAGE, "sh", "-c", loop)
    host.kill9_dockerd()
    try:
        host.start_dockerd()
        assert host.docker("inspect", "-f", "{{.State.Running}}", name) == "false"
        host.docker("start", name)
        assert host.docker("inspect", "-f", "{{.State.Running}}", name) == "true"
    finally:
        host.docker("rm", "-f", name, check=False)
