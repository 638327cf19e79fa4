"""`pydriver doctor`: gathers the facts through the adapters pybridge itself uses (the store's
read-only view, the firewall, sysctl, netlink, the docker CLI, the plugin socket) and lets the
pure checks (checks.py) judge them. Read-only: safe to run while pybridge serves."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

from . import protocol as p
from .checks import Facts, Finding, Probe, Rules, evaluate, state_usable
from .clusterhost import META_KEY, recorded_tunnels
from .clusterreport import gather_cluster
from .dockerapi import docker_network_ids, docker_plugins
from .errors import DriverError
from .firewall import IptablesFirewall, detect_backend, docker_backends, readable_backends
from .model import Endpoint, Network
from .naming import RETIRED_LINK_GROUP, is_spare_veth
from .netlink import Netlink
from .rules import firewall_views
from .store import read_meta, read_state, state_health
from .sysctl import FORWARDING, PROC_SYS, Sysctl
from .unixhttp import call_pybridge

PROBE_TIMEOUT = 5.0


def probe(socket_path: str) -> Probe:
    """Ask whatever listens on pybridge's socket to activate, as Docker does first."""
    try:
        reply = call_pybridge(socket_path, *p.activate_request(), timeout=PROBE_TIMEOUT)
    except DriverError:  # not HTTP, not JSON, or closed without an answer
        return Probe()
    except OSError as err:
        return Probe(error=str(err.strerror or err))
    return Probe(pybridge=reply.status == 200 and "NetworkDriver" in p.implements(reply.body))


async def _rules(firewall: IptablesFirewall) -> list[Rules]:
    found = []
    for family in firewall.families:
        try:
            found.append(Rules(family, await firewall.save(family)))
        except DriverError as err:
            found.append(Rules(family, error=str(err)))
    return found


async def _other_backends(ours: str) -> dict[str, str]:
    """The IPv4 rules of the flavours pybridge does not use (those that can be read)."""
    found: dict[str, str] = {}
    for backend in await readable_backends():
        if backend != ours:
            try:
                found[backend] = await IptablesFirewall(backend).save(4)
            except DriverError:
                continue  # unreadable: nothing of pybridge's can be seen in it either
    return found


async def gather(
    socket_path: str, state_dir: Path, backend_setting: str, ask_docker: bool = True
) -> Facts:
    health = await asyncio.to_thread(state_health, state_dir)
    networks: list[Network] = []
    endpoints: list[Endpoint] = []
    if state_usable(health):
        networks, endpoints = await asyncio.to_thread(read_state, state_dir)
    sysctl = Sysctl(Path(os.environ.get("PYDRIVER_SYSCTL_ROOT") or PROC_SYS))
    facts = Facts(
        socket_path,
        health,
        await asyncio.to_thread(probe, socket_path),
        networks,
        endpoints,
        forwarding={family: await sysctl.read(key) for family, key in FORWARDING.items()},
        cluster=await gather_cluster(state_dir, networks) if state_usable(health) else None,
    )
    try:
        backend = await detect_backend(backend_setting)
    except DriverError as err:
        return replace(facts, backend_error=str(err))  # nothing of the firewall can be read
    docker = await docker_backends()
    netlink = Netlink()
    await netlink.open()
    try:
        found = await netlink.links()
        links = {link.name: link.kind for link in found}
        # Spare pairs, and removed containers' pairs waiting to be deleted (Veths.retire),
        # are pybridge's although no state refers to them.
        spares = frozenset(
            link.name
            for link in found
            if (is_spare_veth(link.name) and link.master is None and not link.up)
            or (link.group == RETIRED_LINK_GROUP and link.master is None)
        )
        routes = await netlink.routes()
    finally:
        await netlink.close()
    known = await asyncio.to_thread(docker_network_ids) if ask_docker else None
    plugins = await asyncio.to_thread(docker_plugins) if ask_docker else None
    return replace(
        facts,
        backend=backend,
        docker_backend=docker[0] if docker else None,
        other_backends=await _other_backends(backend),
        rules=await _rules(IptablesFirewall(backend)),
        views=firewall_views(
            networks,
            endpoints,
            recorded_tunnels(networks, await asyncio.to_thread(read_meta, state_dir, META_KEY)),
        ),
        bridge_nf_call=await sysctl.read("net.bridge.bridge-nf-call-iptables"),
        links=links,
        spare_links=spares,
        routes=routes,
        docker_networks=frozenset(known) if known is not None else None,
        docker_plugins=plugins,
    )


def doctor(
    socket_path: str, state_dir: Path, backend_setting: str, ask_docker: bool = True
) -> list[Finding]:
    return evaluate(asyncio.run(gather(socket_path, state_dir, backend_setting, ask_docker)))
