"""Bad input gets one clear sentence, never a traceback, and the plugin stays up. Both straight
on the plugin's socket (as dockerd would send it) and through the docker CLI."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import DRIVER, Docker, plugin_socket
from tests.harness import docker_fails
from tests.hostenv import OutsideHost, post_raw

HEX = "ab" * 32


def call(method: str, body: bytes) -> tuple[int, dict[str, object]]:
    """Like dockerd: POST, no Content-Type, the Accept header of the plugin protocol."""
    return post_raw(plugin_socket(), method, body, timeout=10)


BAD_REQUESTS = [
    ("NetworkDriver.CreateNetwork", b"{not json", "not valid JSON"),
    ("NetworkDriver.CreateNetwork", b"[1, 2]", "must be a JSON object"),
    ("NetworkDriver.CreateNetwork", b'{"NetworkID": 5}', "NetworkID"),
    ("NetworkDriver.CreateNetwork", b'{"NetworkID": "x; rm -rf /"}', "64-character hexadecimal"),
    (
        "NetworkDriver.CreateNetwork",
        json.dumps({"NetworkID": HEX, "IPv4Data": [{"Pool": "10.0.0.0/33"}]}).encode(),
        "IPv4Data[0].Pool",
    ),
    (
        "NetworkDriver.CreateNetwork",
        json.dumps({"NetworkID": HEX, "Options": []}).encode(),
        "Options must be a JSON object",
    ),
    (
        "NetworkDriver.CreateEndpoint",
        json.dumps(
            {"NetworkID": HEX, "EndpointID": HEX, "Interface": {"Address": "10.1.0.2/24"}}
        ).encode(),
        "is not known to pybridge",
    ),
    (
        "NetworkDriver.CreateEndpoint",
        json.dumps(
            {"NetworkID": HEX, "EndpointID": HEX, "Interface": {"Address": "10.1.0.2"}}
        ).encode(),
        "Interface.Address",
    ),
    (
        "NetworkDriver.Join",
        json.dumps({"NetworkID": HEX, "EndpointID": HEX, "SandboxKey": "/x"}).encode(),
        "is not known to pybridge",
    ),
    ("IpamDriver.RequestPool", b'{"Pool": "banana", "V6": false}', "Pool"),
    ("IpamDriver.RequestPool", b'{"Pool": "10.9.0.0/24", "V6": true}', "V6"),
    ("IpamDriver.RequestAddress", b'{"PoolID": "no-such-pool", "Address": ""}', "not known"),
    ("IpamDriver.RequestAddress", b'{"PoolID": 7}', "PoolID"),
    ("IpamDriver.ReleaseAddress", b'{"PoolID": "x", "Address": "300.1.1.1"}', "Address"),
]


@pytest.mark.parametrize(("method", "body", "fragment"), BAD_REQUESTS)
def test_bad_requests_get_one_clear_sentence(
    environment: None, method: str, body: bytes, fragment: str
) -> None:
    status, reply = call(method, body)
    assert status == 500
    assert set(reply) == {"Err"}
    message = str(reply["Err"])
    assert fragment in message, message
    assert "Traceback" not in message
    assert "\n" not in message
    # ... and the plugin is still there.
    assert call("Plugin.Activate", b"") == (200, {"Implements": ["NetworkDriver", "IpamDriver"]})


def test_unknown_route_is_404(environment: None) -> None:
    status, reply = call("NetworkDriver.NoSuchThing", b"{}")
    assert status == 404
    assert "does not implement" in str(reply["Err"])


def test_empty_bodies_are_accepted(environment: None) -> None:
    assert call("NetworkDriver.GetCapabilities", b"") == (
        200,
        {"Scope": "local", "ConnectivityScope": "local", "GwAllocChecker": True},
    )
    status, spaces = call("IpamDriver.GetDefaultAddressSpaces", b"")
    assert status == 200
    assert set(spaces) == {
        "LocalDefaultAddressSpace",
        "GlobalDefaultAddressSpace",
    }


def test_cli_shows_the_sentence(d: Docker, outside: OutsideHost) -> None:
    err = docker_fails("network", "create", "-d", DRIVER, "-o", "com.example.nope=1", d.name("bad"))
    assert "pybridge does not support the network option com.example.nope" in err
    assert "com.docker.network.bridge.name" in err  # lists what is supported
    err = docker_fails(
        "network",
        "create",
        "-d",
        DRIVER,
        "-o",
        "com.docker.network.driver.mtu=huge",
        d.name("bad"),
    )
    assert "com.docker.network.driver.mtu 'huge' is not valid" in err
    # A subnet the host already routes elsewhere is refused, naming the route.
    for ipam in ([], ["--ipam-driver", DRIVER]):
        err = docker_fails(
            "network",
            "create",
            "-d",
            DRIVER,
            *ipam,
            "--subnet",
            "198.51.100.0/25",
            d.name("bad"),
        )
        assert "overlaps the host route 198.51.100.0/24 on pbt-out-h" in err
