"""A real `pydriver serve` (in a throwaway network namespace) whose state has a row it cannot
decode: it starts anyway, serves every other network, and state and kernel agree."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from pydriver.store import DB_NAME, read_state
from tests.hostenv import require_root, run
from tests.privileged.serving import Plugin, netns

pytestmark = pytest.mark.privileged


def create(plugin: Plugin, third: int) -> tuple[str, str]:
    nid, eid = secrets.token_hex(32), secrets.token_hex(32)
    for method, body in (
        (
            "NetworkDriver.CreateNetwork",
            {
                "NetworkID": nid,
                "Options": {"com.docker.network.generic": {}},
                "IPv4Data": [{"Pool": f"10.213.{third}.0/24", "Gateway": f"10.213.{third}.1/24"}],
                "IPv6Data": [],
            },
        ),
        (
            "NetworkDriver.CreateEndpoint",
            {
                "NetworkID": nid,
                "EndpointID": eid,
                "Interface": {"Address": f"10.213.{third}.2/24"},
                "Options": {},
            },
        ),
    ):
        status, reply = plugin.post(method, body)
        assert status == 200, (method, reply)
    return nid, eid


def test_a_row_that_cannot_be_read_does_not_stop_start_up(tmp_path: Path) -> None:
    require_root()
    with netns() as ns:
        plugin = Plugin(ns, tmp_path)
        plugin.start()
        try:
            broken, _ = create(plugin, 81)
            kept, kept_ep = create(plugin, 82)
            assert plugin.consistent() == []
            plugin.stop()
            db = sqlite3.connect(plugin.state / DB_NAME)
            with db:
                db.execute("UPDATE networks SET data='{\"oops' WHERE id=?", (broken,))
            db.close()

            plugin.start()
            log = plugin.log.read_text()
            assert f"the network row {broken} cannot be read" in log
            assert "set aside in the quarantine table" in log
            networks, endpoints = read_state(plugin.state)
            assert [n.id for n in networks] == [kept]
            assert [e.id for e in endpoints] == [kept_ep]
            assert plugin.consistent() == []  # the broken network's bridge and veth are gone
            links = run(["ip", "netns", "exec", ns, "ip", "-o", "link", "show"]).stdout
            assert f"pyb-{broken[:11]}" not in links
            assert f"pyb-{kept[:11]}" in links
            # The rest is served; the network set aside is refused by name.
            body: dict[str, Any] = {"NetworkID": kept, "EndpointID": kept_ep}
            status, _ = plugin.post("NetworkDriver.DeleteEndpoint", body)
            assert status == 200
            status, reply = plugin.post(
                "NetworkDriver.CreateEndpoint",
                {
                    "NetworkID": broken,
                    "EndpointID": secrets.token_hex(32),
                    "Interface": {"Address": "10.213.81.3/24"},
                    "Options": {},
                },
            )
            assert status == 500
            assert "not known to pybridge" in reply["Err"]
            # Docker removing it is fine (a no-op), and creating it again works.
            assert plugin.post("NetworkDriver.DeleteNetwork", {"NetworkID": broken})[0] == 200
            again, _ = create(plugin, 81)
            assert plugin.consistent() == []
            for nid in (again, kept):
                assert plugin.post("NetworkDriver.DeleteNetwork", {"NetworkID": nid})[0] == 200
            assert plugin.consistent() == []
        finally:
            plugin.stop()
