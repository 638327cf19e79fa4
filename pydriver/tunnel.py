"""What a segment's VXLAN device must hold, and the steps from what it holds (pure).

No flooding and no learning: every remote container's MAC is a static forwarding entry to its
host's tunnel address (VTEP) and every remote address a permanent neighbour entry, written from
the cluster store; broadcast and multicast go to each member host (head-end replication: one
all-zero MAC entry per member). With the device's proxy flag, ARP and neighbour solicitations
are answered from these entries on the host itself, so none crosses the tunnel and the gateway,
the same address on every host, is only ever answered locally.

plan() compares the wanted entries with a dump of the device and returns the steps, removals
of what is stale included (a host that left, a container that moved): applied in order, they
make the device hold exactly the wanted entries. Run at start-up, after a lost watch, and after
each change the watch reports."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from .model import IPAddress

FLOOD_MAC = "00:00:00:00:00:00"


@dataclass(frozen=True)
class RemoteEndpoint:
    """A container on another host of the segment."""

    mac: str
    vtep: IPAddress
    addresses: tuple[IPAddress, ...]


@dataclass(frozen=True)
class TunnelEntries:
    """A VXLAN device's entries: flood destinations, MAC -> VTEP, address -> MAC."""

    flood: frozenset[IPAddress]
    forwarding: Mapping[str, IPAddress]
    neighbours: Mapping[IPAddress, str]


@dataclass(frozen=True)
class Step:
    action: Literal[
        "flood-add", "flood-remove", "fdb-replace", "fdb-remove", "neigh-replace", "neigh-remove"
    ]
    mac: str = ""
    vtep: IPAddress | None = None
    address: IPAddress | None = None


def wanted(
    members: Iterable[IPAddress], endpoints: Iterable[RemoteEndpoint], own_vtep: IPAddress
) -> TunnelEntries:
    """The entries for the other members' VTEPs and their containers (this host's own never:
    its containers are on its bridge)."""
    flood = frozenset(m for m in members if m != own_vtep)
    forwarding: dict[str, IPAddress] = {}
    neighbours: dict[IPAddress, str] = {}
    for endpoint in endpoints:
        if endpoint.vtep == own_vtep:
            continue
        forwarding[endpoint.mac] = endpoint.vtep
        for address in endpoint.addresses:
            neighbours[address] = endpoint.mac
    return TunnelEntries(flood, forwarding, neighbours)


def plan(want: TunnelEntries, have: TunnelEntries) -> list[Step]:
    """The steps from ``have`` to ``want``: additions and changes first (traffic to a container
    that moved goes to its new host at once), then removals."""
    steps: list[Step] = []
    steps += [Step("flood-add", vtep=v) for v in sorted(want.flood - have.flood, key=str)]
    steps += [
        Step("fdb-replace", mac=mac, vtep=vtep)
        for mac, vtep in sorted(want.forwarding.items())
        if have.forwarding.get(mac) != vtep
    ]
    steps += [
        Step("neigh-replace", mac=mac, address=address)
        for address, mac in sorted(want.neighbours.items(), key=lambda i: str(i[0]))
        if have.neighbours.get(address) != mac
    ]
    steps += [
        Step("neigh-remove", address=a)
        for a in sorted(set(have.neighbours) - set(want.neighbours), key=str)
    ]
    steps += [
        Step("fdb-remove", mac=m, vtep=have.forwarding[m])
        for m in sorted(set(have.forwarding) - set(want.forwarding))
    ]
    steps += [Step("flood-remove", vtep=v) for v in sorted(have.flood - want.flood, key=str)]
    return steps


def mtu_for(underlay_mtu: int, underlay_version: int) -> int:
    """The largest MTU a segment's containers can use over an underlay of ``underlay_mtu``:
    VXLAN adds an outer IP header (20 bytes IPv4, 40 IPv6), UDP (8), VXLAN (8) and the inner
    Ethernet header (14)."""
    return underlay_mtu - (50 if underlay_version == 4 else 70)
