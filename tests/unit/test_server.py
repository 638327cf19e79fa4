"""The HTTP glue, served on a real unix socket and called the way dockerd calls it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pydriver import protocol as p
from pydriver import server
from pydriver.errors import DriverError, HostError
from pydriver.naming import bridge_name, container_veth_name, host_veth_name
from pydriver.peers import Peer, peer_credentials
from pydriver.prune import plugin_facts
from pydriver.server import Api, make_app

from .conftest import Env
from .fakes import create_endpoint_body, create_network_body, endpoint_ref_body, hexid, join_body

NET = hexid("server-network")
EP = hexid("server-endpoint")


@dataclass
class Client:
    session: aiohttp.ClientSession
    env: Env
    path: str = ""  # the socket

    async def call(self, path: str, body: bytes | dict[str, Any] = b"") -> tuple[int, Any]:
        """POST like dockerd: raw bytes, no Content-Type."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.session.post(
            f"http://plugin.moby.localhost{path}",
            data=data,
            skip_auto_headers=["Content-Type"],
            headers={"Accept": "application/vnd.docker.plugins.v1.2+json"},
        ) as resp:
            assert "Content-Type" not in resp.request_info.headers
            text = await resp.text()
            assert text.endswith("\n")
            return resp.status, await resp.json(content_type=None)

    async def ok(self, path: str, body: bytes | dict[str, Any] = b"") -> Any:
        status, reply = await self.call(path, body)
        assert status == 200, reply
        assert "Err" not in reply
        return reply


@pytest.fixture
async def client(env: Env) -> AsyncIterator[Client]:
    # unix socket paths are limited to 108 bytes; tmp_path can be longer
    sock_dir = Path(tempfile.mkdtemp(prefix="pyb-", dir="/tmp"))
    sock = sock_dir / "plugin.sock"
    runner = web.AppRunner(
        make_app(Api(env.driver, env.ipam, state_path=env.store.path)), access_log=None
    )
    await runner.setup()
    try:
        await web.UnixSite(runner, str(sock)).start()
        connector = aiohttp.UnixConnector(path=str(sock))
        async with aiohttp.ClientSession(connector=connector) as session:
            yield Client(session, env, str(sock))
    finally:
        await runner.cleanup()
        shutil.rmtree(sock_dir, ignore_errors=True)


async def test_activate_with_empty_body(client: Client) -> None:
    assert await client.ok("/Plugin.Activate") == {"Implements": ["NetworkDriver", "IpamDriver"]}


async def test_response_content_type(client: Client) -> None:
    async with client.session.post(
        "http://x/Plugin.Activate", data=b"", skip_auto_headers=["Content-Type"]
    ) as resp:
        assert resp.headers["Content-Type"].startswith(p.CONTENT_TYPE)


async def test_capabilities(client: Client) -> None:
    assert await client.ok("/NetworkDriver.GetCapabilities") == {
        "Scope": "local",
        "ConnectivityScope": "local",
        "GwAllocChecker": True,
    }
    assert await client.ok("/IpamDriver.GetCapabilities") == {
        "RequiresMACAddress": False,
        "RequiresRequestReplay": False,
    }


async def test_default_address_spaces_with_empty_body(client: Client) -> None:
    assert await client.ok("/IpamDriver.GetDefaultAddressSpaces") == {
        "LocalDefaultAddressSpace": "PybridgeLocal",
        "GlobalDefaultAddressSpace": "PybridgeGlobal",
    }


async def test_empty_verbs(client: Client) -> None:
    for path in (
        "/NetworkDriver.DiscoverNew",
        "/NetworkDriver.DiscoverDelete",
        "/NetworkDriver.FreeNetwork",
    ):
        assert await client.ok(path, {"DiscoveryType": 1, "DiscoveryData": {}}) == {}


async def test_allocate_network_is_refused(client: Client) -> None:
    status, reply = await client.call("/NetworkDriver.AllocateNetwork", {"NetworkID": NET})
    assert status == 500
    assert "swarm" in reply["Err"]


async def test_unknown_route(client: Client) -> None:
    status, reply = await client.call("/NetworkDriver.Frobnicate", b"{}")
    assert status == 404
    assert reply == {"Err": "pybridge does not implement NetworkDriver.Frobnicate"}
    status, reply = await client.call("/", b"")
    assert status == 404
    assert "Err" in reply


async def test_get_is_refused(client: Client) -> None:
    async with client.session.get("http://x/Plugin.Activate") as resp:
        assert resp.status == 405
        assert "POST" in (await resp.json(content_type=None))["Err"]


async def test_malformed_json(client: Client) -> None:
    status, reply = await client.call("/NetworkDriver.CreateNetwork", b'{"NetworkID": ')
    assert status == 500
    assert set(reply) == {"Err"}
    assert reply["Err"].startswith("request body is not valid JSON")
    status, reply = await client.call("/NetworkDriver.CreateNetwork", b"[1, 2]")
    assert status == 500
    assert "JSON object" in reply["Err"]


async def test_wrong_types_name_the_field(client: Client) -> None:
    body = create_network_body(NET)
    body["NetworkID"] = 42
    status, reply = await client.call("/NetworkDriver.CreateNetwork", body)
    assert status == 500
    assert "NetworkID" in reply["Err"]

    body = create_endpoint_body(NET, EP)
    body["Interface"]["Address"] = "10.50.0.2"
    status, reply = await client.call("/NetworkDriver.CreateEndpoint", body)
    assert status == 500
    assert "Interface.Address" in reply["Err"]

    status, reply = await client.call(
        "/IpamDriver.RequestPool", {"Pool": "10.0.0.0/24", "V6": True}
    )
    assert status == 500
    assert "V6" in reply["Err"]


async def test_oversize_body(client: Client) -> None:
    big = b'{"NetworkID": "' + b"a" * (p.MAX_BODY_BYTES + 10) + b'"}'
    status, reply = await client.call("/NetworkDriver.CreateNetwork", big)
    assert status == 500
    assert "larger than" in reply["Err"]
    # still serving
    assert await client.ok("/Plugin.Activate")


async def test_internal_error_is_a_sentence_not_a_traceback(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def boom(req: object) -> None:
        raise RuntimeError("something broke")

    monkeypatch.setattr(client.env.driver, "create_network", boom)
    status, reply = await client.call("/NetworkDriver.CreateNetwork", create_network_body(NET))
    assert status == 500
    assert set(reply) == {"Err"}
    assert "RuntimeError" in reply["Err"]
    assert "something broke" in reply["Err"]
    assert "Traceback" not in reply["Err"]
    assert 'File "' not in reply["Err"]
    assert "\n" not in reply["Err"]
    # the server keeps serving
    assert await client.ok("/Plugin.Activate")
    assert await client.ok("/NetworkDriver.GetCapabilities")


async def test_endpoint_oper_info_never_fails(client: Client) -> None:
    assert await client.ok("/NetworkDriver.EndpointOperInfo", b"") == {"Value": {}}
    assert await client.ok("/NetworkDriver.EndpointOperInfo", {"NetworkID": "x"}) == {"Value": {}}
    assert await client.ok("/NetworkDriver.EndpointOperInfo", endpoint_ref_body(NET, EP)) == {
        "Value": {}
    }


async def test_driver_errors_are_reported(client: Client) -> None:
    status, reply = await client.call(
        "/NetworkDriver.CreateEndpoint", create_endpoint_body(NET, EP)
    )
    assert status == 500
    assert "not known to pybridge" in reply["Err"]


async def test_full_flow(client: Client) -> None:
    env = client.env
    # docker network create -d pybridge --ipam-driver pybridge (no subnet)
    spaces = await client.ok("/IpamDriver.GetDefaultAddressSpaces")
    pool = await client.ok(
        "/IpamDriver.RequestPool",
        {
            "AddressSpace": spaces["LocalDefaultAddressSpace"],
            "Pool": "",
            "SubPool": "",
            "Options": {},
            "V6": False,
        },
    )
    assert pool == {"PoolID": "172.31.0.0/16", "Pool": "172.31.0.0/16", "Data": {}}
    gateway = await client.ok(
        "/IpamDriver.RequestAddress",
        {
            "PoolID": pool["PoolID"],
            "Address": "",
            "Options": {"RequestAddressType": "com.docker.network.gateway"},
        },
    )
    assert gateway == {"Address": "172.31.0.1/16", "Data": {}}
    assert (
        await client.ok(
            "/NetworkDriver.CreateNetwork",
            create_network_body(NET, pool["Pool"], gateway["Address"]),
        )
        == {}
    )
    bridge = bridge_name(NET)
    assert env.kernel.links_by_name[bridge].up is True
    assert env.firewall.last_bridges() == {bridge}

    # docker run --network ...
    address = await client.ok(
        "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "", "Options": None}
    )
    assert address["Address"] == "172.31.0.2/16"
    reply = await client.ok(
        "/NetworkDriver.CreateEndpoint",
        create_endpoint_body(NET, EP, address["Address"], ports=True),
    )
    assert reply == {"Interface": {"MacAddress": "02:50:ac:1f:00:02"}}  # from 172.31.0.2
    join = await client.ok("/NetworkDriver.Join", join_body(NET, EP))
    assert join == {
        "InterfaceName": {"SrcName": container_veth_name(EP), "DstPrefix": "eth"},
        "StaticRoutes": [],
        "DisableGatewayService": False,
        "Gateway": "172.31.0.1",
    }
    program = endpoint_ref_body(NET, EP)
    program["Options"] = create_endpoint_body(NET, EP, ports=True)["Options"]
    assert await client.ok("/NetworkDriver.ProgramExternalConnectivity", program) == {}
    info = await client.ok("/NetworkDriver.EndpointOperInfo", endpoint_ref_body(NET, EP))
    assert info["Value"]["veth_host"] == host_veth_name(EP)
    assert info["Value"]["address"] == "172.31.0.2/16"

    # docker rm -f; docker network rm
    env.kernel.move_to_container(container_veth_name(EP))
    for path in (
        "/NetworkDriver.RevokeExternalConnectivity",
        "/NetworkDriver.Leave",
        "/NetworkDriver.DeleteEndpoint",
    ):
        assert await client.ok(path, endpoint_ref_body(NET, EP)) == {}
    assert host_veth_name(EP) not in env.kernel.names()
    assert (
        await client.ok(
            "/IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": "172.31.0.2"}
        )
        == {}
    )
    assert await client.ok("/NetworkDriver.DeleteNetwork", {"NetworkID": NET}) == {}
    assert (
        await client.ok(
            "/IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": "172.31.0.1"}
        )
        == {}
    )
    assert await client.ok("/IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]}) == {}
    assert env.kernel.names() == set()
    assert env.firewall.last == []
    assert env.ipam.pools == {}
    assert await env.store.load_networks() == []
    # replays of the teardown are harmless
    assert await client.ok("/NetworkDriver.DeleteNetwork", {"NetworkID": NET}) == {}
    assert await client.ok("/IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]}) == {}


async def test_internal_network_join_disables_gateway_service(client: Client) -> None:
    await client.ok("/NetworkDriver.CreateNetwork", create_network_body(NET, internal=True))
    await client.ok("/NetworkDriver.CreateEndpoint", create_endpoint_body(NET, EP))
    join = await client.ok("/NetworkDriver.Join", join_body(NET, EP))
    assert join["DisableGatewayService"] is True
    assert "Gateway" not in join


async def test_docker_supplied_mac_is_not_echoed(client: Client) -> None:
    await client.ok("/NetworkDriver.CreateNetwork", create_network_body(NET))
    reply = await client.ok(
        "/NetworkDriver.CreateEndpoint", create_endpoint_body(NET, EP, mac="02:42:ac:11:00:02")
    )
    assert reply == {"Interface": {}}


def corpus_lines(name: str) -> list[str]:
    return (
        (Path(__file__).resolve().parent.parent / "data" / "corpus" / name).read_text().splitlines()
    )


@pytest.mark.parametrize("name", ["dockerd-20.10.24.jsonl", "dockerd-26.1.5.jsonl"])
async def test_corpus_replay(client: Client, name: str) -> None:
    """Replay every recorded request in order. The only errors are the recorder's own IPAM
    pool (10.215.0.0/24), which pybridge's IPAM never handed out; afterwards nothing is left."""
    for line in corpus_lines(name):
        record = json.loads(line)
        if "path" not in record:
            continue
        body = b"" if record["body"] == {} else json.dumps(record["body"]).encode()
        status, reply = await client.call(record["path"], body)
        if status != 200:
            assert status == 500
            assert record["path"] == "/IpamDriver.RequestAddress", reply
            assert record["body"]["PoolID"] == "10.215.0.0/24"
            assert reply == {"Err": "IPAM pool '10.215.0.0/24' is not known to pybridge"}
    assert client.env.kernel.names() == set()
    assert client.env.firewall.last == []
    assert client.env.driver.networks == {}
    assert client.env.driver.endpoints == {}
    assert await client.ok("/Plugin.Activate")


# ---------------------------------------------------------------------------------------------
# Docker 28 and 29, request by request as their source sends them (moby v28.5.2 and
# docker-v29.0.3; file:line in each test)
# ---------------------------------------------------------------------------------------------

SANDBOX = "/var/run/docker/netns/4b8d2c1e9f03"
NO_PROXY = "com.docker.network.driver.private.no_proxy_6to4"  # netlabel.NoProxy6To4
PORTS_80 = {
    "com.docker.network.endpoint.exposedports": [
        {"Proto": 6, "Port": 80},
        {"Proto": 17, "Port": 53},
    ],
    "com.docker.network.portmap": [
        {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080, "HostPortEnd": 8080},
        {"Proto": 17, "IP": "", "Port": 53, "HostIP": "", "HostPort": 8053, "HostPortEnd": 8053},
    ],
}


def ipv6_only_network(gateway: bool = True) -> dict[str, Any]:
    """`docker network create -d pybridge --ipv4=false --ipv6 --subnet fd00:213:80::/64` on
    28.5.2: both flags as booleans (libnetwork/network.go:799-818), no IPv4 data at all
    (network.go:1706-1723), the v6 gateway Docker's IPAM allocated (ipamdata.go:12-29)."""
    v6: dict[str, Any] = {"AddressSpace": "LocalDefault", "Pool": "fd00:213:80::/64"}
    if gateway:
        v6["Gateway"] = "fd00:213:80::1/64"
    return {
        "NetworkID": NET,
        "Options": {
            "com.docker.network.enable_ipv4": False,
            "com.docker.network.enable_ipv6": True,
            "com.docker.network.generic": {},
        },
        "IPv4Data": [],
        "IPv6Data": [v6],
    }


def v6_endpoint(endpoint: str = EP, address: str = "fd00:213:80::2/64") -> dict[str, Any]:
    # No IPv4 RequestAddress on such a network, so Interface.Address is empty
    # (network.go: ep.assignAddress(ipam, n.enableIPv4, ...); remote/driver.go:195-204).
    return {
        "NetworkID": NET,
        "EndpointID": endpoint,
        "Interface": {"Address": "", "AddressIPv6": address, "MacAddress": ""},
        "Options": dict(PORTS_80),
    }


def join_28(endpoint: str = EP) -> dict[str, Any]:
    # Options are the sandbox labels: exposed ports and port map (remote/driver.go:276-282,
    # sandbox.go:119-127).
    return {"NetworkID": NET, "EndpointID": endpoint, "SandboxKey": SANDBOX, "Options": PORTS_80}


def program_body(endpoint: str = EP, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"NetworkID": NET, "EndpointID": endpoint, "Options": {**PORTS_80, **(extra or {})}}


def mappings(client: Client, endpoint: str = EP) -> list[str]:
    return sorted(m.describe() for m in client.env.driver.endpoints[endpoint].mappings)


async def test_ipv6_only_network_of_docker_28(client: Client) -> None:
    env = client.env
    await client.ok("/NetworkDriver.CreateNetwork", ipv6_only_network())
    bridge = bridge_name(NET)
    assert [str(a) for a in env.kernel.addresses[bridge]] == ["fd00:213:80::1/64"]
    assert env.sysctl.forwarding_v6 >= 1
    reply = await client.ok("/NetworkDriver.CreateEndpoint", v6_endpoint())
    assert reply["Interface"]["MacAddress"].startswith("02:")
    join = await client.ok("/NetworkDriver.Join", join_28())
    assert join["GatewayIPv6"] == "fd00:213:80::1"
    assert "Gateway" not in join
    # 28 programs the IPv6 gateway with no_proxy_6to4 false: no IPv4 gateway at all
    # (endpoint.go:644-645, 701-705).
    await client.ok(
        "/NetworkDriver.ProgramExternalConnectivity", program_body(extra={NO_PROXY: False})
    )
    assert mappings(client) == [
        "[::]:8053/udp -> [fd00:213:80::2]:53",
        "[::]:8080/tcp -> [fd00:213:80::2]:80",
    ]
    env.kernel.move_to_container(container_veth_name(EP))
    for path in (
        "/NetworkDriver.RevokeExternalConnectivity",
        "/NetworkDriver.Leave",
        "/NetworkDriver.DeleteEndpoint",
    ):
        await client.ok(path, endpoint_ref_body(NET, EP))
    await client.ok("/NetworkDriver.DeleteNetwork", {"NetworkID": NET})
    assert env.kernel.names() == set()
    assert env.host_ports.held == set()


async def test_ipv6_only_network_without_a_gateway(client: Client) -> None:
    """Docker leaves the Gateway out only when it was told to skip it (GwAllocCheck, which
    pybridge asks for isolated families only) or an IPAM gave none: the network is made,
    without an address on its bridge, and Join gives no gateway (Docker then adds
    docker_gwbridge, as it would for any driver)."""
    env = client.env
    await client.ok("/NetworkDriver.CreateNetwork", ipv6_only_network(gateway=False))
    assert env.kernel.addresses.get(bridge_name(NET), []) == []
    await client.ok("/NetworkDriver.CreateEndpoint", v6_endpoint())
    join = await client.ok("/NetworkDriver.Join", join_28())
    assert "Gateway" not in join
    assert "GatewayIPv6" not in join


async def test_ipv4_false_without_ipv6_is_one_sentence(client: Client) -> None:
    body = ipv6_only_network()
    body["IPv6Data"] = []
    body["Options"]["com.docker.network.enable_ipv6"] = False
    status, reply = await client.call("/NetworkDriver.CreateNetwork", body)
    assert status == 500
    assert reply == {
        "Err": "the network would have neither IPv4 nor IPv6: use --ipv4=false together with --ipv6"
    }
    assert client.env.kernel.names() == set()


async def test_ip_family_driver_options_of_docker_28_are_accepted(client: Client) -> None:
    # `-o com.docker.network.enable_ipv6=true` on 28: the daemon applies it and leaves it in
    # the generic options (daemon/network.go:327-338).
    body = create_network_body(NET, v6_subnet="fd00:213:81::/64", v6_gateway="fd00:213:81::1/64")
    body["Options"]["com.docker.network.generic"] = {"com.docker.network.enable_ipv6": "true"}
    await client.ok("/NetworkDriver.CreateNetwork", body)
    assert client.env.driver.networks[NET].enable_ipv6


async def test_gw_alloc_check_skips_the_gateways_of_isolated_families(client: Client) -> None:
    """Docker 28+ asks GwAllocCheck (GwAllocChecker true) with CreateNetwork's Options before
    it allocates anything: an isolated family gets no gateway address from the pool, as with
    Docker's own driver (GetSkipGwAlloc); CreateNetwork then has none, and the bridge and Join
    have none either. Before, pybridge always answered allocate both."""
    env = client.env
    generic = {
        "com.docker.network.bridge.gateway_mode_ipv4": "isolated",
        "com.docker.network.bridge.gateway_mode_ipv6": "isolated",
    }
    body = create_network_body(
        NET, gateway=None, v6_subnet="fd00:213:83::/64", generic=generic, internal=True
    )
    reply = await client.ok("/NetworkDriver.GwAllocCheck", {"Options": body["Options"]})
    assert reply == {"SkipIPv4": True, "SkipIPv6": True}
    await client.ok("/NetworkDriver.CreateNetwork", body)
    assert env.kernel.addresses.get(bridge_name(NET), []) == []
    assert env.sysctl.value(bridge_name(NET), "disable_ipv6") == "1"
    await client.ok(
        "/NetworkDriver.CreateEndpoint",
        create_endpoint_body(NET, EP, "10.50.0.2/24", address_v6="fd00:213:83::2/64"),
    )
    join = await client.ok("/NetworkDriver.Join", join_body(NET, EP))
    assert "Gateway" not in join
    assert "GatewayIPv6" not in join
    # One family isolated: only its gateway is skipped.
    one = {"Options": {**body["Options"], p.GENERIC_OPTIONS: {**generic}}}
    del one["Options"][p.GENERIC_OPTIONS]["com.docker.network.bridge.gateway_mode_ipv4"]
    assert await client.ok("/NetworkDriver.GwAllocCheck", one) == {
        "SkipIPv4": False,
        "SkipIPv6": True,
    }


async def test_gw_alloc_check_refuses_bad_options_before_anything_is_allocated(
    client: Client,
) -> None:
    body = {"Options": ipv6_only_network()["Options"]}
    assert await client.ok("/NetworkDriver.GwAllocCheck", body) == {
        "SkipIPv4": False,
        "SkipIPv6": False,
    }
    body["Options"]["com.docker.network.generic"] = {
        "com.docker.network.bridge.gateway_mode_ipv6": "isolated"
    }
    status, reply = await client.call("/NetworkDriver.GwAllocCheck", body)
    assert (status, reply) == (
        500,
        {
            "Err": "com.docker.network.bridge.gateway_mode_ipv6=isolated can only be used for "
            "an internal network; add --internal"
        },
    )
    status, reply = await client.call("/NetworkDriver.GwAllocCheck", {"Options": "x"})
    assert (status, reply) == (500, {"Err": "Options must be a JSON object, not a string"})
    assert client.env.driver.networks == {}


async def dual_stack_joined(client: Client, endpoint: str = EP) -> None:
    body = create_network_body(NET, v6_subnet="fd00:213:82::/64", v6_gateway="fd00:213:82::1/64")
    if NET not in client.env.driver.networks:
        await client.ok("/NetworkDriver.CreateNetwork", body)
    ep = create_endpoint_body(NET, endpoint, address_v6="fd00:213:82::2/64")
    ep["Options"] = dict(PORTS_80)
    await client.ok("/NetworkDriver.CreateEndpoint", ep)
    await client.ok("/NetworkDriver.Join", join_28(endpoint))


async def test_program_again_without_revoke_follows_the_ipv6_gateway_of_docker_29(
    client: Client,
) -> None:
    """Docker 29 sends Program whenever the endpoint's gateway roles change, with no Revoke
    in between, and the labels Join had plus no_proxy_6to4 = true while another endpoint is
    the IPv6 gateway (docker-v29.0.3 daemon/libnetwork/drivers/remote/driver.go:376-414). Each
    Program replaces the publication exactly; flows of a UDP mapping that went are forgotten."""
    env = client.env
    await dual_stack_joined(client)
    both = [
        "0.0.0.0:8053/udp -> 10.50.0.2:53",
        "0.0.0.0:8080/tcp -> 10.50.0.2:80",
        "[::]:8053/udp -> [fd00:213:82::2]:53",
        "[::]:8080/tcp -> [fd00:213:82::2]:80",
    ]
    await client.ok("/NetworkDriver.ProgramExternalConnectivity", program_body())
    assert mappings(client) == both
    # Another network's endpoint becomes the IPv6 gateway (--gw-priority).
    env.kernel.calls.clear()
    await client.ok(
        "/NetworkDriver.ProgramExternalConnectivity", program_body(extra={NO_PROXY: True})
    )
    assert mappings(client) == both[:2]
    assert {m.family for m in env.host_ports.held} == {4}
    assert {m.family for n in env.firewall.last for m in n.mappings} == {4}
    assert ("forget_flows", "fd00:213:82::2 17/53") in env.kernel.calls
    # ... and stops being it: IPv6 comes back.
    await client.ok("/NetworkDriver.ProgramExternalConnectivity", program_body())
    assert mappings(client) == both
    assert len(env.host_ports.held) == 4
    # The state survives a restart as it is.
    await env.restart()
    assert sorted(m.describe() for m in env.driver.endpoints[EP].mappings) == both


async def test_ipv4_only_gateway_leaves_host_ipv6_to_the_ipv6_gateway(client: Client) -> None:
    """An IPv4-only pybridge endpoint next to another network that is the container's IPv6
    gateway (both versions send no_proxy_6to4 true then): a binding on a host IPv6 address is
    that endpoint's to publish, not a reason to fail the container."""
    await client.ok("/NetworkDriver.CreateNetwork", create_network_body(NET))
    await client.ok("/NetworkDriver.CreateEndpoint", create_endpoint_body(NET, EP))
    await client.ok("/NetworkDriver.Join", join_28())
    options = {
        "com.docker.network.portmap": [
            {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080, "HostPortEnd": 8080},
            {
                "Proto": 6,
                "IP": "",
                "Port": 81,
                "HostIP": "::",
                "HostPort": 8081,
                "HostPortEnd": 8081,
            },
            {
                "Proto": 6,
                "IP": "",
                "Port": 82,
                "HostIP": "2001:db8::1",
                "HostPort": 8082,
                "HostPortEnd": 8082,
            },
        ]
    }
    body: dict[str, Any] = {
        "NetworkID": NET,
        "EndpointID": EP,
        "Options": {**options, NO_PROXY: True},
    }
    await client.ok("/NetworkDriver.ProgramExternalConnectivity", body)
    assert mappings(client) == ["0.0.0.0:8080/tcp -> 10.50.0.2:80"]
    # The same without another IPv6 gateway (28: false) is a mistake, said so.
    await client.ok("/NetworkDriver.RevokeExternalConnectivity", endpoint_ref_body(NET, EP))
    body["Options"][NO_PROXY] = False
    status, reply = await client.call("/NetworkDriver.ProgramExternalConnectivity", body)
    assert status == 500
    assert reply == {
        "Err": "cannot publish tcp port 81 on [::]: the container has no IPv6 address on this "
        "network"
    }
    assert mappings(client) == []


async def test_ipv6_only_gateway_of_docker_28_leaves_host_ipv4_to_the_ipv4_gateway(
    client: Client,
) -> None:
    """28 sends no_proxy_6to4 true to both gateways when they differ (endpoint.go:645,
    704): for an IPv6-only endpoint that means another endpoint is the IPv4 gateway."""
    await client.ok("/NetworkDriver.CreateNetwork", ipv6_only_network())
    await client.ok("/NetworkDriver.CreateEndpoint", v6_endpoint())
    await client.ok("/NetworkDriver.Join", join_28())
    options = {
        "com.docker.network.portmap": [
            {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080, "HostPortEnd": 8080},
            {
                "Proto": 6,
                "IP": "",
                "Port": 81,
                "HostIP": "127.0.0.1",
                "HostPort": 8081,
                "HostPortEnd": 8081,
            },
        ],
        NO_PROXY: True,
    }
    body = {"NetworkID": NET, "EndpointID": EP, "Options": options}
    await client.ok("/NetworkDriver.ProgramExternalConnectivity", body)
    assert mappings(client) == ["[::]:8080/tcp -> [fd00:213:80::2]:80"]


async def test_rollback_of_a_failed_join_in_docker_29(client: Client) -> None:
    """29 wraps Join in `defer ep.sbLeave(...)`: a Join that failed is followed by Leave (its
    Program("", "") fails inside dockerd: the endpoint never got into the remote driver's
    table), then connectToNetwork's rollback deletes the endpoint (docker-v29.0.3
    daemon/libnetwork/endpoint.go:514-523, 536-545, 775-786). Every call must succeed,
    repeated too, and leave nothing behind."""
    env = client.env
    await client.ok("/NetworkDriver.CreateNetwork", create_network_body(NET))
    await client.ok("/NetworkDriver.CreateEndpoint", create_endpoint_body(NET, EP))
    env.kernel.fail["exists"] = HostError("injected: netlink is unwell")
    status, reply = await client.call("/NetworkDriver.Join", join_body(NET, EP))
    assert status == 500
    assert "injected" in reply["Err"]
    del env.kernel.fail["exists"]
    for path in (
        "/NetworkDriver.RevokeExternalConnectivity",  # harmless too
        "/NetworkDriver.Leave",
        "/NetworkDriver.Leave",
        "/NetworkDriver.DeleteEndpoint",
        "/NetworkDriver.DeleteEndpoint",
        "/NetworkDriver.Leave",
    ):
        assert await client.ok(path, endpoint_ref_body(NET, EP)) == {}
    assert env.driver.endpoints == {}
    assert env.kernel.names() == {bridge_name(NET)}
    # The address is free for the next container.
    await client.ok("/NetworkDriver.CreateEndpoint", create_endpoint_body(NET, hexid("next")))


async def test_rollback_of_a_failed_program_in_docker_29(client: Client) -> None:
    """A Program that fails (a host port taken) after a good Join: 29 sends Leave from the
    Join rollback, then Leave again from sbLeave (the first dropped the endpoint from the
    remote driver's table, so the Program("", "") of sbLeave fails inside dockerd), then
    DeleteEndpoint (endpoint.go:539-545, 514-523, 775-786). 28 sends one Leave
    (libnetwork/endpoint.go sbJoin defers). Nothing may stay published or held."""
    env = client.env
    await client.ok("/NetworkDriver.CreateNetwork", create_network_body(NET))
    await client.ok("/NetworkDriver.CreateEndpoint", create_endpoint_body(NET, EP))
    await client.ok("/NetworkDriver.Join", join_28())
    env.host_ports.busy[("udp", 8053)] = "dnsmasq (pid 3)"
    status, reply = await client.call("/NetworkDriver.ProgramExternalConnectivity", program_body())
    assert status == 500
    assert reply == {"Err": "host port 0.0.0.0:8053/udp is already in use by dnsmasq (pid 3)"}
    for path in ("/NetworkDriver.Leave", "/NetworkDriver.Leave", "/NetworkDriver.DeleteEndpoint"):
        assert await client.ok(path, endpoint_ref_body(NET, EP)) == {}
    assert env.host_ports.held == set()
    assert all(not n.mappings for n in env.firewall.last)
    assert env.driver.endpoints == {}


async def test_a_published_endpoint_deleted_without_revoke_in_docker_29(client: Client) -> None:
    """A failure after a good Program: 29's rollback sends Leave twice and DeleteEndpoint, but
    no Revoke (the first Leave dropped the endpoint from the remote driver's table). The
    ports go with DeleteEndpoint."""
    env = client.env
    await client.ok("/NetworkDriver.CreateNetwork", create_network_body(NET))
    await client.ok("/NetworkDriver.CreateEndpoint", create_endpoint_body(NET, EP))
    await client.ok("/NetworkDriver.Join", join_28())
    await client.ok("/NetworkDriver.ProgramExternalConnectivity", program_body())
    assert len(env.host_ports.held) == 2
    for path in ("/NetworkDriver.Leave", "/NetworkDriver.Leave", "/NetworkDriver.DeleteEndpoint"):
        await client.ok(path, endpoint_ref_body(NET, EP))
    assert env.host_ports.held == set()
    assert all(not n.mappings for n in env.firewall.last)


async def test_request_address_of_docker_29_names_the_endpoint(client: Client) -> None:
    # docker-v29.0.3 daemon/libnetwork/network.go:1226: Options carry the endpoint's name.
    pool = await client.ok(
        "/IpamDriver.RequestPool",
        {
            "AddressSpace": "PybridgeLocal",
            "Pool": "10.213.83.0/24",
            "SubPool": "",
            "Options": {},
            "V6": False,
        },
    )
    gateway = {"RequestAddressType": "com.docker.network.gateway"}
    assert (
        await client.ok(
            "/IpamDriver.RequestAddress",
            {"PoolID": pool["PoolID"], "Address": "", "Options": gateway},
        )
    )["Address"] == "10.213.83.1/24"
    named = {"PoolID": pool["PoolID"], "Address": "", "Options": {p.ENDPOINT_NAME: "web"}}
    assert (await client.ok("/IpamDriver.RequestAddress", named))["Address"] == "10.213.83.2/24"
    assert (await client.ok("/IpamDriver.RequestAddress", named))["Address"] == "10.213.83.3/24"


# -- who calls pybridge (for `pydriver prune`) --------------------------------------------------


async def status(client: Client) -> Any:
    async with client.session.post(
        f"http://plugin/{p.STATUS_METHOD}", data=b"", headers={p.TOOL_HEADER: "pydriver"}
    ) as resp:
        assert resp.status == 200
        return p.parse_status_reply(await resp.json(content_type=None))


async def test_status_names_the_process_calling(client: Client) -> None:
    before = time.time()
    assert (await status(client)).callers == ()
    await client.ok("/Plugin.Activate")
    await client.ok("/NetworkDriver.GetCapabilities")
    reply = await status(client)
    assert reply.pid == os.getpid()
    state = os.stat(client.env.store.path)
    assert reply.state_file == (state.st_dev, state.st_ino)
    [caller] = reply.callers
    assert (caller.pid, caller.uid, caller.requests) == (os.getpid(), os.getuid(), 2)
    assert before <= caller.first_seen <= caller.last_seen <= time.time()


async def test_pydrivers_own_requests_and_unknown_routes_are_not_callers(client: Client) -> None:
    async with client.session.post(
        "http://plugin/Plugin.Activate", data=b"", headers={p.TOOL_HEADER: "pydriver"}
    ) as resp:
        assert resp.status == 200
    await client.call("/NetworkDriver.Frobnicate", b"{}")
    assert (await status(client)).callers == ()


async def test_peer_is_read_once_per_connection(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[object] = []

    def counting(sock: Any) -> Peer:
        reads.append(sock)
        return peer_credentials(sock)

    monkeypatch.setattr(server, "peer_credentials", counting)
    for _ in range(5):  # one kept-alive connection
        await client.ok("/Plugin.Activate")
    assert len(reads) == 1
    assert (await status(client)).callers[0].requests == 5


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def get_extra_info(self, name: str) -> Any:
        assert name == "socket"
        return FakeSocket(self.pid)


@dataclass
class FakeSocket:
    pid: int
    family: int = socket.AF_UNIX

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        return struct.pack("=iII", self.pid, 0, 0)


def test_callers_keep_the_most_recent_few() -> None:
    clock = iter(range(1000))
    callers = server.Callers(clock=lambda: float(next(clock)))
    transports = [FakeTransport(100 + i) for i in range(server.Callers.LIMIT + 3)]
    for t in transports:
        callers.saw(t)
    callers.saw(transports[0])  # evicted, then seen again: it is the newest
    pids = [c.pid for c in callers.callers()]
    assert len(pids) == server.Callers.LIMIT
    assert pids[-1] == 100
    assert 101 not in pids
    assert 102 not in pids
    callers.saw(None)  # a request whose connection is already gone
    assert len(callers.callers()) == server.Callers.LIMIT


async def test_prune_sees_pybridge_and_its_callers(client: Client) -> None:
    """The tool side of Pybridge.Status (prune.plugin_facts): pybridge's pid as it says it and
    as seen through the socket agree (one pid namespace), and this process is its caller."""
    await client.ok("/Plugin.Activate")
    facts = await asyncio.to_thread(plugin_facts, client.path)
    assert facts.own_pid == facts.pid_here == os.getpid()
    assert [c.pid for c in facts.callers] == [os.getpid()]
    assert facts.running[os.getpid()]  # its name, read from /proc
    assert [c.requests for c in (await status(client)).callers] == [1]  # prune's did not count


def test_prune_refuses_a_pybridge_without_the_status_route(tmp_path: Path) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="pyb-", dir="/tmp"))
    path = str(sock_dir / "old.sock")
    server_sock = socket.socket(socket.AF_UNIX)
    server_sock.bind(path)
    server_sock.listen()

    def old_pybridge() -> None:
        conn, _ = server_sock.accept()
        with conn:
            conn.recv(65536)
            body = b'{"Err":"pybridge does not implement Pybridge.Status"}\n'
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    thread = threading.Thread(target=old_pybridge)
    thread.start()
    try:
        with pytest.raises(DriverError, match="does not say who calls it"):
            plugin_facts(path)
    finally:
        thread.join()
        server_sock.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    with pytest.raises(DriverError, match="pybridge does not answer on"):
        plugin_facts(path)
