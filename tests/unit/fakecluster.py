"""In-memory stand-ins for the cluster store and the tunnel kernel, for unit tests of
cluster.py and clusterhost.py (tests/cluster runs the same logic over a real etcd, and
tests/privileged over the real kernel)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from pydriver.clustermodel import Change, Entry
from pydriver.errors import HostError
from pydriver.model import IPAddress, Link
from pydriver.tunnel import FLOOD_MAC, Step, TunnelEntries


class Unavailable(HostError):
    pass


@dataclass
class _Key:
    value: bytes
    revision: int
    lease: int


class MemoryClusterStore:
    """etcd's semantics that pybridge relies on: revisions, compare-and-set on creation,
    leases whose keys go when they expire, watches from a revision. ``down`` makes every call
    fail as an unreachable etcd does (watches break)."""

    def __init__(self) -> None:
        self.keys: dict[str, _Key] = {}
        self.revision = 1
        self.leases: dict[int, bool] = {}
        self.history: list[Change] = []
        self.down = False
        self._changed = asyncio.Condition()
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise Unavailable("the cluster store (etcd at memory) cannot be reached")

    async def _record(self, kind: str, key: str, value: bytes) -> None:
        self.revision += 1
        self.history.append(Change(kind, key, value, self.revision))  # type: ignore[arg-type]
        async with self._changed:
            self._changed.notify_all()

    async def get(self, key: str) -> Entry | None:
        self._check()
        found = self.keys.get(key)
        return None if found is None else Entry(key, found.value, found.revision, found.lease)

    async def create(self, key: str, value: bytes, lease: int = 0) -> tuple[bool, Entry | None]:
        self._check()
        if key in self.keys:
            return False, await self.get(key)
        await self.put(key, value, lease)
        return True, None

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        self._check()
        if lease and not self.leases.get(lease):
            raise Unavailable(f"lease {lease} not found")
        self.keys[key] = _Key(value, self.revision + 1, lease)
        await self._record("put", key, value)
        return self.revision

    async def delete(self, key: str) -> bool:
        self._check()
        if self.keys.pop(key, None) is None:
            return False
        await self._record("delete", key, b"")
        return True

    async def delete_if(self, key: str, value: bytes) -> bool:
        self._check()
        found = self.keys.get(key)
        if found is None or found.value != value:
            return False
        return await self.delete(key)

    async def read_prefix(self, prefix: str) -> tuple[int, list[Entry]]:
        self._check()
        return self.revision, [
            Entry(k, v.value, v.revision, v.lease)
            for k, v in sorted(self.keys.items())
            if k.startswith(prefix)
        ]

    async def grant(self, ttl: int) -> int:
        self._check()
        lease = len(self.leases) + 1
        self.leases[lease] = True
        return lease

    async def keep_alive(self, lease: int) -> int:
        self._check()
        return 10 if self.leases.get(lease) else 0

    async def expire(self, lease: int) -> None:
        """The lease runs out (its host stopped refreshing it): its keys go."""
        self.leases[lease] = False
        for key in [k for k, v in self.keys.items() if v.lease == lease]:
            del self.keys[key]
            await self._record("delete", key, b"")

    def lease_of(self, key: str) -> int:
        return self.keys[key].lease

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Change]:
        self._check()
        seen = start_revision - 1
        while True:
            for change in self.history:
                if change.revision > seen and change.key.startswith(prefix):
                    seen = change.revision
                    yield change
            seen = max(seen, self.revision)
            async with self._changed:
                await self._changed.wait()
            if self.down:
                raise Unavailable("the watch broke")

    async def set_down(self, down: bool) -> None:
        self.down = down
        async with self._changed:
            self._changed.notify_all()

    async def close(self) -> None:
        pass


@dataclass
class FakeTunnelKernel:
    """VXLAN devices as dictionaries of entries."""

    devices: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (vni, master)
    entries: dict[str, TunnelEntries] = field(default_factory=dict)

    async def ensure_vxlan(
        self, name: str, vni: int, port: int, local: IPAddress, underlay: str, master: str
    ) -> bool:
        created = name not in self.devices
        self.devices[name] = (vni, master)
        self.entries.setdefault(name, TunnelEntries(frozenset(), {}, {}))
        return created

    async def tunnel_entries(self, name: str) -> TunnelEntries:
        return self.entries.get(name, TunnelEntries(frozenset(), {}, {}))

    async def apply_tunnel(self, name: str, steps: Sequence[Step]) -> None:
        if name not in self.devices:
            raise HostError(f"the VXLAN device {name} does not exist")
        have = self.entries[name]
        flood, fdb, neigh = set(have.flood), dict(have.forwarding), dict(have.neighbours)
        for step in steps:
            if step.action == "flood-add" and step.vtep is not None:
                flood.add(step.vtep)
            elif step.action == "flood-remove" and step.vtep is not None:
                flood.discard(step.vtep)
            elif step.action == "fdb-replace" and step.vtep is not None:
                assert step.mac != FLOOD_MAC
                fdb[step.mac] = step.vtep
            elif step.action == "fdb-remove":
                fdb.pop(step.mac, None)
            elif step.action == "neigh-replace" and step.address is not None:
                neigh[step.address] = step.mac
            elif step.action == "neigh-remove" and step.address is not None:
                neigh.pop(step.address, None)
        self.entries[name] = TunnelEntries(frozenset(flood), fdb, neigh)

    async def delete_link(self, name: str) -> bool:
        self.entries.pop(name, None)
        return self.devices.pop(name, None) is not None

    async def links(self) -> list[Link]:
        return [Link(i, name, "vxlan", None, 1450, True, "") for i, name in enumerate(self.devices)]


@dataclass
class MemoryMeta:
    values: dict[str, str] = field(default_factory=dict)

    async def get_meta(self, key: str) -> str | None:
        return self.values.get(key)

    async def set_meta(self, key: str, value: str) -> None:
        self.values[key] = value
