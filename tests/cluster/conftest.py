"""A real etcd for the cluster tests: Debian's etcd-server, on loopback, with a throwaway data
directory; started and stopped by pid (scripts/test.sh installs it)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Etcd:
    data: Path
    client_port: int = field(default_factory=_free_port)
    peer_port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> tuple[str, int]:
        return ("127.0.0.1", self.client_port)

    def start(self) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            raise AssertionError("etcd is not installed: scripts/test.sh installs etcd-server")
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            [
                binary,
                "--name",
                "e0",
                "--data-dir",
                str(self.data),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"e0={peer}",
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(self.endpoint) == 0:
                    time.sleep(0.3)  # serving the port comes just before being ready
                    return
            time.sleep(0.05)
        raise AssertionError("etcd did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


@pytest.fixture
def etcd() -> Iterator[Etcd]:
    # On tmpfs: etcd's fsyncs on a busy disk would make calls miss pybridge's bounds.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="pbt-etcd-", dir=shm) as tmp:
        server = Etcd(Path(tmp) / "data")
        server.start()
        try:
            yield server
        finally:
            if server.proc is not None and server.proc.poll() is None:
                server.resume()
            server.kill()
