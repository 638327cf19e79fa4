"""`pydriver prune`, the decisions: is the Docker daemon the docker CLI talks to the one that
uses this pybridge, what is stale, and may prune go ahead. Pure: the facts are gathered by the
adapters (dockerapi.py, peers.py, the plugin socket); nothing here does I/O. Every refusal is
one sentence (``Refused``)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from .errors import DriverError
from .model import Endpoint, Network
from .protocol import Caller
from .store import PoolRecord

# A pool requested this recently may belong to a network Docker is still creating (it asks
# for the pool before it creates the network, and lists the network only once created).
POOL_GRACE_SECONDS = 60.0
# Likewise pybridge answers CreateNetwork before Docker stores the network: what prune removes
# must still be unknown to Docker at least this long after prune read pybridge's state.
SETTLE_SECONDS = 2.0

# A managed plugin's socket: <exec root>/plugins/<plugin id>/<socket name>.
_MANAGED_SOCKET = re.compile(r"/plugins/([0-9a-f]{64})/[^/]+$")
_PROBE = "create and remove a network with its driver, e.g. docker network create -d pybridge"


class Refused(DriverError):
    """prune will not go on; the message says why and what to do."""

    kind = "refused"


@dataclass(frozen=True)
class DockerNetwork:
    """A network as the daemon lists it: its id and the subnets of its IPAM config."""

    id: str
    subnets: tuple[str, ...] = ()


@dataclass(frozen=True)
class PluginFacts:
    socket: str  # the socket prune talks to pybridge on
    own_pid: int  # pybridge's pid as pybridge says it (its own pid namespace)
    pid_here: int  # pybridge's pid as prune sees it (SO_PEERCRED of prune's connection)
    callers: tuple[Caller, ...]  # who has called it since it started (pids in its namespace)
    running: Mapping[int, str]  # of those, the ones still running here: pid -> name
    state_file: tuple[int, int] | None = None  # its state database (st_dev, st_ino)


@dataclass(frozen=True)
class DaemonFacts:
    host: str  # what the docker CLI talks to, e.g. unix:///var/run/docker.sock
    pids: frozenset[int]  # the process(es) serving that socket, in prune's pid namespace
    plugin_ids: frozenset[str]  # its managed plugins
    networks: tuple[DockerNetwork, ...]


def daemon_socket(host: str) -> str:
    """The socket path of a docker endpoint (``unix:///path``); anything else is refused."""
    scheme, sep, rest = host.partition("://")
    if sep and scheme == "unix" and rest.startswith("/") and "\0" not in rest:
        return rest
    raise Refused(
        f"the docker CLI talks to {host or 'no daemon'}, not to a Unix socket on this host, and "
        "prune only prunes for a local daemon it can identify (unset DOCKER_HOST or choose a "
        "local docker context)"
    )


def managed_plugin_id(socket_path: str) -> str | None:
    """The plugin id in a managed plugin's socket path, or None."""
    found = _MANAGED_SOCKET.search(socket_path)
    return found.group(1) if found else None


def _pids(pids: Iterable[int]) -> str:
    listed = sorted(pids)
    return ", ".join(str(p) for p in listed) if listed else "unknown"


def check_same_daemon(
    plugin: PluginFacts, daemon: DaemonFacts, pybridge_networks: Collection[str], yes: bool
) -> None:
    """Refuse unless ``daemon`` is the Docker daemon that uses this pybridge.

    * pybridge in prune's pid namespace (a host service): the daemon's process must be among
      pybridge's callers, and no other dockerd still running may be; if no daemon has called
      pybridge since it started, only with --yes and if the daemon knows at least one of
      pybridge's networks (ids are 256 random bits: another daemon knows none).
    * pybridge in another pid namespace (a managed plugin, whose callers' pids are 0 there):
      its socket must be <...>/plugins/<plugin id>/... and the daemon must have that plugin.
    """
    where = f"pybridge on {plugin.socket}"
    at = f"the Docker daemon at {daemon.host}"
    plugin_id = managed_plugin_id(plugin.socket)
    if plugin_id is not None and plugin_id in daemon.plugin_ids:
        return
    same_namespace = plugin.pid_here > 0 and plugin.pid_here == plugin.own_pid
    if not same_namespace:
        if plugin_id is None:
            raise Refused(
                f"{where} runs in another pid namespace (pid {plugin.own_pid} there, "
                f"{plugin.pid_here or 'unknown'} here) and is not a managed plugin (its socket "
                "would be .../plugins/<plugin id>/...), so prune cannot tell which Docker "
                "daemon uses it"
            )
        raise Refused(
            f"{where} is the managed plugin {plugin_id[:12]}, which {at} does not have: that "
            "daemon does not use this pybridge, so prune removes nothing"
        )
    if not daemon.pids:
        raise Refused(
            f"prune cannot see which process serves {daemon.host} (it is outside prune's pid "
            "namespace), so it cannot check that it is the Docker daemon using pybridge"
        )
    mine = [c for c in plugin.callers if c.pid in daemon.pids]
    if mine:
        others = sorted(
            c.pid
            for c in plugin.callers
            if c.pid not in daemon.pids and plugin.running.get(c.pid) == "dockerd"
        )
        if others:
            raise Refused(
                f"{where} is also used by another Docker daemon (pid {_pids(others)}) besides "
                f"{at} (pid {_pids(daemon.pids)}), so prune cannot tell their networks apart "
                "and removes nothing"
            )
        return
    if plugin.callers:
        last = max(plugin.callers, key=lambda c: c.last_seen)
        name = plugin.running.get(last.pid)
        what = f"({name})" if name else "(no longer running)"
        hint = (
            f": if dockerd restarted since, let it call pybridge once ({_PROBE}) and run "
            "prune again"
            if name is None
            else ""
        )
        raise Refused(
            f"{where} was last called by pid {last.pid} {what}, not by {at} (pid "
            f"{_pids(daemon.pids)}), so prune removes nothing{hint}"
        )
    if not yes:
        raise Refused(
            f"{where} has not been called by any Docker daemon since it started, so prune "
            f"cannot check that {at} (pid {_pids(daemon.pids)}) is the one using it: pass "
            f"--yes if you are sure, or let that daemon call pybridge first ({_PROBE})"
        )
    known = {n.id for n in daemon.networks}
    if not any(network_id in known for network_id in pybridge_networks):
        raise Refused(
            f"{where} has not been called by any Docker daemon since it started, and {at} "
            "knows none of pybridge's networks, so nothing shows it is the daemon using "
            f"pybridge: let that daemon call pybridge first ({_PROBE}) and run prune again"
        )


# -- what is stale ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StaleNetwork:
    network: Network
    endpoint_ids: tuple[str, ...]

    def describe(self) -> str:
        subnets = ", ".join(str(s.pool) for s in self.network.subnets)
        return f"network {self.network.id[:12]} (bridge {self.network.bridge}" + (
            f", {subnets})" if subnets else ")"
        )


@dataclass(frozen=True)
class StalePool:
    id: str
    subnet: str

    def describe(self) -> str:
        return f"IPAM pool {self.subnet} ({self.id})"


@dataclass(frozen=True)
class Plan:
    networks: tuple[StaleNetwork, ...] = ()
    pools: tuple[StalePool, ...] = ()
    recent_pools: int = 0  # unused pools left alone: requested within POOL_GRACE_SECONDS

    @property
    def empty(self) -> bool:
        return not self.networks and not self.pools

    def lines(self) -> list[str]:
        return [n.describe() for n in self.networks] + [p.describe() for p in self.pools]

    def question(self) -> str:
        parts = []
        if self.networks:
            parts.append(f"{len(self.networks)} network(s)")
        if self.pools:
            parts.append(f"{len(self.pools)} IPAM pool(s)")
        return f"remove {' and '.join(parts)}? [y/N] "

    def still_unknown(self, networks: Sequence[DockerNetwork]) -> Plan:
        """What is still stale by a later listing of the daemon's networks."""
        ids = {n.id for n in networks}
        used = _subnets(networks)
        return replace(
            self,
            networks=tuple(n for n in self.networks if n.network.id not in ids),
            pools=tuple(p for p in self.pools if _normal(p.subnet) not in used),
        )


def _normal(subnet: str) -> str:
    try:
        return str(ipaddress.ip_network(subnet, strict=False))
    except ValueError:
        return subnet


def _subnets(networks: Iterable[DockerNetwork]) -> set[str]:
    return {_normal(s) for n in networks for s in n.subnets}


def stale(
    networks: Sequence[Network],
    endpoints: Sequence[Endpoint],
    pools: Sequence[PoolRecord],
    docker: Sequence[DockerNetwork],
    now: float,
) -> Plan:
    """pybridge's networks the daemon does not list, and its IPAM pools whose subnet no network
    of the daemon uses (whatever its IPAM driver: a pool is kept if in doubt)."""
    ids = {n.id for n in docker}
    gone = [n for n in networks if n.id not in ids]
    used = _subnets(docker)
    unused = [p for p in pools if str(p.subnet) not in used]
    old = [p for p in unused if p.recorded_at is None or now - p.recorded_at >= POOL_GRACE_SECONDS]
    return Plan(
        networks=tuple(
            StaleNetwork(n, tuple(e.id for e in endpoints if e.network_id == n.id)) for n in gone
        ),
        pools=tuple(StalePool(p.id, str(p.subnet)) for p in old),
        recent_pools=len(unused) - len(old),
    )


# -- may it go ahead ----------------------------------------------------------------------------

Go = Literal["list", "ask", "remove"]


def how_to_go(dry_run: bool, yes: bool, terminal: bool) -> Go:
    """List only (--dry-run), ask on the terminal, or remove (--yes); refuse with neither."""
    if dry_run:
        return "list"
    if yes:
        return "remove"
    if terminal:
        return "ask"
    raise Refused(
        "prune asks before it removes anything and there is no terminal to ask on: pass --yes "
        "to remove what it lists (or --dry-run to only list it)"
    )


def confirmed(answer: str) -> bool:
    return answer.strip().lower() in ("y", "yes")
