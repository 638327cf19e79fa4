"""A real `pydriver serve` (in a throwaway network namespace) that runs out of file descriptors
while publishing ports: the request fails with one sentence, the previous publication stays
exactly as it was, no socket leaks, and the same request works once the limit is raised."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any

import pytest

from pydriver.store import read_state
from tests.hostenv import require_root, run
from tests.privileged.serving import Plugin, netns

pytestmark = pytest.mark.privileged

OUT_OF_FDS = "pybridge has run out of file descriptors"


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def set_limit(pid: int, soft: int) -> None:
    """Set the soft limit only (raising a hard limit needs CAP_SYS_RESOURCE)."""
    run(["prlimit", f"--pid={pid}", f"--nofile={soft}:"])


_TRY_BIND = """
import socket, sys
s = socket.socket()
try:
    s.bind(("0.0.0.0", int(sys.argv[1])))
except OSError:
    print("held")
"""


def held(ns: str, port: int) -> bool:
    """Whether something in ``ns`` holds TCP ``port`` (a bind there fails)."""
    argv = ["ip", "netns", "exec", ns, sys.executable, "-c", _TRY_BIND, str(port)]
    return run(argv).stdout.strip() == "held"


def portmap(ports: range) -> dict[str, Any]:
    return {
        "com.docker.network.portmap": [
            {"Proto": 6, "IP": "", "Port": p, "HostIP": "", "HostPort": p, "HostPortEnd": p}
            for p in ports
        ]
    }


def test_running_out_of_descriptors_fails_the_request_cleanly(tmp_path: Path) -> None:
    require_root()
    with netns() as ns, netns() as sandbox:
        plugin = Plugin(ns, tmp_path)
        plugin.start()
        try:
            assert plugin.proc is not None
            pid = plugin.proc.pid
            assert "open file limit" in plugin.log.read_text()
            nid, eid = secrets.token_hex(32), secrets.token_hex(32)

            def call(method: str, body: dict[str, Any]) -> dict[str, Any]:
                status, reply = plugin.post(method, body)
                assert status == 200, (method, reply)
                return reply  # type: ignore[no-any-return]

            call(
                "NetworkDriver.CreateNetwork",
                {
                    "NetworkID": nid,
                    "Options": {"com.docker.network.generic": {}},
                    "IPv4Data": [{"Pool": "10.213.80.0/24", "Gateway": "10.213.80.1/24"}],
                    "IPv6Data": [],
                },
            )
            ref = {"NetworkID": nid, "EndpointID": eid}
            iface = {"Address": "10.213.80.2/24", "AddressIPv6": "", "MacAddress": ""}
            call("NetworkDriver.CreateEndpoint", {**ref, "Interface": iface, "Options": {}})
            call("NetworkDriver.Join", {**ref, "SandboxKey": f"/run/netns/{sandbox}"})
            call(
                "NetworkDriver.ProgramExternalConnectivity",
                {**ref, "Options": portmap(range(21000, 21005))},
            )
            assert plugin.consistent() == []

            # Room for a few more descriptors (a connection, a pipe or two), not for 300.
            baseline = open_fds(pid)
            set_limit(pid, baseline + 20)
            status, reply = plugin.post(
                "NetworkDriver.ProgramExternalConnectivity",
                {**ref, "Options": portmap(range(22000, 22300))},
            )
            assert status == 500
            assert OUT_OF_FDS in reply["Err"], reply
            assert reply["Err"].startswith("cannot hold host port 0.0.0.0:22"), reply
            assert "\n" not in reply["Err"]
            # Nothing leaked, the old ports are held and published as before.
            assert open_fds(pid) <= baseline
            _, endpoints = read_state(plugin.state)
            assert [m.host_port for m in endpoints[0].mappings] == list(range(21000, 21005))
            assert plugin.consistent() == []
            assert held(ns, 21004)
            assert not held(ns, 22000)

            set_limit(pid, baseline + 400)
            call(
                "NetworkDriver.ProgramExternalConnectivity",
                {**ref, "Options": portmap(range(22000, 22300))},
            )
            _, endpoints = read_state(plugin.state)
            assert len(endpoints[0].mappings) == 300
            assert plugin.consistent() == []
            assert open_fds(pid) >= baseline + 300 - 5

            call("NetworkDriver.RevokeExternalConnectivity", ref)
            call("NetworkDriver.Leave", ref)
            call("NetworkDriver.DeleteEndpoint", ref)
            call("NetworkDriver.DeleteNetwork", {"NetworkID": nid})
            assert plugin.consistent() == []
            assert open_fds(pid) <= baseline
        finally:
            plugin.stop()
