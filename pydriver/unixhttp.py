"""HTTP over a Unix socket, blocking: the one client of pydriver's operator commands, for
pybridge's own socket (doctor, prune) and the Docker daemon's (dockerapi.py); the tests use it
too. pybridge itself only serves (aiohttp); nothing here runs inside it."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import protocol as p
from .errors import DriverError
from .peers import peer_credentials


class UnixConnection(http.client.HTTPConnection):
    """An HTTP connection to a Unix socket; remembers who listens on it (the pid SO_PEERCRED
    gives, 0 for a process outside this pid namespace) at each connect."""

    def __init__(self, path: str, timeout: float, host: str = "localhost") -> None:
        super().__init__(host, timeout=timeout)
        self.socket_path = path
        self.listeners: set[int] = set()

    def connect(self) -> None:
        sock = _connect(self.socket_path, self.timeout)
        self.listeners.add(peer_credentials(sock).pid)
        self.sock = sock


def _connect(path: str, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    listener: int  # pid of the process listening on the socket (0: outside this pid namespace)

    def json(self) -> Any:
        """The body as JSON; ValueError if it is not."""
        return json.loads(self.body)


def request(
    path: str,
    method: str,
    target: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Answer:
    """One request on a connection of its own, which the server closes once done with the
    request: this returns only then (pybridge records some answers as sent after sending
    them). OSError if nothing answers on ``path``; http.client.HTTPException if what answers
    does not speak HTTP, or closes without an answer (RemoteDisconnected, also an OSError)."""
    fields = {"Host": "localhost", **(headers or {})}
    fields.update({"Content-Length": str(len(body)), "Connection": "close"})
    head = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    with _connect(path, timeout) as sock:
        listener = peer_credentials(sock).pid
        sock.sendall(f"{method} {target} HTTP/1.1\r\n{head}\r\n".encode() + body)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        data = response.read()
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass  # a server that keeps the connection open after all: the answer is complete
    return Answer(response.status, data, listener)


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any  # decoded JSON
    listener: int  # pybridge's pid as seen from here (SO_PEERCRED; 0: another pid namespace)


def call_pybridge(
    path: str, method: str, body: Mapping[str, Any] | None = None, timeout: float = 60.0
) -> Reply:
    """POST one of pybridge's methods, marked as pydriver's own request (pybridge does not
    count it among the daemons calling it). OSError if pybridge does not answer on ``path``;
    DriverError if what answers is not HTTP with a JSON body."""
    payload = json.dumps(body).encode() if body else b""  # no arguments: no body, as Docker
    try:
        answer = request(
            path, "POST", f"/{method}", payload, {p.TOOL_HEADER: "pydriver"}, timeout=timeout
        )
        return Reply(answer.status, answer.json(), answer.listener)
    except (http.client.HTTPException, ValueError):
        raise DriverError("pybridge's answer is not HTTP with a JSON body") from None
