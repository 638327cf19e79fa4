"""A stand-in for a Docker daemon's Engine API on a Unix socket, enough for `pydriver prune`
and `docker network ls`: GET /_ping, /networks and /plugins (with or without a /vX.Y prefix)
answer what the test sets; anything else is 404. Served by threads of the process that runs
it, so that process is the "daemon" prune identifies.

Run as a program it serves an inherited listening socket (systemd socket activation's shape:
another process made and bound it) and can first call pybridge once, as dockerd would:
    python -m tests.fakedocker --fd N [--networks JSON] [--plugins JSON] [--call SOCKET]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import socketserver
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

_VERSION = re.compile(r"^/v[0-9.]+(?=/)")


def network(network_id: str, *subnets: str, ipam_driver: str = "default") -> dict[str, Any]:
    """One entry of GET /networks."""
    return {
        "Name": "n" + network_id[:8],
        "Id": network_id,
        "Scope": "local",
        "Driver": "pybridge",
        "IPAM": {
            "Driver": ipam_driver,
            "Options": None,
            "Config": [{"Subnet": s} for s in subnets],
        },
        "Options": {},
        "Labels": {},
    }


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    networks: list[dict[str, Any]]
    plugins: list[dict[str, Any]]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as dockerd
    server: _Server

    def do_GET(self) -> None:
        path = _VERSION.sub("", self.path.split("?", 1)[0])
        if path == "/_ping":
            self._answer(200, b"OK", "text/plain")
        elif path == "/networks":
            self._answer(200, json.dumps(self.server.networks).encode())
        elif path == "/plugins":
            self._answer(200, json.dumps(self.server.plugins).encode())
        else:
            self._answer(404, b'{"message":"page not found"}')

    do_HEAD = do_GET

    def _answer(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Api-Version", "1.41")
        self.send_header("OSType", "linux")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # a Unix peer has no address
        pass


class FakeDocker:
    """Serves ``path`` from a thread of this process while in its ``with`` block."""

    def __init__(
        self,
        path: Path,
        networks: Sequence[dict[str, Any]] = (),
        plugins: Sequence[dict[str, Any]] = (),
        listening: socket.socket | None = None,
    ) -> None:
        self.path = path
        self.host = f"unix://{path}"
        if listening is None:
            self.server = _Server(str(path), _Handler)
        else:
            self.server = _Server(str(path), _Handler, bind_and_activate=False)
            self.server.socket.close()
            self.server.socket = listening
        self.server.networks = list(networks)
        self.server.plugins = list(plugins)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def set(
        self,
        networks: Sequence[dict[str, Any]] | None = None,
        plugins: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        if networks is not None:
            self.server.networks = list(networks)
        if plugins is not None:
            self.server.plugins = list(plugins)

    def __enter__(self) -> FakeDocker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--networks", default="[]")
    parser.add_argument("--plugins", default="[]")
    parser.add_argument("--call", default="", help="pybridge's socket: call it once first")
    args = parser.parse_args()
    if args.call:
        from tests.hostenv import post_raw

        post_raw(args.call, "Plugin.Activate")
    listening = socket.socket(fileno=args.fd)
    fake = FakeDocker(
        Path(args.path), json.loads(args.networks), json.loads(args.plugins), listening
    )
    fake.server.serve_forever()


if __name__ == "__main__":
    main()
