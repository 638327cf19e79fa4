"""Host port reservations: the adapter that holds a bound (not listening) socket for every
published host port, so no host process can take a port pybridge publishes, and pybridge
never publishes a port a host process already holds. Also finds who holds a port."""

from __future__ import annotations

import errno
import logging
import re
import resource
import socket

from .errors import Conflict, HostError, PortInUse
from .model import PortMapping
from .process import run

log = logging.getLogger(__name__)

_SOCK_TYPES = {
    "tcp": (socket.SOCK_STREAM, 0),
    "udp": (socket.SOCK_DGRAM, 0),
    "sctp": (socket.SOCK_STREAM, getattr(socket, "IPPROTO_SCTP", 132)),
}
Key = tuple[str, int, str, int]

# socket() failing with these means the kernel has no such protocol (SCTP on most of our
# hosts): nothing can hold the port, and the DNAT rule still works for whoever can speak it.
# Any other failure (out of descriptors above all) means pybridge cannot hold a port it must
# hold, and the request fails: a published port is never silently left unreserved.
_UNSUPPORTED = frozenset(
    {errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT, errno.EPFNOSUPPORT}
)


def _key(m: PortMapping) -> Key:
    return (m.proto, m.family, str(m.host_ip or ""), m.host_port)


class OutOfDescriptors(HostError):
    """pybridge cannot open another socket: a file descriptor limit, or kernel memory."""


def cannot_hold(m: PortMapping, err: OSError) -> HostError:
    """The error for a host port pybridge could not open a socket for."""
    where = f"{m.host_text()}/{m.proto}"
    if err.errno == errno.EMFILE:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return OutOfDescriptors(
            f"cannot hold host port {where}: pybridge has run out of file descriptors (it "
            f"keeps one open per published port and its limit, RLIMIT_NOFILE, is {soft}); "
            "raise it with LimitNOFILE= in pybridge's systemd unit or `ulimit -Hn` where it "
            "is started, then restart pybridge"
        )
    if err.errno == errno.ENFILE:
        return OutOfDescriptors(
            f"cannot hold host port {where}: the host has run out of file descriptors "
            "(sysctl fs.file-max); raise fs.file-max or close files elsewhere"
        )
    if err.errno in (errno.ENOBUFS, errno.ENOMEM):
        return OutOfDescriptors(
            f"cannot hold host port {where}: the kernel has no memory left for another socket"
        )
    return HostError(f"cannot hold host port {where}: {err.strerror or err}")


class SocketReservations:
    def __init__(self) -> None:
        self._held: dict[Key, socket.socket | None] = {}
        self._unsupported: set[str] = set()

    def reserve(self, m: PortMapping) -> None:
        """Hold ``m``'s host port. Raises PortInUse if another socket has it."""
        key = _key(m)
        if key in self._held:
            return
        kind, proto_number = _SOCK_TYPES[m.proto]
        family = socket.AF_INET if m.family == 4 else socket.AF_INET6
        try:
            sock = socket.socket(family, kind, proto_number)
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                raise cannot_hold(m, err) from None
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
            raise cannot_hold(m, err) from None
        self._held[key] = sock

    def release(self, m: PortMapping) -> None:
        sock = self._held.pop(_key(m), None)
        if sock is not None:
            sock.close()

    def held(self, m: PortMapping) -> bool:
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
