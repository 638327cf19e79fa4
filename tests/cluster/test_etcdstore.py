"""The cluster store adapter against a real etcd: compare-and-set, leases, watches that resume
from a revision, and bounded calls when etcd hangs or goes away."""

from __future__ import annotations

import asyncio
import time

import pytest

from pydriver.etcdstore import ClusterUnavailable, EtcdStore, WatchLost
from tests.cluster.conftest import Etcd


async def test_create_is_a_compare_and_set(etcd: Etcd) -> None:
    a, b = EtcdStore([etcd.endpoint]), EtcdStore([etcd.endpoint])
    try:
        results = await asyncio.gather(
            a.create("/t/segments/web", b"A"), b.create("/t/segments/web", b"B")
        )
        winners = [won for won, _ in results]
        assert sorted(winners) == [False, True]
        loser = next(entry for won, entry in results if not won)
        assert loser is not None
        assert loser.value == (b"A" if winners[0] else b"B")
        assert (await a.get("/t/segments/web")) is not None
        assert await a.get("/t/nothing") is None
    finally:
        await a.close()
        await b.close()


async def test_delete_only_what_is_still_ours(etcd: Etcd) -> None:
    store = EtcdStore([etcd.endpoint])
    try:
        await store.put("/t/endpoints/web/10.70.0.5", b"host-a")
        assert not await store.delete_if("/t/endpoints/web/10.70.0.5", b"host-b")
        assert await store.delete_if("/t/endpoints/web/10.70.0.5", b"host-a")
        assert await store.get("/t/endpoints/web/10.70.0.5") is None
    finally:
        await store.close()


async def test_a_watch_resumes_from_the_revision_read(etcd: Etcd) -> None:
    store = EtcdStore([etcd.endpoint])
    try:
        await store.put("/t/members/web/a", b"1")
        revision, entries = await store.read_prefix("/t/members/")
        assert [e.key for e in entries] == ["/t/members/web/a"]
        await store.put("/t/members/web/b", b"2")  # after the read, before the watch
        await store.delete("/t/members/web/a")
        seen = []

        async def consume() -> None:
            async for change in store.watch("/t/members/", revision + 1):
                seen.append((change.kind, change.key))
                if len(seen) == 2:
                    return

        await asyncio.wait_for(consume(), 5)
        assert seen == [("put", "/t/members/web/b"), ("delete", "/t/members/web/a")]
    finally:
        await store.close()


async def test_a_leased_key_goes_with_its_lease(etcd: Etcd) -> None:
    store = EtcdStore([etcd.endpoint])
    try:
        lease = await store.grant(2)
        await store.put("/t/hosts/h9", b"up", lease=lease)
        assert await store.keep_alive(lease) > 0
        entry = await store.get("/t/hosts/h9")
        assert entry is not None
        assert entry.lease == lease
        deadline = time.monotonic() + 10
        while await store.get("/t/hosts/h9") is not None:
            assert time.monotonic() < deadline, "the leased key outlived its lease"
            await asyncio.sleep(0.2)
        assert await store.keep_alive(lease) == 0
    finally:
        await store.close()


async def test_a_hung_etcd_costs_at_most_the_bound(etcd: Etcd) -> None:
    store = EtcdStore([etcd.endpoint], timeout=0.5)
    try:
        deadline = time.monotonic() + 10  # the first call also connects: on a busy machine,
        while True:  # that alone can take longer than the bound
            try:
                await store.put("/t/x", b"1")
                break
            except ClusterUnavailable:
                assert time.monotonic() < deadline
        etcd.pause()
        started = time.monotonic()
        with pytest.raises(ClusterUnavailable, match=r"did not answer within 0\.5 s"):
            await store.get("/t/x")
        assert time.monotonic() - started < 1.5
        etcd.resume()
        deadline = time.monotonic() + 10  # etcd may need a moment (its own heartbeats)
        while True:
            try:
                assert await store.get("/t/x") is not None
                break
            except ClusterUnavailable:
                assert time.monotonic() < deadline
    finally:
        etcd.resume()
        await store.close()


async def test_a_watch_breaks_loudly_when_etcd_goes_and_works_again_after(etcd: Etcd) -> None:
    store = EtcdStore([etcd.endpoint], timeout=1.0)
    try:
        revision, _ = await store.read_prefix("/t/")

        async def consume() -> None:
            async for _ in store.watch("/t/", revision + 1):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        etcd.kill()
        with pytest.raises(WatchLost):
            await asyncio.wait_for(task, 10)
        with pytest.raises(ClusterUnavailable):
            await store.get("/t/x")
        etcd.start()  # the same data directory: a restart
        deadline = time.monotonic() + 10
        while True:
            try:
                await store.put("/t/x", b"2")
                break
            except ClusterUnavailable:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
    finally:
        await store.close()
