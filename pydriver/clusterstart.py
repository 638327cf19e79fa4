"""Joining the cluster at start-up (pydriver serve --cluster): this host's id, the underlay the
tunnels use, and the objects that take part (adapter wiring only)."""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from .cluster import Cluster
from .clusterhost import ClusterHost, Underlay
from .clustermodel import parse_cluster
from .errors import InvalidRequest
from .interfaces import MetaStore, TunnelKernel
from .model import Endpoint, HostRoute, IPAddress, IPInterface, Link, Network

log = logging.getLogger(__name__)

HOST_ID_FILE = "host-id"


class UnderlayKernel(TunnelKernel, Protocol):
    async def links(self) -> list[Link]: ...

    async def routes(self) -> list[HostRoute]: ...

    async def link_addresses(self, name: str) -> list[IPInterface]: ...


def host_id(state_dir: Path) -> str:
    """This host's id in the cluster: random, made once, kept in the state directory (never
    the hostname or machine id, which copies of one image share)."""
    path = state_dir / HOST_ID_FILE
    try:
        found = path.read_text().strip()
        if found:
            return found
    except FileNotFoundError:
        pass
    made = secrets.token_hex(8)
    temporary = path.with_suffix(".new")
    temporary.write_text(made + "\n")
    with open(temporary) as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return made


async def find_underlay(kernel: UnderlayKernel, advertise: str) -> Underlay:
    """The interface holding ``advertise`` (an address), or with no address given, the IPv4
    address of the interface of the default route."""
    links = {link.name: link for link in await kernel.links()}
    if advertise:
        try:
            wanted: IPAddress | None = ipaddress.ip_address(advertise)
        except ValueError:
            raise InvalidRequest(
                f"--advertise-address {advertise!r} is not an IP address of this host"
            ) from None
        candidates = list(links)
    else:
        wanted = None
        candidates = [r.device for r in await kernel.routes() if str(r.destination) == "0.0.0.0/0"]
        if not candidates:
            raise InvalidRequest(
                "this host has no IPv4 default route to find its address from: give "
                "--advertise-address (the address other hosts reach this one at)"
            )
    for name in candidates:
        for iface in await kernel.link_addresses(name):
            if (wanted is None and iface.version == 4) or iface.ip == wanted:
                return Underlay(name, iface.ip, links[name].mtu)
    raise InvalidRequest(
        f"--advertise-address {advertise} is not an address of any interface of this host"
        if advertise
        else f"the default route's interface {candidates[0]} has no IPv4 address: give "
        "--advertise-address"
    )


async def join_cluster(
    cluster_url: str,
    advertise: str,
    vxlan_port: int,
    state_dir: Path,
    kernel: UnderlayKernel,
    meta: MetaStore,
    networks: Callable[[], Iterable[Network]],
    endpoints_of: Callable[[str], Iterable[Endpoint]],
) -> ClusterHost:
    endpoints = parse_cluster(cluster_url)
    underlay = await find_underlay(kernel, advertise)
    # Imported here: gRPC and aetcd cost 65 ms and 33 MiB, only paid in a cluster.
    from .etcdstore import EtcdStore

    store = EtcdStore(endpoints)
    me = host_id(state_dir)
    holder: list[ClusterHost] = []

    async def on_change(segments: set[str]) -> None:
        await holder[0].on_change(segments)

    cluster = Cluster(store, me, underlay.address, on_change=on_change)
    host = ClusterHost(
        cluster,
        kernel,
        meta,
        underlay,
        networks,
        endpoints_of,
        vxlan_port=vxlan_port,
        endpoint=cluster_url,
    )
    holder.append(host)
    await host.load()
    log.info(
        "cluster %s: this host is %s, tunnels from %s on %s (MTU %d), VXLAN port %d",
        cluster_url,
        me,
        underlay.address,
        underlay.interface,
        underlay.mtu,
        vxlan_port,
    )
    return host
