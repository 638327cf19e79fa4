"""The cluster store: etcd, through aetcd (asyncio over gRPC). The one module that imports it.

Every call is bounded (``timeout``, one second by default): a handler that needs the store
waits at most that long per call and then says in one sentence that the store cannot be
reached. aetcd never gives up by itself while etcd hangs (a stopped process, a partition), and
a watch falls silent then instead of failing, so liveness is the caller's job too (its own
lease keepalive, see the design note)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, Literal, TypeVar

import aetcd
from aetcd import exceptions as etcd_errors

from .clustermodel import Change, Entry
from .errors import HostError, InvalidRequest

T = TypeVar("T")
DEFAULT_TIMEOUT = 1.0
RENEW_AFTER = 3
# Reconnect soon after etcd comes back (gRPC's default backoff grows to two minutes), and
# notice a connection that went silent (keepalive pings).
CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 500,
    "grpc.max_reconnect_backoff_ms": 2000,
    "grpc.keepalive_time_ms": 10000,
    "grpc.keepalive_timeout_ms": 3000,
    "grpc.keepalive_permit_without_calls": 1,
}


class ClusterUnavailable(HostError):
    """The cluster store did not answer in time, or refused the connection."""


class WatchLost(ClusterUnavailable):
    """A watch ended; resynchronise and watch again from the revision read."""


class Compacted(WatchLost):
    """The revision to watch from is gone (compacted): read everything again."""


def grpc_target(endpoints: Sequence[tuple[str, int]]) -> tuple[str, int]:
    """aetcd's (host, port), from which it makes the gRPC target "host:port". Several
    endpoints make one target of the ipv4: or ipv6: scheme, "ipv4:A:P,B:P" (a dead first one is
    passed over), so the last port goes separately; those schemes take addresses only."""
    if len(endpoints) == 1:
        return endpoints[0]
    versions = set()
    for host, _ in endpoints:
        try:
            versions.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise InvalidRequest(
                f"--cluster: {host} is a name; give the etcd members by address when there "
                "are several (or one name that resolves to them all)"
            ) from None
    if len(versions) > 1:
        raise InvalidRequest("--cluster: give the etcd members all by IPv4 or all by IPv6 address")
    shown = [f"[{h}]" if ":" in h else h for h, _ in endpoints]
    scheme = "ipv6:" if versions == {6} else "ipv4:"
    head = ",".join(f"{h}:{p}" for h, (_, p) in zip(shown[:-1], endpoints[:-1], strict=True))
    return f"{scheme}{head},{shown[-1]}", endpoints[-1][1]


class EtcdStore:
    def __init__(
        self, endpoints: Sequence[tuple[str, int]], timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._where = ",".join(f"{h}:{p}" for h, p in endpoints)
        self._target = grpc_target(endpoints)
        self._client = self._new_client()
        self._failures = 0
        self._closing: set[asyncio.Task[None]] = set()

    def _new_client(self) -> aetcd.Client:
        host, port = self._target
        return aetcd.Client(
            host=host, port=port, timeout=max(1, round(self.timeout)), options=CHANNEL_OPTIONS
        )

    def _failed(self) -> None:
        """Calls that get no answer RENEW_AFTER times in a row: a new connection (a channel
        whose first connection went wrong was seen to stay so while etcd answered others)."""
        self._failures += 1
        if self._failures < RENEW_AFTER:
            return
        self._failures = 0
        old, self._client = self._client, self._new_client()
        task = asyncio.get_running_loop().create_task(old.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _bounded(self, what: str, call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                found = await call
            self._failures = 0
            return found
        except TimeoutError:
            self._failed()
            raise ClusterUnavailable(
                f"the cluster store (etcd at {self._where}) did not answer within "
                f"{self.timeout:g} s ({what})"
            ) from None
        except etcd_errors.ClientError as err:
            self._failed()
            raise ClusterUnavailable(
                f"the cluster store (etcd at {self._where}) cannot be reached ({what}: "
                f"{type(err).__name__})"
            ) from None

    async def close(self) -> None:
        await self._client.close()

    async def get(self, key: str) -> Entry | None:
        found = await self._bounded(f"reading {key}", self._client.get(key.encode()))
        return None if found is None else _entry(found)

    async def create(self, key: str, value: bytes, lease: int = 0) -> tuple[bool, Entry | None]:
        """Write ``key`` only if it does not exist (compare-and-set on its creation revision):
        (True, None) if this call created it, else (False, what is there)."""
        t = self._client.transactions
        put = t.put(key.encode(), value, lease=lease or None)
        won, answers = await self._bounded(
            f"creating {key}",
            self._client.transaction(
                compare=[t.create(key.encode()) == 0], success=[put], failure=[t.get(key.encode())]
            ),
        )
        if won:
            return True, None
        # The failure branch's read: [(value, the key-value with its metadata)].
        kvs = answers[0] if answers else []
        return False, (_entry(kvs[0][1]) if kvs else None)

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write ``key``; the revision of the write."""
        answer = await self._bounded(
            f"writing {key}", self._client.put(key.encode(), value, lease=lease or None)
        )
        return int(answer.header.revision)

    async def delete(self, key: str) -> bool:
        answer = await self._bounded(f"deleting {key}", self._client.delete(key.encode()))
        return bool(answer and answer.deleted)

    async def delete_if(self, key: str, value: bytes) -> bool:
        """Delete ``key`` only while it still holds ``value`` (a host deleting its own record,
        never one another host wrote since)."""
        t = self._client.transactions
        won, _ = await self._bounded(
            f"deleting {key}",
            self._client.transaction(
                compare=[t.value(key.encode()) == value],
                success=[t.delete(key.encode())],
                failure=[],
            ),
        )
        return bool(won)

    async def read_prefix(self, prefix: str) -> tuple[int, list[Entry]]:
        """Every key under ``prefix`` at one revision, and that revision (to watch from the
        next one)."""
        answer = await self._bounded(f"reading {prefix}", self._client.get_prefix(prefix.encode()))
        return int(answer.header.revision), [_entry(kv) for kv in answer]

    async def grant(self, ttl: int) -> int:
        """A lease of ``ttl`` seconds; its id."""
        lease = await self._bounded("granting a lease", self._client.lease(ttl))
        return int(lease.id)

    async def keep_alive(self, lease: int) -> int:
        """Refresh ``lease``; the seconds it has left (0: it had expired and is gone)."""
        answer: Any = await self._bounded("refreshing a lease", self._client.refresh_lease(lease))
        return int(answer.TTL)

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Change]:
        """Changes under ``prefix`` from ``start_revision`` on. Ends with WatchLost (or
        Compacted) when the watch breaks: the caller reads again and watches anew."""
        try:
            watch = await self._bounded(
                f"watching {prefix}",
                self._client.watch_prefix(prefix.encode(), start_revision=start_revision),
            )
        except ClusterUnavailable as err:
            raise WatchLost(str(err)) from None
        try:
            async for event in watch:
                kind: Literal["put", "delete"] = (
                    "delete" if event.kind == aetcd.rtypes.EventKind.DELETE else "put"
                )
                yield Change(kind, event.kv.key.decode(), event.kv.value, event.kv.mod_revision)
        except etcd_errors.RevisionCompactedError:
            raise Compacted(
                f"the cluster store compacted revision {start_revision}: read everything again"
            ) from None
        except etcd_errors.ClientError as err:
            raise WatchLost(
                f"the watch of {prefix} on etcd at {self._where} broke ({type(err).__name__})"
            ) from None
        finally:
            await watch.cancel()
        raise WatchLost(f"the watch of {prefix} on etcd at {self._where} ended")


def _entry(kv: Any) -> Entry:
    return Entry(kv.key.decode(), kv.value, int(kv.mod_revision), int(kv.lease or 0))
