"""Peer credentials on real Unix sockets: who connected, who listens, and who holds the other end
of a connection when the listening socket was made by another process (socket activation)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pydriver.peers import (
    Peer,
    _peer_from_answer,
    connection_peer_inode,
    peer_credentials,
    process_name,
    serving_processes,
    socket_holders,
)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pyb-", dir="/tmp"))  # short: 108-byte limit
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def test_socketpair_peer_is_this_process() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert peer_credentials(a) == Peer(os.getpid(), os.getuid())


def test_both_ends_of_a_real_connection(sock_dir: Path) -> None:
    path = str(sock_dir / "s.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()
        code = f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({path!r}); s.recv(1)"
        child = subprocess.Popen([sys.executable, "-c", code])
        try:
            conn, _ = server.accept()
            with conn:
                # The accepting side sees the process that connected.
                assert peer_credentials(conn).pid == child.pid
                conn.sendall(b"x")
        finally:
            child.wait(timeout=10)


def test_not_a_unix_socket_or_no_peer_is_an_oserror() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        pytest.raises(OSError, match="not a Unix socket"),
    ):
        peer_credentials(udp)
    with socket.socket(socket.AF_UNIX) as lone, pytest.raises(OSError, match="has no peer"):
        peer_credentials(lone)


def test_socket_activation_the_server_is_the_process_that_accepted(sock_dir: Path) -> None:
    """This process binds and listens (as systemd does) and hands the socket to a child that
    accepts (as dockerd does with fd://). SO_PEERCRED names the listener; the other end of the
    connection is in the child."""
    path = str(sock_dir / "docker.sock")
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(path)
    listening.listen()
    fd = listening.fileno()
    code = (
        f"import socket, time; s = socket.socket(fileno={fd}); c, _ = s.accept(); "
        "c.sendall(b'ok'); time.sleep(30)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], pass_fds=[fd])
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            assert client.recv(2) == b"ok"  # accepted by now
            assert peer_credentials(client).pid == os.getpid()
            assert serving_processes(client) == frozenset({child.pid})
            inode = connection_peer_inode(client)
            assert inode is not None
            assert socket_holders(inode) == frozenset({child.pid})
    finally:
        child.kill()
        child.wait()
        listening.close()


def test_peer_closed_or_unconnected_gives_nothing(sock_dir: Path) -> None:
    with socket.socket(socket.AF_UNIX) as lone:
        assert serving_processes(lone) == frozenset()


def test_diag_answer_garbage_is_none() -> None:
    assert _peer_from_answer(b"") is None
    assert _peer_from_answer(b"\x00" * 40) is None
    error = struct.pack("=IHHII", 36, 2, 0, 1, 0) + b"\x00" * 20
    assert _peer_from_answer(error) is None
    # A well-formed answer with a zero-length attribute must not loop.
    msg = struct.pack("=IHHII", 36, 20, 0, 1, 0) + b"\x00" * 16 + struct.pack("=HH", 0, 2)
    assert _peer_from_answer(msg) is None
    good = struct.pack("=IHHII", 40, 20, 0, 1, 0) + b"\x00" * 16 + struct.pack("=HHI", 8, 2, 4242)
    assert _peer_from_answer(good) == 4242


def test_process_name() -> None:
    assert process_name(os.getpid()) is not None
    assert process_name(0) is None
    assert process_name(2**22 + 12345) is None
