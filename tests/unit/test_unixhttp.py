"""The one HTTP-over-Unix-socket client (unixhttp.py) and doctor's probe through it, against a
real pybridge app and against sockets that answer oddly."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from pydriver import protocol as p
from pydriver.checks import Probe
from pydriver.doctor import probe
from pydriver.errors import DriverError
from pydriver.server import Api, make_app
from pydriver.unixhttp import call_pybridge, request

from .conftest import Env


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pyb-", dir="/tmp"))  # short: sun_path is 108 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def serve_once(path: Path, answer: Callable[[socket.socket, bytes], None]) -> threading.Thread:
    """Accept one connection on ``path``, read the request, and let ``answer`` reply."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def run() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                answer(conn, data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def http_answer(body: bytes, status: str = "200 OK") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def test_request_returns_once_the_server_is_done(sock_dir: Path) -> None:
    """pybridge records some answers as sent after sending them: a caller that goes on at once
    could see the state before that. request() returns when the server closes."""
    seen: list[bytes] = []

    def answer(conn: socket.socket, data: bytes) -> None:
        seen.append(data)
        conn.sendall(http_answer(b'{"a": 1}'))
        time.sleep(0.3)  # still at work after answering

    path = sock_dir / "s.sock"
    thread = serve_once(path, answer)
    started = time.monotonic()
    answer_ = request(str(path), "POST", "/X.Y", b"{}", {"Accept": "x"})
    assert time.monotonic() - started >= 0.3
    thread.join()
    assert (answer_.status, answer_.json(), answer_.listener) == (200, {"a": 1}, os.getpid())
    head = seen[0].decode()
    assert head.startswith("POST /X.Y HTTP/1.1\r\n")
    assert "Content-Length: 2\r\n" in head
    assert "Accept: x\r\n" in head
    assert "Content-Type" not in head  # as dockerd: no Content-Type


def test_call_pybridge_marks_itself_and_sends_no_body_without_arguments(sock_dir: Path) -> None:
    seen: list[bytes] = []

    def answer(conn: socket.socket, data: bytes) -> None:
        seen.append(data)
        conn.sendall(http_answer(b"{}"))

    path = sock_dir / "s.sock"
    thread = serve_once(path, answer)
    reply = call_pybridge(str(path), *p.status_request())
    thread.join()
    assert (reply.status, reply.body) == (200, {})
    assert f"{p.TOOL_HEADER}: pydriver\r\n" in seen[0].decode()
    assert seen[0].endswith(b"Content-Length: 0\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize(
    "reply",
    [
        b"",  # closes without a word
        b"SSH-2.0-OpenSSH\r\n",  # not HTTP
        http_answer(b"<html>"),  # HTTP, not JSON
    ],
)
def test_what_is_not_pybridge(sock_dir: Path, reply: bytes) -> None:
    path = sock_dir / "s.sock"
    thread = serve_once(path, lambda conn, _: conn.sendall(reply))
    with pytest.raises(DriverError, match="pybridge's answer is not HTTP with a JSON body"):
        call_pybridge(str(path), "Plugin.Activate")
    thread.join()
    path.unlink()
    thread = serve_once(path, lambda conn, _: conn.sendall(reply))
    assert probe(str(path)) == Probe()  # something answers, not as pybridge
    thread.join()


def test_probe_of_a_socket_nobody_serves(sock_dir: Path) -> None:
    assert probe(str(sock_dir / "none.sock")) == Probe(error="No such file or directory")
    with pytest.raises(FileNotFoundError, match="No such file"):
        call_pybridge(str(sock_dir / "none.sock"), "Plugin.Activate")


def test_probe_of_another_plugin(sock_dir: Path) -> None:
    path = sock_dir / "s.sock"
    thread = serve_once(path, lambda conn, _: conn.sendall(http_answer(b'{"Implements": []}')))
    assert probe(str(path)) == Probe(pybridge=False)
    thread.join()


async def test_probe_of_pybridge_is_not_counted_as_a_caller(env: Env, sock_dir: Path) -> None:
    api = Api(env.driver, env.ipam)
    runner = web.AppRunner(make_app(api), access_log=None)
    await runner.setup()
    try:
        await web.UnixSite(runner, str(sock_dir / "pb.sock")).start()
        assert await asyncio.to_thread(probe, str(sock_dir / "pb.sock")) == Probe(pybridge=True)
    finally:
        await runner.cleanup()
    assert api.callers.callers() == ()


def test_request_builders() -> None:
    assert p.activate_request() == ("Plugin.Activate", {})
    assert p.implements(p.activate_reply()) == ("NetworkDriver", "IpamDriver")
    assert p.implements({"Implements": "NetworkDriver"}) == ()
    assert p.implements(["NetworkDriver"]) == ()
    assert p.delete_endpoint_request("n", "e") == (
        "NetworkDriver.DeleteEndpoint",
        {"NetworkID": "n", "EndpointID": "e"},
    )
    assert p.delete_network_request("n") == ("NetworkDriver.DeleteNetwork", {"NetworkID": "n"})
    assert p.release_pool_request("10.1.0.0/24") == (
        "IpamDriver.ReleasePool",
        {"PoolID": "10.1.0.0/24"},
    )
    # What the server parses back is what was built.
    assert p.parse_endpoint_ref(p.delete_endpoint_request("a" * 64, "b" * 64)[1]).endpoint_id == (
        "b" * 64
    )
    assert p.parse_release_pool(p.release_pool_request("10.1.0.0/24")[1]).pool_id == "10.1.0.0/24"
