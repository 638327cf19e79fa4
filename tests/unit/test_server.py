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
from pydriver.doctor import plugin_facts
from pydriver.errors import DriverError
from pydriver.naming import bridge_name, container_veth_name, host_veth_name
from pydriver.peers import Peer, peer_credentials
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
    runner = web.AppRunner(make_app(Api(env.driver, env.ipam)), access_log=None)
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


@pytest.mark.parametrize("name", ["dockerd-20.10.24.jsonl", "dockerd-26.1.5.jsonl"])
async def test_corpus_replay(client: Client, name: str) -> None:
    """Replay every recorded request in order. The only errors are the recorder's own IPAM
    pool (10.215.0.0/24), which pybridge's IPAM never handed out; afterwards nothing is left."""
    corpus = Path(__file__).resolve().parent.parent / "data" / "corpus" / name
    for line in corpus.read_text().splitlines():
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
    assert pids[-1] == 100 and 101 not in pids and 102 not in pids
    callers.saw(None)  # a request whose connection is already gone
    assert len(callers.callers()) == server.Callers.LIMIT


async def test_prune_sees_pybridge_and_its_callers(client: Client) -> None:
    """The tool side of Pybridge.Status (doctor.plugin_facts): pybridge's pid as it says it and
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
