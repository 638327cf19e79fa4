"""The IPAM allocator (pure) and the IPAM driver over a real state database."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pydriver import protocol as p
from pydriver.errors import Conflict, Exhausted, InvalidRequest, NotFound, Unsupported
from pydriver.interfaces import PoolStore
from pydriver.ipam import (
    DEFAULT_V4_POOLS,
    REPLAY_WINDOW,
    UNCLAIMED_RELEASE_AFTER,
    Pool,
    UnacknowledgedAnswer,
    choose_subnet,
    default_v4_candidates,
    describe_route,
    find_overlap,
    make_ula_prefix,
    pool_id_for,
    v6_candidates,
)
from pydriver.ipamdriver import GLOBAL_ADDRESS_SPACE, LOCAL_ADDRESS_SPACE, IpamDriver
from pydriver.model import HostRoute, IPNetwork
from pydriver.store import SqliteStore

from .fakes import FakeStore


def iface(text: str) -> Any:
    return ipaddress.ip_interface(text)


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def pool(subnet: str, sub_range: str | None = None) -> Pool:
    s = net(subnet)
    return Pool(id=pool_id_for(s), subnet=s, sub_range=net(sub_range) if sub_range else None)


# ---------------------------------------------------------------------------------------------
# Pool.allocate
# ---------------------------------------------------------------------------------------------


def test_gateway_is_first_host_and_dynamic_follows() -> None:
    pl = pool("10.1.0.0/24")
    assert pl.allocate(gateway=True) == ip("10.1.0.1")
    assert pl.allocate() == ip("10.1.0.2")
    assert pl.allocate() == ip("10.1.0.3")
    assert pl.allocated == {int(ip("10.1.0.1")), int(ip("10.1.0.2")), int(ip("10.1.0.3"))}


def test_dynamic_without_gateway_starts_at_first_host() -> None:
    assert pool("10.1.0.0/24").allocate() == ip("10.1.0.1")


def test_round_robin_after_release() -> None:
    pl = pool("10.1.0.0/24")
    pl.allocate(gateway=True)
    a, b = pl.allocate(), pl.allocate()
    assert (a, b) == (ip("10.1.0.2"), ip("10.1.0.3"))
    assert pl.release(a) is True
    assert pl.release(a) is False  # idempotent
    # the just-released .2 is not reused at once
    assert pl.allocate() == ip("10.1.0.4")


def test_round_robin_wraps_to_released_addresses() -> None:
    pl = pool("10.1.0.0/29")  # hosts .1-.6
    got = [pl.allocate() for _ in range(6)]
    assert got == [ip(f"10.1.0.{i}") for i in range(1, 7)]
    pl.release(ip("10.1.0.3"))
    assert pl.allocate() == ip("10.1.0.3")


def test_specific_address_and_conflict() -> None:
    pl = pool("10.1.0.0/24")
    assert pl.allocate(ip("10.1.0.77")) == ip("10.1.0.77")
    with pytest.raises(Conflict, match=r"10\.1\.0\.77 is already in use"):
        pl.allocate(ip("10.1.0.77"))
    # a specific allocation does not move the cursor
    assert pl.allocate() == ip("10.1.0.1")


def test_gateway_given_explicitly() -> None:
    pl = pool("10.1.0.0/24")
    assert pl.allocate(ip("10.1.0.254"), gateway=True) == ip("10.1.0.254")
    assert pl.allocate() == ip("10.1.0.1")


def test_gateway_skips_taken_addresses() -> None:
    pl = pool("10.1.0.0/24")
    pl.allocate(ip("10.1.0.1"))
    assert pl.allocate(gateway=True) == ip("10.1.0.2")


@pytest.mark.parametrize("address", ["10.2.0.1", "fd00::1", "10.1.1.0"])
def test_specific_outside_subnet(address: str) -> None:
    with pytest.raises(InvalidRequest, match="outside the subnet"):
        pool("10.1.0.0/24").allocate(ip(address))


@pytest.mark.parametrize(
    ("subnet", "address"),
    [("10.1.0.0/24", "10.1.0.0"), ("10.1.0.0/24", "10.1.0.255"), ("fd00::/64", "fd00::")],
)
def test_network_and_broadcast_refused(subnet: str, address: str) -> None:
    with pytest.raises(InvalidRequest, match="network or broadcast"):
        pool(subnet).allocate(ip(address))


def test_ipv6_last_address_is_usable() -> None:
    pl = pool("fd00::/120")
    assert pl.allocate(ip("fd00::ff")) == ip("fd00::ff")
    assert pl.allocate(gateway=True) == ip("fd00::1")


def test_slash_31_uses_both_addresses() -> None:
    pl = pool("10.9.0.0/31")
    assert pl.allocate(gateway=True) == ip("10.9.0.0")
    assert pl.allocate() == ip("10.9.0.1")
    with pytest.raises(Exhausted, match="out of addresses"):
        pl.allocate()


def test_slash_32_has_one_address() -> None:
    pl = pool("10.9.0.7/32")
    assert pl.allocate() == ip("10.9.0.7")
    with pytest.raises(Exhausted, match="out of addresses"):
        pl.allocate()
    with pytest.raises(Conflict):
        pl.allocate(ip("10.9.0.7"))


def test_exhaustion() -> None:
    pl = pool("10.1.0.0/29")
    for _ in range(6):
        pl.allocate()
    with pytest.raises(Exhausted) as info:
        pl.allocate()
    assert "out of addresses" in str(info.value)
    assert "10.1.0.0/29" in str(info.value)
    with pytest.raises(Exhausted, match="out of addresses"):
        pl.allocate(gateway=True)


def test_sub_range_for_dynamic_only() -> None:
    pl = pool("10.216.0.0/24", "10.216.0.128/25")
    assert pl.allocate(gateway=True) == ip("10.216.0.1")  # gateway: anywhere in the subnet
    assert pl.allocate() == ip("10.216.0.128")
    assert pl.allocate() == ip("10.216.0.129")
    assert pl.allocate(ip("10.216.0.5")) == ip("10.216.0.5")  # specific: anywhere too
    assert pl.allocate() == ip("10.216.0.130")


def test_sub_range_exhaustion_ignores_rest_of_subnet() -> None:
    pl = pool("10.216.0.0/24", "10.216.0.252/30")  # .252-.254 (.255 is the broadcast)
    assert [pl.allocate() for _ in range(3)] == [ip(f"10.216.0.{i}") for i in (252, 253, 254)]
    with pytest.raises(Exhausted) as info:
        pl.allocate()
    assert "out of addresses" in str(info.value)
    assert "10.216.0.252/30" in str(info.value)
    # the rest of the subnet is still there for specific requests and the gateway
    assert pl.allocate(gateway=True) == ip("10.216.0.1")


def test_ipv6_slash_64_is_fast_with_thousands_allocated() -> None:
    pl = pool("fd12:3456:789a:1::/64")
    started = time.perf_counter()
    assert pl.allocate(gateway=True) == ip("fd12:3456:789a:1::1")
    got = [pl.allocate() for _ in range(5000)]
    assert got[0] == ip("fd12:3456:789a:1::2")
    assert got[-1] == ip("fd12:3456:789a:1::1389")
    assert len(set(got)) == 5000
    # the worst case: a cursor that points before thousands of allocated addresses
    pl.cursor = 0
    assert pl.allocate() == ip("fd12:3456:789a:1::138a")
    for address in got[::2]:
        pl.release(address)
    pl.cursor = 0
    assert pl.allocate() == ip("fd12:3456:789a:1::2")
    assert time.perf_counter() - started < 2.0


def test_ipv6_sub_range() -> None:
    pl = pool("fd00:1::/64", "fd00:1::1:0/112")
    assert pl.allocate(gateway=True) == ip("fd00:1::1")
    assert pl.allocate() == ip("fd00:1::1:0")


@pytest.mark.parametrize("seed", range(20))
def test_allocator_never_hands_out_a_duplicate(seed: int) -> None:
    rng = random.Random(seed)
    pl = pool("10.3.0.0/27", "10.3.0.16/28")  # dynamic range .16-.30 (.31 is the broadcast)
    live: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for _ in range(200):
        if rng.random() < 0.6:
            try:
                address = pl.allocate()
            except Exhausted:
                assert len(live) == 15
                continue
            assert address not in live
            assert address in net("10.3.0.16/28")
            assert address != ip("10.3.0.31")
            live.add(address)
        elif live:
            victim = rng.choice(sorted(live))
            assert pl.release(victim)
            live.discard(victim)
        assert pl.allocated == {int(a) for a in live}


def test_pool_round_trips_through_dict() -> None:
    pl = pool("10.1.0.0/24", "10.1.0.128/25")
    pl.address_space = "LocalDefault"
    pl.allocate()
    copy = Pool.from_dict(pl.to_dict(), [str(ip("10.1.0.128"))])
    assert copy == pl
    assert copy.cursor == int(ip("10.1.0.128"))


# ---------------------------------------------------------------------------------------------
# Subnet choice
# ---------------------------------------------------------------------------------------------


def route(dest: str, dev: str = "eth0") -> HostRoute:
    return HostRoute(net(dest), dev)


def test_find_overlap_with_pools() -> None:
    assert find_overlap(net("10.1.0.0/24"), [net("10.1.0.0/16")], []) == net("10.1.0.0/16")
    assert find_overlap(net("10.1.0.0/16"), [net("10.1.7.0/24")], []) is not None
    assert find_overlap(net("10.2.0.0/24"), [net("10.1.0.0/16")], []) is None
    # different families never overlap
    assert find_overlap(net("fd00::/64"), [net("10.1.0.0/16")], []) is None


def test_find_overlap_with_routes() -> None:
    routes = [route("0.0.0.0/0"), route("::/0"), route("192.168.1.0/24", "wlan0")]
    assert find_overlap(net("192.168.1.0/24"), [], routes) == route("192.168.1.0/24", "wlan0")
    assert find_overlap(net("192.168.0.0/16"), [], routes) is not None
    # default routes overlap everything; they are ignored
    assert find_overlap(net("10.0.0.0/8"), [], routes) is None
    assert find_overlap(net("fd00::/64"), [], routes) is None
    assert find_overlap(net("10.0.0.0/8"), [], [route("10.1.2.3/32")]) is not None
    # a taken subnet is named before a route
    both = find_overlap(net("10.1.0.0/24"), [net("10.1.0.0/16")], [route("10.1.0.0/24")])
    assert both == net("10.1.0.0/16")


def test_describe_route_without_device() -> None:
    assert describe_route(HostRoute(net("10.0.0.0/8"), "")) == "the host route 10.0.0.0/8"


def test_default_v4_candidates_order() -> None:
    # Docker's default pools, from the top down (Docker's IPAM goes bottom up).
    candidates = [str(c) for c in default_v4_candidates()]
    assert candidates[:15] == [f"172.{n}.0.0/16" for n in range(31, 16, -1)]
    assert candidates[15:18] == ["192.168.240.0/20", "192.168.224.0/20", "192.168.208.0/20"]
    assert candidates[-1] == "192.168.0.0/20"
    assert len(candidates) == 15 + 16
    assert DEFAULT_V4_POOLS[0] == ("172.17.0.0/16", 16)


def test_choose_subnet() -> None:
    assert choose_subnet(default_v4_candidates(), [], []) == net("172.31.0.0/16")
    # a route and another pool are skipped
    assert choose_subnet(
        default_v4_candidates(),
        [net("172.30.0.0/16")],
        [route("0.0.0.0/0"), route("172.31.0.0/24", "br-x")],
    ) == net("172.29.0.0/16")
    # once 172.16.0.0/12 is taken, 192.168 /20s follow from the top, skipping a LAN route
    assert choose_subnet(
        default_v4_candidates(), [net("172.16.0.0/12")], [route("192.168.240.0/24", "eth0")]
    ) == net("192.168.224.0/20")


def test_choose_subnet_exhausted() -> None:
    with pytest.raises(Exhausted, match="--subnet"):
        choose_subnet(default_v4_candidates(), [net("172.16.0.0/12"), net("192.168.0.0/16")], [])
    with pytest.raises(Exhausted):
        choose_subnet([], [], [])


def test_make_ula_prefix() -> None:
    prefix = make_ula_prefix(bytes([0x12, 0x34, 0x56, 0x78, 0x9A]))
    assert prefix == net("fd12:3456:789a::/48")
    assert prefix.subnet_of(net("fc00::/7"))  # type: ignore[arg-type]
    assert make_ula_prefix(b"\x00" * 5) == net("fd00::/48")
    assert make_ula_prefix(b"\xff" * 8) == net("fdff:ffff:ffff::/48")
    with pytest.raises(ValueError, match="need 5 random bytes"):
        make_ula_prefix(b"\x01\x02")


def test_v6_candidates() -> None:
    prefix = ipaddress.IPv6Network("fd12:3456:789a::/48")
    gen = v6_candidates(prefix)
    first = [next(gen) for _ in range(3)]
    assert [str(c) for c in first] == [
        "fd12:3456:789a:1::/64",
        "fd12:3456:789a:2::/64",
        "fd12:3456:789a:3::/64",
    ]
    assert all(c.subnet_of(prefix) for c in first)
    assert choose_subnet(v6_candidates(prefix), [net("fd12:3456:789a:1::/64")], []) == net(
        "fd12:3456:789a:2::/64"
    )


# ---------------------------------------------------------------------------------------------
# IpamDriver over the SQLite store and over the in-memory one (as CNI's host-local tests its
# allocator over a fake store): every test below runs on both
# ---------------------------------------------------------------------------------------------


class FakeRoutes:
    def __init__(self) -> None:
        self.routes: list[HostRoute] = [route("0.0.0.0/0"), route("192.0.2.0/24")]
        self.calls = 0

    async def __call__(self) -> list[HostRoute]:
        self.calls += 1
        return list(self.routes)


OpenIpam = Callable[[], Awaitable[IpamDriver]]


@pytest.fixture
def routes() -> FakeRoutes:
    return FakeRoutes()


class Stores:
    """The state an IPAM driver restarts on: a SQLite database in a directory, or a FakeStore
    kept across restarts (what a fresh SqliteStore would read back)."""

    def __init__(self, kind: str, path: Path) -> None:
        self.kind, self.path = kind, path
        self.memory = FakeStore()
        self.sqlite: SqliteStore | None = None

    def open(self) -> PoolStore:
        self.close()
        if self.kind == "memory":
            return self.memory
        self.sqlite = SqliteStore(self.path)
        return self.sqlite

    def close(self) -> None:
        if self.sqlite is not None:
            self.sqlite.close()
            self.sqlite = None


@pytest.fixture(params=["sqlite", "memory"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    opened = Stores(request.param, tmp_path / "state")
    yield opened
    opened.close()


@pytest.fixture
async def open_ipam(stores: Stores, routes: FakeRoutes) -> OpenIpam:
    """Opens a fresh store + IpamDriver on the same state (a daemon restart)."""

    async def opener() -> IpamDriver:
        ipam = IpamDriver(stores.open(), routes)
        await ipam.load()
        return ipam

    return opener


def pool_req(
    pool: str = "", sub_pool: str = "", v6: bool = False, options: dict[str, str] | None = None
) -> p.RequestPoolRequest:
    return p.parse_request_pool(
        {
            "AddressSpace": LOCAL_ADDRESS_SPACE,
            "Pool": pool,
            "SubPool": sub_pool,
            "Options": options or {},
            "V6": v6,
        }
    )


def addr_req(pool_id: str, address: str = "", gateway: bool = False) -> p.RequestAddressRequest:
    options = {"RequestAddressType": "com.docker.network.gateway"} if gateway else None
    return p.parse_request_address({"PoolID": pool_id, "Address": address, "Options": options})


def release_req(pool_id: str, address: str) -> p.ReleaseAddressRequest:
    return p.parse_release_address({"PoolID": pool_id, "Address": address})


async def test_address_spaces(open_ipam: OpenIpam) -> None:
    ipam = await open_ipam()
    assert ipam.address_spaces() == (LOCAL_ADDRESS_SPACE, GLOBAL_ADDRESS_SPACE)


async def request_pool(ipam: IpamDriver, req: p.RequestPoolRequest) -> tuple[str, Any]:
    """request_pool, with its answer acknowledged as the HTTP layer does once it is sent."""
    pool_id, subnet, ack = await ipam.request_pool(req)
    await ack()
    return pool_id, subnet


async def request_address(ipam: IpamDriver, req: p.RequestAddressRequest) -> Any:
    address, ack = await ipam.request_address(req)
    await ack()
    return address


async def test_request_pool_explicit(open_ipam: OpenIpam, routes: FakeRoutes) -> None:
    ipam = await open_ipam()
    pool_id, subnet = await request_pool(ipam, pool_req("10.216.0.0/24", "10.216.0.128/25"))
    assert subnet == net("10.216.0.0/24")
    assert pool_id == "10.216.0.0/24"
    assert ipam.pools[pool_id].sub_range == net("10.216.0.128/25")
    assert ipam.pools[pool_id].address_space == LOCAL_ADDRESS_SPACE
    assert routes.calls == 1


async def test_request_pool_auto(open_ipam: OpenIpam, routes: FakeRoutes) -> None:
    routes.routes.append(route("172.31.0.0/16", "br-1234"))
    ipam = await open_ipam()
    first = await request_pool(ipam, pool_req())
    second = await request_pool(ipam, pool_req())
    assert first[1] == net("172.30.0.0/16")
    assert second[1] == net("172.29.0.0/16")


async def test_request_pool_v6_auto(open_ipam: OpenIpam) -> None:
    ipam = await open_ipam()
    assert ipam.ula_prefix is not None
    assert ipam.ula_prefix.prefixlen == 48
    assert ipam.ula_prefix.subnet_of(net("fd00::/8"))  # type: ignore[arg-type]
    _, a = await request_pool(ipam, pool_req(v6=True))
    _, b = await request_pool(ipam, pool_req(v6=True))
    assert a.prefixlen == b.prefixlen == 64
    assert a.subnet_of(ipam.ula_prefix)
    assert a != b
    assert a != next(ipam.ula_prefix.subnets(new_prefix=64))  # the ::/64 is skipped


async def test_request_pool_v6_explicit(open_ipam: OpenIpam) -> None:
    ipam = await open_ipam()
    pool_id, subnet = await request_pool(ipam, pool_req("fd00:216:1::/64", v6=True))
    assert subnet == net("fd00:216:1::/64")
    address = await request_address(ipam, addr_req(pool_id, gateway=True))
    assert address == ipaddress.ip_interface("fd00:216:1::1/64")


async def test_request_pool_overlapping_a_pool(open_ipam: OpenIpam) -> None:
    ipam = await open_ipam()
    await request_pool(ipam, pool_req("10.216.0.0/16"))
    with pytest.raises(Conflict) as info:
        await request_pool(ipam, pool_req("10.216.3.0/24"))
    assert str(info.value) == "subnet 10.216.3.0/24 overlaps the pool 10.216.0.0/16 already in use"
    # auto-allocation skips pools too
    await request_pool(ipam, pool_req("172.31.0.0/16"))
    assert (await request_pool(ipam, pool_req()))[1] == net("172.30.0.0/16")


async def test_request_pool_overlapping_a_route(open_ipam: OpenIpam, routes: FakeRoutes) -> None:
    ipam = await open_ipam()
    with pytest.raises(Conflict) as info:
        await request_pool(ipam, pool_req("192.0.2.128/25"))
    assert str(info.value) == "subnet 192.0.2.128/25 overlaps the host route 192.0.2.0/24 on eth0"
    assert ipam.pools == {}


async def test_request_pool_ipam_options_unsupported(open_ipam: OpenIpam) -> None:
    ipam = await open_ipam()
    with pytest.raises(Unsupported) as info:
        await request_pool(ipam, pool_req(options={"com.example.opt": "1"}))
    assert "com.example.opt" in str(info.value)
    assert ipam.pools == {}


async def test_request_address(open_ipam: OpenIpam) -> None:
    ipam = await open_ipam()
    pool_id, _ = await request_pool(ipam, pool_req("10.216.0.0/24", "10.216.0.128/25"))
    assert str(await request_address(ipam, addr_req(pool_id, gateway=True))) == "10.216.0.1/24"
    assert str(await request_address(ipam, addr_req(pool_id, "10.216.0.200"))) == "10.216.0.200/24"
    assert str(await request_address(ipam, addr_req(pool_id))) == "10.216.0.128/24"
    assert str(await request_address(ipam, addr_req(pool_id))) == "10.216.0.129/24"
    with pytest.raises(Conflict):
        await request_address(ipam, addr_req(pool_id, "10.216.0.200"))
    with pytest.raises(InvalidRequest, match="outside"):
        await request_address(ipam, addr_req(pool_id, "10.217.0.1"))
    with pytest.raises(InvalidRequest, match="IPv4"):
        await request_address(ipam, addr_req(pool_id, "fd00::1"))
    with pytest.raises(NotFound, match="nope"):
        await request_address(ipam, addr_req("nope"))


async def test_concurrent_requests_get_distinct_addresses(open_ipam: OpenIpam) -> None:
    ipam = await open_ipam()
    pool_id, _ = await request_pool(ipam, pool_req("10.216.8.0/24"))
    got = await asyncio.gather(*(request_address(ipam, addr_req(pool_id)) for _ in range(50)))
    assert len({str(a) for a in got}) == 50
    reloaded = await open_ipam()
    assert len(reloaded.pools[pool_id].allocated) == 50


async def test_request_address_exhausted(open_ipam: OpenIpam) -> None:
    ipam = await open_ipam()
    pool_id, _ = await request_pool(ipam, pool_req("10.216.9.0/30"))
    await request_address(ipam, addr_req(pool_id, gateway=True))
    await request_address(ipam, addr_req(pool_id))
    with pytest.raises(Exhausted, match="out of addresses"):
        await request_address(ipam, addr_req(pool_id))


async def test_release_is_idempotent(open_ipam: OpenIpam) -> None:
    ipam = await open_ipam()
    pool_id, _ = await request_pool(ipam, pool_req("10.216.0.0/24"))
    await request_address(ipam, addr_req(pool_id, gateway=True))
    await request_address(ipam, addr_req(pool_id))
    await ipam.release_address(release_req(pool_id, "10.216.0.2"))
    await ipam.release_address(release_req(pool_id, "10.216.0.2"))
    await ipam.release_address(release_req(pool_id, "10.216.0.99"))
    await ipam.release_address(release_req("unknown-pool", "10.216.0.2"))
    assert ipam.pools[pool_id].allocated == {int(ip("10.216.0.1"))}
    await ipam.release_pool(p.parse_release_pool({"PoolID": pool_id}))
    await ipam.release_pool(p.parse_release_pool({"PoolID": pool_id}))
    assert ipam.pools == {}
    # the subnet can be used again
    assert (await request_pool(ipam, pool_req("10.216.0.0/24")))[0] == pool_id


async def test_state_survives_a_reload(open_ipam: OpenIpam) -> None:
    ipam = await open_ipam()
    a, _ = await request_pool(ipam, pool_req("10.216.0.0/24", "10.216.0.128/25"))
    b, _ = await request_pool(ipam, pool_req())
    c, _ = await request_pool(ipam, pool_req(v6=True))
    gone, _ = await request_pool(ipam, pool_req("10.216.5.0/24"))
    await ipam.release_pool(p.parse_release_pool({"PoolID": gone}))
    await request_address(ipam, addr_req(a, gateway=True))
    await request_address(ipam, addr_req(a, "10.216.0.5"))
    assert str(await request_address(ipam, addr_req(a))) == "10.216.0.128/24"
    assert str(await request_address(ipam, addr_req(a))) == "10.216.0.129/24"
    await ipam.release_address(release_req(a, "10.216.0.129"))
    await request_address(ipam, addr_req(b, gateway=True))
    before = {pid: (pl.subnet, pl.sub_range, set(pl.allocated)) for pid, pl in ipam.pools.items()}
    ula = ipam.ula_prefix

    reloaded = await open_ipam()
    after = {
        pid: (pl.subnet, pl.sub_range, set(pl.allocated)) for pid, pl in reloaded.pools.items()
    }
    assert after == before
    assert set(after) == {a, b, c}
    assert reloaded.ula_prefix == ula
    # the cursor continues: neither a live address nor the just-released .129 comes back
    assert str(await request_address(reloaded, addr_req(a))) == "10.216.0.130/24"
    with pytest.raises(Conflict):
        await request_address(reloaded, addr_req(a, "10.216.0.5"))
    # the auto-allocator sees the reloaded pools
    assert (await request_pool(reloaded, pool_req()))[1] == net("172.30.0.0/16")


async def test_reload_does_not_hand_out_duplicates(open_ipam: OpenIpam) -> None:
    ipam = await open_ipam()
    pool_id, _ = await request_pool(ipam, pool_req("10.216.7.0/29"))
    first = [str(await request_address(ipam, addr_req(pool_id))) for _ in range(3)]
    reloaded = await open_ipam()
    rest = [str(await request_address(reloaded, addr_req(pool_id))) for _ in range(3)]
    assert len(set(first + rest)) == 6
    with pytest.raises(Exhausted):
        await request_address(reloaded, addr_req(pool_id))


async def test_ula_prefix_is_stable_across_reloads(open_ipam: OpenIpam) -> None:
    first = (await open_ipam()).ula_prefix
    second = (await open_ipam()).ula_prefix
    third = (await open_ipam()).ula_prefix
    assert first is not None
    assert first == second == third


# -- crash recovery: Docker retries a request that died with the plugin ----------------------
#
# An answer is recorded before it is sent and acknowledged once written; after a crash in
# between, pybridge cannot tell whether Docker got it. Docker resends a request only after a
# connection error, within ~15 s, and never once it has read the answer. So an unacknowledged
# answer may go again only to that same request, in that window; otherwise it stays allocated.

T0 = 1_700_000_000.0


def unacknowledged_pool() -> Pool:
    pl = pool("10.216.0.0/24")
    for value, answer in (
        ("10.216.0.1", UnacknowledgedAnswer("gateway", T0)),
        ("10.216.0.2", UnacknowledgedAnswer("dynamic", T0, "web")),
        ("10.216.0.3", UnacknowledgedAnswer("dynamic", T0)),
        ("10.216.0.77", UnacknowledgedAnswer("specific", T0)),
    ):
        pl.allocated.add(int(ip(value)))
        pl.unacknowledged[int(ip(value))] = answer
    return pl


def test_replay_only_to_a_request_with_the_same_identity() -> None:
    pl = unacknowledged_pool()
    now = T0 + 5

    def claim(requested: str = "", gateway: bool = False, name: str | None = None) -> Any:
        wanted = ip(requested) if requested else None
        return pl.claim_replay(wanted, gateway=gateway, endpoint_name=name, now=now)

    # A dynamic request without a name (Docker before 29) is never a replay: it may be a new
    # container's, while Docker holds the unacknowledged address.
    assert claim() is None
    assert claim(name="db") is None  # another container
    assert claim(requested="10.216.0.3") is None  # a dynamic answer is no specific one
    assert claim(requested="10.216.0.1") is None  # nor is the gateway
    assert claim(requested="10.216.0.78") is None
    assert claim(name="web") == ip("10.216.0.2")  # Docker 29's retry, by endpoint name
    assert claim(name="web") is None  # once
    assert claim(requested="10.216.0.77") == ip("10.216.0.77")
    assert claim(requested="10.216.0.77", gateway=True) is None  # claimed already
    assert claim(gateway=True) == ip("10.216.0.1")  # the pool's next gateway request
    assert set(pl.unacknowledged) == {int(ip("10.216.0.3"))}  # never replayed, still allocated
    assert int(ip("10.216.0.3")) in pl.allocated


def test_a_gateway_request_for_another_address_is_no_replay() -> None:
    pl = unacknowledged_pool()
    assert pl.claim_replay(ip("10.216.0.9"), gateway=True, now=T0) is None
    assert pl.claim_replay(ip("10.216.0.1"), gateway=True, now=T0) == ip("10.216.0.1")


@pytest.mark.parametrize(
    "now", [T0 + REPLAY_WINDOW + 0.1, T0 + 3600, T0 - 5], ids=["after", "long-after", "clock-back"]
)
def test_replay_only_within_the_retry_window(now: float) -> None:
    pl = unacknowledged_pool()
    assert pl.claim_replay(None, gateway=False, endpoint_name="web", now=now) is None
    assert pl.claim_replay(None, gateway=True, now=now) is None
    assert pl.claim_replay(ip("10.216.0.77"), gateway=False, now=now) is None
    # Expired: set aside once (for a single log line each), still allocated.
    expired = pl.expire_replays(now)
    assert {str(a) for a, _ in expired} == {"10.216.0.1", "10.216.0.2", "10.216.0.3", "10.216.0.77"}
    assert pl.expire_replays(now) == []
    assert pl.unacknowledged == {}
    assert len(pl.unclaimed) == 4
    assert len(pl.allocated) == 4


def test_answers_of_an_older_pybridge_have_no_time_and_are_expired() -> None:
    assert UnacknowledgedAnswer("gateway").expired(T0)
    assert not UnacknowledgedAnswer("gateway", T0).expired(T0 + REPLAY_WINDOW)
    pl = pool("10.216.0.0/24")
    pl.allocated.add(int(ip("10.216.0.1")))
    pl.unacknowledged[int(ip("10.216.0.1"))] = UnacknowledgedAnswer("gateway")
    assert pl.claim_replay(None, gateway=True, now=T0) is None


def test_answers_a_known_endpoint_uses_are_dropped() -> None:
    pl = unacknowledged_pool()
    assert pl.drop_replays([ip("10.216.0.2"), ip("10.216.0.9")]) == [ip("10.216.0.2")]
    assert pl.claim_replay(None, gateway=False, endpoint_name="web", now=T0) is None
    assert int(ip("10.216.0.2")) in pl.allocated


def test_only_unclaimed_dynamic_answers_no_endpoint_uses_are_releasable() -> None:
    pl = unacknowledged_pool()
    pl.unacknowledged[int(ip("10.216.0.4"))] = UnacknowledgedAnswer("dynamic")  # no time: never
    pl.allocated.add(int(ip("10.216.0.4")))
    late = T0 + UNCLAIMED_RELEASE_AFTER + 1
    assert pl.releasable(late, []) == []  # still unacknowledged: not looked at
    pl.expire_replays(late)
    assert pl.releasable(T0 + UNCLAIMED_RELEASE_AFTER - 1, []) == []  # not yet
    assert pl.releasable(late, [ip("10.216.0.3")]) == [ip("10.216.0.2")]
    assert pl.releasable(late, []) == [ip("10.216.0.2"), ip("10.216.0.3")]


def test_an_unacknowledged_pool_is_replayed_only_within_the_window() -> None:
    pl = pool("10.216.0.0/24")
    pl.pool_unacknowledged, pl.pool_recorded_at = True, T0
    assert pl.pool_may_be_replayed(T0 + 1)
    assert not pl.pool_may_be_replayed(T0 + REPLAY_WINDOW + 1)
    assert not pl.pool_may_be_replayed(T0 + 1)  # and never again
    old = pool("10.217.0.0/24")
    old.pool_unacknowledged = True  # an older pybridge's row: no time
    assert not old.pool_may_be_replayed(T0)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Endpoints:
    """The network driver's view for the IPAM driver: addresses per pool."""

    def __init__(self) -> None:
        self.by_pool: dict[str, set[Any]] = {}

    def __call__(self, pool_id: str) -> set[Any] | None:
        return self.by_pool.get(pool_id)


async def no_routes() -> list[HostRoute]:
    return []


class Restartable:
    def __init__(self, stores: Stores) -> None:
        self.stores = stores
        self.clock = Clock()
        self.endpoints = Endpoints()

    async def open(self) -> IpamDriver:
        ipam = IpamDriver(self.stores.open(), no_routes, self.endpoints, self.clock)
        await ipam.load()
        return ipam


@pytest.fixture
def daemon(stores: Stores) -> Restartable:
    return Restartable(stores)


def named_req(pool_id: str, name: str) -> p.RequestAddressRequest:
    return p.parse_request_address(
        {"PoolID": pool_id, "Address": "", "Options": {p.ENDPOINT_NAME: name}}
    )


async def test_retries_after_a_restart_get_the_same_answers(daemon: Restartable) -> None:
    ipam = await daemon.open()
    pool_id, _, ack = await ipam.request_pool(pool_req("10.216.0.0/24"))
    await ack()
    # These answers never reach Docker: pybridge dies before sending them.
    gateway, _ = await ipam.request_address(addr_req(pool_id, gateway=True))
    await ipam.request_address(named_req(pool_id, "web"))
    await ipam.request_address(addr_req(pool_id, "10.216.0.77"))
    auto_id, auto_subnet, _ = await ipam.request_pool(pool_req())

    daemon.clock.now += 3  # Docker retries within seconds
    ipam = await daemon.open()
    assert (await ipam.request_address(addr_req(pool_id, gateway=True)))[0] == gateway
    assert (await ipam.request_address(named_req(pool_id, "web")))[0] == iface("10.216.0.2/24")
    assert (await ipam.request_address(addr_req(pool_id, "10.216.0.77")))[0] == iface(
        "10.216.0.77/24"
    )
    # An automatic pool is never given again (a retry cannot be told from another network's
    # request): the retry gets another subnet and the first stays taken.
    again_id, again_subnet, _ = await ipam.request_pool(pool_req())
    assert again_id != auto_id
    assert not again_subnet.overlaps(auto_subnet)
    # ... and nothing is handed out twice.
    with pytest.raises(Conflict):
        await ipam.request_address(addr_req(pool_id, str(gateway.ip)))
    assert (await ipam.request_address(named_req(pool_id, "web")))[0] == iface("10.216.0.3/24")
    with pytest.raises(Conflict):
        await ipam.request_address(addr_req(pool_id, "10.216.0.77"))


async def test_an_answer_docker_may_hold_goes_to_no_other_request(daemon: Restartable) -> None:
    """The crash came after the answer was sent: Docker has it, does not retry, and the next
    dynamic requests (another container's) must get other addresses."""
    ipam = await daemon.open()
    pool_id, _, ack = await ipam.request_pool(pool_req("10.216.0.0/24"))
    await ack()
    await request_address(ipam, addr_req(pool_id, gateway=True))
    sent, _ = await ipam.request_address(addr_req(pool_id))  # never acknowledged
    daemon.clock.now += 1
    ipam = await daemon.open()
    others = [
        (await ipam.request_address(addr_req(pool_id)))[0],
        (await ipam.request_address(named_req(pool_id, "db")))[0],
    ]
    assert sent not in others
    assert len(set(others)) == 2
    # After the window it is not released either: it stays allocated (a leak is safe).
    daemon.clock.now += 3600
    ipam = await daemon.open()
    assert int(sent.ip) in ipam.pools[pool_id].allocated
    assert (await ipam.request_address(addr_req(pool_id)))[0] != sent


async def test_expired_answers_pybridge_never_releases_become_plain_allocations(
    daemon: Restartable,
) -> None:
    ipam = await daemon.open()
    pool_id, _, ack = await ipam.request_pool(pool_req("10.216.0.0/24"))
    await ack()
    gateway, _ = await ipam.request_address(addr_req(pool_id, gateway=True))
    dynamic, _ = await ipam.request_address(addr_req(pool_id))
    daemon.clock.now += REPLAY_WINDOW + 1
    ipam = await daemon.open()
    assert set(ipam.pools[pool_id].unclaimed) == {int(dynamic.ip)}  # may be released later
    daemon.clock.now = T0 + 1  # even were the clock to go back, the gateway is not unacknowledged
    ipam = await daemon.open()
    assert set(ipam.pools[pool_id].unacknowledged) == {int(dynamic.ip)}
    assert (await ipam.request_address(addr_req(pool_id, gateway=True)))[0] != gateway


async def test_answers_in_use_by_an_endpoint_are_dropped_and_acknowledged(
    daemon: Restartable,
) -> None:
    ipam = await daemon.open()
    pool_id, _, ack = await ipam.request_pool(pool_req("10.216.0.0/24"))
    await ack()
    sent, _ = await ipam.request_address(named_req(pool_id, "web"))
    daemon.endpoints.by_pool[pool_id] = {sent.ip}  # Docker went on: CreateEndpoint with it
    ipam = await daemon.open()
    assert ipam.pools[pool_id].unacknowledged == {}
    daemon.endpoints.by_pool.clear()
    ipam = await daemon.open()  # recorded as acknowledged: not unacknowledged any more
    assert ipam.pools[pool_id].unacknowledged == {}
    assert (await ipam.request_address(named_req(pool_id, "web")))[0] != sent


async def test_an_endpoint_created_after_the_restart_stops_the_replay(daemon: Restartable) -> None:
    ipam = await daemon.open()
    pool_id, _, ack = await ipam.request_pool(pool_req("10.216.0.0/24"))
    await ack()
    sent, _ = await ipam.request_address(named_req(pool_id, "web"))
    ipam = await daemon.open()
    daemon.endpoints.by_pool[pool_id] = {sent.ip}
    assert (await ipam.request_address(named_req(pool_id, "web")))[0] != sent


async def test_unclaimed_dynamic_answers_are_released_only_in_pools_of_pybridge_networks(
    daemon: Restartable,
) -> None:
    ipam = await daemon.open()
    mine, _, ack = await ipam.request_pool(pool_req("10.216.0.0/24"))
    await ack()
    foreign, _, ack = await ipam.request_pool(pool_req("10.217.0.0/24"))
    await ack()
    lost, _ = await ipam.request_address(addr_req(mine))
    used, _ = await ipam.request_address(addr_req(mine))
    elsewhere, _ = await ipam.request_address(addr_req(foreign))
    ipam = await daemon.open()
    daemon.endpoints.by_pool[mine] = set()  # a pybridge network uses this pool
    assert await ipam.release_unclaimed() == []  # within the window: nothing
    daemon.clock.now += UNCLAIMED_RELEASE_AFTER + 1
    daemon.endpoints.by_pool[mine] = {used.ip}
    assert await ipam.release_unclaimed() == [lost.ip]
    # The other pool backs no pybridge network: who uses its addresses is unknown.
    assert int(elsewhere.ip) in ipam.pools[foreign].allocated
    ipam = await daemon.open()
    assert ipam.pools[mine].allocated == {int(used.ip)}


async def test_a_late_release_never_frees_an_address_a_live_endpoint_uses(
    daemon: Restartable,
) -> None:
    ipam = await daemon.open()
    pool_id, _, ack = await ipam.request_pool(pool_req("10.216.0.0/24"))
    await ack()
    address = await request_address(ipam, addr_req(pool_id))
    daemon.endpoints.by_pool[pool_id] = {address.ip}
    await ipam.release_address(release_req(pool_id, str(address.ip)))
    assert int(address.ip) in ipam.pools[pool_id].allocated
    daemon.endpoints.by_pool[pool_id] = set()  # Docker deleted the endpoint first
    await ipam.release_address(release_req(pool_id, str(address.ip)))
    assert int(address.ip) not in ipam.pools[pool_id].allocated


async def test_release_owned_releases_only_in_the_pool_named(daemon: Restartable) -> None:
    ipam = await daemon.open()
    pool_id, _, ack = await ipam.request_pool(pool_req("10.216.0.0/24"))
    await ack()
    address = await request_address(ipam, addr_req(pool_id))
    await ipam.release_owned([("10.216.0.0/25", address.ip), ("nope", address.ip)])
    assert int(address.ip) in ipam.pools[pool_id].allocated
    await ipam.release_owned([(pool_id, address.ip)])
    assert int(address.ip) not in ipam.pools[pool_id].allocated


async def test_a_pool_docker_asks_addresses_of_is_no_longer_given_again(
    daemon: Restartable,
) -> None:
    """Docker asks for a pool's gateway right after it gets the pool: from then on a
    request for the same subnet is another network's, and must not get that pool."""
    ipam = await daemon.open()
    pool_id, _, _ = await ipam.request_pool(pool_req("10.216.0.0/24"))  # never acknowledged
    daemon.clock.now += 1
    ipam = await daemon.open()
    await request_address(ipam, addr_req(pool_id, gateway=True))
    with pytest.raises(Conflict):
        await ipam.request_pool(pool_req("10.216.0.0/24"))
    ipam = await daemon.open()  # and it stays confirmed across a restart
    with pytest.raises(Conflict):
        await ipam.request_pool(pool_req("10.216.0.0/24"))
