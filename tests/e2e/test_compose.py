"""A pybridge network declared in a compose file, with Compose v1 (bookworm's docker-compose
1.29) and Compose v2 (`docker compose`, sid's docker-compose 2.x, the one users run today;
scripts/test.sh fetches it with dockerd 28)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import DRIVER
from tests.harness import IMAGE, docker, wait_for
from tests.hostenv import ROOT, OutsideHost, firewall_dump, link_names

COMPOSE_FILE = ROOT / "examples" / "compose.yml"
PROJECT = "pbtcompose"


# Compose v2 is a docker CLI plugin: found in $DOCKER_CONFIG/cli-plugins.
COMPOSE_V2 = (
    Path(os.environ.get("DOCKERD28_DIR", ROOT / ".cache" / "docker28"))
    / "root/usr/libexec/docker/cli-plugins/docker-compose"
)


class Compose:
    def __init__(self, version: str, config_dir: str) -> None:
        self.env = dict(os.environ, IMAGE=IMAGE, PYBRIDGE_DRIVER=DRIVER)
        if version == "v1":
            self.argv = ["docker-compose"]
        else:
            assert COMPOSE_V2.exists(), f"{COMPOSE_V2} is missing: scripts/test.sh fetches it"
            plugins = Path(config_dir) / "cli-plugins"
            plugins.mkdir()
            (plugins / "docker-compose").symlink_to(COMPOSE_V2)
            self.env["DOCKER_CONFIG"] = config_dir
            self.argv = ["docker", "compose"]

    def __call__(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            [*self.argv, "-p", PROJECT, "-f", str(COMPOSE_FILE), *args],
            capture_output=True,
            text=True,
            timeout=180,
            env=self.env,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(self.argv)} {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout.strip()


@pytest.fixture(params=["v1", "v2"])
def compose(request: pytest.FixtureRequest, environment: None) -> Iterator[Compose]:
    with tempfile.TemporaryDirectory() as config_dir:
        run = Compose(request.param, config_dir)
        try:
            run("up", "-d")
            yield run
        finally:
            run("down", "--remove-orphans", check=False)


def test_compose_services_by_name_and_published_port(
    compose: Compose, outside: OutsideHost
) -> None:
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
