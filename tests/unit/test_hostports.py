"""Host port reservations when pybridge runs out of file descriptors: the request fails with
one sentence, nothing is left half-published, and no port is ever silently left unheld."""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

from pydriver import protocol as p
from pydriver.errors import HostError
from pydriver.hostports import OutOfDescriptors, SocketReservations
from pydriver.model import PortMapping

from .conftest import Env
from .fakes import FakeHostPorts, create_endpoint_body, create_network_body, hexid, join_body

NET = hexid("fd-net")
EP = hexid("fd-ep")
V4 = ipaddress.ip_address("10.50.0.2")
LOOPBACK = ipaddress.ip_address("127.0.0.1")
OUT_OF_FDS = "pybridge has run out of file descriptors"


def failing_socket(code: int) -> object:
    def make(*args: object) -> socket.socket:
        raise OSError(code, "simulated")

    return make


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
def test_running_out_is_an_error_not_an_unsupported_protocol(
    code: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = SocketReservations()
    monkeypatch.setattr("pydriver.hostports.socket.socket", failing_socket(code))
    mapping = PortMapping("tcp", None, 18081, V4, 80)
    with pytest.raises(OutOfDescriptors) as err:
        ports.reserve(mapping)
    assert str(err.value).startswith("cannot hold host port 0.0.0.0:18081/tcp: ")
    if code == errno.EMFILE:
        assert OUT_OF_FDS in str(err.value)
        assert "RLIMIT_NOFILE" in str(err.value)
        assert "LimitNOFILE=" in str(err.value)
    assert not ports.held(mapping)


def test_an_unknown_socket_error_is_an_error_too(monkeypatch: pytest.MonkeyPatch) -> None:
    ports = SocketReservations()
    monkeypatch.setattr("pydriver.hostports.socket.socket", failing_socket(errno.EACCES))
    with pytest.raises(HostError, match=r"cannot hold host port 0\.0\.0\.0:18082/tcp"):
        ports.reserve(PortMapping("tcp", None, 18082, V4, 80))


@pytest.mark.parametrize("code", [errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT])
def test_a_protocol_the_kernel_lacks_is_published_without_a_socket(
    code: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ports = SocketReservations()
    monkeypatch.setattr("pydriver.hostports.socket.socket", failing_socket(code))
    with caplog.at_level(logging.WARNING, logger="pydriver.hostports"):
        ports.reserve(PortMapping("sctp", None, 18083, V4, 80))
        ports.reserve(PortMapping("sctp", None, 18084, V4, 80))
    assert ports.held(PortMapping("sctp", None, 18084, V4, 80))
    assert len(caplog.records) == 1  # said once


_CHILD = textwrap.dedent(
    """
    import ipaddress, json, resource, sys
    from pydriver.cli import raise_fd_limit
    from pydriver.errors import PortInUse
    from pydriver.hostports import OutOfDescriptors, SocketReservations
    from pydriver.model import PortMapping
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (40, hard))
    ports, held, error = SocketReservations(), [], None
    for port in range(int(sys.argv[1]), int(sys.argv[1]) + 200):
        m = PortMapping("tcp", ipaddress.ip_address("127.0.0.1"), port,
                    ipaddress.ip_address("10.50.0.2"), 80)
        try:
            ports.reserve(m)
        except PortInUse:
            continue  # taken on this host: not our concern
        except OutOfDescriptors as err:
            error = str(err)
            break
        held.append(port)
    failed_key_held = ports.held(m)
    ports.close()
    before, after = raise_fd_limit()
    print(json.dumps({"held": len(held), "error": error, "failed_key_held": failed_key_held,
                      "raised": [before, after], "hard": hard}))
    """
)


def test_the_real_kernel_under_a_low_limit() -> None:
    """A child process with RLIMIT_NOFILE 40 holds loopback ports until it runs out."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, "47100"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(done.stdout)
    assert 10 < result["held"] < 40
    assert result["error"].startswith("cannot hold host port 127.0.0.1:")
    assert OUT_OF_FDS in result["error"]
    assert "RLIMIT_NOFILE, is 40)" in result["error"]
    assert result["failed_key_held"] is False
    assert result["raised"] == [40, result["hard"]]


# -- the driver ---------------------------------------------------------------------------------


@dataclass
class LimitedHostPorts(FakeHostPorts):
    """Host ports of a process that can hold at most ``capacity`` sockets."""

    capacity: int = 1_000_000

    def reserve(self, mapping: PortMapping) -> None:
        if mapping not in self.held and len(self.held) >= self.capacity:
            raise OutOfDescriptors(
                f"cannot hold host port {mapping.host_text()}/{mapping.proto}: {OUT_OF_FDS}"
            )
        super().reserve(mapping)


def entry(port: int) -> dict[str, object]:
    return {"Proto": 6, "Port": port, "HostPort": port, "HostPortEnd": port}


async def program(env: Env, *ports: int) -> None:
    body = {
        "NetworkID": NET,
        "EndpointID": EP,
        "Options": {"com.docker.network.portmap": [entry(port) for port in ports]},
    }
    await env.driver.program_external_connectivity(p.parse_program_external(body))


@pytest.fixture
async def limited(env: Env) -> tuple[Env, LimitedHostPorts]:
    ports = LimitedHostPorts()
    await env.restart(host_ports=ports)
    body = create_network_body(NET, v6_subnet="fd00:78::/64", v6_gateway="fd00:78::1/64")
    await env.driver.create_network(p.parse_create_network(body))
    endpoint = create_endpoint_body(NET, EP, address_v6="fd00:78::2/64")
    await env.driver.create_endpoint(p.parse_create_endpoint(endpoint))
    await env.driver.join(p.parse_join(join_body(NET, EP)))
    return env, ports


async def test_running_out_fails_the_request_and_publishes_nothing(
    limited: tuple[Env, LimitedHostPorts],
) -> None:
    env, ports = limited
    ports.capacity = 5  # the third port's IPv4 socket is the fifth, its IPv6 one fails
    applied = len(env.firewall.applied)
    with pytest.raises(OutOfDescriptors, match=OUT_OF_FDS):
        await program(env, *range(18000, 18010))
    assert ports.held == set()  # nothing leaked, not even the third port's IPv4 socket
    assert env.driver.endpoints[EP].mappings == ()
    stored = {e.id: e for e in await env.store.load_endpoints()}
    assert stored[EP].mappings == ()
    assert len(env.firewall.applied) == applied  # no rule written
    # With a higher limit the same request works.
    ports.capacity = 100
    await program(env, *range(18000, 18010))
    assert len(env.driver.endpoints[EP].mappings) == len(ports.held) == 20


async def test_a_failed_republish_keeps_the_old_ports_held(
    limited: tuple[Env, LimitedHostPorts],
) -> None:
    env, ports = limited
    await program(env, 18000, 18001)
    before = set(ports.held)
    ports.capacity = 6
    with pytest.raises(OutOfDescriptors):
        await program(env, *range(19000, 19010))
    assert ports.held == before
    assert {m.host_port for m in env.driver.endpoints[EP].mappings} == {18000, 18001}


async def test_running_out_at_start_up_is_reported_as_such(
    limited: tuple[Env, LimitedHostPorts],
) -> None:
    env, _ = limited
    await program(env, 18000, 18001)
    driver = await env.restart(host_ports=LimitedHostPorts(capacity=1))
    repairs = await driver.reconcile()
    out = [r for r in repairs if OUT_OF_FDS in r]
    assert len(out) == 3
    assert not any("another program" in r for r in out)
