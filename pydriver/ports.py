"""Port publishing decisions (pure): from Docker's port bindings to concrete host mappings.

Docker sends one binding per container port (a `-p 8000-8010:80-90` range arrives already
expanded); a binding may ask for one host port, a host port range to choose from
(`-p 8000-8010:80`), or any port (`-p 80`, `-P`: HostPort 0). pybridge publishes with DNAT
rules alone, so it must also pick ephemeral ports and refuse conflicts itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from .errors import InvalidRequest
from .model import IPAddress, PortBinding, PortMapping

__all__ = [
    "DEFAULT_EPHEMERAL_RANGE",
    "PortIndex",
    "PortMapping",
    "PortRequest",
    "find_conflict",
    "overlaps",
    "plan",
]
DEFAULT_EPHEMERAL_RANGE = (32768, 60999)


def overlaps(a: PortMapping, b: PortMapping) -> bool:
    """Whether two mappings claim the same host port (same protocol, family and address, or a
    wildcard on either side)."""
    return (
        a.proto == b.proto
        and a.family == b.family
        and a.host_port == b.host_port
        and (a.host_ip is None or b.host_ip is None or a.host_ip == b.host_ip)
    )


@dataclass(frozen=True)
class PortRequest:
    """One binding, resolved to its targets; the host port is still to be chosen."""

    binding: PortBinding
    # (host address or None, container address) per family the binding covers
    targets: tuple[tuple[IPAddress | None, IPAddress], ...]

    @property
    def ephemeral(self) -> bool:
        return self.binding.host_port == 0

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
        return [
            PortMapping(self.binding.proto, host_ip, host_port, container_ip, self.binding.port)
            for host_ip, container_ip in self.targets
        ]


def _unspecified(address: IPAddress | None) -> bool:
    return address is None or address.is_unspecified


def plan(
    bindings: Sequence[PortBinding],
    container_v4: IPAddress | None,
    container_v6: IPAddress | None,
    default_host_ip: IPAddress | None = None,
    *,
    leave_unserved: bool = False,
) -> list[PortRequest]:
    """Resolve which host address family each binding publishes on.

    No host address: every IPv4 address (or the network's host_binding_ipv4) and, when the
    container has an IPv6 address, every IPv6 address. A host address: that family only.

    A binding for a family with no container address here is refused, unless
    ``leave_unserved``: another endpoint of the container is that family's gateway (Docker
    28+'s no_proxy_6to4) and publishes it, so it is skipped.
    """
    containers = {4: container_v4, 6: container_v6}
    requests = []
    for binding in bindings:
        host_ip = binding.host_ip if binding.host_ip is not None else default_host_ip
        if leave_unserved and host_ip is not None and containers[host_ip.version] is None:
            continue
        if host_ip is not None and host_ip.version == 6 and host_ip.is_loopback:
            raise InvalidRequest(
                f"cannot publish {binding.proto} port {binding.port} on [::1]: IPv6 loopback "
                "cannot be forwarded to a container; use 127.0.0.1 or a host address"
            )
        targets: list[tuple[IPAddress | None, IPAddress]] = []
        if host_ip is None or _unspecified(host_ip):
            wanted = {4, 6} if host_ip is None else {host_ip.version}
            if 4 in wanted and container_v4 is not None:
                targets.append((None, container_v4))
            if 6 in wanted and container_v6 is not None:
                targets.append((None, container_v6))
        elif host_ip.version == 4 and container_v4 is not None:
            targets.append((host_ip, container_v4))
        elif host_ip.version == 6 and container_v6 is not None:
            targets.append((host_ip, container_v6))
        if not targets and leave_unserved:
            continue
        if not targets:
            family = "IPv6" if host_ip is not None and host_ip.version == 6 else "IPv4"
            where = f"[{host_ip}]" if family == "IPv6" else host_ip or "this host"
            raise InvalidRequest(
                f"cannot publish {binding.proto} port {binding.port} on {where}: the "
                f"container has no {family} address on this network"
            )
        requests.append(PortRequest(binding, tuple(targets)))
    return requests


class PortIndex:
    """Published mappings by protocol, family and host port: finding a clash costs the same
    with thousands of ports published (`-p 20000-22999:20000-22999`) as with one, where a
    scan of every published port for every new one would stall the event loop for seconds."""

    def __init__(self, mappings: Iterable[PortMapping] = ()) -> None:
        self._by_port: dict[tuple[str, int, int], list[PortMapping]] = {}
        for mapping in mappings:
            self.add(mapping)

    def add(self, mapping: PortMapping) -> None:
        key = (mapping.proto, mapping.family, mapping.host_port)
        self._by_port.setdefault(key, []).append(mapping)

    def conflict(self, candidate: Iterable[PortMapping]) -> PortMapping | None:
        """A published mapping that claims the same host port as one of ``candidate``."""
        for mine in candidate:
            for other in self._by_port.get((mine.proto, mine.family, mine.host_port), ()):
                if overlaps(mine, other):
                    return other
        return None


def find_conflict(
    candidate: Iterable[PortMapping], taken: Iterable[PortMapping]
) -> PortMapping | None:
    return PortIndex(taken).conflict(candidate)
