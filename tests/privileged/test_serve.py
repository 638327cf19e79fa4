"""`pydriver serve` as a process: socket handling, start-up order and signals. Each instance runs
inside its own network namespace, so it never sees (or tidies up) the host's pybridge objects."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostenv import post_raw, require_root, run

pytestmark = pytest.mark.privileged


@pytest.fixture
def netns() -> Iterator[str]:
    require_root()
    name = "pbt-" + secrets.token_hex(4)
    run(["ip", "netns", "add", name])
    run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
    try:
        yield name
    finally:
        run(["ip", "netns", "del", name], check=False)


def start_argv(netns: str, sock: Path, state: Path, *extra: str) -> list[str]:
    return [
        *("ip", "netns", "exec", netns, sys.executable, "-m", "pydriver.cli", "serve"),
        *("--socket", str(sock), "--state-dir", str(state), "--log-level", "debug"),
        *extra,
    ]


def start(
    netns: str, sock: Path, state: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """`pydriver serve` in ``netns``; ``extra`` arguments, ``env`` added to the environment."""
    return subprocess.Popen(
        start_argv(netns, sock, state, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env} if env else None,
    )


def wait_socket(sock: Path, proc: subprocess.Popen[str], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.is_socket() and _connects(sock):
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"pydriver exited early:\n{proc.stdout.read() if proc.stdout else ''}"
            )
        time.sleep(0.05)
    raise AssertionError("pydriver did not bind its socket")


def _connects(sock: Path) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(sock))
        return True
    except OSError:
        return False
    finally:
        s.close()


def post(sock: Path, method: str, body: bytes = b"") -> tuple[int, object]:
    return post_raw(str(sock), method, body, timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_lifecycle(netns: str, tmp_path: Path, sig: signal.Signals) -> None:
    sock = tmp_path / "pb.sock"
    state = tmp_path / "state"
    # A stale socket file with no listener, as a crash leaves behind.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()
    proc = start(netns, sock, state)
    try:
        wait_socket(sock, proc)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert post(sock, "Plugin.Activate") == (
            200,
            {"Implements": ["NetworkDriver", "IpamDriver"]},
        )
        # A second instance on the same socket refuses to start and leaves the first alone.
        second = start(netns, sock, tmp_path / "state2")
        out, _ = second.communicate(timeout=30)
        assert second.returncode == 1
        assert "another process is already serving" in out
        assert post(sock, "NetworkDriver.GetCapabilities")[0] == 200
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        assert not sock.exists()
        assert (state / "state.db").exists()
        assert "listening on" in out
        assert "stopped" in out
        assert "Plugin.Activate" in out  # one log line per request
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_one_pybridge_per_state_directory(netns: str, tmp_path: Path) -> None:
    """The host service and a managed plugin left enabled share /var/lib/pydriver: the second
    to start refuses to, naming the first (a managed plugin says it on every call), and the
    first goes on serving."""
    state = tmp_path / "state"
    first_sock = tmp_path / "first.sock"
    first = start(netns, first_sock, state)
    try:
        wait_socket(first_sock, first)
        holder = f"the host service, pid {first.pid}"
        # The plain pid is the `ip netns exec` one, which execs pydriver: the same process.
        second = start(netns, tmp_path / "second.sock", state)
        out, _ = second.communicate(timeout=30)
        assert second.returncode == 1
        assert f"another pybridge ({holder}) is running with the state directory {state}" in out
        # On the same socket too, and the first one's socket is left alone (it is refused
        # before it looks at the socket).
        again = start(netns, first_sock, state)
        out, _ = again.communicate(timeout=30)
        assert again.returncode == 1
        assert "another pybridge" in out
        assert first_sock.is_socket()
        assert post(first_sock, "NetworkDriver.GetCapabilities")[0] == 200
        managed_sock = tmp_path / "managed.sock"
        managed = start(netns, managed_sock, state, env={"PYDRIVER_MANAGED": "1"})
        try:
            wait_socket(managed_sock, managed)
            status, reply = post(managed_sock, "NetworkDriver.CreateNetwork", b'{"NetworkID": "x"}')
            assert status == 500
            assert isinstance(reply, dict)
            assert f"another pybridge ({holder})" in reply["Err"]
            assert "not both" in reply["Err"]
        finally:
            managed.kill()
            managed.wait()
        assert post(first_sock, "NetworkDriver.GetCapabilities")[0] == 200
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0
        # Once the first is gone, the directory is free again.
        again = start(netns, first_sock, state)
        try:
            wait_socket(first_sock, again)
        finally:
            again.kill()
            again.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_state_is_loaded_and_reconciled_before_binding(netns: str, tmp_path: Path) -> None:
    """A network created by one instance is still served by the next one, whose bridge is
    back before the socket answers, even if someone deleted it in between."""
    sock = tmp_path / "pb.sock"
    state = tmp_path / "state"
    network_id = secrets.token_hex(32)
    proc = start(netns, sock, state)
    try:
        wait_socket(sock, proc)
        body = json.dumps(
            {
                "NetworkID": network_id,
                "Options": {"com.docker.network.generic": {}},
                "IPv4Data": [{"Pool": "10.213.60.0/24", "Gateway": "10.213.60.1/24"}],
                "IPv6Data": [],
            }
        ).encode()
        assert post(sock, "NetworkDriver.CreateNetwork", body) == (200, {})
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
        bridge = "pyb-" + network_id[:11]
        run(["ip", "netns", "exec", netns, "ip", "link", "del", bridge])
        # An orphan with pybridge's prefix that no state refers to.
        run(
            ["ip", "netns", "exec", netns, "ip", "link", "add", "pyb-00000000000", "type", "bridge"]
        )
        proc = start(netns, sock, state)
        wait_socket(sock, proc)
        links = run(["ip", "netns", "exec", netns, "ip", "-o", "link", "show"]).stdout
        addrs = run(
            ["ip", "netns", "exec", netns, "ip", "-o", "addr", "show", "dev", bridge]
        ).stdout
        assert bridge in links
        assert "10.213.60.1/24" in addrs
        assert "pyb-00000000000" not in links
        body = json.dumps({"NetworkID": network_id}).encode()
        assert post(sock, "NetworkDriver.DeleteNetwork", body) == (200, {})
        links = run(["ip", "netns", "exec", netns, "ip", "-o", "link", "show"]).stdout
        assert bridge not in links
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=20)


def test_sigterm_finishes_requests_in_flight_and_keeps_the_data_plane(
    netns: str, tmp_path: Path
) -> None:
    from tests.privileged.serving import Plugin

    plugin = Plugin(netns, tmp_path)
    # The request pauses inside, right after the bridge is made, while SIGTERM arrives.
    plugin.start(PYDRIVER_DELAY_AT="network.create.bridge:1.5")
    network_id = secrets.token_hex(32)
    body = {
        "NetworkID": network_id,
        "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"Pool": "10.213.61.0/24", "Gateway": "10.213.61.1/24"}],
        "IPv6Data": [],
    }
    result: dict[str, object] = {}

    def call() -> None:
        result["reply"] = plugin.post("NetworkDriver.CreateNetwork", body)

    import threading

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)
    assert plugin.proc is not None
    plugin.proc.send_signal(signal.SIGTERM)
    caller.join(20)
    assert result["reply"] == (200, {})
    assert plugin.proc.wait(timeout=20) == 0
    assert not plugin.sock.exists()
    links = run(["ip", "netns", "exec", netns, "ip", "-o", "link", "show"]).stdout
    assert "pyb-" + network_id[:11] in links  # the data plane stays up
    assert plugin.consistent() == []


def test_json_logs(netns: str, tmp_path: Path) -> None:
    from tests.privileged.serving import Plugin

    plugin = Plugin(netns, tmp_path)
    plugin.start(PYDRIVER_LOG_FORMAT="json")
    try:
        network_id = secrets.token_hex(32)
        assert plugin.post("NetworkDriver.DeleteNetwork", {"NetworkID": network_id})[0] == 200
        assert plugin.post("NetworkDriver.Join", {"NetworkID": "nope"})[0] == 500
    finally:
        plugin.stop()
    entries = [json.loads(line) for line in plugin.log.read_text().splitlines() if line]
    requests = [e for e in entries if e["logger"] == "pydriver.requests"]
    delete = next(e for e in requests if e["method"] == "NetworkDriver.DeleteNetwork")
    assert delete["network"] == network_id
    assert delete["outcome"] == "ok"
    assert isinstance(delete["duration_ms"], float)
    assert delete["level"] == "info"
    join = next(e for e in requests if e["method"] == "NetworkDriver.Join")
    assert join["outcome"].startswith("error(invalid)")


def test_a_managed_plugin_that_cannot_start_says_why_on_every_call(
    netns: str, tmp_path: Path
) -> None:
    """Exiting would leave dockerd with a plugin it cannot enable (and dockerd 28 has
    crash-looped on a network plugin that failed to enable at boot): a managed pybridge that
    cannot start stays up, registers, and answers every call with the reason."""
    sock = tmp_path / "pb.sock"
    state = tmp_path / "state"
    state.write_text("not a directory")  # the state directory cannot be opened
    proc = start(netns, sock, state, env={"PYDRIVER_MANAGED": "1"})
    try:
        wait_socket(sock, proc)
        assert post(sock, "NetworkDriver.GetCapabilities")[0] == 200
        assert post(sock, "IpamDriver.GetCapabilities")[0] == 200
        status, reply = post(sock, "NetworkDriver.CreateNetwork", b'{"NetworkID": "x"}')
        assert status == 500
        assert isinstance(reply, dict)
        assert reply["Err"].startswith("pybridge could not start: cannot open the state directory")
        assert post(sock, "Nothing.Here")[0] == 404
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 1
        assert not sock.exists()
        output = proc.stdout.read() if proc.stdout else ""
        assert "pybridge is not working: cannot open the state directory" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # Not a managed plugin (a host service under systemd): it exits and says why.
    plain = start(netns, sock, state)
    assert plain.wait(timeout=15) == 1
    assert "cannot open the state directory" in (plain.stdout.read() if plain.stdout else "")


def test_metrics_that_cannot_be_served_do_not_stop_the_driver(netns: str, tmp_path: Path) -> None:
    """A metrics address someone else holds (seen: an old plugin process still on the port)
    must not keep the driver from serving."""
    sock = tmp_path / "pb.sock"
    proc = start(
        netns,
        sock,
        tmp_path / "state",
        "--metrics-address",
        str(tmp_path / "missing" / "metrics.sock"),
    )
    try:
        wait_socket(sock, proc)
        assert post(sock, "NetworkDriver.GetCapabilities")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "metrics are not served" in (proc.stdout.read() if proc.stdout else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_metrics_address_typo_is_refused_before_anything_starts(
    netns: str, tmp_path: Path
) -> None:
    sock = tmp_path / "pb.sock"
    proc = start(netns, sock, tmp_path / "state", "--metrics-address", "127.0.0.1:93270")
    assert proc.wait(timeout=15) == 1
    assert "--metrics-address '127.0.0.1:93270' is not HOST:PORT" in (
        proc.stdout.read() if proc.stdout else ""
    )
    assert not sock.exists()
    assert not (tmp_path / "state").exists()
