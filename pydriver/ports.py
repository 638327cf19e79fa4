"""Port publishing decisions (pure): from Docker's port bindings to concrete host mappings.

Docker sends one binding per container port (a `-p 8000-8010:80-90` range arrives already
expanded); a binding may ask for one host port, a host port range to choose from
(`-p 8000-8010:80`), or any port (`-p 80`, `-P`: HostPort 0). pybridge publishes with DNAT
rules alone, so it must also pick ephemeral ports and refuse conflicts itself.

In a routed family (gateway mode routed) a binding publishes no host port: the container's
own address and port are opened to whoever routes to them, the host address and port of `-p`
being ignored, as Docker does (moby v28.5.2 port_mapping_linux.go, configurePortBindingIPv4/6
and attemptBindHostPorts).
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

from .errors import InvalidRequest
from .model import Family, IPAddress, PortBinding, PortMapping

__all__ = [
    "DEFAULT_EPHEMERAL_RANGE",
    "PortIndex",
    "PortMapping",
    "PortRequest",
    "find_conflict",
    "held",
    "overlaps",
    "plan",
]
DEFAULT_EPHEMERAL_RANGE = (32768, 60999)


def held(mappings: Iterable[PortMapping]) -> list[PortMapping]:
    """The mappings that hold a host port (a routed publication holds none)."""
    return [m for m in mappings if not m.direct]


def overlaps(a: PortMapping, b: PortMapping) -> bool:
    """Whether two mappings claim the same host port (same protocol, family and address, or a
    wildcard on either side). A routed publication claims none."""
    return (
        not a.direct
        and not b.direct
        and a.proto == b.proto
        and a.family == b.family
        and a.host_port == b.host_port
        and (a.host_ip is None or b.host_ip is None or a.host_ip == b.host_ip)
    )


@dataclass(frozen=True)
class PortRequest:
    """One binding, resolved to its targets; the host port is still to be chosen."""

    binding: PortBinding
    # (host address or None, container address) per NAT family the binding covers
    targets: tuple[tuple[IPAddress | None, IPAddress], ...]
    # The container's address in each routed family the binding covers: no host port.
    direct: tuple[IPAddress, ...] = ()

    @property
    def ephemeral(self) -> bool:
        return self.binding.host_port == 0

    @property
    def needs_host_port(self) -> bool:
        return bool(self.targets)

    def candidates(self, ephemeral_range: tuple[int, int], start: int) -> Iterator[int]:
        """Host ports to try, in order. Ephemeral ports start after ``start`` and wrap."""
        if not self.ephemeral:
            yield from range(self.binding.host_port, self.binding.host_port_end + 1)
            return
        low, high = ephemeral_range
        size = high - low + 1
        offset = (start - low + 1) % size if low <= start <= high else 0
        for step in range(size):
            yield low + (offset + step) % size

    def mappings(self, host_port: int) -> list[PortMapping]:
        proto, port = self.binding.proto, self.binding.port
        return [
            *(
                PortMapping(proto, host, host_port, container, port)
                for host, container in self.targets
            ),
            *(PortMapping(proto, None, 0, container, port) for container in self.direct),
        ]


ANY_IPV4 = ipaddress.IPv4Address("0.0.0.0")  # noqa: S104 (an address, not a bind)


def covers(
    family: Family, host_ip: IPAddress | None, default_host_ip: IPAddress | None
) -> tuple[bool, IPAddress | None]:
    """Whether a binding with ``host_ip`` (None: `-p` without an address) publishes on host
    addresses of ``family``, and on which one (None: every address of the family), as Docker
    reads it. An address given covers its own family only (0.0.0.0 every IPv4 address, :: every
    IPv6 one). Without one, the network's host_binding_ipv4 decides, 0.0.0.0 when unset: an
    IPv4 address covers IPv4 alone, except 0.0.0.0, which covers every IPv6 address too; an
    IPv6 address covers IPv6 alone (:: every IPv6 address)."""
    if host_ip is not None:
        if host_ip.version != family:
            return False, None
        return True, None if host_ip.is_unspecified else host_ip
    chosen = default_host_ip if default_host_ip is not None else ANY_IPV4
    if chosen.version == family:
        return True, None if chosen.is_unspecified else chosen
    return family == 6 and chosen.is_unspecified, None


def plan(
    bindings: Sequence[PortBinding],
    container_v4: IPAddress | None,
    container_v6: IPAddress | None,
    default_host_ip: IPAddress | None = None,
    *,
    leave_unserved: bool = False,
    routed: Collection[Family] = (),
) -> list[PortRequest]:
    """Resolve which host address family each binding publishes on (``covers``), on the host
    addresses of each NAT family and, in a ``routed`` family, at the container's own address
    whatever host address and port the binding names.

    A binding that covers no family the container has an address of here is refused, unless
    ``leave_unserved``: another endpoint of the container is that family's gateway (Docker
    28+'s no_proxy_6to4) and publishes it, so it is skipped.

    Stricter than Docker: a binding on a loopback address (`-p 127.0.0.1:8080:80`) opens
    nothing in a routed family, where Docker opens the container port to everyone who routes
    to it; the host, the only one such a binding was meant for, reaches its containers
    directly anyway.
    """
    containers: dict[Family, IPAddress | None] = {4: container_v4, 6: container_v6}
    requests = []
    for binding in bindings:
        targets: list[tuple[IPAddress | None, IPAddress]] = []
        direct: list[IPAddress] = []
        local_only = False
        for family in (4, 6):
            covered, host_ip = covers(family, binding.host_ip, default_host_ip)
            container = containers[family]
            if not covered or (container is None and leave_unserved):
                continue
            if family in routed and host_ip is not None and host_ip.is_loopback:
                local_only = True  # (see the docstring)
            elif family in routed:
                direct += [container] if container is not None else []
            elif host_ip is not None and host_ip.version == 6 and host_ip.is_loopback:
                raise InvalidRequest(
                    f"cannot publish {binding.proto} port {binding.port} on [::1]: IPv6 "
                    "loopback cannot be forwarded to a container; use 127.0.0.1 or a host "
                    "address"
                )
            elif container is not None:
                targets.append((host_ip, container))
        if not targets and not direct:
            if leave_unserved or local_only:
                continue
            shown = binding.host_ip if binding.host_ip is not None else default_host_ip
            family_name = "IPv6" if shown is not None and shown.version == 6 else "IPv4"
            where = f"[{shown}]" if family_name == "IPv6" else shown or "this host"
            raise InvalidRequest(
                f"cannot publish {binding.proto} port {binding.port} on {where}: the "
                f"container has no {family_name} address on this network"
            )
        requests.append(PortRequest(binding, tuple(targets), tuple(direct)))
    return requests


class PortIndex:
    """Published mappings by protocol, family and host port, each with the endpoint that
    publishes it: finding a clash costs the same with thousands of ports published
    (`-p 20000-22999:20000-22999`) as with one, where a scan of every published port for every
    new one would stall the event loop for seconds."""

    def __init__(self, mappings: Iterable[PortMapping] = ()) -> None:
        self._by_port: dict[tuple[str, int, int], list[tuple[PortMapping, str | None]]] = {}
        for mapping in mappings:
            self.add(mapping)

    def add(self, mapping: PortMapping, owner: str | None = None) -> None:
        if mapping.direct:
            return  # no host port
        key = (mapping.proto, mapping.family, mapping.host_port)
        self._by_port.setdefault(key, []).append((mapping, owner))

    def remove(self, mapping: PortMapping, owner: str | None = None) -> None:
        key = (mapping.proto, mapping.family, mapping.host_port)
        entries = self._by_port.get(key)
        if entries is None:
            return
        with contextlib.suppress(ValueError):
            entries.remove((mapping, owner))
        if not entries:
            del self._by_port[key]

    def conflict(
        self, candidate: Iterable[PortMapping], ignore: str | None = None
    ) -> PortMapping | None:
        """A published mapping that claims the same host port as one of ``candidate`` (not
        one of ``ignore``'s)."""
        for mine in candidate:
            if mine.direct:
                continue
            for other, owner in self._by_port.get((mine.proto, mine.family, mine.host_port), ()):
                if (ignore is None or owner != ignore) and overlaps(mine, other):
                    return other
        return None


class PortsOfOthers:
    """What one endpoint's new publication must not clash with: every other endpoint's
    published ports (the state's index, as it is now) and those it has chosen so far."""

    def __init__(self, index: PortIndex, endpoint_id: str) -> None:
        self._index = index
        self._endpoint_id = endpoint_id
        self._chosen = PortIndex()

    def add(self, mapping: PortMapping) -> None:
        self._chosen.add(mapping)

    def conflict(self, candidate: Sequence[PortMapping]) -> PortMapping | None:
        return self._index.conflict(candidate, ignore=self._endpoint_id) or self._chosen.conflict(
            candidate
        )


def find_conflict(
    candidate: Iterable[PortMapping], taken: Iterable[PortMapping]
) -> PortMapping | None:
    return PortIndex(taken).conflict(candidate)
