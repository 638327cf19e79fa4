"""Who is at the other end of a Unix socket: the peer credentials the kernel recorded
(SO_PEERCRED), the process holding the other end of a connection (sock_diag + /proc), and a
process's name. Used by the server (which daemon calls pybridge) and by `pydriver prune`
(which process serves the Docker socket the CLI uses). Linux only; never blocks for long."""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, overload

_UCRED = struct.Struct("=iII")  # struct ucred: pid_t pid, uid_t uid, gid_t gid

# sock_diag for AF_UNIX (linux/sock_diag.h, linux/unix_diag.h).
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_UDIAG_SHOW_PEER = 0x4
_UNIX_DIAG_PEER = 2
_NO_COOKIE = 0xFFFFFFFF
_NO_UID = 0xFFFFFFFF  # (uid_t)-1
_NLMSG = struct.Struct("=IHHII")
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")
_UNIX_DIAG_MSG = struct.Struct("=BBBBIII")
_RTATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class Peer:
    """Credentials of the process at the other end, translated by the kernel into the reader's
    pid namespace: pid 0 when that process is outside it."""

    pid: int
    uid: int


class SocketLike(Protocol):
    """socket.socket, or asyncio's TransportSocket wrapping one."""

    @property
    def family(self) -> int: ...

    @overload
    def getsockopt(self, level: int, optname: int, /) -> int: ...
    @overload
    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


def peer_credentials(sock: SocketLike) -> Peer:
    """SO_PEERCRED of a connected (or socketpair) Unix socket: for the connecting side, the
    process that called listen() on the other; for the accepting side, the one that called
    connect(). One getsockopt: cheap and never blocks. OSError if it is not a Unix socket or
    has no peer."""
    if sock.family != socket.AF_UNIX:
        raise OSError(errno.EAFNOSUPPORT, "not a Unix socket")
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, _gid = _UCRED.unpack(raw)
    if pid == 0 and uid == _NO_UID:  # what the kernel says for a socket without a peer
        raise OSError(errno.ENOTCONN, "the socket has no peer")
    return Peer(pid, uid)


def connection_peer_inode(sock: socket.socket) -> int | None:
    """The inode of the socket at the other end of a connected Unix socket, from the kernel's
    sock_diag; None when the kernel cannot say (no unix_diag, not connected, peer closed)."""
    inode = os.fstat(sock.fileno()).st_ino
    request = _UNIX_DIAG_REQ.pack(
        socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode, _UDIAG_SHOW_PEER, _NO_COOKIE, _NO_COOKIE
    )
    header = _NLMSG.pack(_NLMSG.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as netlink:
            netlink.settimeout(2.0)
            netlink.sendto(header + request, (0, 0))
            answer = netlink.recv(65536)
    except OSError:
        return None
    return _peer_from_answer(answer)


def _peer_from_answer(answer: bytes) -> int | None:
    if len(answer) < _NLMSG.size + _UNIX_DIAG_MSG.size:
        return None
    length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(answer)
    if kind == _NLMSG_ERROR or kind != _SOCK_DIAG_BY_FAMILY:
        return None
    offset = _NLMSG.size + _UNIX_DIAG_MSG.size
    end = min(length, len(answer))
    while offset + _RTATTR.size <= end:
        size, attr = _RTATTR.unpack_from(answer, offset)
        if size < _RTATTR.size:
            return None
        if attr == _UNIX_DIAG_PEER and size >= _RTATTR.size + 4:
            (peer,) = struct.unpack_from("=I", answer, offset + _RTATTR.size)
            return int(peer) or None
        offset += (size + 3) & ~3
    return None


def socket_holders(inode: int, proc: Path = Path("/proc")) -> frozenset[int]:
    """Processes (in this pid namespace) with the socket ``inode`` among their open files."""
    target = f"socket:[{inode}]"
    found = set()
    try:
        processes = [e for e in os.scandir(proc) if e.name.isdigit()]
    except OSError:
        return frozenset()
    for process in processes:
        try:
            with os.scandir(os.path.join(process.path, "fd")) as fds:
                for fd in fds:
                    try:
                        if os.readlink(fd.path) == target:
                            found.add(int(process.name))
                            break
                    except OSError:
                        continue
        except OSError:
            continue  # gone, or not ours to read
    return frozenset(found)


def serving_processes(sock: socket.socket) -> frozenset[int]:
    """The processes holding the other end of this connected Unix socket: the server that
    accepted it. Differs from SO_PEERCRED's pid when the listening socket was made by another
    process (systemd socket activation: SO_PEERCRED says pid 1). Empty when unknown."""
    inode = connection_peer_inode(sock)
    return socket_holders(inode) if inode is not None else frozenset()


def process_name(pid: int, proc: Path = Path("/proc")) -> str | None:
    """The command name of a running process (in this pid namespace), or None if there is none."""
    if pid <= 0:
        return None
    try:
        return (proc / str(pid) / "comm").read_text().strip() or "?"
    except OSError:
        return None
