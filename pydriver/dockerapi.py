"""The Docker daemon as pydriver's operator commands see it. For `pydriver prune`: which
endpoint the docker CLI talks to (its context, DOCKER_HOST), which process serves that socket,
and the daemon's networks and plugins, read from the Engine API on that very socket. For
`doctor`, `status` and `ports`: the network ids and names the docker CLI lists (best effort).
Only operator commands use this; the plugin itself never calls Docker."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
from typing import Any

from .errors import DriverError
from .logs import escape
from .peers import serving_processes
from .pruning import DaemonFacts, DockerNetwork
from .report import Names
from .unixhttp import UnixConnection

TIMEOUT = 20.0


def docker_host() -> str:
    """The endpoint the docker CLI would use now (DOCKER_HOST, DOCKER_CONTEXT, the current
    context), as the CLI itself resolves it."""
    try:
        done = subprocess.run(
            ["docker", "context", "inspect"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise DriverError(
            f"cannot run the docker CLI to learn which Docker daemon it uses ({err})"
        ) from None
    if done.returncode != 0:
        reason = escape((done.stderr.strip().splitlines() or ["no reason given"])[-1][:300])
        raise DriverError(f"the docker CLI cannot say which Docker daemon it uses: {reason}")
    try:
        host = json.loads(done.stdout)[0]["Endpoints"]["docker"]["Host"]
    except (ValueError, LookupError, TypeError):
        host = None
    if not isinstance(host, str):
        raise DriverError("the docker CLI's context names no Docker endpoint")
    return host


def _get(conn: UnixConnection, path: str) -> Any:
    conn.request("GET", path, headers={"Accept": "application/json"})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise DriverError(
            f"the Docker daemon at {conn.socket_path} answered GET {path} with HTTP "
            f"{response.status}: {escape(data.decode(errors='replace').strip()[:300])}"
        )
    try:
        return json.loads(data)
    except ValueError:
        raise DriverError(
            f"the Docker daemon at {conn.socket_path} answered GET {path} with something that "
            "is not JSON"
        ) from None


def _networks(body: Any, path: str) -> tuple[DockerNetwork, ...]:
    if not isinstance(body, list) or not all(isinstance(n, dict) for n in body):
        raise DriverError(
            f"the Docker daemon at {path} listed its networks in a form prune does not understand"
        )
    networks = []
    for item in body:
        network_id = item.get("Id")
        if not isinstance(network_id, str):
            raise DriverError(f"the Docker daemon at {path} listed a network without an id")
        ipam = item.get("IPAM")
        configs = ipam.get("Config") if isinstance(ipam, dict) else None
        if not isinstance(configs, list):
            configs = []
        subnets = tuple(
            c["Subnet"] for c in configs if isinstance(c, dict) and isinstance(c.get("Subnet"), str)
        )
        networks.append(DockerNetwork(network_id, subnets))
    return tuple(networks)


def _plugin_ids(body: Any, path: str) -> frozenset[str]:
    if not isinstance(body, list):
        raise DriverError(
            f"the Docker daemon at {path} listed its plugins in a form prune does not understand"
        )
    return frozenset(p["Id"] for p in body if isinstance(p, dict) and isinstance(p.get("Id"), str))


def look_at(host: str, path: str) -> DaemonFacts:
    """Ask the daemon listening on ``path`` for its networks and plugins, and find out which
    process answers: the one holding the other end of the connection (this finds dockerd
    behind systemd socket activation too), else the one that listens (SO_PEERCRED)."""
    conn = UnixConnection(path, TIMEOUT, host="docker")
    try:
        networks = _networks(_get(conn, "/networks"), path)
        # The connection is kept alive: its other end is in the process serving it.
        servers = serving_processes(conn.sock) if isinstance(conn.sock, socket.socket) else None
        plugins = _plugin_ids(_get(conn, "/plugins"), path)
    except OSError as err:
        raise DriverError(
            f"cannot ask the Docker daemon at {path}: {err.strerror or err}"
        ) from None
    except http.client.HTTPException as err:
        raise DriverError(
            f"the Docker daemon at {path} did not answer as a Docker daemon ({type(err).__name__})"
        ) from None
    finally:
        conn.close()
    if len(conn.listeners) > 1:
        raise DriverError(
            f"another process took over {path} while prune was asking (pids "
            f"{', '.join(str(p) for p in sorted(conn.listeners))})"
        )
    # pid 0: a process outside prune's pid namespace, which it cannot identify.
    return DaemonFacts(
        host=host,
        pids=frozenset(p for p in (servers or conn.listeners) if p > 0),
        plugin_ids=plugins,
        networks=networks,
    )


def _cli(*argv: str) -> str:
    return subprocess.run(
        ["docker", *argv], capture_output=True, text=True, timeout=TIMEOUT, check=True
    ).stdout


def docker_network_ids() -> set[str] | None:
    """Network ids the daemon the docker CLI talks to knows, or None if it cannot be asked."""
    try:
        return set(_cli("network", "ls", "-q", "--no-trunc").split())
    except (OSError, subprocess.SubprocessError):
        return None


def docker_names() -> Names:
    """Container and network names, by endpoint and network id, as the docker CLI shows them
    (best effort: none if it cannot)."""
    containers: dict[str, str] = {}
    networks: dict[str, str] = {}
    try:
        ids = _cli("ps", "-q", "--no-trunc").split()
        for info in json.loads(_cli("inspect", *ids)) if ids else []:
            name = str(info.get("Name", "")).lstrip("/")
            for net_name, net in (info.get("NetworkSettings", {}).get("Networks") or {}).items():
                if net.get("EndpointID"):
                    containers[net["EndpointID"]] = name
                if net.get("NetworkID"):
                    networks[net["NetworkID"]] = net_name
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return Names(containers, networks)


def docker_plugins() -> list[tuple[str, bool]] | None:
    """The managed plugins of the daemon the docker CLI talks to, as (name, enabled), or None
    if it cannot be asked."""
    try:
        out = _cli("plugin", "ls", "--format", "{{.Name}} {{.Enabled}}")
    except (OSError, subprocess.SubprocessError):
        return None
    found = []
    for line in out.splitlines():
        name, _, enabled = line.strip().rpartition(" ")
        if name:
            found.append((name, enabled == "true"))
    return found
