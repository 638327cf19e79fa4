"""`pydriver prune`, the orchestration: gathers the facts (pybridge's status on its socket, its
state read-only, the Docker daemon through dockerapi.py), lets pruning.py decide, and removes
what is stale through the running pybridge, as Docker itself would."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import protocol as p
from . import pruning
from .dockerapi import docker_host, look_at
from .errors import DriverError
from .peers import process_name
from .pruning import Plan, PluginFacts, Refused
from .store import DB_NAME, read_pools, read_state
from .unixhttp import call_pybridge

STATUS_TIMEOUT = 20.0


def plugin_facts(socket_path: str) -> PluginFacts:
    """Ask pybridge who has called it (Pybridge.Status), and see its pid from here."""
    try:
        reply = call_pybridge(socket_path, *p.status_request(), timeout=STATUS_TIMEOUT)
    except OSError as err:
        raise DriverError(
            f"pybridge does not answer on {socket_path} ({err.strerror or err}); prune works "
            "through the running pybridge"
        ) from None
    if reply.status != 200 or not isinstance(reply.body, dict):
        raise DriverError(
            f"pybridge on {socket_path} does not say who calls it (an older version?): run "
            "this version of pybridge to use prune"
        )
    try:
        status = p.parse_status_reply(reply.body)
    except DriverError as err:
        raise DriverError(f"pybridge on {socket_path} answered its status oddly: {err}") from None
    same = reply.listener > 0 and reply.listener == status.pid
    running = {}
    if same:  # the callers' pids are ours too: which are still running, as what
        for caller in status.callers:
            name = process_name(caller.pid)
            if name is not None:
                running[caller.pid] = name
    return PluginFacts(
        socket_path, status.pid, reply.listener, status.callers, running, status.state_file
    )


def _remove(socket_path: str, request: tuple[str, dict[str, Any]]) -> tuple[int, Any]:
    reply = call_pybridge(socket_path, *request)
    return reply.status, reply.body


@dataclass
class Pruned:
    plan: Plan
    removed: bool  # False: only listed (--dry-run), or declined


def prune(
    socket_path: str,
    state_dir: Path,
    *,
    dry_run: bool,
    yes: bool,
    ask: Callable[[Plan], bool] | None,
    done: Callable[[str], None] = lambda line: None,
) -> Pruned:
    """Remove, through the running pybridge, the networks and IPAM pools it has that the Docker
    daemon using it no longer knows (removed while pybridge was away). The daemon is the one
    the docker CLI talks to, and only if it is shown to be the one using this pybridge (see
    pruning.check_same_daemon). ``ask`` confirms on a terminal (None: there is none); ``done``
    hears each thing removed."""
    plugin = plugin_facts(socket_path)
    try:
        here = (state_dir / DB_NAME).stat()
    except OSError as err:
        raise DriverError(f"no pybridge state at {state_dir / DB_NAME} ({err.strerror})") from None
    if plugin.state_file is not None and plugin.state_file != (here.st_dev, here.st_ino):
        raise Refused(
            f"pybridge on {socket_path} keeps its state in another database than "
            f"{state_dir / DB_NAME}: give prune the --state-dir that pybridge uses"
        )
    read_at = time.monotonic()
    networks, endpoints = read_state(state_dir)
    pools = read_pools(state_dir)
    host = docker_host()
    path = pruning.daemon_socket(host)
    daemon = look_at(host, path)
    pruning.check_same_daemon(plugin, daemon, [n.id for n in networks], yes)
    plan = pruning.stale(networks, endpoints, pools, daemon.networks, time.time())
    if plan.empty:
        return Pruned(plan, False)
    go = pruning.how_to_go(dry_run, yes, ask is not None)
    if go == "list" or (go == "ask" and ask is not None and not ask(plan)):
        return Pruned(plan, False)
    # Look again, after the prompt and at least SETTLE_SECONDS after reading the state: a
    # network Docker was creating (pybridge answers before Docker stores it) shows up by then.
    time.sleep(max(0.0, read_at + pruning.SETTLE_SECONDS - time.monotonic()))
    again = look_at(host, path)
    if again.pids != daemon.pids:
        raise Refused(
            f"the process serving {host} changed while prune ran (pid "
            f"{', '.join(map(str, sorted(daemon.pids)))} before, "
            f"{', '.join(map(str, sorted(again.pids)))} now); run prune again"
        )
    plan = plan.still_unknown(again.networks)
    for stale_network in plan.networks:
        network_id = stale_network.network.id
        for endpoint_id in stale_network.endpoint_ids:
            _remove(socket_path, p.delete_endpoint_request(network_id, endpoint_id))
        status, reply = _remove(socket_path, p.delete_network_request(network_id))
        if status != 200:
            raise DriverError(f"pybridge refused to remove network {network_id[:12]}: {reply}")
        done(stale_network.describe())
    for pool in plan.pools:
        status, reply = _remove(socket_path, p.release_pool_request(pool.id))
        if status != 200:
            raise DriverError(f"pybridge refused to release {pool.describe()}: {reply}")
        done(pool.describe())
    return Pruned(plan, True)
