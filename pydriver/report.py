"""Read-only reports for operators, from pybridge's state (the `ports` command)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Any

from .model import Endpoint, Network

DOCKER_TIMEOUT = 20


@dataclass(frozen=True)
class Names:
    """Container and network names Docker knows, by endpoint id and network id."""

    containers: dict[str, str]
    networks: dict[str, str]


def docker_names() -> Names:
    """Ask the docker CLI for names (best effort: an empty answer if it cannot).

    Only this operator command does this; the plugin itself never calls Docker."""
    containers: dict[str, str] = {}
    networks: dict[str, str] = {}
    try:
        ids = subprocess.run(
            ["docker", "ps", "-q", "--no-trunc"],
            capture_output=True,
            text=True,
            timeout=DOCKER_TIMEOUT,
            check=True,
        ).stdout.split()
        if ids:
            out = subprocess.run(
                ["docker", "inspect", *ids],
                capture_output=True,
                text=True,
                timeout=DOCKER_TIMEOUT,
                check=True,
            ).stdout
            for info in json.loads(out):
                name = str(info.get("Name", "")).lstrip("/")
                for net_name, net in (
                    info.get("NetworkSettings", {}).get("Networks") or {}
                ).items():
                    if net.get("EndpointID"):
                        containers[net["EndpointID"]] = name
                    if net.get("NetworkID"):
                        networks[net["NetworkID"]] = net_name
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return Names(containers, networks)


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


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("CONTAINER", "NETWORK", "ENDPOINT", "PROTO", "HOST", "", "CONTAINER PORT")
    lines = [header]
    for r in rows:
        lines.append(
            (
                r["container"] or "-",
                r["network"] or r["network_id"][:12],
                r["endpoint_id"][:12],
                r["proto"],
                r["host"],
                "->",
                r["target"],
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in lines
    )
