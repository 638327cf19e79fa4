"""End-to-end fixtures: a real dockerd (started by scripts/install.sh), the pybridge host service,
a busybox image built locally, the leak guard and an outside test host."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import IMAGE, build_image, docker, remove_network, wait_for
from tests.hostenv import (
    ROOT,
    OutsideHost,
    firewall_dump,
    leak_guard,
    link_names,
    outside_host,
    probe,
    require_root,
    routes,
    run,
)

SERVICE = ROOT / "scripts" / "pybridge-service.sh"
# PYBRIDGE_MODE=service (default): the host service; =managed: the managed plugin
# PYBRIDGE_PLUGIN (default pybridge:latest), driven by its full name.
MODE = os.environ.get("PYBRIDGE_MODE", "service")
PLUGIN_NAME = os.environ.get("PYBRIDGE_PLUGIN", "pybridge:latest")
DRIVER = PLUGIN_NAME if MODE == "managed" else "pybridge"
MANAGED_ENTRYPOINT = "/opt/pydriver/bin/pydriver"


def plugin_socket() -> str:
    """The plugin's socket (a managed plugin's path changes with each install)."""
    if MODE != "managed":
        return "/run/docker/plugins/pybridge.sock"
    plugin_id = run(["docker", "plugin", "inspect", "-f", "{{.Id}}", PLUGIN_NAME]).stdout.strip()
    return f"/run/docker/plugins/{plugin_id}/pybridge.sock"


def plugin_pid() -> int:
    """The pid of the running pybridge (the host service's, or the managed plugin's)."""
    if MODE != "managed":
        return int(Path("/run/pydriver.pid").read_text())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if MANAGED_ENTRYPOINT.encode() in cmdline and b"serve" in cmdline:
            return int(entry.name)
    raise AssertionError("the managed plugin's process is not running")


# The managed plugin's own life cycle tests need the managed plugin.
collect_ignore = [] if MODE == "managed" else ["test_managed.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


class Plugin:
    """The pybridge the tests run against: the host service, or the managed plugin (which
    dockerd starts and stops: `docker plugin disable -f` / `enable`)."""

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill9_and_start(self) -> None:
        if MODE != "managed":
            run([str(SERVICE), "kill"])
            run([str(SERVICE), "start"])
            return
        old = plugin_pid()
        os.kill(old, 9)
        # dockerd notices the plugin died and starts it again.
        assert wait_for(lambda: _other_pid(old) and _answers(), timeout=60), "not restarted"

    def stop(self) -> None:
        if MODE == "managed":
            run(["docker", "plugin", "disable", "-f", PLUGIN_NAME], timeout=60)
        else:
            run([str(SERVICE), "stop"])

    def start(self) -> None:
        if MODE == "managed":
            run(["docker", "plugin", "enable", PLUGIN_NAME], timeout=60)
            assert wait_for(_answers, timeout=30)
        else:
            run([str(SERVICE), "start"])


def _other_pid(old: int) -> bool:
    try:
        return plugin_pid() != old
    except AssertionError:
        return False


def _answers() -> bool:
    import socket as sockets

    probe = sockets.socket(sockets.AF_UNIX)
    try:
        probe.connect(plugin_socket())
        return True
    except OSError:
        return False
    finally:
        probe.close()


class Docker:
    """Creates uniquely named containers and networks and removes them all afterwards."""

    def __init__(self) -> None:
        self.prefix = "pbt" + secrets.token_hex(3)
        self.containers: list[str] = []
        self.networks: list[str] = []
        self._n = 0

    def name(self, kind: str) -> str:
        self._n += 1
        return f"{self.prefix}-{kind}{self._n}"

    def network(self, *args: str, driver: str = DRIVER, name: str | None = None) -> str:
        name = name or self.name("net")
        docker("network", "create", "-d", driver, *args, name)
        self.networks.append(name)
        return name

    def run(
        self,
        network: str,
        *args: str,
        name: str | None = None,
        command: tuple[str, ...] = ("sleep", "600"),
    ) -> str:
        name = name or self.name("c")
        self.containers.append(name)
        docker("run", "-d", "--name", name, "--network", network, *args, IMAGE, *command)
        return name

    def exec(self, container: str, *argv: str, check: bool = True, timeout: float = 60) -> str:
        return docker("exec", container, *argv, check=check, timeout=timeout)

    def probe(self, container: str, *argv: str, timeout: float = 60) -> str:
        """A probe from a container (see ``probe``): it must run, answered or not."""
        return probe(["docker", "exec", container, *argv], timeout=timeout)

    def ip(self, container: str, network: str) -> str:
        return docker(
            "inspect",
            "-f",
            f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}',
            container,
        )

    def ip6(self, container: str, network: str) -> str:
        return docker(
            "inspect",
            "-f",
            f'{{{{(index .NetworkSettings.Networks "{network}").GlobalIPv6Address}}}}',
            container,
        )

    def network_info(self, network: str) -> dict[str, object]:
        data = json.loads(docker("network", "inspect", network))
        assert isinstance(data, list)
        assert data
        return dict(data[0])

    def rm_container(self, name: str) -> None:
        docker("rm", "-f", name, check=False)
        if name in self.containers:
            self.containers.remove(name)

    def rm_network(self, name: str) -> None:
        docker("network", "rm", name)
        self.networks.remove(name)

    def cleanup(self) -> None:
        if self.containers:
            docker("rm", "-f", *self.containers, check=False)
        for net in reversed(self.networks):
            remove_network(net)
        self.containers.clear()
        self.networks.clear()


def default_routes(d: Docker, container: str, family: str = "-4") -> list[str]:
    """The container's default route lines (busybox's ip ignores a "default" filter)."""
    out = d.exec(container, "ip", family, "route", "show")
    return [line.strip() for line in out.splitlines() if line.startswith("default")]


def ping(d: Docker, container: str, target: str, count: int = 2) -> None:
    out = d.exec(container, "ping", "-c", str(count), "-W", "2", target, check=False)
    assert f"{count} packets received" in out, f"{container} cannot ping {target}:\n{out}"


def cannot_ping(d: Docker, container: str, target: str) -> None:
    out = d.probe(container, "ping", "-c", "1", "-W", "1", target)
    assert " 0 packets received" in out, f"{container} reached {target} but must not:\n{out}"


# A TCP server in the test image that answers each connection with the address it came from.
ECHO_TCP = ("pbtest-echo", "tcp", "80")


def tcp_from(outside: OutsideHost, ip: str, port: int, expect: str | None = None) -> str:
    """Connect from the outside host; what the server said, '' if nothing answers. With
    ``expect``, retry for a few seconds until that answer comes (a just-started container may
    not listen yet)."""
    deadline = time.monotonic() + (5 if expect is not None else 0)
    while True:
        out = outside.probe("busybox", "nc", "-w", "3", ip, str(port))
        if expect is None or out == expect or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def tcp_from_container(d: Docker, container: str, ip: str, port: int) -> str:
    """Connect from a container; what the server said, '' if nothing answers."""
    return d.probe(container, "nc", "-w", "3", ip, str(port))


def free_subnet(third: int) -> str:
    """A test subnet 10.213.N.0/24, checked against every host route."""
    subnet = ipaddress.ip_network(f"10.213.{third}.0/24")
    for route in routes():
        dst = str(route.get("dst", ""))
        if dst in ("default", "") or ":" in dst:
            continue
        if subnet.overlaps(ipaddress.ip_network(dst, strict=False)):
            raise AssertionError(f"test subnet {subnet} overlaps host route {dst}")
    return str(subnet)


@pytest.fixture(scope="session")
def environment() -> Iterator[None]:
    require_root()
    if run(["docker", "info"], check=False).returncode != 0:
        raise AssertionError("no dockerd answers: run scripts/install.sh (scripts/test.sh does)")
    if not Path(plugin_socket()).is_socket():
        raise AssertionError(f"pybridge is not serving {plugin_socket()}: run scripts/install.sh")
    build_image()
    with leak_guard():
        check_dockerd_uses_pybridge()
        yield
    assert_nothing_left_behind()


DOCKERD_LOGS = [
    Path("/var/log/dockerd.log"),
    Path("/var/log/dockerd26.log"),
    Path("/var/log/dockerd28.log"),
]
SERVICE_LOG = Path("/var/log/pydriver.log")


def _tail(path: Path, lines: int, grep: tuple[str, ...] = ()) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} cannot be read)"
    if grep:
        text = [line for line in text if any(word in line.lower() for word in grep)]
    return "\n".join(text[-lines:])


def check_dockerd_uses_pybridge() -> None:
    """One network created and removed before the suite: when dockerd cannot use pybridge
    (dockerd 20.10 keeps a plugin whose GetCapabilities failed once unregistered until it
    restarts: 'could not resolve driver'), one failure that shows both logs instead of every
    test failing with the same line."""
    name = f"pbt{secrets.token_hex(3)}-probe"
    created = run(
        ["docker", "network", "create", "-d", DRIVER, "--subnet", free_subnet(250), name],
        check=False,
    )
    if created.returncode == 0:
        remove_network(name)
        return
    dockerd_log = max(
        (log for log in DOCKERD_LOGS if log.exists()),
        key=lambda log: log.stat().st_mtime,
        default=DOCKERD_LOGS[0],
    )
    raise AssertionError(
        f"dockerd cannot use pybridge: {created.stderr.strip()}\n"
        f"--- {dockerd_log}, lines about plugins:\n"
        + _tail(dockerd_log, 40, ("plugin", "pybridge", "capabilit", "driver"))
        + (f"\n--- {SERVICE_LOG}:\n" + _tail(SERVICE_LOG, 40) if MODE != "managed" else "")
    )


def host_veth(endpoint_id: str) -> str:
    """The host end of an endpoint's veth pair, as pybridge recorded it (`pydriver status`):
    ``pyv`` and the endpoint id, or the names of the spare pair it took (``pys…``)."""
    out = run([sys.executable, "-m", "pydriver.cli", "status", "--json", "--no-names"]).stdout
    endpoints = json.loads(out)["endpoints"]
    return str(next(e["veth"] for e in endpoints if e["id"] == endpoint_id))


def pybridge_veths() -> list[str]:
    """Links named like pybridge's veths: endpoints' and spare pairs'."""
    return [n for n in link_names() if n.startswith(("pyv", "pyc", "pys", "pyt"))]


def assert_nothing_left_behind() -> None:
    """After the whole run: no test container or network, and no pybridge kernel object or rule
    that no remaining pybridge network accounts for."""
    containers = docker("ps", "-a", "--filter", "name=pbt", "--format", "{{.Names}}").split()
    assert containers == [], f"test containers left behind: {containers}"
    networks = docker("network", "ls", "--filter", "name=pbt", "--format", "{{.Name}}").split()
    assert networks == [], f"test networks left behind: {networks}"
    remaining = docker("network", "ls", "--filter", "driver=pybridge", "-q", "--no-trunc").split()
    bridges = {"pyb-" + network_id[:11] for network_id in remaining}

    def leftover_bridges() -> set[str]:
        return {n for n in link_names() if n.startswith("pyb-")} - bridges

    # Bridges and rules go just after each DeleteNetwork answer (in the background).
    wait_for(lambda: not leftover_bridges(), timeout=30)
    leftover = leftover_bridges()
    assert leftover == set(), f"bridges left behind: {leftover}"
    names = link_names()
    if not remaining:
        wait_for(lambda: "PYBRIDGE" not in firewall_dump(), timeout=10)
        # (Spare pairs go just after the last network.)
        wait_for(lambda: not pybridge_veths(), timeout=10)
        assert not pybridge_veths(), names
        assert "PYBRIDGE" not in firewall_dump(), "pybridge rules left behind"
    # Every pybridge IPAM pool belongs to a network Docker still has.
    used = set()
    for network in docker("network", "ls", "-q").split():
        info = json.loads(docker("network", "inspect", network))[0]
        if info["IPAM"]["Driver"] == DRIVER:
            used |= {c["Subnet"] for c in info["IPAM"]["Config"] or []}
    code = (
        "import sqlite3, json; db = sqlite3.connect('file:/var/lib/pydriver/state.db?mode=ro',"
        " uri=True); print(json.dumps([r[0] for r in db.execute('SELECT id FROM pools')]))"
    )
    pools = set(json.loads(run([sys.executable, "-c", code]).stdout))
    assert pools <= used, f"IPAM pools left behind: {sorted(pools - used)}"


@pytest.fixture(scope="session")
def outside(environment: None) -> Iterator[OutsideHost]:
    with outside_host() as host:
        yield host


@pytest.fixture
def d(environment: None) -> Iterator[Docker]:
    client = Docker()
    try:
        yield client
    finally:
        client.cleanup()


@pytest.fixture(scope="session")
def plugin(environment: None) -> Plugin:
    return Plugin()
