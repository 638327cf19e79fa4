"""How prune finds and reads the Docker daemon: the endpoint the docker CLI resolves, and the
Engine API on a Unix socket (a stand-in daemon served by this very process)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pydriver.dockerapi import _networks, docker_host, look_at
from pydriver.errors import DriverError
from pydriver.pruning import DockerNetwork
from tests.fakedocker import FakeDocker, network

from .fakes import hexid


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pyb-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_look_at_reads_networks_plugins_and_the_serving_process(sock_dir: Path) -> None:
    nets = [network(hexid("a"), "10.9.0.0/24", "fd00:9::/64"), network(hexid("b"))]
    with FakeDocker(sock_dir / "d.sock", nets, [{"Id": hexid("plugin"), "Name": "x"}]) as fake:
        facts = look_at(fake.host, str(fake.path))
    assert facts.pids == frozenset({os.getpid()})
    assert facts.plugin_ids == frozenset({hexid("plugin")})
    assert facts.networks == (
        DockerNetwork(hexid("a"), ("10.9.0.0/24", "fd00:9::/64")),
        DockerNetwork(hexid("b"), ()),
    )


def test_nobody_listening(sock_dir: Path) -> None:
    with pytest.raises(DriverError, match=r"cannot ask the Docker daemon at .*d\.sock"):
        look_at("unix://x", str(sock_dir / "d.sock"))


def test_something_that_is_not_docker(sock_dir: Path) -> None:
    path = sock_dir / "d.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"SSH-2.0-OpenSSH\r\n")

        thread = threading.Thread(target=answer)
        thread.start()
        with pytest.raises(DriverError, match="did not answer as a Docker daemon"):
            look_at("unix://x", str(path))
        thread.join()


def test_network_listing_in_an_unexpected_form() -> None:
    with pytest.raises(DriverError, match="listed its networks in a form"):
        _networks({"message": "no"}, "/d.sock")
    with pytest.raises(DriverError, match="listed a network without an id"):
        _networks([{"Name": "x"}], "/d.sock")
    # Missing or null IPAM parts are no subnets, not errors.
    assert _networks(
        [{"Id": "a", "IPAM": None}, {"Id": "b", "IPAM": {"Config": None}}], "/d.sock"
    ) == (DockerNetwork("a"), DockerNetwork("b"))


@pytest.mark.skipif(shutil.which("docker") is None, reason="needs the docker CLI")
def test_docker_host_is_what_the_cli_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://192.0.2.1:2375")
    assert docker_host() == "tcp://192.0.2.1:2375"
    monkeypatch.setenv("DOCKER_HOST", "unix:///tmp/elsewhere.sock")
    assert docker_host() == "unix:///tmp/elsewhere.sock"
    monkeypatch.delenv("DOCKER_HOST")
    monkeypatch.setenv("DOCKER_CONTEXT", "no-such-context-pbt")
    with pytest.raises(DriverError, match="the docker CLI cannot say which Docker daemon it uses"):
        docker_host()


def test_docker_host_without_the_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DriverError, match="cannot run the docker CLI"):
        docker_host()
