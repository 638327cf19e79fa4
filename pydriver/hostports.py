"""Host port reservations: the adapter that holds a bound (not listening) socket for every
published host port, so no host process can take a port pybridge publishes, and pybridge
never publishes a port a host process already holds. Also finds who holds a port."""

from __future__ import annotations

import errno
import logging
import re
import socket

from .errors import Conflict, HostError
from .model import Mapping
from .process import run

log = logging.getLogger(__name__)

_SOCK_TYPES = {
    "tcp": (socket.SOCK_STREAM, 0),
    "udp": (socket.SOCK_DGRAM, 0),
    "sctp": (socket.SOCK_STREAM, getattr(socket, "IPPROTO_SCTP", 132)),
}
Key = tuple[str, int, str, int]


def _key(m: Mapping) -> Key:
    return (m.proto, m.family, str(m.host_ip or ""), m.host_port)


class PortInUse(Conflict):
    """The host port is held by something else."""


class HostPorts:
    def __init__(self) -> None:
        self._held: dict[Key, socket.socket | None] = {}
        self._unsupported: set[str] = set()

    def reserve(self, m: Mapping) -> None:
        """Hold ``m``'s host port. Raises PortInUse if another socket has it."""
        key = _key(m)
        if key in self._held:
            return
        kind, proto_number = _SOCK_TYPES[m.proto]
        family = socket.AF_INET if m.family == 4 else socket.AF_INET6
        try:
            sock = socket.socket(family, kind, proto_number)
        except OSError as err:
            # e.g. a kernel without SCTP: the DNAT rule still works for whoever can speak it.
            if m.proto not in self._unsupported:
                log.warning("cannot reserve %s ports on this host (%s)", m.proto, err.strerror)
                self._unsupported.add(m.proto)
            self._held[key] = None
            return
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            address = str(m.host_ip) if m.host_ip else ("0.0.0.0" if m.family == 4 else "::")  # noqa: S104
            sock.bind((address, m.host_port))
        except OSError as err:
            sock.close()
            if err.errno == errno.EADDRINUSE:
                raise PortInUse(f"host port {m.host_text()}/{m.proto} is already in use") from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise Conflict(
                    f"cannot publish on {m.host_text()}: {m.host_ip} is not an address of this host"
                ) from None
            raise HostError(f"cannot reserve host port {m.host_text()}/{m.proto}: {err}") from None
        self._held[key] = sock

    def release(self, m: Mapping) -> None:
        sock = self._held.pop(_key(m), None)
        if sock is not None:
            sock.close()

    def held(self, m: Mapping) -> bool:
        return _key(m) in self._held

    def close(self) -> None:
        for sock in self._held.values():
            if sock is not None:
                sock.close()
        self._held.clear()


_USERS_RE = re.compile(r'\("([^"]+)",pid=(\d+)')


async def port_holder(proto: str, port: int) -> str | None:
    """Describe the process holding a port (from `ss -p`), or None if it cannot tell."""
    flag = {"tcp": "-t", "udp": "-u"}.get(proto)
    if flag is None:
        return None
    try:
        result = await run(["ss", "-H", "-a", "-n", "-p", flag, f"sport = :{port}"])
    except HostError:
        return None
    for line in result.stdout.splitlines():
        match = _USERS_RE.search(line)
        if match:
            return f"{match.group(1)} (pid {match.group(2)})"
    return None
