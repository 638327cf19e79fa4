"""Address blocks of a segment that spans hosts: every host hands out addresses from the blocks
it won, so no address is ever handed out twice, whatever the hosts do concurrently."""

from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydriver.blocks import (
    Holdings,
    block_at,
    block_count,
    block_of,
    block_prefix,
    next_claim,
    reserved_in,
)
from pydriver.model import IPAddress, IPNetwork

net = ipaddress.ip_network
addr = ipaddress.ip_address


@pytest.mark.parametrize(
    ("pool", "prefix"),
    [
        ("10.70.0.0/16", 26),  # 1024 blocks of 64
        ("10.70.0.0/22", 26),  # 16 blocks of 64
        ("10.70.0.0/24", 28),  # 16 blocks of 16
        ("10.70.0.0/28", 30),  # 4 blocks of 4: the smallest
        ("10.70.0.0/30", 30),
        ("fd00:70::/64", 122),
        ("fd00:70::/120", 124),
    ],
)
def test_block_sizes(pool: str, prefix: int) -> None:
    assert block_prefix(net(pool)) == prefix


def test_a_chosen_block_size() -> None:
    assert block_prefix(net("10.70.0.0/16"), 256) == 24
    with pytest.raises(ValueError, match="power of two"):
        block_prefix(net("10.70.0.0/16"), 100)
    with pytest.raises(ValueError, match="do not fit"):
        block_prefix(net("10.70.0.0/24"), 512)


def test_blocks_of_a_huge_pool_are_computed_not_listed() -> None:
    pool = net("fd00:70::/64")
    prefix = block_prefix(pool)
    assert block_count(pool, prefix) == 2**58
    assert block_at(pool, prefix, 2**58 - 1) == net("fd00:70::ffff:ffff:ffff:ffc0/122")
    assert block_of(addr("fd00:70::1:5"), pool, prefix) == net("fd00:70::1:0/122")


def test_reserved_addresses() -> None:
    pool = net("10.70.0.0/24")
    assert reserved_in(pool, [addr("10.70.0.1")], [addr("10.70.0.5"), addr("10.9.9.9")]) == {
        addr("10.70.0.0"),
        addr("10.70.0.255"),
        addr("10.70.0.1"),
        addr("10.70.0.5"),
    }


def test_a_host_hands_out_only_what_it_holds() -> None:
    pool = net("10.70.0.0/24")
    reserved = frozenset(reserved_in(pool, [addr("10.70.0.1")], []))
    held = Holdings((net("10.70.0.0/28"),), frozenset({addr("10.70.0.2")}), reserved)
    assert held.capacity() == 14  # .0 and .1 are reserved
    assert held.allocate() == addr("10.70.0.3")
    assert held.allocate(addr("10.70.0.9")) == addr("10.70.0.9")
    assert held.allocate(addr("10.70.0.2")) is None  # in use
    assert held.allocate(addr("10.70.0.1")) is None  # the gateway
    assert held.allocate(addr("10.70.0.20")) is None  # another host's block, maybe
    full = Holdings(
        held.blocks, frozenset(a for a in pool.hosts() if a in held.blocks[0]), reserved
    )
    assert full.allocate() is None
    assert full.needs_another_block()


def test_refill_before_the_last_address_goes() -> None:
    reserved: frozenset[IPAddress] = frozenset()
    block = net("10.70.0.64/28")
    used: frozenset[IPAddress] = frozenset(addr(str(a)) for a in list(block)[:12])
    assert not Holdings((block,), used, reserved).needs_another_block()  # 4 of 16 free
    used = frozenset(addr(str(a)) for a in list(block)[:13])
    assert Holdings((block,), used, reserved).needs_another_block()  # 3 of 16 free
    assert Holdings((), frozenset(), reserved).needs_another_block()


def test_empty_blocks_may_be_given_back_but_one_is_kept() -> None:
    a, b = net("10.70.0.0/28"), net("10.70.0.16/28")
    assert Holdings((a, b), frozenset(), frozenset()).empty_blocks() == [a]
    assert Holdings((a, b), frozenset({addr("10.70.0.3")}), frozenset()).empty_blocks() == [b]


def test_a_claim_walk_is_bounded_by_what_is_held() -> None:
    pool = net("fd00:70::/64")
    prefix = block_prefix(pool)
    first = next_claim(pool, prefix, "host-a", [])
    assert first is not None
    second = next_claim(pool, prefix, "host-a", [first])
    assert second not in (None, first)
    small = net("10.70.0.0/28")
    every = [block_at(small, 30, i) for i in range(4)]
    assert next_claim(small, 30, "host-a", every) is None


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["10.70.0.0/24", "10.70.0.0/26", "fd00:70::/120"]),
    st.integers(min_value=2, max_value=5),
    st.integers(min_value=0, max_value=2**32),
)
def test_hosts_claiming_and_allocating_concurrently_never_share_an_address(
    pool_text: str, hosts: int, seed: int
) -> None:
    """Hosts interleave claims (a compare-and-set on a shared map: the first writer of a block
    wins, the others see its owner) and allocations, each from what it believes it holds."""
    pool = net(pool_text)
    prefix = block_prefix(pool)
    gateway = addr(str(next(pool.hosts())))
    reserved = frozenset(reserved_in(pool, [gateway], []))
    owners: dict[IPNetwork, str] = {}  # the cluster store
    known: dict[str, set[IPNetwork]] = {f"h{i}": set() for i in range(hosts)}  # each host's view
    used: dict[str, set[IPAddress]] = {h: set() for h in known}
    handed: list[IPAddress] = []
    rng = random.Random(seed)
    for _ in range(400):
        host = rng.choice(list(known))
        mine = tuple(b for b, owner in owners.items() if owner == host)
        holdings = Holdings(mine, frozenset(used[host]), reserved)
        if holdings.needs_another_block() and rng.random() < 0.7:
            wanted = next_claim(pool, prefix, host, known[host])
            if wanted is not None:
                owners.setdefault(wanted, host)  # compare-and-set: create if absent
                known[host].add(wanted)  # won or lost, the host now knows its owner
            continue
        address = holdings.allocate()
        if address is not None:
            used[host].add(address)
            handed.append(address)
    assert len(handed) == len(set(handed))
    assert all(a in pool and a not in reserved for a in handed)
    assert all(any(a in b for b, o in owners.items() if o == h) for h in used for a in used[h])
