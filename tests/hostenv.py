"""Helpers shared by the privileged and end-to-end tests: commands, the leak guard, the outside
test host. Everything here only touches objects the tests create (names start with "pbt")."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydriver.unixhttp import request

ROOT = Path(__file__).resolve().parents[1]
# What dockerd's plugin client sends besides Content-Length.
DOCKERD_HEADERS = {
    "Host": "plugin.moby.localhost",
    "Accept": "application/vnd.docker.plugins.v1.2+json",
}


def post_raw(path: str, method: str, body: bytes = b"", timeout: float = 30) -> tuple[int, Any]:
    """POST on a Unix socket as dockerd does (no Content-Type): (status, decoded JSON).
    OSError if the connection fails or closes without an answer."""
    answer = request(path, "POST", f"/{method}", body, DOCKERD_HEADERS, timeout=timeout)
    return answer.status, answer.json()


OUTSIDE_NS = "pbt-outside"
OUTSIDE_HOST_IF = "pbt-out-h"
OUTSIDE_NS_IF = "pbt-out-n"
# Documentation ranges (RFC 5737 / RFC 3849): never routed anywhere real.
OUTSIDE_HOST_IP = "198.51.100.1"
OUTSIDE_IP = "198.51.100.2"
OUTSIDE_HOST_IP6 = "2001:db8:5100::1"
OUTSIDE_IP6 = "2001:db8:5100::2"
OUTSIDE_PORT = 7000

# A server in the outside namespace that answers every TCP connection with the address it
# sees the connection coming from, then closes it.
_PEER_SERVER = r"""
import socket, sys, threading
PORT = int(sys.argv[1])
def serve(family, addr):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, PORT)); s.listen(64)
    while True:
        c, peer = s.accept()
        try:
            c.sendall((peer[0] + "\n").encode())
        finally:
            c.close()
threading.Thread(target=serve, args=(socket.AF_INET6, "::"), daemon=True).start()
serve(socket.AF_INET, "0.0.0.0")
"""


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 120,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command; ``env`` adds to (or overrides) this process's environment."""
    result = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        check=False,
        env={**os.environ, **env} if env else None,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"command failed ({result.returncode}): {' '.join(argv)}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


# What busybox's nc and ping, iputils' ping and a Python socket probe say when a probe went out
# and got no answer (or a refusal, or its own host found no route). Any other failure means no
# probe was sent: no such tool, container or namespace, a bad address. That proves nothing
# about reachability, so a "cannot reach" check must not take it for "no answer".
_WENT_OUT = (
    r"(Connection refused|Network is unreachable|No route to host|Connection timed out"
    r"|Operation not permitted|Host is unreachable)"
)
_PROBE_RAN = re.compile(
    rf"nc: timed out|nc: can't connect to remote host.*: {_WENT_OUT}|packets transmitted"
    rf"|ping: sendto: {_WENT_OUT}|^(TimeoutError|ConnectionRefusedError|socket\.timeout)\b"
    rf"|^OSError: \[Errno (101|110|111|113)\]",
    re.MULTILINE,
)


def probed(result: subprocess.CompletedProcess[str], what: str) -> str:
    """A probe's output: what came back, "" if nothing did; an AssertionError if the probe
    never ran."""
    if result.returncode == 0 or _PROBE_RAN.search(result.stdout + result.stderr):
        return result.stdout.strip()
    said = (result.stdout + result.stderr).strip()[-400:]
    raise AssertionError(f"{what} never ran (exit {result.returncode}): {said}")


def probe(argv: Sequence[str], timeout: float = 30) -> str:
    """Run a probe (nc, ping, a socket client), as ``probed``."""
    return probed(run(argv, check=False, timeout=timeout), " ".join(argv))


def require_root() -> None:
    if os.geteuid() != 0:
        raise AssertionError("these tests need root: run them with scripts/test.sh as root")


def uplink_interfaces() -> list[str]:
    """Interfaces carrying a default route (v4 or v6): the machine's way out."""
    names: set[str] = set()
    for family in ("-4", "-6"):
        out = run(["ip", "-j", family, "route", "show", "default"], check=False).stdout
        for route in json.loads(out or "[]"):
            if route.get("dev"):
                names.add(route["dev"])
    return sorted(names)


def _guard_rule(uplink: str) -> list[str]:
    return ["-o", uplink, "-m", "addrtype", "!", "--src-type", "LOCAL", "-j", "DROP"]


def leak_guard_rules() -> list[tuple[str, list[str]]]:
    """(tool, mangle POSTROUTING rule) pairs of the leak guard, one per uplink and family."""
    return [
        (tool, _guard_rule(uplink))
        for uplink in uplink_interfaces()
        for tool in ("iptables", "ip6tables")
    ]


@contextmanager
def leak_guard() -> Iterator[list[str]]:
    """Drop anything forwarded out of the uplink whose source is not a local address, so no
    test packet can ever leave the machine (testing.md)."""
    installed: list[tuple[str, list[str]]] = []
    try:
        for tool, rule in leak_guard_rules():
            present = run([tool, "-t", "mangle", "-C", "POSTROUTING", *rule], check=False)
            if present.returncode != 0:
                run([tool, "-t", "mangle", "-I", "POSTROUTING", *rule])
                installed.append((tool, rule))
        yield [rule[1] for _, rule in installed]
    finally:
        for tool, rule in installed:
            run([tool, "-t", "mangle", "-D", "POSTROUTING", *rule], check=False)


@dataclass
class OutsideHost:
    """A network namespace playing a host outside the machine, joined by a veth pair."""

    ip: str = OUTSIDE_IP
    ip6: str = OUTSIDE_IP6
    host_ip: str = OUTSIDE_HOST_IP
    host_ip6: str = OUTSIDE_HOST_IP6
    port: int = OUTSIDE_PORT
    ns: str = OUTSIDE_NS

    def exec(self, *argv: str, check: bool = True, timeout: float = 30) -> str:
        return run(["ip", "netns", "exec", self.ns, *argv], check=check, timeout=timeout).stdout

    def probe(self, *argv: str, timeout: float = 30) -> str:
        """A probe from the outside host (see ``probe``)."""
        return probe(["ip", "netns", "exec", self.ns, *argv], timeout=timeout)


def _remove_outside() -> None:
    run(["ip", "link", "del", OUTSIDE_HOST_IF], check=False)
    run(["ip", "netns", "del", OUTSIDE_NS], check=False)


@contextmanager
def outside_host() -> Iterator[OutsideHost]:
    _remove_outside()
    server: subprocess.Popen[bytes] | None = None
    try:
        run(["ip", "netns", "add", OUTSIDE_NS])
        run(["ip", "link", "add", OUTSIDE_HOST_IF, "type", "veth", "peer", "name", OUTSIDE_NS_IF])
        run(["ip", "link", "set", OUTSIDE_NS_IF, "netns", OUTSIDE_NS])
        run(["ip", "addr", "add", f"{OUTSIDE_HOST_IP}/24", "dev", OUTSIDE_HOST_IF])
        run(["ip", "-6", "addr", "add", f"{OUTSIDE_HOST_IP6}/64", "dev", OUTSIDE_HOST_IF, "nodad"])
        run(["ip", "link", "set", OUTSIDE_HOST_IF, "up"])
        ns = ["ip", "netns", "exec", OUTSIDE_NS]
        run([*ns, "ip", "addr", "add", f"{OUTSIDE_IP}/24", "dev", OUTSIDE_NS_IF])
        run([*ns, "ip", "-6", "addr", "add", f"{OUTSIDE_IP6}/64", "dev", OUTSIDE_NS_IF, "nodad"])
        run([*ns, "ip", "link", "set", OUTSIDE_NS_IF, "up"])
        run([*ns, "ip", "link", "set", "lo", "up"])
        # No default route inside: replies reach only the host's own address on this link,
        # so a container gets an answer only if its traffic was masqueraded.
        server = subprocess.Popen(
            [*ns, "python3", "-c", _PEER_SERVER, str(OUTSIDE_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = run([*ns, "ss", "-ltnH", f"sport = :{OUTSIDE_PORT}"], check=False)
            if probe.stdout.strip():
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the outside test server did not start")
        yield OutsideHost()
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=10)
        _remove_outside()


def links() -> list[dict[str, object]]:
    return list(json.loads(run(["ip", "-j", "-d", "link", "show"]).stdout or "[]"))


def link_names() -> set[str]:
    return {str(link["ifname"]) for link in links()}


def all_addresses() -> set[str]:
    found = set()
    for link in json.loads(run(["ip", "-j", "addr", "show"]).stdout or "[]"):
        for info in link.get("addr_info", []):
            found.add(f"{info['local']}/{info['prefixlen']}")
    return found


def routes() -> list[dict[str, object]]:
    out = []
    for family in ("-4", "-6"):
        out += json.loads(run(["ip", "-j", family, "route", "show"]).stdout or "[]")
    return out


def firewall_dump() -> str:
    """Every rule in every iptables flavour and family (pybridge must leave none behind)."""
    text = []
    for tool in ("iptables-nft-save", "ip6tables-nft-save"):
        text.append(run([tool]).stdout)
    # Reading legacy tables that do not exist would create them; read only existing ones.
    for names, tool in (
        ("/proc/net/ip_tables_names", "iptables-legacy-save"),
        ("/proc/net/ip6_tables_names", "ip6tables-legacy-save"),
    ):
        try:
            present = Path(names).read_text().split()
        except OSError:
            present = []
        for table in present:
            text.append(run([tool, "-t", table], check=False).stdout)
    return "\n".join(text)
