"""`pydriver prune` with a real dockerd: it refuses a daemon that is not the one using pybridge
(DOCKER_HOST pointing at a stand-in daemon on another socket) and removes nothing then; it
refuses without a terminal unless --yes; against the real daemon it removes exactly what that
daemon forgot, and keeps the pybridge IPAM pool of a network the daemon still has."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pydriver.store import read_pools, read_state
from tests.e2e.conftest import DRIVER, MODE, Docker, Plugin, free_subnet, plugin_socket
from tests.fakedocker import FakeDocker
from tests.harness import docker
from tests.hostenv import post_raw

STATE = Path("/var/lib/pydriver")


def prune(*flags: str, docker_host: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if docker_host:
        env["DOCKER_HOST"] = docker_host
    return subprocess.run(
        [sys.executable, "-m", "pydriver.cli", "prune", "--socket", plugin_socket(), *flags],
        env=env,
        stdin=subprocess.DEVNULL,  # no terminal
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def call(method: str, body: dict[str, object]) -> dict[str, object]:
    status, reply = post_raw(plugin_socket(), method, json.dumps(body).encode())
    assert status == 200, (method, reply)
    assert isinstance(reply, dict)
    return reply


def state() -> tuple[set[str], set[str]]:
    """(network ids, pool subnets) in pybridge's state."""
    return {n.id for n in read_state(STATE)[0]}, {str(p.subnet) for p in read_pools(STATE)}


def lines(text: str, prefix: str) -> set[str]:
    return {line.removeprefix(prefix) for line in text.splitlines() if line.startswith(prefix)}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pbt", dir="/tmp"))  # Unix socket paths: 108 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_prune_removes_only_what_the_daemon_using_pybridge_forgot(
    d: Docker, plugin: Plugin, short_dir: Path
) -> None:
    # A network the daemon has, on an automatic subnet of pybridge's IPAM: its pool must stay.
    kept = d.network("--ipam-driver", DRIVER)
    kept_id = docker("network", "inspect", "-f", "{{.Id}}", kept)
    [kept_subnet] = [c["Subnet"] for c in d.network_info(kept)["IPAM"]["Config"]]  # type: ignore[index]
    # What the daemon forgot: a network and its pool pybridge has and the daemon does not, as
    # when a network is removed while pybridge is away (made here on pybridge's socket: a real
    # `docker network rm` with pybridge down waits ~30 s per call for the plugin).
    subnet = free_subnet(95)
    gone = secrets.token_hex(32)
    call(
        "IpamDriver.RequestPool",
        {"AddressSpace": "PybridgeLocal", "Pool": subnet, "Options": {}, "V6": False},
    )
    call(
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": gone,
            "Options": {"com.docker.network.generic": {}},
            "IPv4Data": [
                {
                    "AddressSpace": "PybridgeLocal",
                    "Pool": subnet,
                    "Gateway": subnet.replace("0/24", "1/24"),
                }
            ],
            "IPv6Data": [],
        },
    )
    try:
        # Restarted, pybridge has no caller. prune leaves alone pools requested in the last
        # minute (a network may be being created with them): these two are made an hour old
        # while pybridge is stopped, so the kept one would be listed if prune got it wrong.
        plugin.stop()
        try:
            db = sqlite3.connect(STATE / "state.db")
            with db:
                db.executemany(
                    "UPDATE pools SET recorded_at = recorded_at - 3600 WHERE id = ?",
                    [(subnet,), (kept_subnet,)],
                )
            db.close()
        finally:
            plugin.start()
        before = state()
        assert gone in before[0]
        assert kept_id in before[0]
        assert {subnet, kept_subnet} <= before[1]

        with FakeDocker(short_dir / "docker.sock") as fake:  # a daemon knowing no network
            result = prune("--yes", docker_host=fake.host)
        assert result.returncode == 1, result
        assert "pybridge on" in result.stderr
        assert len(result.stderr.splitlines()) == 1
        assert state() == before

        # dockerd calls pybridge (a host service records its pid).
        d.network()
        before = state()
        with FakeDocker(short_dir / "docker.sock") as fake:
            result = prune("--yes", docker_host=fake.host)
        assert result.returncode == 1, result
        if MODE == "managed":
            assert "is the managed plugin" in result.stderr, result.stderr
        else:
            assert "(dockerd), not by the Docker daemon at unix://" in result.stderr, result.stderr
            assert f"(pid {os.getpid()})" in result.stderr
        assert "removes nothing" in result.stderr
        assert state() == before

        result = prune()
        assert result.returncode == 1
        assert "no terminal to ask on: pass --yes" in result.stderr
        assert state() == before

        expected = {
            f"network {gone[:12]} (bridge pyb-{gone[:11]}, {subnet})",
            f"IPAM pool {subnet} ({subnet})",
        }
        listed = prune("--dry-run")
        assert listed.returncode == 0, listed
        assert lines(listed.stdout, "would remove ") == expected, listed.stdout
        done = prune("--yes")
        assert done.returncode == 0, done
        assert lines(done.stdout, "removed ") == expected, done.stdout
        networks, pools = state()
        assert networks == before[0] - {gone}
        assert pools == before[1] - {subnet}
        assert kept_subnet in pools
    finally:
        if gone in state()[0]:
            call("NetworkDriver.DeleteNetwork", {"NetworkID": gone})
        if subnet in state()[1]:
            call("IpamDriver.ReleasePool", {"PoolID": subnet})
