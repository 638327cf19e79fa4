"""This host's part in a cluster (orchestration over the cluster store).

Three tasks, none of which a Docker request ever waits on:

* the session: a lease (TTL ``lease_ttl``) kept alive every third of it, with this host's
  record and every leased key (members, endpoints) written under it. A lease that is lost
  (etcd restarted past it, a long partition) is replaced and the leased keys written again.
* the sync: one read of the whole prefix at a revision, then a watch from the next one; the
  view (clusterview.py) follows, and ``on_change`` hears which segments changed. A broken
  watch is answered with a new read (the view is rebuilt, so nothing stale survives).
* the publisher: keys to write or delete are queued (``publish``/``unpublish`` return at once)
  and written in order; while etcd cannot be reached they wait and are retried.

Only two things wait on the store, each for a bounded time: recording or checking a segment
(network create) and claiming an address block (when a host has no free address left)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from .blocks import next_claim
from .clustermodel import (
    PREFIX,
    Change,
    Segment,
    block_key,
    differences,
    host_key,
    segment_key,
    vni_candidates,
    vni_key,
)
from .clusterview import ClusterView
from .errors import Conflict, HostError
from .interfaces import ClusterStore
from .model import IPAddress, IPNetwork

log = logging.getLogger(__name__)

Notify = Callable[[set[str]], Awaitable[None]]
RETRY = 1.0  # seconds between attempts while etcd cannot be reached
CLAIM_TRIES = 64  # lost compare-and-sets in a row before giving up (hosts racing)


class Cluster:
    def __init__(
        self,
        store: ClusterStore,
        host_id: str,
        vtep: IPAddress,
        *,
        lease_ttl: int = 10,
        on_change: Notify | None = None,
    ) -> None:
        self.store = store
        self.host_id = host_id
        self.vtep = vtep
        self.lease_ttl = lease_ttl
        self.view = ClusterView()
        self._on_change = on_change
        self._lease = 0
        self._leased: dict[
            str, bytes
        ] = {}  # what goes under the lease (written again with a new one)
        # key -> (value to write, None: delete; a serial telling one request from another)
        self._pending: dict[str, tuple[bytes | None, int]] = {}
        self._serial = 0
        self._withdrawn: set[str] = set()  # own leased keys deleted, until the watch says so
        self._wake = asyncio.Event()
        self._synced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._sync_task: asyncio.Task[None] | None = None

    # -- life --------------------------------------------------------------------------------

    def start(self) -> None:
        self._leased[host_key(self.host_id)] = json.dumps({"vtep": str(self.vtep)}).encode()
        self._queue(host_key(self.host_id), self._leased[host_key(self.host_id)])
        for run, name in ((self._session, "session"), (self._publisher, "publisher")):
            self._tasks.append(asyncio.create_task(run(), name=f"pydriver-cluster-{name}"))
        self._start_sync()
        self._wake.set()

    def _start_sync(self) -> None:
        """The sync (again: a new read, then a watch). After a lost lease too: a watch can fall
        silent instead of failing when etcd goes away without a word."""
        if self._sync_task is not None:
            self._sync_task.cancel()
        self._sync_task = asyncio.create_task(self._sync(), name="pydriver-cluster-sync")

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._sync_task] if self._sync_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._sync_task = None

    @property
    def is_synced(self) -> bool:
        """Whether the view holds the cluster's state (it may lag while etcd is away)."""
        return self._synced.is_set()

    async def synced(self) -> None:
        """Return once the view holds the cluster's state (the first read is done)."""
        await self._synced.wait()

    # -- publishing --------------------------------------------------------------------------

    def publish(self, key: str, value: bytes, *, leased: bool = True) -> None:
        """Write ``key`` soon (under this host's lease if ``leased``); never waits."""
        if leased:
            self._leased[key] = value
        self._queue(key, value)

    def unpublish(self, key: str) -> None:
        if self._leased.pop(key, None) is not None:
            self._withdrawn.add(key)
        self._queue(key, None)

    def _queue(self, key: str, value: bytes | None) -> None:
        self._serial += 1
        self._pending[key] = (value, self._serial)
        self._wake.set()

    async def _publisher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending and self._lease:
                key, request = next(iter(self._pending.items()))
                value = request[0]
                try:
                    if value is None:
                        await self.store.delete(key)
                    else:
                        lease = self._lease if key in self._leased else 0
                        await self.store.put(key, value, lease=lease)
                except HostError as err:
                    log.warning("cluster: %s; trying again in %g s", err, RETRY)
                    await asyncio.sleep(RETRY)
                    continue
                # Done unless asked for again meanwhile (a new value, or the same one under a
                # new lease: a write in flight when the lease was replaced went under the old).
                if self._pending.get(key) is request:
                    del self._pending[key]

    # -- the session -------------------------------------------------------------------------

    async def _session(self) -> None:
        first = True
        while True:
            try:
                self._lease = await self.store.grant(self.lease_ttl)
            except HostError as err:
                log.warning("cluster: no lease (%s); trying again in %g s", err, RETRY)
                await asyncio.sleep(RETRY)
                continue
            # Everything leased goes again under the new lease.
            for key, value in self._leased.items():
                self._queue(key, value)
            if not first:
                self._start_sync()
            first = False
            await self._keep_alive()
            self._lease = 0  # lost: nothing is written under it any more

    async def _keep_alive(self) -> None:
        """Refresh the lease until it is lost (it expired, or etcd forgot it)."""
        lost_after = asyncio.get_running_loop().time() + self.lease_ttl
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                left = await self.store.keep_alive(self._lease)
            except HostError as err:
                if asyncio.get_running_loop().time() > lost_after:
                    log.warning("cluster: lease lost while etcd could not be reached (%s)", err)
                    return
                continue
            if left <= 0:
                log.warning("cluster: lease expired; taking a new one")
                return
            lost_after = asyncio.get_running_loop().time() + left

    # -- the sync ----------------------------------------------------------------------------

    async def _sync(self) -> None:
        while True:
            try:
                revision, entries = await self.store.read_prefix(PREFIX)
            except HostError as err:
                log.warning("cluster: cannot read the cluster (%s); trying again", err)
                await asyncio.sleep(RETRY)
                continue
            self.view = ClusterView.read(revision, ((e.key, e.value) for e in entries))
            self._synced.set()
            await self._notify(set(self.view.segments))
            try:
                async for change in self.store.watch(PREFIX, revision + 1):
                    touched = self.view.apply(
                        change.kind, change.key, change.value, change.revision
                    )
                    if touched is not None and not self._echo(change):
                        await self._notify({touched})
            except HostError as err:  # WatchLost and Compacted included
                log.warning("cluster: %s; reading the cluster again", err)
                await asyncio.sleep(RETRY / 4)

    def _echo(self, change: Change) -> bool:
        """Whether ``change`` is this host's own write of a leased key coming back (its own
        containers and membership: nothing for the tunnels to do, and no reason to make every
        container start and stop wait behind a tunnel check)."""
        if change.kind == "put":
            return self._leased.get(change.key) == change.value
        if change.key in self._withdrawn and change.key not in self._leased:
            self._withdrawn.discard(change.key)
            return True
        return False

    async def _notify(self, segments: set[str]) -> None:
        if self._on_change is None or not segments:
            return
        try:
            await self._on_change(segments)
        except Exception:  # a failed reaction must not end the sync
            log.exception("cluster: reacting to a change of %s failed", ", ".join(sorted(segments)))

    # -- waited on, bounded --------------------------------------------------------------------

    async def record_segment(self, wanted: Segment) -> Segment:
        """The segment as the cluster has it: recorded now from ``wanted`` (a VNI chosen by a
        compare-and-set when none was given) if no host did before; otherwise checked against
        it. Raises Conflict naming the differences, HostError if etcd cannot be reached."""
        found = await self.store.get(segment_key(wanted.name))
        if found is not None:
            return self._agree(wanted, Segment.from_json(found.value.decode()))
        candidates = [wanted.vni] if wanted.vni else vni_candidates(wanted.name)
        for vni in candidates:
            won, holder = await self.store.create(vni_key(vni), wanted.name.encode())
            if not won and not (holder is not None and holder.value == wanted.name.encode()):
                continue  # (taken by this segment itself: an earlier try that timed out)
            segment = Segment(**{**wanted.__dict__, "vni": vni})
            created, other = await self.store.create(
                segment_key(wanted.name), segment.to_json().encode()
            )
            if created:
                return segment
            await self.store.delete_if(vni_key(vni), wanted.name.encode())
            assert other is not None
            return self._agree(wanted, Segment.from_json(other.value.decode()))
        raise Conflict(
            f"no free VNI for segment {wanted.name}: "
            + (f"VNI {wanted.vni} is taken" if wanted.vni else "give one with pybridge.vni")
        )

    @staticmethod
    def _agree(wanted: Segment, recorded: Segment) -> Segment:
        sentence = differences(wanted, recorded)
        if sentence is not None:
            raise Conflict(sentence)
        return recorded

    async def claim_block(self, segment: str, pool: IPNetwork, prefix: int) -> IPNetwork | None:
        """One more block of ``pool`` for this host (None: every block is held). Each lost
        compare-and-set teaches this host the winner, so the next try is another block; a
        block this host itself won meanwhile (another of its claims) counts as lost too."""
        view = self.view.segment(segment)
        taken = {
            b
            for b in view.blocks
            if b.version == pool.version and b.subnet_of(pool)  # type: ignore[arg-type]
        }
        record = json.dumps({"host": self.host_id}).encode()
        for _ in range(CLAIM_TRIES):
            block = next_claim(pool, prefix, self.host_id, taken)
            if block is None:
                return None
            won, other = await self.store.create(block_key(segment, block), record)
            if won:
                view.blocks[block] = self.host_id
                return block
            taken.add(block)
            if other is not None:
                view.blocks[block] = str(json.loads(other.value).get("host", ""))
        raise HostError(
            f"could not claim an address block of {pool} in segment {segment}: other hosts "
            f"took {CLAIM_TRIES} in a row; try again"
        )

    async def claim_this_block(self, segment: str, block: IPNetwork) -> str:
        """Claim ``block`` itself (for an address asked for by name, ``--ip``); the host that
        holds it afterwards: this one if the claim was won or it held it already."""
        holder = self.view.segment(segment).blocks.get(block)
        if holder is not None:
            return holder
        record = json.dumps({"host": self.host_id}).encode()
        won, other = await self.store.create(block_key(segment, block), record)
        holder = self.host_id if won or other is None else str(json.loads(other.value)["host"])
        self.view.segment(segment).blocks[block] = holder
        return holder
