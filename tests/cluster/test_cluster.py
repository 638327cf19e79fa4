"""Hosts of a cluster over a real etcd: each sees the others, segments are recorded once and
checked after, blocks are claimed by one host each, and a host that stops leaves with its
lease; an etcd restart is read through."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import AsyncIterator, Callable

import pytest

from pydriver.cluster import Cluster
from pydriver.clustermodel import Segment, member_key
from pydriver.errors import Conflict
from pydriver.etcdstore import EtcdStore
from pydriver.interfaces import ClusterStore
from tests.cluster.conftest import Etcd

ip = ipaddress.ip_address


async def until(condition: Callable[[], bool], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.fixture
async def hosts(etcd: Etcd) -> AsyncIterator[list[Cluster]]:
    stores: list[ClusterStore] = [EtcdStore([etcd.endpoint]) for _ in range(3)]
    clusters = [
        Cluster(store, f"h{n}", ip(f"203.0.113.{n}"), lease_ttl=3)
        for n, store in enumerate(stores, start=1)
    ]
    for cluster in clusters:
        cluster.start()
    try:
        yield clusters
    finally:
        for cluster in clusters:
            await cluster.stop()
        for store in stores:
            assert isinstance(store, EtcdStore)
            await store.close()


def member(cluster: Cluster) -> tuple[str, bytes]:
    return member_key("web", cluster.host_id), json.dumps({"vtep": str(cluster.vtep)}).encode()


async def test_hosts_see_each_other_and_a_stopped_host_leaves(hosts: list[Cluster]) -> None:
    for cluster in hosts:
        await asyncio.wait_for(cluster.synced(), 10)
        cluster.publish(*member(cluster))
    await until(lambda: all(len(c.view.segment("web").members) == 3 for c in hosts))
    assert hosts[0].view.hosts == {c.host_id: c.vtep for c in hosts}
    await hosts[2].stop()  # it stops keeping its lease alive: it and its keys expire
    await until(lambda: set(hosts[0].view.segment("web").members) == {"h1", "h2"}, within=15)
    assert "h3" not in hosts[0].view.hosts


async def test_a_segment_is_recorded_once_and_checked_after(hosts: list[Cluster]) -> None:
    wanted = Segment("web", ("10.70.0.0/16",), ("10.70.0.1",), vni=0)
    recorded = await asyncio.gather(*(c.record_segment(wanted) for c in hosts))
    assert len({s.vni for s in recorded}) == 1
    assert 0 < recorded[0].vni < 4096
    other = Segment("web", ("10.71.0.0/16",), ("10.71.0.1",), vni=0)
    with pytest.raises(
        Conflict, match=r"subnets 10\.71\.0\.0/16 \(the cluster has 10\.70\.0\.0/16\)"
    ):
        await hosts[1].record_segment(other)
    # Another segment gets another VNI.
    assert (
        await hosts[1].record_segment(Segment("db", ("10.72.0.0/16",), ("10.72.0.1",), 0))
    ).vni != recorded[0].vni


async def test_blocks_are_claimed_by_one_host_each(hosts: list[Cluster]) -> None:
    pool = ipaddress.ip_network("10.70.0.0/24")
    for cluster in hosts:
        await asyncio.wait_for(cluster.synced(), 10)
    claims = await asyncio.gather(
        *(c.claim_block("web", pool, 28) for c in hosts for _ in range(5))
    )
    got = [b for b in claims if b is not None]
    assert len(got) == len(set(got)) == 15
    # Every host learns the owners through the watch.
    await until(lambda: all(len(c.view.segment("web").blocks) == 15 for c in hosts))
    owners = hosts[0].view.segment("web").blocks
    assert sorted(set(owners.values())) == ["h1", "h2", "h3"]
    last = await hosts[0].claim_block("web", pool, 28)
    assert last is not None
    assert await hosts[1].claim_block("web", pool, 28) is None  # all 16 are held


async def test_an_etcd_restart_is_read_through(etcd: Etcd, hosts: list[Cluster]) -> None:
    for cluster in hosts:
        await asyncio.wait_for(cluster.synced(), 10)
        cluster.publish(*member(cluster))
    await until(lambda: len(hosts[0].view.segment("web").members) == 3)
    etcd.kill()
    await asyncio.sleep(1)
    etcd.start()  # same data directory
    hosts[1].publish(member_key("db", "h2"), json.dumps({"vtep": "203.0.113.2"}).encode())
    await until(lambda: "h2" in hosts[0].view.segment("db").members, within=20)
    assert len(hosts[0].view.segment("web").members) == 3
