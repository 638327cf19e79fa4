"""Address blocks of a segment (pure): how a network that spans hosts keeps every address
unique without asking the cluster store for each one.

A segment's pool is carved into equal blocks. A host claims whole blocks in the cluster store
(a compare-and-set that only one host can win) and hands out addresses from the blocks it
holds, locally: a container start never waits on another host. Blocks outlive their host's
lease on purpose: a host that is unreachable may still have containers on its addresses, so
its blocks are freed only when an operator says the host is gone for good.

Each host tries the blocks in its own order (a rotation chosen from its id), so hosts starting
together rarely race for the same block."""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from .model import IPAddress, IPNetwork

# A block is a /26 of IPv4 (64 addresses) or a /122 of IPv6, unless that leaves a pool with
# fewer than MIN_BLOCKS blocks: then smaller ones, down to 4 addresses.
DEFAULT_BLOCK_SIZE = 64
MIN_BLOCKS = 16
SMALLEST_BLOCK = 4
# A host claims another block when fewer than this share of its addresses are free.
REFILL_BELOW = 0.25


def block_prefix(pool: IPNetwork, size: int | None = None) -> int:
    """The prefix length of ``pool``'s blocks: ``size`` addresses (a power of two) if given,
    else DEFAULT_BLOCK_SIZE, made smaller for small pools (at least MIN_BLOCKS blocks)."""
    bits = pool.max_prefixlen
    if size is not None:
        if size < SMALLEST_BLOCK or size & (size - 1):
            raise ValueError(f"a block size must be a power of two of at least {SMALLEST_BLOCK}")
        prefix = bits - size.bit_length() + 1
        if prefix < pool.prefixlen:
            raise ValueError(f"blocks of {size} addresses do not fit in {pool}")
        return prefix
    prefix = bits - DEFAULT_BLOCK_SIZE.bit_length() + 1
    smallest = bits - SMALLEST_BLOCK.bit_length() + 1
    while prefix < smallest and 2 ** (prefix - pool.prefixlen) < MIN_BLOCKS:
        prefix += 1
    return max(prefix, pool.prefixlen)


def block_count(pool: IPNetwork, prefix: int) -> int:
    return int(2 ** (prefix - pool.prefixlen))


def block_at(pool: IPNetwork, prefix: int, index: int) -> IPNetwork:
    """Block number ``index`` of ``pool`` (0 is the first), without listing the others: an
    IPv6 /64 has 2**58 blocks of 64 addresses."""
    size = 2 ** (pool.max_prefixlen - prefix)
    first = int(pool.network_address) + index * size
    return ipaddress.ip_network(f"{ipaddress.ip_address(first)}/{prefix}")


def start_index(pool: IPNetwork, prefix: int, host_id: str) -> int:
    """Where ``host_id`` starts on the ring of ``pool``'s blocks."""
    digest = int.from_bytes(hashlib.sha256(host_id.encode()).digest()[:8], "big")
    return digest % block_count(pool, prefix)


def reserved_in(
    pool: IPNetwork, gateways: Iterable[IPAddress], aux: Iterable[IPAddress]
) -> set[IPAddress]:
    """Addresses of ``pool`` no block hands out: IPv4's network and broadcast addresses, IPv6's
    subnet-router anycast address, the gateway (the same on every host) and aux addresses."""
    reserved: set[IPAddress] = {pool.network_address}
    if pool.version == 4 and pool.prefixlen < 31:
        reserved.add(pool.broadcast_address)
    reserved |= {a for a in (*gateways, *aux) if a in pool}
    return reserved


@dataclass(frozen=True)
class Holdings:
    """What one host holds of a segment: its blocks, and the addresses in use in them."""

    blocks: tuple[IPNetwork, ...]
    used: frozenset[IPAddress]
    reserved: frozenset[IPAddress]

    def capacity(self) -> int:
        return sum(b.num_addresses - sum(1 for r in self.reserved if r in b) for b in self.blocks)

    def free(self) -> int:
        return self.capacity() - sum(1 for a in self.used if self.holds(a))

    def holds(self, address: IPAddress) -> bool:
        return any(address in b for b in self.blocks)

    def allocate(self, wanted: IPAddress | None = None) -> IPAddress | None:
        """``wanted`` if this host may hand it out (in one of its blocks, not reserved, not
        used), else None; without ``wanted``, the lowest free address of its blocks, or None
        when they are full."""
        if wanted is not None:
            if self.holds(wanted) and wanted not in self.reserved and wanted not in self.used:
                return wanted
            return None
        for block in sorted(self.blocks, key=lambda b: int(b.network_address)):
            for address in block:
                if address not in self.reserved and address not in self.used:
                    return address
        return None

    def needs_another_block(self) -> bool:
        """Whether to claim a block now (before the last one runs out: a claim needs the
        cluster store, a container start must not)."""
        capacity = self.capacity()
        return capacity == 0 or self.free() < capacity * REFILL_BELOW

    def empty_blocks(self) -> list[IPNetwork]:
        """Blocks with no address in use, which may be given back (all but one)."""
        empty = [b for b in self.blocks if not any(a in b for a in self.used)]
        return empty[: max(0, len(self.blocks) - 1)] if len(empty) == len(self.blocks) else empty


def next_claim(
    pool: IPNetwork, prefix: int, host_id: str, taken: Iterable[IPNetwork]
) -> IPNetwork | None:
    """The first block on this host's walk of the ring that no host holds, as far as this host
    knows (the compare-and-set decides); None when every block is held. Steps over at most as
    many blocks as are held, whatever the pool's size."""
    held = set(taken)
    count = block_count(pool, prefix)
    start = start_index(pool, prefix, host_id)
    for step in range(min(count, len(held) + 1)):
        block = block_at(pool, prefix, (start + step) % count)
        if block not in held:
            return block
    return None


def block_of(address: IPAddress, pool: IPNetwork, prefix: int) -> IPNetwork:
    """The block of ``pool`` that ``address`` is in."""
    if address not in pool:
        raise ValueError(f"{address} is not in {pool}")
    return ipaddress.ip_network(f"{address}/{prefix}", strict=False)
