"""IPAM allocator (pure): pools, subnet choice, address allocation. No I/O.

The IPAM driver (ipamdriver.py) keeps these objects in memory, persists every change through
the store before replying, and feeds in the host routes it reads from the kernel.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import Conflict, Exhausted, InvalidRequest
from .model import IPAddress, IPNetwork

# The built-in IPAM's default pools (172.17-31.x.x/16, then 192.168.x.x/20), so automatic
# subnets look like Docker's own (pybridge walks them in the other direction).
DEFAULT_V4_POOLS: tuple[tuple[str, int], ...] = (
    *((f"172.{n}.0.0/16", 16) for n in range(17, 32)),
    ("192.168.0.0/16", 20),
)
V6_SUBNET_PREFIX = 64


@dataclass(frozen=True)
class HostRoute:
    """A route in the host's main table, used to avoid subnets that are already reachable."""

    destination: IPNetwork
    device: str


def describe_route(route: HostRoute) -> str:
    return (
        f"the host route {route.destination} on {route.device}"
        if route.device
        else (f"the host route {route.destination}")
    )


@dataclass
class Pool:
    id: str
    subnet: IPNetwork
    sub_range: IPNetwork | None = None
    address_space: str = ""
    allocated: set[int] = field(default_factory=set)
    # The last address handed out dynamically: allocation continues after it (round robin), so
    # a just-released address is not reused at once (stale ARP/conntrack entries).
    cursor: int = 0
    # Chosen by pybridge (no --subnet was given).
    auto: bool = False
    # Crash recovery: allocations whose answer never reached Docker before pybridge stopped
    # (address -> "gateway" | "specific" | "dynamic"). Docker retries a request that died with
    # the plugin, and the retry gets the same answer instead of a second allocation.
    replayable: dict[int, str] = field(default_factory=dict)
    # The pool itself was never acknowledged to Docker before pybridge stopped.
    replayable_pool: bool = False

    @property
    def v6(self) -> bool:
        return self.subnet.version == 6

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "subnet": str(self.subnet),
            "range": str(self.sub_range) if self.sub_range else None,
            "address_space": self.address_space,
            "cursor": self.cursor,
            "auto": self.auto,
        }

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        allocated: Iterable[str] = (),
        unacknowledged: dict[str, str] | None = None,
        pool_unacknowledged: bool = False,
    ) -> Pool:
        return cls(
            id=data["id"],
            subnet=ipaddress.ip_network(data["subnet"]),
            sub_range=ipaddress.ip_network(data["range"]) if data.get("range") else None,
            address_space=data.get("address_space", ""),
            allocated={int(ipaddress.ip_address(a)) for a in allocated},
            cursor=int(data.get("cursor", 0)),
            auto=bool(data.get("auto", False)),
            replayable={
                int(ipaddress.ip_address(a)): kind for a, kind in (unacknowledged or {}).items()
            },
            replayable_pool=pool_unacknowledged,
        )

    def claim_replay(self, requested: IPAddress | None, *, gateway: bool) -> IPAddress | None:
        """The answer to a retried request, if this looks like one (see ``replayable``)."""
        if not self.replayable:
            return None
        if requested is not None:
            kind = self.replayable.get(int(requested))
            if kind not in ("specific", "gateway"):
                return None
            del self.replayable[int(requested)]
            return requested
        wanted = "gateway" if gateway else "dynamic"
        for value, kind in sorted(self.replayable.items()):
            if kind == wanted:
                del self.replayable[value]
                return ipaddress.ip_address(value)
        return None

    # -- address rules -------------------------------------------------------------------------

    def _usable_bounds(self, net: IPNetwork) -> tuple[int, int]:
        """First and last usable host address (as ints) of ``net`` within this pool's subnet."""
        low, high = int(net.network_address), int(net.broadcast_address)
        sub_low, sub_high = int(self.subnet.network_address), int(self.subnet.broadcast_address)
        if self.subnet.num_addresses > 2:
            sub_low += 1  # network address (v4) / subnet-router anycast (v6)
            if not self.v6:
                sub_high -= 1  # IPv4 broadcast
        return max(low, sub_low), min(high, sub_high)

    def is_host_address(self, address: IPAddress) -> bool:
        low, high = self._usable_bounds(self.subnet)
        return low <= int(address) <= high

    def allocate(self, requested: IPAddress | None = None, *, gateway: bool = False) -> IPAddress:
        """Allocate ``requested``, or the next free address. Mutates the pool."""
        if requested is not None:
            if requested.version != self.subnet.version or requested not in self.subnet:
                raise InvalidRequest(f"address {requested} is outside the subnet {self.subnet}")
            if not self.is_host_address(requested):
                raise InvalidRequest(
                    f"address {requested} is the network or broadcast address of {self.subnet}"
                )
            if int(requested) in self.allocated:
                raise Conflict(f"address {requested} is already in use in {self.subnet}")
            self.allocated.add(int(requested))
            return requested
        if gateway:
            # The gateway is the first free address of the whole subnet, as Docker does.
            value = self._scan(*self._usable_bounds(self.subnet), None, self.subnet)
        else:
            space = self.sub_range or self.subnet
            low, high = self._usable_bounds(space)
            value = self._scan(low, high, self.cursor, space)
            self.cursor = value
        self.allocated.add(value)
        return ipaddress.ip_address(value)

    def _scan(self, low: int, high: int, start: int | None, space: IPNetwork) -> int:
        size = high - low + 1
        if size <= 0:
            raise Exhausted(f"the network is out of addresses: {space} has none to give")
        offset = 0 if start is None or not low <= start <= high else start - low + 1
        # Every step either finds a free address or passes an allocated one, so the loop is
        # bounded by the number of allocated addresses, even in a /64.
        for step in range(min(size, len(self.allocated) + 1)):
            candidate = low + (offset + step) % size
            if candidate not in self.allocated:
                return candidate
        raise Exhausted(
            f"the network is out of addresses: every address of {space} is in use; "
            "remove a container or use a larger subnet"
        )

    def release(self, address: IPAddress) -> bool:
        """Release an address; returns False if it was not allocated (release is idempotent)."""
        self.replayable.pop(int(address), None)
        if int(address) in self.allocated:
            self.allocated.discard(int(address))
            return True
        return False


def pool_id_for(subnet: IPNetwork) -> str:
    # Pools never overlap, so the subnet names its pool; readable in logs and the state db.
    return str(subnet)


def find_overlap(
    subnet: IPNetwork,
    pools: Iterable[IPNetwork],
    routes: Iterable[HostRoute],
) -> str | None:
    """Describe what ``subnet`` overlaps (another pool or a host route), or None."""
    for other in pools:
        if other.version == subnet.version and other.overlaps(subnet):
            return f"the pool {other} already in use"
    for route in routes:
        dest = route.destination
        if dest.prefixlen == 0 or dest.version != subnet.version:
            continue  # default routes overlap everything; Docker ignores them too
        if dest.overlaps(subnet):
            return describe_route(route)
    return None


def default_v4_candidates() -> Iterator[ipaddress.IPv4Network]:
    """Docker's default pools, each range from the top down (172.31 ... 172.17, then
    192.168.240/20 ... 192.168.0/20): Docker's own IPAM takes them from the bottom up, so two
    networks created at the same moment by the two allocators (neither sees the other's pool
    before its bridge exists) do not pick the same subnet."""
    sixteens = [ipaddress.IPv4Network(base) for base, prefix in DEFAULT_V4_POOLS if prefix == 16]
    yield from reversed(sixteens)
    for base, prefix in DEFAULT_V4_POOLS:
        if prefix != 16:
            yield from reversed(list(ipaddress.IPv4Network(base).subnets(new_prefix=prefix)))


def v6_candidates(ula_prefix: ipaddress.IPv6Network) -> Iterator[ipaddress.IPv6Network]:
    """/64 subnets of the installation's ULA /48, skipping the first (::/64)."""
    gen = ula_prefix.subnets(new_prefix=V6_SUBNET_PREFIX)
    next(gen, None)
    yield from gen


def choose_subnet(
    candidates: Iterable[IPNetwork],
    pools: Iterable[IPNetwork],
    routes: Iterable[HostRoute],
) -> IPNetwork:
    taken = list(pools)
    route_list = list(routes)
    for candidate in candidates:
        if find_overlap(candidate, taken, route_list) is None:
            return candidate
    raise Exhausted("no free subnet is left in pybridge's default pools; give one with --subnet")


def choose_v6_subnet(
    ula_prefix: ipaddress.IPv6Network,
    pools: Iterable[IPNetwork],
    routes: Iterable[HostRoute],
) -> ipaddress.IPv6Network:
    """The first /64 of ``v6_candidates(ula_prefix)`` that overlaps no pool and no host route,
    as ``choose_subnet`` would pick it, but found from the sorted ranges of /64s that pools
    and routes cover: O(n log n) in their number, where testing up to 65,535 candidates
    against each of them would stall the event loop for seconds on a host with many routes."""
    base = int(ula_prefix.network_address)
    top = int(ula_prefix.broadcast_address)
    shift = 128 - V6_SUBNET_PREFIX
    count = 1 << max(V6_SUBNET_PREFIX - ula_prefix.prefixlen, 0)
    covered: list[tuple[int, int]] = []  # first and last /64 index a pool or route overlaps
    others = [p for p in pools if p.version == 6]
    # Default routes overlap everything; find_overlap ignores them too.
    others += [
        r.destination for r in routes if r.destination.version == 6 and r.destination.prefixlen
    ]
    for other in others:
        low = max(int(other.network_address), base)
        high = min(int(other.broadcast_address), top)
        if low <= high:
            covered.append(((low - base) >> shift, (high - base) >> shift))
    index = 1  # v6_candidates skips the first /64
    for low, high in sorted(covered):
        if low > index:
            break  # a gap: ``index`` is free
        index = max(index, high + 1)
    if index >= count:
        raise Exhausted(
            f"no free /64 is left in pybridge's IPv6 prefix {ula_prefix}; give one with --subnet"
        )
    return ipaddress.IPv6Network((base + (index << shift), V6_SUBNET_PREFIX))


def make_ula_prefix(random_bytes: bytes) -> ipaddress.IPv6Network:
    """An RFC 4193 unique local /48 (fd00::/8 + 40 random bits)."""
    if len(random_bytes) < 5:
        raise ValueError("need 5 random bytes")
    value = (0xFD << 120) | (int.from_bytes(random_bytes[:5], "big") << 80)
    return ipaddress.IPv6Network((value, 48))
