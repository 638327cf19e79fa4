"""What the operator commands print (pure): `ports` and `status` from pybridge's state, and
`doctor`'s findings, as aligned text tables or JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .checks import Finding
from .model import Endpoint, Network


@dataclass(frozen=True)
class Names:
    """Container and network names Docker knows, by endpoint id and network id."""

    containers: dict[str, str]
    networks: dict[str, str]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of columns padded to their widest cell, two spaces apart, no trailing blanks."""
    lines = [tuple(header), *(tuple(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in lines
    ]


# -- ports --------------------------------------------------------------------------------------


def port_rows(
    networks: list[Network], endpoints: list[Endpoint], names: Names
) -> list[dict[str, Any]]:
    by_id = {n.id: n for n in networks}
    rows = []
    for endpoint in endpoints:
        for mapping in endpoint.mappings:
            network = by_id.get(endpoint.network_id)
            rows.append(
                {
                    "container": names.containers.get(endpoint.id),
                    "network": names.networks.get(endpoint.network_id),
                    "network_id": endpoint.network_id,
                    "endpoint_id": endpoint.id,
                    "bridge": network.bridge if network else None,
                    "proto": mapping.proto,
                    "host": mapping.host_text(),
                    "target": mapping.container_text(),
                }
            )
    rows.sort(key=lambda r: (r["container"] or "", r["proto"], r["host"]))
    return rows


def format_ports(rows: list[dict[str, Any]]) -> str:
    return "\n".join(
        table(
            ("CONTAINER", "NETWORK", "ENDPOINT", "PROTO", "HOST", "", "CONTAINER PORT"),
            [
                (
                    r["container"] or "-",
                    r["network"] or r["network_id"][:12],
                    r["endpoint_id"][:12],
                    r["proto"],
                    r["host"],
                    "->",
                    r["target"],
                )
                for r in rows
            ],
        )
    )


# -- status -------------------------------------------------------------------------------------


def status_data(networks: list[Network], endpoints: list[Endpoint], names: Names) -> dict[str, Any]:
    return {
        "networks": [
            {
                "id": n.id,
                "name": names.networks.get(n.id),
                "bridge": n.bridge,
                "bridge_owned": n.bridge_owned,
                "state": n.state,
                "subnets": [
                    {"subnet": str(s.pool), "gateway": str(s.gateway.ip) if s.gateway else None}
                    for s in n.subnets
                ],
                "internal": n.internal,
                "options": n.raw_options,
            }
            for n in networks
        ],
        "endpoints": [
            {
                "id": e.id,
                "network_id": e.network_id,
                "container": names.containers.get(e.id),
                "addresses": [str(a) for a in (e.address, e.address_v6) if a is not None],
                "mac_address": e.mac_address,
                "veth": e.host_veth,
                "sandbox": e.sandbox_key,
                "state": e.state,
            }
            for e in endpoints
        ],
        "ports": port_rows(networks, endpoints, names),
    }


def _network_row(n: dict[str, Any]) -> tuple[str, ...]:
    subnets = ", ".join(
        s["subnet"] + (f" gw {s['gateway']}" if s["gateway"] else "") for s in n["subnets"]
    )
    options = (["internal"] if n["internal"] else []) + [
        f"{k}={v}" for k, v in sorted(n["options"].items())
    ]
    bridge = n["bridge"] + ("" if n["bridge_owned"] else " (yours)")
    return (n["id"][:12], n["name"] or "-", bridge, subnets, ", ".join(options) or "-")


def _endpoint_row(e: dict[str, Any]) -> tuple[str, ...]:
    addresses = ", ".join(e["addresses"]) or "-"
    return (
        e["id"][:12],
        e["container"] or "-",
        e["network_id"][:12],
        addresses,
        e["mac_address"],
        e["veth"],
    )


def format_status(data: dict[str, Any]) -> str:
    out = [f"networks: {len(data['networks'])}"]
    if data["networks"]:
        out += table(
            ("NETWORK", "NAME", "BRIDGE", "SUBNETS", "OPTIONS"),
            [_network_row(n) for n in data["networks"]],
        )
    out += ["", f"endpoints: {len(data['endpoints'])}"]
    if data["endpoints"]:
        out += table(
            ("ENDPOINT", "CONTAINER", "NETWORK", "ADDRESSES", "MAC", "VETH"),
            [_endpoint_row(e) for e in data["endpoints"]],
        )
    out += ["", f"published ports: {len(data['ports'])}"]
    if data["ports"]:
        out += table(
            ("CONTAINER", "PROTO", "HOST", "", "CONTAINER PORT"),
            [
                (r["container"] or r["endpoint_id"][:12], r["proto"], r["host"], "->", r["target"])
                for r in data["ports"]
            ],
        )
    return "\n".join(out)


# -- doctor -------------------------------------------------------------------------------------


def healthy(findings: Sequence[Finding]) -> bool:
    return all(f.ok for f in findings)


def findings_text(findings: Sequence[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(("ok       " if f.ok else "PROBLEM  ") + f.what)
        if f.fix:
            lines.append("         fix: " + f.fix)
    problems = sum(1 for f in findings if not f.ok)
    lines.append("healthy" if not problems else f"{problems} problem(s) found")
    return "\n".join(lines)


def findings_json(findings: Sequence[Finding]) -> str:
    return json.dumps(
        {
            "healthy": healthy(findings),
            "findings": [{"ok": f.ok, "what": f.what, "fix": f.fix} for f in findings],
        },
        indent=2,
    )
