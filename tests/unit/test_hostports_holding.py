"""HostPorts without root: holding ports on loopback (the real socket calls, no traffic) and
naming the process that holds a port from `ss -p` output (``run`` faked)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

import pytest

from pydriver import hostports
from pydriver.errors import Conflict, HostError, PortInUse
from pydriver.hostports import SocketReservations, port_holder
from pydriver.model import PortMapping
from pydriver.process import CommandResult

LOOPBACK = ipaddress.ip_address("127.0.0.1")
CONTAINER = ipaddress.ip_address("10.50.0.2")


def free_port(family: socket.AddressFamily = socket.AF_INET) -> int:
    """A port nothing holds on loopback right now."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        return int(probe.getsockname()[1])


def on_loopback(port: int, proto: str = "tcp") -> PortMapping:
    return PortMapping(proto, LOOPBACK, port, CONTAINER, 80)  # type: ignore[arg-type]


def test_a_held_port_cannot_be_taken_by_a_host_process_until_released() -> None:
    ports = SocketReservations()
    mapping = on_loopback(free_port())
    ports.reserve(mapping)
    ports.reserve(mapping)  # again: nothing new, no error
    assert ports.held(mapping)
    with socket.socket() as other, pytest.raises(OSError, match="Address already in use"):
        other.bind(("127.0.0.1", mapping.host_port))
    ports.release(mapping)
    assert not ports.held(mapping)
    with socket.socket() as other:
        other.bind(("127.0.0.1", mapping.host_port))
    ports.close()


def test_a_port_a_host_process_holds_is_refused_in_one_sentence() -> None:
    ports = SocketReservations()
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        mapping = on_loopback(other.getsockname()[1])
        with pytest.raises(PortInUse, match=r"^host port 127\.0\.0\.1:\d+/tcp is already in use$"):
            ports.reserve(mapping)
    assert not ports.held(mapping)


def test_tcp_and_udp_of_one_port_are_held_separately() -> None:
    ports = SocketReservations()
    port = free_port()
    tcp, udp = on_loopback(port, "tcp"), on_loopback(port, "udp")
    ports.reserve(tcp)
    ports.reserve(udp)
    ports.release(tcp)
    assert ports.held(udp)
    assert not ports.held(tcp)
    ports.close()
    assert not ports.held(udp)


def test_an_address_this_host_does_not_have_is_a_conflict() -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this host: bind() says so, nothing is sent.
    mapping = PortMapping("tcp", ipaddress.ip_address("192.0.2.1"), 18090, CONTAINER, 80)
    with pytest.raises(Conflict, match=r"192\.0\.2\.1 is not an address of this host"):
        SocketReservations().reserve(mapping)


def test_ipv6_holds_only_ipv6() -> None:
    try:
        port = free_port(socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    v6 = PortMapping("tcp", ipaddress.ip_address("::1"), port, ipaddress.ip_address("fd00::2"), 80)
    ports = SocketReservations()
    ports.reserve(v6)
    with socket.socket() as v4:  # IPV6_V6ONLY: the IPv4 port stays free
        v4.bind(("127.0.0.1", port))
    ports.close()


# -- who holds a port: `ss -p` -----------------------------------------------------------------


def fake_ss(monkeypatch: pytest.MonkeyPatch, stdout: str) -> list[Sequence[str]]:
    calls: list[Sequence[str]] = []

    async def run(argv: Sequence[str], stdin: str | None = None) -> CommandResult:
        calls.append(argv)
        return CommandResult(0, stdout, "")

    monkeypatch.setattr(hostports, "run", run)
    return calls


async def test_the_holder_is_the_first_process_ss_names(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_ss(
        monkeypatch,
        "LISTEN 0      511          0.0.0.0:8080      0.0.0.0:*    "
        'users:(("nginx",pid=1234,fd=6),("nginx",pid=1233,fd=6))\n',
    )
    assert await port_holder("tcp", 8080) == "nginx (pid 1234)"
    assert calls == [["ss", "-H", "-a", "-n", "-p", "-t", "sport = :8080"]]


async def test_udp_and_names_with_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_ss(
        monkeypatch,
        "UNCONN 0 0 127.0.0.1:5353 0.0.0.0:*\n"  # no process shown (another user's)
        'UNCONN 0 0 0.0.0.0:5353 0.0.0.0:* users:(("tmux: server",pid=77,fd=4))\n',
    )
    assert await port_holder("udp", 5353) == "tmux: server (pid 77)"
    assert calls[0][5] == "-u"


@pytest.mark.parametrize(
    "stdout",
    ["", "LISTEN 0 4096 0.0.0.0:8080 0.0.0.0:*\n", 'LISTEN users:(("x",fd=3))\n'],
    ids=["nothing", "no-process", "no-pid"],
)
async def test_no_holder_ss_can_name_is_none(monkeypatch: pytest.MonkeyPatch, stdout: str) -> None:
    fake_ss(monkeypatch, stdout)
    assert await port_holder("tcp", 8080) is None


async def test_sctp_or_no_ss_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_ss(monkeypatch, "")
    assert await port_holder("sctp", 8080) is None
    assert calls == []  # ss has no SCTP filter: not asked

    async def missing(argv: Sequence[str], stdin: str | None = None) -> CommandResult:
        raise HostError("could not run ss: No such file or directory")

    monkeypatch.setattr(hostports, "run", missing)
    assert await port_holder("tcp", 8080) is None
