"""Networks that span hosts, with the real `pydriver serve --cluster` on two namespace hosts and
a real etcd on their underlay, driven on the plugins' sockets as dockerd drives them.

Underlay: a bridge in its own namespace with etcd at 203.0.113.254; hosts h1 and h2 at
203.0.113.1 and .2, each running pybridge; "containers" are namespaces that get the container
end of each veth as Docker hands it over."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.hostenv import probe, require_root, run
from tests.privileged.serving import Plugin

pytestmark = pytest.mark.privileged

ETCD_IP = "203.0.113.254"
ETCD_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None
SPACE = "PybridgeLocal"


def ns_run(ns: str, *argv: str, check: bool = True, timeout: float = 30) -> str:
    return run(["ip", "netns", "exec", ns, *argv], check=check, timeout=timeout).stdout


@dataclass
class Lab:
    underlay: str
    hosts: list[str]
    plugins: list[Plugin]
    containers: list[str]
    tmp: Path

    def container_ns(self) -> str:
        name = f"pbt-c{secrets.token_hex(3)}"
        run(["ip", "netns", "add", name])
        ns_run(name, "ip", "link", "set", "lo", "up")
        self.containers.append(name)
        return name


def _etcd(ns: str, data: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("etcd")
    if binary is None:
        raise AssertionError("etcd is not installed: scripts/test.sh installs etcd-server")
    client = f"http://{ETCD_IP}:2379"
    peer = "http://127.0.0.1:2380"
    argv = [
        "ip", "netns", "exec", ns, binary, "--name", "e0", "--data-dir", str(data),
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"e0={peer}", "--logger", "zap", "--log-outputs", "stderr",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if _listening(ns):
            time.sleep(0.3)
            return proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("etcd did not start")


def _listening(ns: str) -> bool:
    return ":2379" in ns_run(ns, "ss", "-ltn", check=False)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    require_root()
    tag = secrets.token_hex(3)
    underlay = f"pbt-ul{tag}"
    hosts = [f"pbt-h1{tag}", f"pbt-h2{tag}"]
    etcd: subprocess.Popen[bytes] | None = None
    state = Lab(underlay, hosts, [], [], tmp_path)
    etcd_dir: Path | None = None
    for ns in (underlay, *hosts):
        run(["ip", "netns", "add", ns])
        ns_run(ns, "ip", "link", "set", "lo", "up")
    try:
        ns_run(underlay, "ip", "link", "add", "ul", "type", "bridge")
        ns_run(underlay, "ip", "addr", "add", f"{ETCD_IP}/24", "dev", "ul")
        ns_run(underlay, "ip", "link", "set", "ul", "up")
        for n, host in enumerate(hosts, 1):
            ns_run(underlay, "ip", "link", "add", f"u{n}", "type", "veth", "peer", "name", "eth0",
                   "netns", host)  # fmt: skip
            ns_run(underlay, "ip", "link", "set", f"u{n}", "master", "ul", "up")
            ns_run(host, "ip", "addr", "add", f"203.0.113.{n}/24", "dev", "eth0")
            ns_run(host, "ip", "link", "set", "eth0", "up")
            ns_run(host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # On tmpfs: etcd's fsyncs on a busy disk would make calls miss pybridge's bounds.
        etcd_dir = Path(tempfile.mkdtemp(prefix="pbt-etcd-", dir=ETCD_DIR))
        etcd = _etcd(underlay, etcd_dir / "data")
        for n, host in enumerate(hosts, 1):
            workdir = tmp_path / f"h{n}"
            workdir.mkdir()
            plugin = Plugin(host, workdir)
            plugin.start(
                PYDRIVER_CLUSTER=f"etcd://{ETCD_IP}:2379",
                PYDRIVER_ADVERTISE_ADDRESS=f"203.0.113.{n}",
            )
            state.plugins.append(plugin)
        yield state
    finally:
        for plugin in state.plugins:
            plugin.stop()
        if etcd is not None:
            etcd.kill()
            etcd.wait(timeout=10)
        for ns in (*state.containers, underlay, *hosts):
            run(["ip", "netns", "del", ns], check=False)
        if etcd_dir is not None:
            shutil.rmtree(etcd_dir, ignore_errors=True)


def call(plugin: Plugin, method: str, body: dict[str, Any]) -> dict[str, Any]:
    status, answer = plugin.post(method, body)
    ok(status, answer)
    return dict(answer)


def ok(status: int, answer: Any) -> None:
    assert status == 200, answer
    assert not answer.get("Err"), answer


def network(
    plugin: Plugin, subnet: str, segment: str, ipam_segment: bool = False
) -> tuple[int, Any, str]:
    """What dockerd sends for `docker network create -d pybridge --ipam-driver pybridge -o
    pybridge.segment=SEGMENT --subnet SUBNET` (with ``ipam_segment``, also `--ipam-opt
    pybridge.segment=SEGMENT`; SUBNET may then be ""): (status, answer of CreateNetwork,
    network id)."""
    ipam_options = {"pybridge.segment": segment} if ipam_segment else {}
    pool = call(plugin, "IpamDriver.RequestPool", {"AddressSpace": SPACE, "Pool": subnet,
                "SubPool": "", "Options": ipam_options, "V6": False})  # fmt: skip
    gateway = call(plugin, "IpamDriver.RequestAddress", {
        "PoolID": pool["PoolID"], "Address": "",
        "Options": {"RequestAddressType": "com.docker.network.gateway"}})  # fmt: skip
    network_id = secrets.token_hex(32)
    status, answer = plugin.post(
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": network_id,
            "Options": {
                "com.docker.network.enable_ipv6": False,
                "com.docker.network.generic": {"pybridge.segment": segment},
            },
            "IPv4Data": [
                {"AddressSpace": SPACE, "Pool": pool["Pool"], "Gateway": gateway["Address"]}
            ],
            "IPv6Data": [],
        },
    )
    return status, answer, network_id


def container(lab: Lab, n: int, network_id: str, pool: str) -> tuple[str, str]:
    """A container of host ``n`` on the network: (its namespace, its address)."""
    plugin, host = lab.plugins[n], lab.hosts[n]
    address = call(plugin, "IpamDriver.RequestAddress",
                   {"PoolID": pool, "Address": "", "Options": {}})["Address"]  # fmt: skip
    endpoint_id = secrets.token_hex(32)
    created = call(plugin, "NetworkDriver.CreateEndpoint", {
        "NetworkID": network_id, "EndpointID": endpoint_id,
        "Interface": {"Address": address, "AddressIPv6": "", "MacAddress": ""}, "Options": {}})  # fmt: skip
    mac = created["Interface"]["MacAddress"]
    joined = call(plugin, "NetworkDriver.Join", {"NetworkID": network_id,
                  "EndpointID": endpoint_id, "SandboxKey": "", "Options": {}})  # fmt: skip
    ns = lab.container_ns()
    src = joined["InterfaceName"]["SrcName"]
    ns_run(host, "ip", "link", "set", src, "netns", ns)
    ns_run(ns, "ip", "link", "set", src, "name", "eth0")
    ns_run(ns, "ip", "link", "set", "eth0", "address", mac)
    ns_run(ns, "ip", "addr", "add", address, "dev", "eth0")
    ns_run(ns, "ip", "link", "set", "eth0", "up")
    ns_run(ns, "ip", "route", "add", "default", "via", joined["Gateway"])
    return ns, address.split("/")[0]


def ping(ns: str, address: str, count: int = 1) -> bool:
    out = probe(
        ["ip", "netns", "exec", ns, "busybox", "ping", "-c", str(count), "-W", "1", address]
    )
    received = re.search(r"(\d+) packets received", out)
    return received is not None and int(received.group(1)) > 0


def eventually(check: Any, timeout: float) -> float:
    """Seconds until ``check()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.1)
    return time.monotonic() - start


def segment_on_every_host(lab: Lab, subnet: str) -> list[str]:
    """Segment "seg" on each host: the first gives the subnet, the others leave --subnet out
    (--ipam-opt pybridge.segment gives them the segment's). Their network ids."""
    ids = []
    for n, plugin in enumerate(lab.plugins):
        status, answer, network_id = network(plugin, "" if n else subnet, "seg", bool(n))
        ok(status, answer)
        ids.append(network_id)
    return ids


def test_one_segment_on_two_hosts(lab: Lab) -> None:
    subnet = "10.70.0.0/16"
    ids = segment_on_every_host(lab, subnet)
    # Each host has the tunnel on its network's bridge, below the underlay's MTU.
    for host, network_id in zip(lab.hosts, ids, strict=True):
        details = ns_run(host, "ip", "-d", "link", "show", f"pyx-{network_id[:11]}")
        for flag in ("vxlan id", "nolearning", "proxy"):
            assert flag in details
        assert f"master pyb-{network_id[:11]}" in details
        assert "mtu 1450" in ns_run(host, "ip", "link", "show", f"pyb-{network_id[:11]}")

    c1, a1 = container(lab, 0, ids[0], subnet)
    c2, a2 = container(lab, 1, ids[1], subnet)
    assert a1 != a2
    # Blocks of the same pool: no host hands out an address another may.
    assert ipaddress.ip_network(f"{a1}/26", strict=False) != ipaddress.ip_network(
        f"{a2}/26", strict=False
    )
    took = eventually(lambda: ping(c1, a2), 10)
    assert took < 5
    assert ping(c2, a1)
    # Kernel objects and rules are what the state says (VXLAN only from the other host).
    for n, plugin in enumerate(lab.plugins):
        assert plugin.consistent() == []
        raw = ns_run(lab.hosts[n], "iptables-nft-save", "-t", "raw")
        other = f"203.0.113.{2 - n}/32"
        assert (
            f"-s {other} -p udp -m udp --dport 4789 -m addrtype --dst-type LOCAL -m rpfilter "
            "-j RETURN" in raw
        )
    # `pydriver status` shows the cluster: both hosts, the segment, no entry in disagreement.
    status = json.loads(ns_run(lab.hosts[0], sys.executable, "-m", "pydriver.cli", "status",
                               "--json", "--no-names", "--state-dir",
                               str(lab.plugins[0].state)))  # fmt: skip
    report = status["cluster"]
    assert report["store_error"] is None
    assert sorted(report["hosts"].values()) == ["203.0.113.1", "203.0.113.2"]
    (seg,) = [s for s in report["segments"] if s["name"] == "seg"]
    assert seg["device"]
    assert seg["disagreements"] == []
    assert len(seg["members"]) == 2
    # A stale entry someone left is reported, then repaired by the upkeep.
    device = f"pyx-{ids[0][:11]}"
    ns_run(lab.hosts[0], "ip", "neigh", "replace", "10.70.250.250", "lladdr", "02:00:00:00:00:01",
           "dev", device, "nud", "permanent")  # fmt: skip
    text = ns_run(lab.hosts[0], sys.executable, "-m", "pydriver.cli", "status", "--no-names",
                  "--state-dir", str(lab.plugins[0].state))  # fmt: skip
    assert "stale neighbour entry 10.70.250.250" in text, text
    eventually(lambda: "10.70.250.250" not in ns_run(lab.hosts[0], "ip", "neigh", "show", "dev",
                                                     device), 10)  # fmt: skip
    # The gateway answers locally on each host, never across.
    assert ping(c1, "10.70.0.1")
    assert ping(c2, "10.70.0.1")

    # A LAN neighbour that is no member writes VXLAN frames for the segment to host 1: dropped
    # (counted by pybridge's rule), the container does not answer.
    intruder_reaches(lab, ids[0], c1, a1)

    # A later host that asks for something else is told what differs, in one sentence.
    status, answer, _ = network(lab.plugins[0], "10.71.0.0/24", "other")
    ok(status, answer)
    status, answer, other_id = network(lab.plugins[1], "10.72.0.0/24", "other")
    assert "already exists in the cluster with other settings" in answer["Err"]
    assert "10.72.0.0/24 (the cluster has 10.71.0.0/24)" in answer["Err"], answer
    # Segments are isolated from each other across hosts too.
    status, answer, other_id = network(lab.plugins[1], "10.71.0.0/24", "other")
    ok(status, answer)
    c3, a3 = container(lab, 1, other_id, "10.71.0.0/24")
    assert not ping(c1, a3, count=2)
    assert not ping(c3, a1, count=2)
    # One network per segment per host.
    status, answer, _ = network(lab.plugins[0], "10.73.0.0/24", "seg")
    assert "already has a network on this host" in answer["Err"], answer

    # A host that dies: its containers leave the other host's tunnel with its lease.
    assert lab.plugins[1].proc is not None
    lab.plugins[1].proc.kill()
    lab.plugins[1].wait_dead()
    device = f"pyx-{ids[0][:11]}"
    eventually(lambda: "203.0.113.2" not in ns_run(lab.hosts[0], "bridge", "fdb", "show",
                                                   "dev", device), 20)  # fmt: skip
    assert a2 not in ns_run(lab.hosts[0], "ip", "neigh", "show", "dev", device)
    # ... and it comes back: its entries are written again, and the data plane works.
    lab.plugins[1].start(
        PYDRIVER_CLUSTER=f"etcd://{ETCD_IP}:2379", PYDRIVER_ADVERTISE_ADDRESS="203.0.113.2"
    )
    eventually(lambda: ping(c1, a2), 15)


def test_without_cluster_a_segment_is_refused(tmp_path: Path) -> None:
    require_root()
    ns = f"pbt-n{secrets.token_hex(3)}"
    run(["ip", "netns", "add", ns])
    plugin = Plugin(ns, tmp_path)
    try:
        plugin.start()
        _, answer, _ = network(plugin, "10.70.0.0/16", "seg")
        assert "pybridge.segment needs pybridge started in a cluster" in answer["Err"], answer
        assert json.dumps(answer).count("Traceback") == 0
    finally:
        plugin.stop()
        run(["ip", "netns", "del", ns], check=False)


def segment_vni(lab: Lab, network_id: str) -> str:
    """The VNI of the tunnel on host 1's bridge of ``network_id``."""
    details = ns_run(lab.hosts[0], "ip", "-d", "link", "show", f"pyx-{network_id[:11]}")
    vni = re.search(r"vxlan id (\d+)", details)
    assert vni is not None
    return vni.group(1)


def eth0_mac(ns: str) -> str:
    mac = re.search(r"link/ether (\S+)", ns_run(ns, "ip", "link", "show", "eth0"))
    assert mac is not None
    return mac.group(1)


def vxlan_sender(
    ns: str,
    dev: str,
    vni: str,
    local: str,
    to: str,
    source: str,
    target: str,
    mac: str,
    *,
    via_eth0: bool = True,
) -> None:
    """A VXLAN device ``dev`` in ``ns`` (address ``source``) that sends frames for ``target``
    (``mac``) to the tunnel endpoint ``to``, from ``local`` (``via_eth0=False``: a spoofed
    local address, on lo): any sender can write these."""
    via = ["dev", "eth0"] if via_eth0 else []
    ns_run(ns, "ip", "link", "add", dev, "type", "vxlan", "id", vni, "dstport", "4789",
           "local", local, *via, "nolearning")  # fmt: skip
    ns_run(ns, "ip", "addr", "add", f"{source}/16", "dev", dev)
    ns_run(ns, "ip", "link", "set", dev, "up")
    ns_run(ns, "bridge", "fdb", "append", "00:00:00:00:00:00", "dev", dev, "dst", to)
    ns_run(ns, "ip", "neigh", "replace", target, "lladdr", mac, "dev", dev, "nud", "permanent")


def count_frames(host: str, network_id: str, source: str) -> None:
    """A rule without a target only counts: frames from ``source`` that reach the bridge."""
    ns_run(host, "iptables-nft", "-t", "raw", "-I", "PREROUTING", "1", "-i",
           f"pyb-{network_id[:11]}", "-s", f"{source}/32")  # fmt: skip


def frames_counted(host: str) -> tuple[int, str]:
    seen = ns_run(host, "iptables-nft", "-t", "raw", "-L", "PREROUTING", "1", "-v", "-x", "-n")
    return int(seen.split()[0]), seen


def intruder_reaches(lab: Lab, network_id: str, target_ns: str, target: str) -> None:
    """A namespace on the underlay (203.0.113.3, no member) with its own VXLAN device of the
    segment's VNI, sending to host 1 as if it were a member."""
    vni, mac = segment_vni(lab, network_id), eth0_mac(target_ns)
    x = lab.container_ns()
    ns_run(lab.underlay, "ip", "link", "add", "ux", "type", "veth", "peer", "name", "eth0",
           "netns", x)  # fmt: skip
    ns_run(lab.underlay, "ip", "link", "set", "ux", "master", "ul", "up")
    ns_run(x, "ip", "addr", "add", "203.0.113.3/24", "dev", "eth0")
    ns_run(x, "ip", "link", "set", "eth0", "up")
    vxlan_sender(x, "vx", vni, "203.0.113.3", "203.0.113.1", "10.70.99.99", target, mac)
    count_frames(lab.hosts[0], network_id, "10.70.99.99")
    assert not ping(x, target, count=2)
    frames, seen = frames_counted(lab.hosts[0])
    assert frames == 0, seen
    counters = ns_run(lab.hosts[0], "iptables-nft", "-t", "raw", "-L", "PYBRIDGE-PREROUTING",
                      "-v", "-x", "-n")  # fmt: skip
    drop = next(line for line in counters.splitlines() if "DROP" in line and "4789" in line)
    assert int(drop.split()[0]) >= 2, counters


def test_a_container_of_a_member_host_cannot_write_onto_a_segment(lab: Lab) -> None:
    """A container on host 2, on an ordinary pybridge network with egress, sends VXLAN for
    host 1's segment: masqueraded to host 2's address (a member's) it would pass host 1's check,
    so host 2 must not forward it. And to its own host, claiming host 1's address as source:
    not a member either (rpfilter)."""
    subnet = "10.70.0.0/16"
    ids = segment_on_every_host(lab, subnet)
    c1, a1 = container(lab, 0, ids[0], subnet)
    c2, a2 = container(lab, 1, ids[1], subnet)  # host 2 is a member of the segment
    # An ordinary network with egress on host 2, and a container on it.
    plugin = lab.plugins[1]
    pool = call(plugin, "IpamDriver.RequestPool", {"AddressSpace": SPACE, "Pool": "10.80.0.0/24",
                "SubPool": "", "Options": {}, "V6": False})  # fmt: skip
    gateway = call(plugin, "IpamDriver.RequestAddress", {
        "PoolID": pool["PoolID"], "Address": "",
        "Options": {"RequestAddressType": "com.docker.network.gateway"}})  # fmt: skip
    plain_id = secrets.token_hex(32)
    call(plugin, "NetworkDriver.CreateNetwork", {
        "NetworkID": plain_id,
        "Options": {"com.docker.network.enable_ipv6": False, "com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": SPACE, "Pool": pool["Pool"], "Gateway": gateway["Address"]}],
        "IPv6Data": []})  # fmt: skip
    x, ax = container(lab, 1, plain_id, pool["PoolID"])
    vni = segment_vni(lab, ids[0])
    # Plain UDP from the container would do; a VXLAN device is the shortest way to write it.
    vxlan_sender(x, "vx", vni, ax, "203.0.113.1", "10.70.99.99", a1, eth0_mac(c1))
    count_frames(lab.hosts[0], ids[0], "10.70.99.99")
    ping(x, a1, count=2)
    frames, seen = frames_counted(lab.hosts[0])
    assert frames == 0, f"frames from a container reached the segment: {seen}"

    # To its own host, claiming host 1's address as its source: refused there too.
    ns_run(x, "ip", "link", "del", "vx")  # (one device per VNI and port)
    ns_run(x, "ip", "addr", "add", "203.0.113.1/32", "dev", "lo")
    vxlan_sender(
        x, "vy", vni, "203.0.113.1", "203.0.113.2", "10.70.99.98", a2, eth0_mac(c2), via_eth0=False
    )
    count_frames(lab.hosts[1], ids[1], "10.70.99.98")
    ping(x, a2, count=2)
    frames, seen = frames_counted(lab.hosts[1])
    assert frames == 0, f"spoofed frames reached the segment: {seen}"
