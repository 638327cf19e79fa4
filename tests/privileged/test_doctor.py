"""`pydriver doctor` against a pybridge in a throwaway namespace, each thing broken on purpose;
and `pydriver status`."""

from __future__ import annotations

import json
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakedocker import FakeDocker
from tests.hostenv import require_root, run
from tests.privileged.serving import Plugin, netns

pytestmark = pytest.mark.privileged

NETWORK = secrets.token_hex(32)
ENDPOINT = secrets.token_hex(32)
BRIDGE = "pyb-" + NETWORK[:11]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Plugin]:
    require_root()
    with netns() as ns, netns() as sandbox:
        plugin = Plugin(ns, tmp_path)
        plugin.start()  # self-healing off: what we break stays broken
        assert (
            plugin.post(
                "NetworkDriver.CreateNetwork",
                {
                    "NetworkID": NETWORK,
                    "Options": {"com.docker.network.generic": {}},
                    "IPv4Data": [{"Pool": "10.213.80.0/24", "Gateway": "10.213.80.1/24"}],
                    "IPv6Data": [],
                },
            )[0]
            == 200
        )
        assert (
            plugin.post(
                "NetworkDriver.CreateEndpoint",
                {
                    "NetworkID": NETWORK,
                    "EndpointID": ENDPOINT,
                    "Interface": {"Address": "10.213.80.2/24"},
                    "Options": {},
                },
            )[0]
            == 200
        )
        assert (
            plugin.post(
                "NetworkDriver.Join",
                {
                    "NetworkID": NETWORK,
                    "EndpointID": ENDPOINT,
                    "SandboxKey": f"/run/netns/{sandbox}",
                },
            )[0]
            == 200
        )
        try:
            yield plugin
        finally:
            plugin.stop()


def doctor(
    plugin: Plugin,
    *extra: str,
    state: Path | None = None,
    ask_docker: bool = False,
    env: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    # The networks made here straight on the socket are unknown to Docker by design, so the
    # Docker cross-check is off unless a test is about it.
    result = run(
        [
            "ip",
            "netns",
            "exec",
            plugin.ns,
            sys.executable,
            "-m",
            "pydriver.cli",
            "doctor",
            "--socket",
            str(plugin.sock),
            "--state-dir",
            str(state or plugin.state),
            "--json",
            *([] if ask_docker else ["--no-docker"]),
            *extra,
        ],
        check=False,
        env=env,
    )
    return result.returncode, json.loads(result.stdout)


def problems(report: dict[str, Any]) -> list[str]:
    return [f["what"] for f in report["findings"] if not f["ok"]]


def in_ns(plugin: Plugin, *argv: str) -> None:
    run(["ip", "netns", "exec", plugin.ns, *argv])


def test_healthy(served: Plugin) -> None:
    code, report = doctor(served)
    assert (code, problems(report)) == (0, [])
    assert report["healthy"] is True


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (["sysctl", "-qw", "net.ipv4.ip_forward=0"], "IPv4 forwarding is off"),
        (
            ["iptables-nft", "-D", "FORWARD", "-j", "PYBRIDGE-FORWARD"],
            "IPv4 firewall: filter: jump '-A FORWARD -j PYBRIDGE-FORWARD' missing",
        ),
        (
            ["iptables-nft", "-I", "PYBRIDGE-FORWARD", "-s", "203.0.113.7/32", "-j", "ACCEPT"],
            "IPv4 firewall: filter: pybridge rules differ (0 missing, 1 unexpected)",
        ),
        (
            ["iptables-nft", "-t", "nat", "-F", "PYBRIDGE-POSTROUTING"],
            "IPv4 firewall: nat: pybridge rules differ",
        ),
        (["ip", "link", "del", BRIDGE], f"has no bridge {BRIDGE}"),
        (
            ["ip", "link", "add", "pyb-00000000000", "type", "bridge"],
            "pyb-00000000000 looks like pybridge's but no state refers to it",
        ),
        (["ip", "link", "del", "pyv" + ENDPOINT[:12]], "has lost its veth"),
        (
            ["ip", "route", "add", "10.213.80.0/25", "dev", "lo"],
            "overlaps the host route 10.213.80.0/25 on lo",
        ),
    ],
)
def test_each_breakage_is_found(served: Plugin, breakage: list[str], expected: str) -> None:
    in_ns(served, *breakage)
    code, report = doctor(served)
    assert code == 1
    found = problems(report)
    assert any(expected in p for p in found), found
    assert all(f["fix"] for f in report["findings"] if not f["ok"])


def test_plugin_not_answering(served: Plugin) -> None:
    served.stop()
    code, report = doctor(served)
    assert code == 1
    assert any("pybridge does not answer on" in p for p in problems(report))


def test_damaged_state_database(served: Plugin, tmp_path: Path) -> None:
    copy = tmp_path / "damaged"
    shutil.copytree(served.state, copy)
    db = copy / "state.db"
    data = bytearray(db.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)
    db.write_bytes(bytes(data))
    for extra in ("state.db-wal", "state.db-shm"):
        (copy / extra).unlink(missing_ok=True)
    code, report = doctor(served, state=copy)
    assert code == 1
    assert any("state database" in p for p in problems(report)), problems(report)


def test_backend_mismatch(served: Plugin) -> None:
    """Docker's chains in nf_tables, pybridge told to use legacy: the classic silent failure."""
    served.stop()
    in_ns(served, "iptables-nft", "-N", "DOCKER-USER")
    served.start(PYDRIVER_FIREWALL_BACKEND="legacy")
    code, report = doctor(served, "--firewall-backend", "legacy")
    assert code == 1
    assert any(
        "Docker's rules are in iptables-nft but pybridge's are in iptables-legacy" in p
        for p in problems(report)
    ), problems(report)


def test_backend_mismatch_found_by_the_chain_pybridge_itself_looks_for(served: Plugin) -> None:
    """Docker's rules are recognised as pybridge's own backend detection recognises them: a
    DOCKER chain is enough (doctor used to look for DOCKER-USER only)."""
    served.stop()
    in_ns(served, "iptables-nft", "-N", "DOCKER")
    served.start(PYDRIVER_FIREWALL_BACKEND="legacy")
    code, report = doctor(served, "--firewall-backend", "legacy")
    assert code == 1
    assert any(
        "Docker's rules are in iptables-nft but pybridge's are in iptables-legacy" in p
        for p in problems(report)
    ), problems(report)


def status(served: Plugin, *flags: str) -> str:
    """`pydriver status --no-names` in the plugin's namespace, as an operator runs it."""
    argv = [sys.executable, "-m", "pydriver.cli", "status", "--state-dir", str(served.state)]
    return run(["ip", "netns", "exec", served.ns, *argv, "--no-names", *flags]).stdout


def test_status(served: Plugin) -> None:
    data = json.loads(status(served, "--json"))
    assert [n["bridge"] for n in data["networks"]] == [BRIDGE]
    assert data["networks"][0]["subnets"] == [
        {"subnet": "10.213.80.0/24", "gateway": "10.213.80.1"}
    ]
    [endpoint] = data["endpoints"]
    assert endpoint["addresses"] == ["10.213.80.2/24"]
    assert endpoint["mac_address"] == "02:50:0a:d5:50:02"
    text = status(served)
    assert BRIDGE in text
    assert "10.213.80.2/24" in text
    assert "pyv" + ENDPOINT[:12] in text


def test_networks_docker_does_not_know_are_found_and_pruned(served: Plugin) -> None:
    """Docker (a stand-in daemon served by this process, which also made the network on
    pybridge's socket, as dockerd does) knows no network: doctor says so, prune removes it."""
    short = Path(tempfile.mkdtemp(prefix="pb", dir="/tmp"))
    try:
        with FakeDocker(short / "docker.sock") as fake:
            env = {"DOCKER_HOST": fake.host}
            code, report = doctor(served, ask_docker=True, env=env)
            assert code == 1
            assert any(
                f"network {NETWORK[:12]} (bridge {BRIDGE}) is in pybridge's state but Docker "
                "does not know it" in p
                for p in problems(report)
            ), problems(report)
            prune = [
                "ip",
                "netns",
                "exec",
                served.ns,
                sys.executable,
                "-m",
                "pydriver.cli",
                "prune",
                "--socket",
                str(served.sock),
                "--state-dir",
                str(served.state),
            ]
            listed = run([*prune, "--dry-run"], env=env).stdout
            assert f"would remove network {NETWORK[:12]}" in listed
            assert f"removed network {NETWORK[:12]}" in run([*prune, "--yes"], env=env).stdout
            links = run(["ip", "netns", "exec", served.ns, "ip", "-o", "link"]).stdout
            assert BRIDGE not in links
            code, report = doctor(served, ask_docker=True, env=env)
            assert (code, problems(report)) == (0, [])
            # A managed plugin named pybridge:latest beside this (host service) socket: dockerd
            # would read -d pybridge as it.
            fake.set(
                plugins=[
                    {
                        "Id": "ab" * 32,
                        "Name": "pybridge:latest",
                        "Enabled": False,
                        "Config": {"Description": "pybridge"},
                        "Settings": {},
                        "PluginReference": "pybridge:latest",
                    }
                ]
            )
            code, report = doctor(served, ask_docker=True, env=env)
            assert code == 1
            assert [p for p in problems(report) if "the managed plugin pybridge:latest" in p]
    finally:
        shutil.rmtree(short, ignore_errors=True)
