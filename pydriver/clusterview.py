"""This host's copy of what the cluster store holds (pure): rebuilt from one read at a
revision, then kept up to date change by change from the watch. What the tunnels and the
address blocks are planned from; never written to by anything else."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from .clustermodel import PREFIX, Segment, block_from_key
from .model import IPAddress, IPNetwork
from .tunnel import RemoteEndpoint


@dataclass
class SegmentView:
    definition: Segment | None = None
    members: dict[str, IPAddress] = field(default_factory=dict)  # host id -> VTEP
    blocks: dict[IPNetwork, str] = field(default_factory=dict)  # block -> host id
    endpoints: dict[IPAddress, tuple[str, str, IPAddress]] = field(default_factory=dict)
    # address -> (host id, MAC, VTEP)

    def remote_endpoints(self) -> list[RemoteEndpoint]:
        by_mac: dict[str, tuple[IPAddress, list[IPAddress]]] = {}
        for address, (_, mac, vtep) in self.endpoints.items():
            by_mac.setdefault(mac, (vtep, []))[1].append(address)
        return [
            RemoteEndpoint(mac, vtep, tuple(sorted(addresses, key=str)))
            for mac, (vtep, addresses) in sorted(by_mac.items())
        ]


@dataclass
class ClusterView:
    revision: int = 0
    hosts: dict[str, IPAddress] = field(default_factory=dict)  # host id -> VTEP, while up
    segments: dict[str, SegmentView] = field(default_factory=dict)

    def segment(self, name: str) -> SegmentView:
        return self.segments.setdefault(name, SegmentView())

    def apply(self, kind: str, key: str, value: bytes, revision: int) -> str | None:
        """One change (a put or a delete of ``key``); returns the segment it touched, if any.
        Keys and values that cannot be read are ignored (a newer version's, or damage):
        they must not stop the watch."""
        self.revision = max(self.revision, revision)
        if not key.startswith(PREFIX):
            return None
        parts = key[len(PREFIX) :].split("/")
        try:
            return self._apply(kind, parts, value)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def _apply(self, kind: str, parts: list[str], value: bytes) -> str | None:
        put = kind == "put"
        if parts[0] == "hosts" and len(parts) == 2:
            if put:
                self.hosts[parts[1]] = ipaddress.ip_address(json.loads(value)["vtep"])
            else:
                self.hosts.pop(parts[1], None)
            return None
        if len(parts) < 2:
            return None
        name = parts[1]
        view = self.segment(name)
        if parts[0] == "segments" and len(parts) == 2:
            view.definition = Segment.from_json(value.decode()) if put else None
        elif parts[0] == "members" and len(parts) == 3:
            if put:
                view.members[parts[2]] = ipaddress.ip_address(json.loads(value)["vtep"])
            else:
                view.members.pop(parts[2], None)
        elif parts[0] == "blocks" and len(parts) == 3:
            block = block_from_key("/".join(parts))
            if put:
                view.blocks[block] = str(json.loads(value)["host"])
            else:
                view.blocks.pop(block, None)
        elif parts[0] == "endpoints" and len(parts) == 3:
            address = ipaddress.ip_address(parts[2])
            if put:
                record = json.loads(value)
                view.endpoints[address] = (
                    str(record["host"]),
                    str(record["mac"]),
                    ipaddress.ip_address(record["vtep"]),
                )
            else:
                view.endpoints.pop(address, None)
        else:
            return None
        return name

    @classmethod
    def read(cls, revision: int, entries: Iterable[tuple[str, bytes]]) -> ClusterView:
        view = cls(revision)
        for key, value in entries:
            view.apply("put", key, value, revision)
        return view
