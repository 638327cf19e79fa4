"""IPAM allocator (pure): pools, subnet choice, address allocation. No I/O.

The IPAM driver (ipamdriver.py) keeps these objects in memory, persists every change through
the store before replying, and feeds in the host routes it reads from the kernel.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import Conflict, Exhausted, InvalidRequest
from .model import HostRoute, IPAddress, IPNetwork

# The built-in IPAM's default pools (172.17-31.x.x/16, then 192.168.x.x/20), so automatic
# subnets look like Docker's own (pybridge walks them in the other direction).
DEFAULT_V4_POOLS: tuple[tuple[str, int], ...] = (
    *((f"172.{n}.0.0/16", 16) for n in range(17, 32)),
    ("192.168.0.0/16", 20),
)
V6_SUBNET_PREFIX = 64

# The address spaces pybridge's IPAM announces (GetDefaultAddressSpaces). A network whose
# IPv4Data/IPv6Data carry one of them got that subnet from pybridge's IPAM.
LOCAL_ADDRESS_SPACE = "PybridgeLocal"
GLOBAL_ADDRESS_SPACE = "PybridgeGlobal"
ADDRESS_SPACES = (LOCAL_ADDRESS_SPACE, GLOBAL_ADDRESS_SPACE)

# How long after an IPAM answer was recorded Docker may still send the same request again.
# dockerd retries a plugin call only after a connection error, at about 0, 1, 3, 7 and 15 s
# after its first attempt, and never once it has read a whole answer; the first attempt is
# what was recorded, so 20 s covers every retry with room for a slow start.
REPLAY_WINDOW = 20.0
# When an unclaimed dynamic answer in a pool of a pybridge network may be given back (see
# Pool.releasable).
UNCLAIMED_RELEASE_AFTER = 60.0

AnswerKind = Literal["gateway", "specific", "dynamic"]


def describe_route(route: HostRoute) -> str:
    return (
        f"the host route {route.destination} on {route.device}"
        if route.device
        else (f"the host route {route.destination}")
    )


@dataclass(frozen=True)
class UnacknowledgedAnswer:
    """An IPAM answer recorded before it was sent and not (yet) known to have reached Docker
    (acknowledged), with what identifies the request it answered. The store keeps this flag in
    its ``pending`` column."""

    kind: AnswerKind  # gateway | specific (an address was asked for) | dynamic
    # time.time() when recorded; None for rows of an older pybridge, which count as expired.
    recorded_at: float | None = None
    # Docker 29+ names the endpoint in a RequestAddress (its container's name); the only way
    # to tell a retried dynamic request from another container's.
    endpoint_name: str | None = None

    def expired(self, now: float) -> bool:
        # A clock that went backwards counts as expired too: a leak is safe, a duplicate not.
        return self.recorded_at is None or not 0 <= now - self.recorded_at <= REPLAY_WINDOW

    def answers(
        self,
        value: int,
        requested: IPAddress | None,
        *,
        gateway: bool,
        endpoint_name: str | None,
    ) -> bool:
        """Whether a request with this identity may be Docker's retry of the one answered."""
        if gateway:
            # A pool gets one gateway request (per network create); its retry is the next.
            return self.kind == "gateway" and (requested is None or int(requested) == value)
        if requested is not None:
            return self.kind == "specific" and int(requested) == value
        # Before Docker 29 nothing tells a retried dynamic request from a new container's, and
        # Docker never retries once it has the answer: without a name, never replay.
        named = bool(endpoint_name)
        return self.kind == "dynamic" and named and self.endpoint_name == endpoint_name


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
    # Crash recovery: allocations whose answer was not acknowledged (known to have reached
    # Docker) when pybridge stopped, still within REPLAY_WINDOW. Docker resends a request that
    # died with the plugin, and that retry (the same request) gets the same answer instead of
    # a second allocation. Nothing else may get it: Docker may hold the address already.
    unacknowledged: dict[int, UnacknowledgedAnswer] = field(default_factory=dict)
    # Past the window (or in use by a known endpoint): never replayed, still allocated.
    # Dynamic ones no endpoint ever used may be released later (IpamDriver.release_unclaimed).
    unclaimed: dict[int, UnacknowledgedAnswer] = field(default_factory=dict)
    # The pool itself was not acknowledged when pybridge stopped (and when it was recorded;
    # None: an older pybridge's row, expired).
    pool_unacknowledged: bool = False
    pool_recorded_at: float | None = None

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
        unacknowledged: dict[str, UnacknowledgedAnswer] | None = None,
        pool_unacknowledged: bool = False,
        pool_recorded_at: float | None = None,
    ) -> Pool:
        return cls(
            id=data["id"],
            subnet=ipaddress.ip_network(data["subnet"]),
            sub_range=ipaddress.ip_network(data["range"]) if data.get("range") else None,
            address_space=data.get("address_space", ""),
            allocated={int(ipaddress.ip_address(a)) for a in allocated},
            cursor=int(data.get("cursor", 0)),
            auto=bool(data.get("auto", False)),
            unacknowledged={
                int(ipaddress.ip_address(a)): answer for a, answer in (unacknowledged or {}).items()
            },
            pool_unacknowledged=pool_unacknowledged,
            pool_recorded_at=pool_recorded_at,
        )

    def pool_may_be_replayed(self, now: float) -> bool:
        """Whether a RequestPool now may be Docker's retry of the one that created this pool."""
        if not self.pool_unacknowledged or self.allocated:
            return False
        if self.pool_recorded_at is None or not 0 <= now - self.pool_recorded_at <= REPLAY_WINDOW:
            self.pool_unacknowledged = False
            return False
        return True

    def expire_replays(self, now: float) -> list[tuple[IPAddress, UnacknowledgedAnswer]]:
        """Move answers past the retry window from ``unacknowledged`` to ``unclaimed``; returns
        them (each is returned once, so the caller logs it once)."""
        expired = [(v, a) for v, a in self.unacknowledged.items() if a.expired(now)]
        for value, answer in expired:
            del self.unacknowledged[value]
            self.unclaimed[value] = answer
        return [(ipaddress.ip_address(v), a) for v, a in sorted(expired)]

    def drop_replays(self, in_use: Iterable[IPAddress]) -> list[IPAddress]:
        """Stop replaying (or releasing) answers that a known endpoint uses: Docker has them."""
        dropped = []
        for address in in_use:
            value = int(address)
            if self.unacknowledged.pop(value, None) or self.unclaimed.pop(value, None):
                dropped.append(address)
        return dropped

    def releasable(self, now: float, in_use: Iterable[IPAddress]) -> list[IPAddress]:
        """Unclaimed dynamic answers that no endpoint took up within UNCLAIMED_RELEASE_AFTER.

        Only for a pool that backs a pybridge network, with ``in_use`` the addresses of that
        network's endpoints: dockerd sends CreateEndpoint to pybridge right after it gets a
        dynamic address (the two calls are back to back), retrying it within its retry window
        if pybridge is down, and releases the address itself if that fails. So an address no
        endpoint uses long after the window either never reached Docker (it retried and got
        another) or was given up by a Docker that could not tell pybridge: nobody holds it."""
        used = {int(a) for a in in_use}
        return [
            ipaddress.ip_address(value)
            for value, answer in sorted(self.unclaimed.items())
            if answer.kind == "dynamic"
            and answer.recorded_at is not None
            and now - answer.recorded_at > UNCLAIMED_RELEASE_AFTER
            and value not in used
        ]

    def claim_replay(
        self,
        requested: IPAddress | None,
        *,
        gateway: bool,
        endpoint_name: str | None = None,
        now: float,
    ) -> IPAddress | None:
        """The answer to Docker's retry of a request answered just before pybridge stopped, if
        this request is one (same kind, same address or endpoint name, within the window)."""
        for value, answer in sorted(self.unacknowledged.items()):
            if answer.expired(now):
                continue
            if answer.answers(value, requested, gateway=gateway, endpoint_name=endpoint_name):
                del self.unacknowledged[value]
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
        self.unacknowledged.pop(int(address), None)
        self.unclaimed.pop(int(address), None)
        if int(address) in self.allocated:
            self.allocated.discard(int(address))
            return True
        return False


def pool_id_for(subnet: IPNetwork) -> str:
    # Pools never overlap, so the subnet names its pool; readable in logs and the state db.
    return str(subnet)


def find_overlap(
    subnet: IPNetwork,
    taken: Iterable[IPNetwork],
    routes: Iterable[HostRoute],
) -> IPNetwork | HostRoute | None:
    """What ``subnet`` overlaps: the first of ``taken`` (other pools, or other networks'
    subnets), else the first host route, of its own IP version; None if nothing. The one test
    of a subnet against what is already there, for the IPAM, the network driver and the doctor
    (each leaves out the routes of its own bridges)."""
    for other in taken:
        if other.version == subnet.version and other.overlaps(subnet):
            return other
    for route in routes:
        dest = route.destination
        if dest.prefixlen == 0 or dest.version != subnet.version:
            continue  # default routes overlap everything; Docker ignores them too
        if dest.overlaps(subnet):
            return route
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
