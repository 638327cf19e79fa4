"""Benchmarks of a network that spans hosts (issue 16), on the multi-host harness: three Docker
hosts on this machine (tests/multihost/harness.py), each with pybridge in the cluster.

* TCP stream container -> container across hosts, against host -> host over the same underlay
  (iperf3 run in the containers' network namespaces; interleaved, medians);
* ping round trip, the same two ways;
* from `docker run` on one host to the first reply from a container on another;
* container start time (`docker run --rm ... true`) on a cluster network against a single-host
  pybridge network of the same host."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from tests.harness import IMAGE
from tests.multihost.harness import Cluster, DockerHost

STREAM_SECONDS = 3
PING_COUNT = 40


@dataclass
class Figure:
    name: str
    value: str
    target: str = ""
    met: bool | None = None


def _pid(host: DockerHost, container: str) -> int:
    return int(host.docker("inspect", "-f", "{{.State.Pid}}", container))


def _in(pid_or_ns: int | str, *argv: str, timeout: float = 60) -> str:
    """``argv`` in a container's network namespace (a pid) or a host's (a netns name)."""
    where = (
        f"--net=/proc/{pid_or_ns}/ns/net"
        if isinstance(pid_or_ns, int)
        else f"--net=/run/netns/{pid_or_ns}"
    )
    return subprocess.run(
        ["nsenter", where, *argv], capture_output=True, text=True, check=True, timeout=timeout
    ).stdout


def _stream_gbit(client: int | str, server: str) -> float:
    out = _in(client, "iperf3", "-c", server, "-t", str(STREAM_SECONDS), "-J", timeout=60)
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def _rtt_ms(client: int | str, target: str) -> float:
    out = _in(client, "ping", "-q", "-c", str(PING_COUNT), "-i", "0.02", target)
    found = re.search(r"= [\d.]+/([\d.]+)/", out)
    assert found is not None, out
    return float(found.group(1))


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _address(host: DockerHost, container: str, network: str) -> str:
    template = f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}'
    return host.docker("inspect", "-f", template, container)


def measure(reps: int) -> list[Figure]:
    cluster = Cluster(2, "20.10")
    cluster.up()
    servers: list[subprocess.Popen[bytes]] = []
    try:
        one, two = cluster.hosts
        for host in (one, two):
            host.start_pybridge(env=host.cluster_env)
        for i, host in enumerate((one, two)):
            where = (
                ["--subnet", "10.90.0.0/16"] if i == 0 else ["--ipam-opt", "pybridge.segment=pbb"]
            )
            host.docker("network", "create", "-d", "pybridge", "--ipam-driver", "pybridge",
                        "-o", "pybridge.segment=pbb", *where, "pbb")  # fmt: skip
        one.docker("network", "create", "-d", "pybridge", "--subnet", "10.91.0.0/24", "pbl")
        one.docker("run", "-d", "--name", "pbb-c", "--network", "pbb", IMAGE, "sleep", "3600")
        two.docker("run", "-d", "--name", "pbb-s", "--network", "pbb", IMAGE, "sleep", "3600")
        client, server = _pid(one, "pbb-c"), _pid(two, "pbb-s")
        server_ip = _address(two, "pbb-s", "pbb")
        # iperf3 servers: in the server container, and on host 2 itself.
        for namespace in (f"/proc/{server}/ns/net", f"/run/netns/{two.ns}"):
            argv = ["nsenter", f"--net={namespace}", "iperf3", "-s"]
            servers.append(
                subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        time.sleep(0.5)
        _rtt_ms(client, server_ip)  # the first packets learn nothing, but warm the caches
        streams: dict[str, list[float]] = {"containers": [], "hosts": []}
        rtts: dict[str, list[float]] = {"containers": [], "hosts": []}
        for _ in range(reps):
            streams["containers"].append(_stream_gbit(client, server_ip))
            streams["hosts"].append(_stream_gbit(one.ns, two.address))
            rtts["containers"].append(_rtt_ms(client, server_ip))
            rtts["hosts"].append(_rtt_ms(one.ns, two.address))
        print(f"[bench] cross-host streams {streams}, rtts {rtts}", file=sys.stderr)

        # From `docker run` on host 2 to the first reply from host 1's container.
        first_reply: list[float] = []
        whole: list[float] = []
        for i in range(reps * 3):
            container = f"pbb-n{i}"
            started = time.monotonic()
            two.docker("run", "-d", "--name", container, "--network", "pbb", IMAGE, "sleep", "600")
            running = time.monotonic()
            target = _address(two, container, "pbb")
            while True:
                done = subprocess.run(
                    ["nsenter", f"--net=/proc/{client}/ns/net", "ping", "-c", "1", "-W", "0.1",
                     target], capture_output=True, check=False,
                )  # fmt: skip
                if done.returncode == 0 or time.monotonic() - running > 10:
                    break
            first_reply.append(time.monotonic() - running)
            whole.append(time.monotonic() - started)
            two.docker("rm", "-f", container)

        # Container start time: the cluster network against a single-host one, interleaved.
        starts: dict[str, list[float]] = {"pbb": [], "pbl": []}
        for _ in range(reps * 2):
            for net in ("pbb", "pbl"):
                began = time.monotonic()
                one.docker("run", "--rm", "--network", net, IMAGE, "true")
                starts[net].append(time.monotonic() - began)
    finally:
        for proc in servers:
            proc.kill()
            proc.wait(timeout=10)
        cluster.down()

    stream_ratio = statistics.median(streams["containers"]) / statistics.median(streams["hosts"])
    rtt_ratio = statistics.median(rtts["containers"]) / statistics.median(rtts["hosts"])
    start_ratio = statistics.median(starts["pbb"]) / statistics.median(starts["pbl"])
    return [
        Figure(
            "cross-host TCP stream, container to container / host to host over the underlay",
            f"{statistics.median(streams['containers']):.1f} / "
            f"{statistics.median(streams['hosts']):.1f} Gbit/s = {stream_ratio:.2f}",
            ">= 0.85",
            stream_ratio >= 0.85,
        ),
        Figure(
            "cross-host ping RTT, container to container / host to host",
            f"{statistics.median(rtts['containers']):.3f} / "
            f"{statistics.median(rtts['hosts']):.3f} ms = {rtt_ratio:.2f}",
        ),
        Figure(
            "`docker run -d` returned on one host -> first reply from another host, p50 / p99",
            f"{_p(first_reply, 0.5):.2f} / {_p(first_reply, 0.99):.2f} s "
            f"(from before docker run: {_p(whole, 0.5):.2f} / {_p(whole, 0.99):.2f} s)",
            "p99 <= 1 s",
            _p(first_reply, 0.99) <= 1.0,
        ),
        Figure(
            "container start (`docker run --rm true`), cluster network / single-host network",
            f"{statistics.median(starts['pbb']):.3f} / {statistics.median(starts['pbl']):.3f} s"
            f" = {start_ratio:.2f}",
            "<= 1.05",
            start_ratio <= 1.05,
        ),
    ]
