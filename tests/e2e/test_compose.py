"""A pybridge network declared in a compose file (Debian's docker-compose)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import DRIVER, IMAGE, docker, wait_for
from tests.hostenv import ROOT, OutsideHost, firewall_dump, link_names

COMPOSE_FILE = ROOT / "examples" / "compose.yml"
PROJECT = "pbtcompose"


def compose(*args: str, check: bool = True) -> str:
    env = dict(os.environ, IMAGE=IMAGE, PYBRIDGE_DRIVER=DRIVER)
    done = subprocess.run(
        ["docker-compose", "-p", PROJECT, "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker-compose {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout.strip()


@pytest.fixture
def project(environment: None) -> Iterator[None]:
    try:
        compose("up", "-d")
        yield
    finally:
        compose("down", "--remove-orphans", check=False)


def test_compose_services_by_name_and_published_port(project: None, outside: OutsideHost) -> None:
    network = f"{PROJECT}_app"
    info = docker("network", "inspect", "-f", "{{.Driver}} {{.IPAM.Driver}}", network)
    assert info == f"{DRIVER} {DRIVER}"
    client_ip = compose("exec", "-T", "client", "hostname", "-i").split()[0]
    # By name, through Docker's embedded DNS.
    assert compose("exec", "-T", "client", "nc", "-w", "3", "web", "80") == client_ip
    # Through the published port, from another host.
    assert wait_for(
        lambda: (
            outside.exec("busybox", "nc", "-w", "3", outside.host_ip, "18800", check=False).strip()
            == outside.ip
        ),
        timeout=10,
    )
    network_id = docker("network", "inspect", "-f", "{{.Id}}", network)
    compose("down")
    assert wait_for(lambda: "pyb-" + network_id[:11] not in link_names(), timeout=10)
    assert wait_for(lambda: "18800" not in firewall_dump(), timeout=5)
