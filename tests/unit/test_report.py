"""What `ports`, `status` and `doctor` print: one table layout, the findings as text and JSON."""

from __future__ import annotations

import json
from typing import Any

from pydriver.checks import Finding
from pydriver.report import (
    findings_json,
    findings_text,
    format_ports,
    format_status,
    healthy,
    table,
)

NET = "94a3577c551e" + "0" * 52
EP = "404b28d817e8" + "1" * 52


def test_table_pads_columns_and_trims_line_ends() -> None:
    assert table(("A", "LONG", "C"), [("xyz", "", "1"), ("", "b", "")]) == [
        "A    LONG  C",
        "xyz        1",
        "     b",
    ]
    assert table(("ONLY",), []) == ["ONLY"]


PORT: dict[str, Any] = {
    "container": "web",
    "network": "mynet",
    "network_id": NET,
    "endpoint_id": EP,
    "bridge": "pyb-94a3577c551",
    "proto": "tcp",
    "host": "0.0.0.0:8080",
    "target": "10.213.80.2:80",
}


def test_ports() -> None:
    unnamed = {**PORT, "container": None, "network": None, "host": "127.0.0.1:53"}
    assert format_ports([PORT, unnamed]).splitlines() == [
        "CONTAINER  NETWORK       ENDPOINT      PROTO  HOST              CONTAINER PORT",
        "web        mynet         404b28d817e8  tcp    0.0.0.0:8080  ->  10.213.80.2:80",
        "-          94a3577c551e  404b28d817e8  tcp    127.0.0.1:53  ->  10.213.80.2:80",
    ]


def test_status() -> None:
    data = {
        "networks": [
            {
                "id": NET,
                "name": None,
                "bridge": "br0",
                "bridge_owned": False,
                "state": "ready",
                "subnets": [
                    {"subnet": "10.213.80.0/24", "gateway": "10.213.80.1"},
                    {"subnet": "fd00:80::/64", "gateway": None},
                ],
                "internal": True,
                "options": {"mtu": "1400", "a": "b"},
            }
        ],
        "endpoints": [
            {
                "id": EP,
                "network_id": NET,
                "container": "web",
                "addresses": [],
                "mac_address": "02:50:0a:d5:50:02",
                "veth": "pyv404b28d817e8",
                "sandbox": None,
                "state": "ready",
            }
        ],
        "ports": [{**PORT, "container": None}],
    }
    assert format_status(data).splitlines() == [
        "networks: 1",
        "NETWORK       NAME  BRIDGE       SUBNETS                                      OPTIONS",
        "94a3577c551e  -     br0 (yours)  10.213.80.0/24 gw 10.213.80.1, fd00:80::/64  "
        "internal, a=b, mtu=1400",
        "",
        "endpoints: 1",
        "ENDPOINT      CONTAINER  NETWORK       ADDRESSES  MAC                VETH",
        "404b28d817e8  web        94a3577c551e  -          02:50:0a:d5:50:02  pyv404b28d817e8",
        "",
        "published ports: 1",
        "CONTAINER     PROTO  HOST              CONTAINER PORT",
        "404b28d817e8  tcp    0.0.0.0:8080  ->  10.213.80.2:80",
    ]
    assert format_status({"networks": [], "endpoints": [], "ports": []}).splitlines() == [
        "networks: 0",
        "",
        "endpoints: 0",
        "",
        "published ports: 0",
    ]


FINDINGS = [
    Finding(True, "state database /x/state.db is intact", kind="state-intact"),
    Finding(False, "pybridge does not answer on /x.sock (No such file)", "start it", "socket"),
]


def test_findings_as_text() -> None:
    assert findings_text(FINDINGS).splitlines() == [
        "ok       state database /x/state.db is intact",
        "PROBLEM  pybridge does not answer on /x.sock (No such file)",
        "         fix: start it",
        "1 problem(s) found",
    ]
    assert findings_text(FINDINGS[:1]).splitlines()[-1] == "healthy"
    assert healthy(FINDINGS[:1])
    assert not healthy(FINDINGS)


def test_findings_as_json_keep_their_shape() -> None:
    """Scripts read this: the kinds are not in it (yet), only what always was."""
    assert json.loads(findings_json(FINDINGS)) == {
        "healthy": False,
        "findings": [
            {"ok": True, "what": "state database /x/state.db is intact", "fix": ""},
            {
                "ok": False,
                "what": "pybridge does not answer on /x.sock (No such file)",
                "fix": "start it",
            },
        ],
    }
