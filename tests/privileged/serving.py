"""Run `pydriver serve` inside a throwaway network namespace and talk to it as dockerd does."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydriver.clusterhost import META_KEY, recorded_tunnels, segment_of
from pydriver.naming import vxlan_name
from pydriver.rules import drift, firewall_views
from pydriver.store import read_meta, read_state
from tests.hostenv import post_raw, run


class PluginDied(Exception):
    """The connection broke: the plugin died in the middle of the request."""


@contextmanager
def netns() -> Iterator[str]:
    name = "pbt-" + secrets.token_hex(4)
    run(["ip", "netns", "add", name])
    run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
    try:
        yield name
    finally:
        run(["ip", "netns", "del", name], check=False)


class Plugin:
    """One `pydriver serve` process in ``ns``, restartable, with its own socket and state."""

    def __init__(
        self, ns: str, workdir: Path, sock: Path | None = None, wrap: Sequence[str] = ()
    ) -> None:
        self.ns = ns
        self.sock = sock or workdir / "pb.sock"
        self.state = workdir / "state"
        self.proc: subprocess.Popen[str] | None = None
        self.log = workdir / "pydriver.log"
        self.wrap = list(wrap)  # a command that runs pydriver, e.g. unshare --pid --fork

    def start(self, **env: str) -> None:
        environment = dict(os.environ)
        environment.update({"PYDRIVER_GC_INTERVAL": "0", "PYDRIVER_HEAL_INTERVAL": "0"})
        environment.update(env)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.ns,
                    *self.wrap,
                    sys.executable,
                    "-m",
                    "pydriver.cli",
                    "serve",
                    "--socket",
                    str(self.sock),
                    "--state-dir",
                    str(self.state),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                env=environment,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.sock.is_socket() and _connects(self.sock):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"pydriver exited early:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.02)
        raise AssertionError("pydriver did not bind its socket")

    def wait_dead(self, timeout: float = 10) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    def post(self, method: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        return post(self.sock, method, body)

    def consistent(self, settle: float = 3.0) -> list[str]:
        """Everything wrong between pybridge's state and the namespace's kernel objects and
        firewall ([] when they agree). Rules for published ports and veth removals happen
        just after the answer, so this waits up to ``settle`` seconds for them."""
        deadline = time.monotonic() + settle
        while True:
            problems = check_consistent(self.ns, self.state)
            if not problems or time.monotonic() > deadline:
                return problems
            time.sleep(0.05)


def _connects(sock: Path) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(sock))
        return True
    except OSError:
        return False
    finally:
        s.close()


def post(sock: Path, method: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    payload = b"" if body is None else (json.dumps(body) + "\n").encode()
    try:
        return post_raw(str(sock), method, payload)
    except OSError as err:
        raise PluginDied(str(err)) from None


def check_consistent(ns: str, state_dir: Path) -> list[str]:
    networks, endpoints = read_state(state_dir)
    problems = [f"network {n.id[:12]} is {n.state}" for n in networks if n.state != "ready"]
    problems += [f"endpoint {e.id[:12]} is {e.state}" for e in endpoints if e.state != "ready"]
    links = set(run(["ip", "netns", "exec", ns, "ip", "-o", "link", "show"]).stdout.split())
    names = {word.rstrip(":").split("@")[0] for word in links}
    wanted = {n.bridge for n in networks} | {e.host_veth for e in endpoints}
    wanted |= {vxlan_name(n.id) for n in networks if segment_of(n) is not None}
    problems += [f"{name} missing" for name in sorted(wanted - names)]
    ours = {n for n in names if n.startswith(("pyb-", "pyv", "pyc", "pyx-"))}
    known = wanted | {e.container_veth for e in endpoints}
    problems += [f"{name} left behind" for name in sorted(ours - known)]
    tunnels = recorded_tunnels(networks, read_meta(state_dir, META_KEY))
    views = firewall_views(networks, endpoints, tunnels)
    for family, tool in ((4, "iptables-nft-save"), (6, "ip6tables-nft-save")):
        save = run(["ip", "netns", "exec", ns, tool]).stdout
        problems += [f"IPv{family} {p}" for p in drift(views, family, save)]  # type: ignore[arg-type]
    return problems
