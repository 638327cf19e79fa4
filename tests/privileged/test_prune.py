"""`pydriver prune` against a real pybridge in a throwaway namespace and a stand-in Docker daemon
(tests/fakedocker.py) reached through DOCKER_HOST, as an operator runs it. This test process
plays dockerd: it creates the networks on pybridge's socket, so pybridge records it as its
caller, and it serves the stand-in daemon's API, so prune identifies it as that daemon.

Three networks' worth of state: KEPT (the daemon knows it), GONE (it does not: removed while
pybridge was away) with an endpoint, and a lone IPAM pool LONE no network uses."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pydriver.store import read_pools, read_state
from tests.fakedocker import FakeDocker, network
from tests.hostenv import ROOT, require_root, run
from tests.privileged.serving import Plugin, netns

pytestmark = pytest.mark.privileged

KEPT_SUBNET, GONE_SUBNET, LONE_SUBNET = "10.213.90.0/24", "10.213.91.0/24", "10.213.92.0/24"


@dataclass
class Setup:
    plugin: Plugin
    dir: Path  # short, for sockets
    kept: str
    gone: str
    pools: dict[str, str]  # subnet -> pool id

    def fake(self, *networks: dict[str, object], plugins: tuple[str, ...] = ()) -> FakeDocker:
        return FakeDocker(
            self.dir / "docker.sock",
            networks,
            [{"Id": plugin_id, "Name": "pybridge:latest"} for plugin_id in plugins],
        )

    def kept_network(self) -> dict[str, object]:
        return network(self.kept, KEPT_SUBNET, ipam_driver="pybridge")

    def prune(
        self, *flags: str, docker_host: str | None = None, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, DOCKER_HOST=docker_host or f"unix://{self.dir / 'docker.sock'}")
        env.pop("DOCKER_CONTEXT", None)
        return subprocess.run(
            [*self.argv(), *flags],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )

    def argv(self) -> list[str]:
        return [
            "ip",
            "netns",
            "exec",
            self.plugin.ns,
            sys.executable,
            "-m",
            "pydriver.cli",
            "prune",
            "--socket",
            str(self.plugin.sock),
            "--state-dir",
            str(self.plugin.state),
        ]

    def state(self) -> tuple[set[str], set[str]]:
        """(network ids, pool subnets) in pybridge's state."""
        networks, _ = read_state(self.plugin.state)
        return {n.id for n in networks}, {str(p.subnet) for p in read_pools(self.plugin.state)}

    def untouched(self) -> bool:
        return self.state() == ({self.kept, self.gone}, {KEPT_SUBNET, GONE_SUBNET, LONE_SUBNET})

    def pruned(self) -> bool:
        return self.state() == ({self.kept}, {KEPT_SUBNET})

    def bridges(self) -> str:
        return run(["ip", "netns", "exec", self.plugin.ns, "ip", "-o", "link"]).stdout


def call(plugin: Plugin, method: str, body: dict[str, object]) -> dict[str, object]:
    status, reply = plugin.post(method, body)
    assert status == 200, (method, reply)
    assert isinstance(reply, dict)
    return reply


def make_state(plugin: Plugin) -> tuple[str, str, dict[str, str]]:
    """What dockerd would have made: two networks on pybridge IPAM pools, and a lone pool."""
    pools = {}
    for subnet in (KEPT_SUBNET, GONE_SUBNET, LONE_SUBNET):
        reply = call(
            plugin,
            "IpamDriver.RequestPool",
            {"AddressSpace": "PybridgeLocal", "Pool": subnet, "Options": {}, "V6": False},
        )
        pools[subnet] = str(reply["PoolID"])
    ids = []
    for subnet in (KEPT_SUBNET, GONE_SUBNET):
        network_id = secrets.token_hex(32)
        gateway = subnet.replace("0/24", "1/24")
        call(
            plugin,
            "NetworkDriver.CreateNetwork",
            {
                "NetworkID": network_id,
                "Options": {"com.docker.network.generic": {}},
                "IPv4Data": [{"AddressSpace": "PybridgeLocal", "Pool": subnet, "Gateway": gateway}],
                "IPv6Data": [],
            },
        )
        ids.append(network_id)
    call(
        plugin,
        "NetworkDriver.CreateEndpoint",
        {
            "NetworkID": ids[1],
            "EndpointID": secrets.token_hex(32),
            "Interface": {"Address": GONE_SUBNET.replace("0/24", "2/24")},
            "Options": {},
        },
    )
    return ids[0], ids[1], pools


def age_pools(plugin: Plugin) -> None:
    """Make the pools an hour old (prune leaves pools requested in the last minute alone). The
    restart also makes pybridge forget its callers."""
    stop_wrapped(plugin)
    db = sqlite3.connect(plugin.state / "state.db")
    with db:
        db.execute("UPDATE pools SET recorded_at = recorded_at - 3600")
    db.close()
    plugin.start()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    require_root()
    short = Path(tempfile.mkdtemp(prefix="pb", dir="/tmp"))  # Unix socket paths: 108 bytes
    try:
        with netns() as ns:
            plugin = Plugin(ns, tmp_path)
            plugin.start()
            try:
                kept, gone, pools = make_state(plugin)
                age_pools(plugin)
                call(plugin, "Plugin.Activate", {})  # this process is pybridge's caller again
                yield Setup(plugin, short, kept, gone, pools)
            finally:
                plugin.stop()
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_removes_exactly_what_the_daemon_using_pybridge_forgot(setup: Setup) -> None:
    with setup.fake(setup.kept_network()):
        listed = setup.prune("--dry-run", check=True).stdout.splitlines()
        assert sorted(listed) == sorted(
            [
                f"would remove network {setup.gone[:12]} (bridge pyb-{setup.gone[:11]}, "
                f"{GONE_SUBNET})",
                f"would remove IPAM pool {GONE_SUBNET} ({setup.pools[GONE_SUBNET]})",
                f"would remove IPAM pool {LONE_SUBNET} ({setup.pools[LONE_SUBNET]})",
            ]
        )
        assert setup.untouched()
        started = time.monotonic()
        done = setup.prune("--yes", check=True).stdout.splitlines()
        assert time.monotonic() - started < 20
        assert sorted(done) == sorted(line.replace("would remove", "removed") for line in listed)
        assert setup.pruned()
        assert f"pyb-{setup.kept[:11]}" in setup.bridges()
        assert f"pyb-{setup.gone[:11]}" not in setup.bridges()
        again = setup.prune("--yes", check=True).stdout
        assert again.startswith("nothing to remove")


def test_refuses_a_state_directory_pybridge_does_not_use(setup: Setup) -> None:
    """prune reads one state directory and acts through one socket: a copy of the state (an
    older backup, another pybridge's) must not decide what the running pybridge removes."""
    copy = setup.dir / "copy"
    copy.mkdir()
    shutil.copy(setup.plugin.state / "state.db", copy / "state.db")
    with setup.fake(setup.kept_network()):
        argv = setup.argv()
        argv[argv.index("--state-dir") + 1] = str(copy)
        env = dict(os.environ, DOCKER_HOST=f"unix://{setup.dir / 'docker.sock'}")
        done = subprocess.run(
            [*argv, "--yes"], env=env, capture_output=True, text=True, timeout=60, check=False
        )
    assert done.returncode != 0
    assert "keeps its state in another database than" in done.stderr, done.stderr
    assert setup.untouched()


def test_refuses_a_daemon_served_by_another_process(setup: Setup) -> None:
    """DOCKER_HOST points at a daemon pybridge has never heard from: prune removes nothing."""
    path = setup.dir / "docker.sock"
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(path))
    listening.listen()
    other = serve_elsewhere(listening, path)
    try:
        result = setup.prune("--yes")
        assert result.returncode == 1, result
        assert result.stdout == ""
        [line] = result.stderr.splitlines()
        assert f"was last called by pid {os.getpid()} (" in line, line
        assert f"not by the Docker daemon at unix://{path} (pid {other.pid})" in line, line
        assert "removes nothing" in line
        assert setup.untouched()
    finally:
        stop(other)
        listening.close()


def serve_elsewhere(
    listening: socket.socket, path: Path, *, call: str = "", networks: str = "[]"
) -> subprocess.Popen[bytes]:
    """The stand-in daemon in a child process, on a listening socket this process made (the
    shape of systemd socket activation); with ``call``, it calls pybridge once first."""
    fd = listening.fileno()
    argv = [sys.executable, "-m", "tests.fakedocker", "--fd", str(fd), "--path", str(path)]
    argv += ["--networks", networks] + (["--call", call] if call else [])
    child = subprocess.Popen(argv, pass_fds=[fd], cwd=ROOT)
    if call:  # it has called pybridge once it answers
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not answers(path):
            time.sleep(0.05)
    return child


def answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
            probe.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return probe.recv(12).startswith(b"HTTP/1.")
        except OSError:
            return False


def stop(child: subprocess.Popen[bytes]) -> None:
    child.terminate()
    child.wait(timeout=10)


def test_socket_activation_the_daemon_is_the_process_that_accepts(setup: Setup) -> None:
    """systemd made and listens on the socket, dockerd accepts on it (fd://): SO_PEERCRED on
    the Docker socket names the listener, but the daemon is the process serving the
    connection. Here the listener is this process (a caller of pybridge, to make the point):
    prune must go by the child that serves."""
    path = setup.dir / "docker.sock"
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(path))
    listening.listen()
    known = json.dumps([setup.kept_network()])
    silent = serve_elsewhere(listening, path, networks=known)
    try:
        result = setup.prune("--yes")
        assert result.returncode == 1, result
        assert f"(pid {silent.pid})" in result.stderr, result.stderr
        assert setup.untouched()
    finally:
        stop(silent)
    calling = serve_elsewhere(listening, path, call=str(setup.plugin.sock), networks=known)
    try:
        done = setup.prune("--yes")
        assert done.returncode == 0, done
        assert setup.pruned()
    finally:
        stop(calling)
        listening.close()


def test_no_caller_since_start(setup: Setup) -> None:
    stop_wrapped(setup.plugin)
    setup.plugin.start()  # forgets its callers
    with setup.fake(setup.kept_network()):
        result = setup.prune()
        assert result.returncode == 1
        assert "has not been called by any Docker daemon since it started" in result.stderr
        assert "pass --yes if you are sure" in result.stderr
        assert setup.untouched()
    with setup.fake():  # knows none of pybridge's networks: not the daemon using it
        result = setup.prune("--yes")
        assert result.returncode == 1
        assert "knows none of pybridge's networks" in result.stderr
        assert setup.untouched()
    with setup.fake(setup.kept_network()):
        setup.prune("--yes", check=True)
        assert setup.pruned()


def test_without_a_terminal_it_needs_yes(setup: Setup) -> None:
    with setup.fake(setup.kept_network()):
        result = setup.prune()
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "pydriver: prune asks before it removes anything and there is no terminal to ask on: "
        "pass --yes to remove what it lists (or --dry-run to only list it)"
    )
    assert setup.untouched()


def on_terminal(setup: Setup, answer: bytes) -> str:
    """Run prune with a pseudo-terminal as stdin and stdout, answer its question."""
    master, slave = os.openpty()
    env = dict(os.environ, DOCKER_HOST=f"unix://{setup.dir / 'docker.sock'}")
    proc = subprocess.Popen(setup.argv(), stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"[y/N]" not in seen and time.monotonic() < deadline:
            seen += os.read(master, 4096)
        os.write(master, answer + b"\n")
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        proc.wait(timeout=30)
        os.close(master)
    return seen.decode()


def test_asks_on_a_terminal(setup: Setup) -> None:
    with setup.fake(setup.kept_network()):
        text = on_terminal(setup, b"n")
        assert f"stale: network {setup.gone[:12]}" in text
        assert "remove 1 network(s) and 2 IPAM pool(s)? [y/N]" in text
        assert "nothing removed" in text
        assert setup.untouched()
        text = on_terminal(setup, b"y")
        assert f"removed network {setup.gone[:12]}" in text
        assert setup.pruned()


def test_a_daemon_that_is_not_local_is_refused(setup: Setup) -> None:
    result = setup.prune("--yes", docker_host="tcp://127.0.0.1:9")
    assert result.returncode == 1
    assert result.stderr.startswith(
        "pydriver: the docker CLI talks to tcp://127.0.0.1:9, not to a Unix socket on this host"
    )
    assert len(result.stderr.splitlines()) == 1
    assert setup.untouched()


def test_managed_plugin_in_its_own_pid_namespace(tmp_path: Path) -> None:
    """A managed plugin lives in its own pid namespace (it sees dockerd as pid 0): prune goes by
    its socket path, /run/docker/plugins/<plugin id>/..., and the daemon's list of plugins."""
    require_root()
    plugin_id = secrets.token_hex(32)
    short = Path(tempfile.mkdtemp(prefix="pb", dir="/tmp"))
    sock = short / "plugins" / plugin_id / "pybridge.sock"
    try:
        with netns() as ns:
            plugin = Plugin(
                ns, tmp_path, sock=sock, wrap=["unshare", "--pid", "--kill-child=SIGTERM"]
            )
            plugin.start()
            try:
                kept, gone, pools = make_state(plugin)
                age_pools(plugin)
                call(plugin, "Plugin.Activate", {})  # seen from inside as pid 0
                setup = Setup(plugin, short, kept, gone, pools)
                with setup.fake(setup.kept_network(), plugins=(secrets.token_hex(32),)):
                    result = setup.prune("--yes")
                    assert result.returncode == 1
                    assert (
                        f"is the managed plugin {plugin_id[:12]}, which the Docker daemon at "
                        in result.stderr
                    )
                    assert setup.untouched()
                # Without any network the daemon knows: the plugin is its, that is enough.
                with setup.fake(plugins=(plugin_id,)):
                    listed = setup.prune("--dry-run", check=True).stdout
                    assert f"would remove network {kept[:12]}" in listed
                with setup.fake(setup.kept_network(), plugins=(plugin_id,)):
                    setup.prune("--yes", check=True)
                    assert setup.pruned()
            finally:
                stop_wrapped(plugin)
    finally:
        shutil.rmtree(short, ignore_errors=True)


def stop_wrapped(plugin: Plugin) -> None:
    """Stop pybridge and wait until its socket is gone. Under unshare, Popen's process is
    unshare, which ignores SIGTERM: it is killed, and --kill-child=SIGTERM passes a SIGTERM on
    to pybridge (pid 1 of its namespace)."""
    if plugin.proc is not None and plugin.proc.poll() is None:
        if plugin.wrap:
            plugin.proc.kill()
        else:
            plugin.proc.send_signal(signal.SIGTERM)
        plugin.proc.wait(timeout=20)
    deadline = time.monotonic() + 20
    while plugin.sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not plugin.sock.exists(), "pybridge did not stop"
