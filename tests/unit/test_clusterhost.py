"""This host's networks that span hosts (clusterhost.py with cluster.py), several hosts over
one in-memory cluster store: segments recorded and checked, addresses unique across hosts
from blocks, tunnels that follow the cluster, and what still works while etcd is away."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from pydriver.cluster import Cluster
from pydriver.clusterhost import META_KEY, ClusterHost, Underlay
from pydriver.clustermodel import PREFIX, member_key
from pydriver.errors import Conflict, HostError, InvalidRequest
from pydriver.model import Endpoint, IPAddress, IPNetwork, Network, Subnet
from pydriver.protocol import CreateNetworkRequest, IPData
from pydriver.segments import segment_options
from tests.unit.fakecluster import FakeTunnelKernel, MemoryClusterStore, MemoryMeta

ip = ipaddress.ip_address
SUBNET = ipaddress.ip_network("10.70.0.0/16")
GATEWAY = ipaddress.ip_interface("10.70.0.1/16")
SPACE = "PybridgeLocal"


@dataclass
class Host:
    n: int
    host: ClusterHost
    kernel: FakeTunnelKernel
    meta: MemoryMeta
    networks: dict[str, Network] = field(default_factory=dict)
    endpoints: dict[str, list[Endpoint]] = field(default_factory=dict)
    used: set[int] = field(default_factory=set)


def make_host(store: MemoryClusterStore, n: int, meta: MemoryMeta | None = None) -> Host:
    kernel, meta = FakeTunnelKernel(), meta or MemoryMeta()
    vtep = ip(f"203.0.113.{n}")
    holder: list[Host] = []

    async def on_change(segments: set[str]) -> None:
        await holder[0].host.on_change(segments)

    cluster = Cluster(store, f"host{n}", vtep, on_change=on_change)
    box = Host(n, None, kernel, meta)  # type: ignore[arg-type]
    box.host = ClusterHost(
        cluster,
        kernel,
        meta,
        Underlay("eth0", vtep, 1500),
        lambda: box.networks.values(),
        lambda network_id: box.endpoints.get(network_id, []),
        vxlan_port=4789,
        endpoint="etcd://memory",
    )
    holder.append(box)
    return box


def request(
    segment: str = "seg", subnet: str = "10.70.0.0/16", **extra: str
) -> CreateNetworkRequest:
    pool = ipaddress.ip_network(subnet)
    return CreateNetworkRequest(
        network_id=secrets.token_hex(32),
        generic_options={"pybridge.segment": segment, **extra},
        ipv4_data=(IPData(pool, ipaddress.ip_interface(f"{pool[1]}/{pool.prefixlen}"), {}, SPACE),),
        ipv6_data=(),
    )


async def create(box: Host, req: CreateNetworkRequest) -> Network:
    """What the driver does: prepare (the cluster's word), then attach once the bridge is up."""
    options = segment_options(req.generic_options)
    assert options is not None
    segment = await box.host.prepare(options, req, icc=True, owned=True)
    data = req.ipv4_data[0]
    network = Network(
        id=req.network_id,
        bridge=f"pyb-{req.network_id[:11]}",
        bridge_owned=True,
        subnets_v4=(Subnet(data.pool, data.gateway, ipam_pool=str(data.pool)),),
        subnets_v6=(),
        raw_options=dict(req.generic_options),
    )
    box.networks[network.id] = network
    await box.host.attach(network, segment)
    return network


async def allocate(
    host: ClusterHost, subnet: IPNetwork, used: set[int], wanted: IPAddress | None
) -> IPAddress:
    """What the IPAM driver does: an address from the blocks held, else a claim first."""
    found = host.pick(str(subnet), subnet, used, wanted)
    if found is None:
        await host.claim_for(str(subnet), subnet, wanted)
        found = host.pick(str(subnet), subnet, used, wanted)
    if found is None:
        raise Conflict(f"{wanted} taken")
    return found


async def start_container(
    box: Host, network: Network, wanted: IPAddress | None = None
) -> IPAddress:
    address = await allocate(box.host, SUBNET, box.used, wanted)
    box.used.add(int(address))
    endpoint = Endpoint(
        id=secrets.token_hex(32),
        network_id=network.id,
        host_veth="v",
        container_veth="c",
        mac_address=f"02:42:{box.n:02x}:{int(address) >> 16 & 255:02x}:{int(address) >> 8 & 255:02x}:{int(address) & 255:02x}",
        mac_generated=True,
        address=ipaddress.IPv4Interface(f"{address}/16"),
    )
    box.endpoints.setdefault(network.id, []).append(endpoint)
    box.host.sync_endpoints(network.id)
    return address


async def settle(store: MemoryClusterStore, *boxes: Host) -> None:
    """Until every publisher has written what it queued and the watches delivered it."""
    for _ in range(200):
        await asyncio.sleep(0)
        if all(not b.host.cluster._pending for b in boxes) and all(
            b.host.cluster.view.revision >= store.revision for b in boxes
        ):
            break
    for _ in range(50):
        await asyncio.sleep(0)


@pytest.fixture
async def store() -> MemoryClusterStore:
    return MemoryClusterStore()


@pytest.fixture
async def hosts(
    store: MemoryClusterStore, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[list[Host]]:
    monkeypatch.setattr("pydriver.clusterhost.WAIT", 0.3)  # the bound, shortened
    boxes = [make_host(store, n) for n in (1, 2, 3)]
    for box in boxes:
        await box.host.load()
        box.host.start(interval=3600)
    await asyncio.gather(*(b.host.cluster.synced() for b in boxes))
    yield boxes
    for box in boxes:
        await box.host.close()


async def test_containers_on_three_hosts_see_each_other_and_never_share_an_address(
    store: MemoryClusterStore, hosts: list[Host]
) -> None:
    nets = [await create(box, request()) for box in hosts]
    addresses = await asyncio.gather(
        *(
            start_container(box, net)
            for box, net in zip(hosts, nets, strict=True)
            for _ in range(70)
        )
    )
    assert len(set(addresses)) == len(addresses) == 210
    assert all(a in SUBNET and a != GATEWAY.ip for a in addresses)
    await settle(store, *hosts)
    for box, net in zip(hosts, nets, strict=True):
        await box.host.reconcile()
        entries = box.kernel.entries[f"pyx-{net.id[:11]}"]
        others = {ip(f"203.0.113.{n}") for n in (1, 2, 3) if n != box.n}
        assert entries.flood == others
        assert len(entries.neighbours) == 140  # the other hosts' containers, never its own
        assert set(entries.forwarding.values()) == others
        # Blocks held are recorded locally before any of their addresses is handed out.
        held = json.loads(box.meta.values[META_KEY])["blocks"]["seg"]
        assert all(
            any(ipaddress.ip_address(a) in ipaddress.ip_network(b) for b in held)
            for a in addresses[(box.n - 1) * 70 : box.n * 70]
        )


async def test_a_later_host_that_differs_is_told_in_one_sentence(hosts: list[Host]) -> None:
    await create(hosts[0], request("other", "10.71.0.0/24"))
    with pytest.raises(Conflict, match=r"10\.72\.0\.0/24 \(the cluster has 10\.71\.0\.0/24\)"):
        await create(hosts[1], request("other", "10.72.0.0/24"))
    with pytest.raises(Conflict, match="a host joins a segment once"):
        await create(hosts[0], request("other", "10.71.0.0/24"))


async def test_docker_ipam_is_refused_for_a_segment(hosts: list[Host]) -> None:
    req = request()
    options = segment_options(req.generic_options)
    assert options is not None
    with pytest.raises(InvalidRequest, match="--ipam-driver pybridge"):
        await hosts[0].host.prepare(options, req, icc=True, owned=False)


async def test_a_host_that_leaves_is_removed_from_the_tunnels(
    store: MemoryClusterStore, hosts: list[Host]
) -> None:
    nets = [await create(box, request()) for box in hosts[:2]]
    await start_container(hosts[0], nets[0])
    gone = await start_container(hosts[1], nets[1])
    await settle(store, *hosts)
    device = f"pyx-{nets[0].id[:11]}"
    assert gone in hosts[0].kernel.entries[device].neighbours
    lease = store.lease_of(member_key("seg", "host2"))
    await hosts[1].host.cluster.stop()  # it dies: nothing refreshes its lease
    await store.expire(lease)
    await settle(store, hosts[0])
    entries = hosts[0].kernel.entries[device]
    assert gone not in entries.neighbours
    assert entries.flood == frozenset()
    # Its blocks stay its own: its addresses are not handed out again while it may come back.
    assert any(v.value == b'{"host": "host2"}' for k, v in store.keys.items() if "/blocks/" in k)


async def test_an_address_asked_for_in_another_hosts_block_is_refused(
    store: MemoryClusterStore, hosts: list[Host]
) -> None:
    nets = [await create(box, request()) for box in hosts[:2]]
    theirs = await start_container(hosts[1], nets[1])
    await settle(store, *hosts)
    with pytest.raises(Conflict, match="another host holds \\(host2\\)"):
        await start_container(hosts[0], nets[0], ip(str(theirs + 1)))
    # A free block: claimed for it.
    mine = await start_container(hosts[0], nets[0], ip("10.70.200.7"))
    assert mine == ip("10.70.200.7")


async def test_while_etcd_is_away(store: MemoryClusterStore, hosts: list[Host]) -> None:
    net = await create(hosts[0], request())
    await start_container(hosts[0], net)
    await settle(store, *hosts)
    await store.set_down(True)
    # Containers keep starting from the blocks this host holds.
    for _ in range(20):
        await start_container(hosts[0], net)
    # A host with no block says so, in one sentence.
    other = hosts[1]
    other.networks[net.id] = net
    other.host.segments["seg"] = hosts[0].host.segments["seg"]
    other.host.pools[str(SUBNET)] = "seg"
    with pytest.raises(HostError, match="cannot reach the cluster store at etcd://memory and "
                       "holds no free address in segment seg"):  # fmt: skip
        await allocate(other.host, SUBNET, set(), None)
    # A segment this host knows is created again without the store; an unknown one is not.
    await hosts[0].host.detach(net)
    del hosts[0].networks[net.id]
    await create(hosts[0], request())
    with pytest.raises(HostError, match="cannot reach the cluster store"):
        await create(hosts[0], request("new", "10.80.0.0/24"))


async def test_restart_with_etcd_away_rebuilds_the_tunnel_from_the_state(
    store: MemoryClusterStore, hosts: list[Host]
) -> None:
    net = await create(hosts[0], request())
    await start_container(hosts[0], net)
    await settle(store, *hosts)
    await store.set_down(True)
    again = make_host(store, 1, hosts[0].meta)
    again.networks[net.id] = net
    again.kernel.devices["pyx-0123456789a"] = (9, "pyb-gone")  # a rolled-back network's
    await again.host.load()
    again.host.start(interval=3600)
    try:
        await again.host.restore()
        assert list(again.kernel.devices) == [f"pyx-{net.id[:11]}"]
        # Addresses come from the blocks it held, without the store.
        address = await allocate(again.host, SUBNET, hosts[0].used, None)
        assert address not in {ip(a) for a in hosts[0].used}
        await store.set_down(False)
        await asyncio.wait_for(again.host.cluster.synced(), 5)
        await settle(store, again)
        assert PREFIX + "members/seg/host1" in store.keys
    finally:
        await again.host.close()


async def test_later_hosts_take_the_segments_subnet(
    store: MemoryClusterStore, hosts: list[Host]
) -> None:
    await create(hosts[0], request())
    assert await hosts[1].host.segment_subnet("seg", v6=False) == SUBNET
    with pytest.raises(InvalidRequest, match="segment seg has no IPv6 subnet"):
        await hosts[1].host.segment_subnet("seg", v6=True)
    with pytest.raises(InvalidRequest, match="the first host creates it with --subnet"):
        await hosts[1].host.segment_subnet("nope", v6=False)
    await store.set_down(True)
    with pytest.raises(HostError, match=r"cannot reach the cluster store .* give --subnet"):
        await hosts[2].host.segment_subnet("nope", v6=False)


async def test_a_slow_store_is_tried_again_within_the_bound(
    store: MemoryClusterStore, hosts: list[Host]
) -> None:
    calls = 0
    original = store.get

    async def first_call_fails(key: str) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise HostError("etcd did not answer within 1 s")
        return await original(key)

    store.get = first_call_fails  # type: ignore[method-assign]
    await create(hosts[0], request())
    assert calls >= 2


async def test_blocks_forgotten_in_the_cluster_are_claimed_again_or_given_up(
    store: MemoryClusterStore, hosts: list[Host]
) -> None:
    net = await create(hosts[0], request())
    mine = await start_container(hosts[0], net)
    await settle(store, *hosts)
    (block,) = [b for b in hosts[0].host.blocks["seg"] if mine in b]
    key = f"{PREFIX}blocks/seg/{str(block).replace('/', '-')}"
    # Freed in the cluster behind this host's back (an operator's `cluster forget`): claimed again.
    await store.delete(key)
    await settle(store, *hosts)
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert json.loads(store.keys[key].value) == {"host": "host1"}
    # Taken by another host meanwhile: never handed out here again.
    await store.delete(key)
    hosts[1].host.cluster.view.segment("seg").blocks.pop(block, None)
    hosts[0].host.cluster.view.segment("seg").blocks.pop(block, None)
    await store.put(key, b'{"host": "host2"}')
    await settle(store, *hosts)
    assert block not in hosts[0].host.blocks["seg"]
    assert mine in block
