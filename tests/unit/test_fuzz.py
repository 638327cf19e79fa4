"""Property-based fuzzing of every route over a real Unix socket (driver over fakes, real
state database): whatever arrives, the reply is JSON with a plain Err sentence or a success,
the server stays up, and a rejected request changes no state."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pydriver.driver import NetworkDriver
from pydriver.ipamdriver import IpamDriver
from pydriver.server import Api, make_app
from pydriver.store import SqliteStore, SyncStore
from tests.fuzzing import BODIES, RAW_BODIES, ROUTES, check_reply
from tests.hostenv import post_raw

from .fakes import FakeFirewall, FakeHostPorts, FakeKernel, FakeSysctl


class Served:
    def __init__(self, socket_path: str, state_dir: Path) -> None:
        self.socket = socket_path
        self.state_dir = state_dir


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    state_dir = tmp_path_factory.mktemp("fuzz-state")
    sock = f"/tmp/pbfuzz-{threading.get_ident()}.sock"
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, object] = {}

    async def start() -> web.AppRunner:
        store = SqliteStore(state_dir)
        host_ports = FakeHostPorts()
        driver = NetworkDriver(
            store,
            FakeKernel(),
            FakeFirewall(),
            FakeSysctl(),
            host_ports=host_ports,
            port_holder=host_ports.holder,
        )
        ipam = IpamDriver(store, FakeKernel().routes)
        await driver.load()
        await ipam.load()
        runner = web.AppRunner(make_app(Api(driver, ipam)))
        await runner.setup()
        await web.UnixSite(runner, sock).start()
        holder["store"] = store
        return runner

    def serve() -> None:
        asyncio.set_event_loop(loop)
        holder["runner"] = loop.run_until_complete(start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield Served(sock, state_dir)
    finally:
        runner = holder["runner"]
        assert isinstance(runner, web.AppRunner)
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        store = holder["store"]
        assert isinstance(store, SqliteStore)
        store.close()


def snapshot(state_dir: Path) -> str:
    store = SyncStore(state_dir)
    try:
        rows = [
            store.db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("networks", "endpoints", "pools", "addresses")
        ]
    finally:
        store.close()
    return json.dumps(rows)


FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(method=st.sampled_from(ROUTES), body=RAW_BODIES)
def test_any_bytes_to_any_route(served: Served, method: str, body: bytes) -> None:
    before = snapshot(served.state_dir)
    status, reply = post_raw(served.socket, method, body)
    check_reply(status, reply)
    if status != 200:
        assert snapshot(served.state_dir) == before, "a rejected request changed the state"


@FUZZ
@given(method=st.sampled_from(ROUTES), body=BODIES)
def test_docker_shaped_objects_with_wrong_fields(
    served: Served, method: str, body: dict[str, object]
) -> None:
    before = snapshot(served.state_dir)
    status, reply = post_raw(served.socket, method, json.dumps(body).encode())
    check_reply(status, reply)
    if status != 200:
        assert snapshot(served.state_dir) == before, "a rejected request changed the state"


def test_oversized_body_and_server_still_up(served: Served) -> None:
    status, reply = post_raw(served.socket, "NetworkDriver.CreateNetwork", b" " * (2 * 1024 * 1024))
    check_reply(status, reply)
    assert status == 500
    assert "larger than" in reply["Err"]
    assert post_raw(served.socket, "Plugin.Activate", b"") == (
        200,
        {"Implements": ["NetworkDriver", "IpamDriver"]},
    )
