"""`pydriver status` and `pydriver doctor`: what pybridge has made, and whether the host is in a
state where it works. Read-only: safe to run while pybridge serves."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import protocol as p
from . import pruning
from .dockerapi import docker_host, look_at
from .driver import firewall_view
from .errors import DriverError
from .firewall import BACKENDS, Backend, detect_backend, tool
from .logs import escape
from .model import Endpoint, Family, Mapping, Network
from .naming import is_pybridge_bridge, is_pybridge_veth
from .netlink import Netlink
from .peers import Peer, peer_credentials, process_name
from .process import run
from .pruning import Plan, PluginFacts, Refused
from .report import Names, port_rows
from .rules import drift
from .store import (
    DB_NAME,
    ROW_KIND,
    SCHEMA_VERSION,
    SetAside,
    read_pools,
    read_state,
    unreadable,
)
from .sysctl import Sysctl

# -- status -------------------------------------------------------------------------------------


def status_data(networks: list[Network], endpoints: list[Endpoint], names: Names) -> dict[str, Any]:
    return {
        "networks": [
            {
                "id": n.id,
                "name": names.networks.get(n.id),
                "bridge": n.bridge,
                "bridge_owned": n.bridge_owned,
                "state": n.state,
                "subnets": [
                    {"subnet": str(s.pool), "gateway": str(s.gateway.ip) if s.gateway else None}
                    for s in n.subnets
                ],
                "internal": n.internal,
                "options": n.raw_options,
            }
            for n in networks
        ],
        "endpoints": [
            {
                "id": e.id,
                "network_id": e.network_id,
                "container": names.containers.get(e.id),
                "addresses": [str(a) for a in (e.address, e.address_v6) if a is not None],
                "mac_address": e.mac_address,
                "veth": e.host_veth,
                "sandbox": e.sandbox_key,
                "state": e.state,
            }
            for e in endpoints
        ],
        "ports": port_rows(networks, endpoints, names),
    }


def format_status(data: dict[str, Any]) -> str:
    def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        return [
            "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
            for row in [header, *rows]
        ]

    out = [f"networks: {len(data['networks'])}"]
    if data["networks"]:
        out += table(
            ("NETWORK", "NAME", "BRIDGE", "SUBNETS", "OPTIONS"),
            [
                (
                    n["id"][:12],
                    n["name"] or "-",
                    n["bridge"] + ("" if n["bridge_owned"] else " (yours)"),
                    ", ".join(
                        s["subnet"] + (f" gw {s['gateway']}" if s["gateway"] else "")
                        for s in n["subnets"]
                    ),
                    ", ".join(
                        ([] if not n["internal"] else ["internal"])
                        + [f"{k}={v}" for k, v in sorted(n["options"].items())]
                    )
                    or "-",
                )
                for n in data["networks"]
            ],
        )
    out += ["", f"endpoints: {len(data['endpoints'])}"]
    if data["endpoints"]:
        out += table(
            ("ENDPOINT", "CONTAINER", "NETWORK", "ADDRESSES", "MAC", "VETH"),
            [
                (
                    e["id"][:12],
                    e["container"] or "-",
                    e["network_id"][:12],
                    ", ".join(e["addresses"]) or "-",
                    e["mac_address"],
                    e["veth"],
                )
                for e in data["endpoints"]
            ],
        )
    out += ["", f"published ports: {len(data['ports'])}"]
    if data["ports"]:
        out += table(
            ("CONTAINER", "PROTO", "HOST", "", "CONTAINER PORT"),
            [
                (r["container"] or r["endpoint_id"][:12], r["proto"], r["host"], "->", r["target"])
                for r in data["ports"]
            ],
        )
    return "\n".join(out)


# -- doctor -------------------------------------------------------------------------------------


@dataclass
class Finding:
    ok: bool
    what: str
    fix: str = ""


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    def ok(self, what: str) -> None:
        self.findings.append(Finding(True, what))

    def problem(self, what: str, fix: str) -> None:
        self.findings.append(Finding(False, what, fix))

    @property
    def healthy(self) -> bool:
        return all(f.ok for f in self.findings)

    def text(self) -> str:
        lines = []
        for f in self.findings:
            lines.append(("ok       " if f.ok else "PROBLEM  ") + f.what)
            if f.fix:
                lines.append("         fix: " + f.fix)
        problems = sum(1 for f in self.findings if not f.ok)
        lines.append("healthy" if not problems else f"{problems} problem(s) found")
        return "\n".join(lines)

    def json(self) -> str:
        return json.dumps(
            {
                "healthy": self.healthy,
                "findings": [{"ok": f.ok, "what": f.what, "fix": f.fix} for f in self.findings],
            },
            indent=2,
        )


def _check_database(state_dir: Path, report: Report) -> bool:
    path = state_dir / DB_NAME
    if not path.exists():
        report.problem(
            f"no state database at {path}",
            "start pybridge (scripts/install.sh), or pass the right --state-dir",
        )
        return False
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
            version = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            set_aside = unreadable(db) if integrity == "ok" else []
        finally:
            db.close()
    except sqlite3.Error as err:
        report.problem(
            f"the state database {path} cannot be read: {err}",
            "restore it from a backup; without it pybridge has forgotten its networks",
        )
        return False
    if integrity != "ok":
        report.problem(
            f"the state database {path} is damaged: {integrity}", "restore it from a backup"
        )
        return False
    if version is None or int(version[0]) > SCHEMA_VERSION:
        report.problem(
            f"the state database {path} has an unknown schema",
            "use the pybridge version that wrote it",
        )
        return False
    report.ok(f"state database {path} is intact")
    _report_set_aside(path, set_aside, report)
    return True


def _report_set_aside(path: Path, rows: list[SetAside], report: Report) -> None:
    """Rows pybridge could not decode: set aside (the quarantine table), or still in place."""
    kept = [r for r in rows if r.time is not None]
    waiting = [r for r in rows if r.time is None]

    def listed(found: list[SetAside]) -> str:
        text = "; ".join(
            f"{ROW_KIND.get(r.source, r.source)} {r.key[:40]} ({r.error[:120]})" for r in found[:5]
        )
        # Keys and errors come from damaged rows: nothing in them may reach the terminal raw.
        return escape(text) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")

    clear = f"sqlite3 {path} 'DELETE FROM quarantine'"  # noqa: S608 (a hint, not a query)
    if kept:
        report.problem(
            f"{len(kept)} row(s) of pybridge's state could not be read and were set aside "
            f"(pybridge serves without them): {listed(kept)}",
            "a network set aside is unknown to pybridge: remove it in Docker (docker network "
            "rm) and create it again, likewise a network using a pool set aside; the rows are "
            f"in table quarantine of {path}; once dealt with, clear it: {clear}",
        )
    if waiting:
        report.problem(
            f"{len(waiting)} row(s) of pybridge's state cannot be read: {listed(waiting)}",
            "restart pybridge: it sets them aside and serves the rest",
        )


def _check_socket(path: str, report: Report) -> None:
    try:
        answer = _exchange(path, "Plugin.Activate", b"", timeout=5)
    except OSError as err:
        report.problem(
            f"pybridge does not answer on {path} ({err.strerror or err})",
            "start it: scripts/pybridge-service.sh start (or check its log)",
        )
        return
    if b" 200 " in answer.split(b"\r\n", 1)[0] and b"NetworkDriver" in answer:
        report.ok(f"pybridge answers on {path}")
    else:
        report.problem(
            f"something answers on {path}, but not as pybridge", "check what serves that socket"
        )


async def _docker_backend() -> Backend | None:
    """The iptables flavour holding Docker's chains, if any."""
    for backend in BACKENDS:
        if backend == "legacy" and "filter" not in _legacy_tables():
            continue
        result = await run([tool(backend, 4, "save"), "-t", "filter"])
        if result.returncode == 0 and ":DOCKER-USER" in result.stdout:
            return backend
    return None


def _legacy_tables() -> list[str]:
    try:
        return Path("/proc/net/ip_tables_names").read_text().split()
    except OSError:
        return []


def _views(networks: list[Network], endpoints: list[Endpoint]) -> list[Any]:
    mappings: dict[str, list[Mapping]] = {}
    for e in endpoints:
        mappings.setdefault(e.network_id, []).extend(e.mappings)
    return [firewall_view(n, mappings.get(n.id, ())) for n in networks if n.state != "deleting"]


def docker_network_ids() -> set[str] | None:
    """Network ids dockerd knows (through the docker CLI), or None if it cannot be asked.
    Only these operator commands ask; the plugin itself never calls Docker."""
    try:
        done = subprocess.run(
            ["docker", "network", "ls", "-q", "--no-trunc"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return set(done.stdout.split())


async def diagnose(  # noqa: C901 (issue 15 item 3: doctor rebuilt as small checks)
    socket_path: str, state_dir: Path, backend_setting: str, ask_docker: bool = True
) -> Report:
    report = Report()
    networks: list[Network] = []
    endpoints: list[Endpoint] = []
    if _check_database(state_dir, report):
        networks, endpoints = read_state(state_dir)
    _check_socket(socket_path, report)
    sysctl = Sysctl(Path(os.environ.get("PYDRIVER_SYSCTL_ROOT") or "/proc/sys"))

    # Forwarding.
    if networks:
        if await sysctl.read("net.ipv4.ip_forward") == "1":
            report.ok("IPv4 forwarding is on")
        else:
            report.problem(
                "IPv4 forwarding is off: containers cannot reach anything outside",
                "sysctl -w net.ipv4.ip_forward=1 (pybridge sets it when it starts)",
            )
        if any(n.subnets_v6 for n in networks):
            if await sysctl.read("net.ipv6.conf.all.forwarding") == "1":
                report.ok("IPv6 forwarding is on")
            else:
                report.problem(
                    "IPv6 forwarding is off: IPv6 containers cannot reach outside",
                    "sysctl -w net.ipv6.conf.all.forwarding=1",
                )

    # Backends and rules.
    try:
        ours = await detect_backend(backend_setting)
    except DriverError as err:
        report.problem(str(err), "install iptables")
        return report
    docker = await _docker_backend()
    holding = []
    for backend in BACKENDS:
        if backend == "legacy" and "filter" not in _legacy_tables():
            continue
        text = (await run([tool(backend, 4, "save")])).stdout
        if "PYBRIDGE-" in text:
            holding.append(backend)
    if docker is not None and ours != docker:
        report.problem(
            f"Docker's rules are in iptables-{docker} but pybridge's are in iptables-{ours}: "
            "packets never see pybridge's accepts",
            f"run pybridge with --firewall-backend={docker} (or auto) and restart it",
        )
    elif docker is not None:
        report.ok(f"Docker and pybridge both use iptables-{docker}")
    else:
        report.ok(f"Docker's chains were not found; pybridge uses iptables-{ours}")
    for stale in holding:
        if stale != ours:
            report.problem(
                f"pybridge chains are also in iptables-{stale}, which pybridge does not use",
                f"remove them: iptables-{stale}-save | grep PYBRIDGE, then -F and -X each chain "
                "(or restart pybridge once with that backend and remove its networks)",
            )
    backend = ours
    forward_policy = ""
    views = _views(networks, endpoints)
    for family in (4, 6):
        save = (await run([tool(backend, family, "save")])).stdout
        family_typed: Family = 4 if family == 4 else 6
        problems = drift(views, family_typed, save)
        if problems:
            for p in problems:
                report.problem(
                    f"IPv{family} firewall: {p}",
                    "pybridge restores its rules within seconds while it runs; if this stays, "
                    "restart it (scripts/pybridge-service.sh restart)",
                )
        elif networks:
            report.ok(f"IPv{family} firewall: pybridge's chains and jumps are all in place")
        if family == 4:
            for line in save.splitlines():
                if line.startswith(":FORWARD "):
                    forward_policy = line.split()[1]
    nf_call = await sysctl.read("net.bridge.bridge-nf-call-iptables")
    if forward_policy == "DROP":
        detail = (
            "br_netfilter is on, so even traffic within one bridge"
            if nf_call == "1"
            else ("traffic between networks")
        )
        report.ok(f"FORWARD policy is DROP ({detail} needs pybridge's accept rules)")

    # Kernel objects and state.
    netlink = Netlink()
    await netlink.open()
    try:
        links = {link.name: link for link in await netlink.links()}
        routes = await netlink.routes()
    finally:
        await netlink.close()
    bridges = {n.bridge for n in networks}
    for n in networks:
        if n.state != "ready":
            report.problem(
                f"network {n.id[:12]} is half {n.state}",
                "restart pybridge: it finishes or undoes it",
            )
        if n.bridge not in links:
            report.problem(
                f"network {n.id[:12]} has no bridge {n.bridge}", "restart pybridge: it recreates it"
            )
    veths = {e.host_veth for e in endpoints} | {e.container_veth for e in endpoints}
    for e in endpoints:
        if e.sandbox_key and e.host_veth not in links:
            report.problem(
                f"endpoint {e.id[:12]} has lost its veth {e.host_veth} (its container is gone)",
                "pybridge removes it by itself within a minute while it runs",
            )
    for name, link in sorted(links.items()):
        if (link.kind == "bridge" and is_pybridge_bridge(name) and name not in bridges) or (
            link.kind == "veth" and is_pybridge_veth(name) and name not in veths
        ):
            report.problem(
                f"{name} looks like pybridge's but no state refers to it",
                f"ip link del {name} (pybridge removes it when it starts)",
            )
    known = docker_network_ids() if ask_docker else None
    if known is not None:
        for n in networks:
            if n.id not in known:
                report.problem(
                    f"network {n.id[:12]} (bridge {n.bridge}) is in pybridge's state but Docker "
                    "does not know it (removed while pybridge was not there)",
                    "pydriver prune (removes such networks from pybridge)",
                )
    if networks and not [f for f in report.findings if "no bridge" in f.what]:
        report.ok(f"{len(networks)} network(s) and {len(endpoints)} endpoint(s) match the kernel")
    for n in networks:
        for s in n.subnets:
            for route in routes:
                dest = route.destination
                if (
                    route.device not in bridges
                    and dest.prefixlen
                    and dest.version == s.pool.version
                    and dest.overlaps(s.pool)
                ):
                    report.problem(
                        f"subnet {s.pool} of network {n.id[:12]} overlaps the host route "
                        f"{dest} on {route.device or '?'}",
                        "traffic for one of them goes the wrong way; move one of them",
                    )
    return report


def doctor(
    socket_path: str, state_dir: Path, backend_setting: str, ask_docker: bool = True
) -> Report:
    return asyncio.run(diagnose(socket_path, state_dir, backend_setting, ask_docker))


def _exchange_with_peer(
    socket_path: str, method: str, payload: bytes, timeout: float
) -> tuple[bytes, Peer]:
    """One POST to pybridge's socket, marked as pydriver's own (pybridge does not count it as
    a daemon calling); the whole raw answer, and who listens on the socket (SO_PEERCRED)."""
    conn = socket.socket(socket.AF_UNIX)
    conn.settimeout(timeout)
    try:
        conn.connect(socket_path)
        peer = peer_credentials(conn)
        conn.sendall(
            f"POST /{method} HTTP/1.1\r\nHost: plugin\r\nContent-Length: {len(payload)}\r\n"
            f"{p.TOOL_HEADER}: pydriver\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        return data, peer
    finally:
        conn.close()


def _exchange(socket_path: str, method: str, payload: bytes, timeout: float) -> bytes:
    return _exchange_with_peer(socket_path, method, payload, timeout)[0]


def _decode_answer(data: bytes) -> tuple[int, Any]:
    head, _, rest = data.partition(b"\r\n\r\n")
    try:
        return int(head.split()[1]), json.loads(rest)
    except (IndexError, ValueError):
        raise DriverError("pybridge's answer is not HTTP with a JSON body") from None


def post(socket_path: str, method: str, body: dict[str, Any]) -> tuple[int, Any]:
    return _decode_answer(_exchange(socket_path, method, json.dumps(body).encode(), timeout=60))


# -- prune --------------------------------------------------------------------------------------


def plugin_facts(socket_path: str) -> PluginFacts:
    """Ask pybridge who has called it (Pybridge.Status), and see its pid from here."""
    method, body = p.status_request()
    try:
        data, peer = _exchange_with_peer(socket_path, method, json.dumps(body).encode(), 20)
    except OSError as err:
        raise DriverError(
            f"pybridge does not answer on {socket_path} ({err.strerror or err}); prune works "
            "through the running pybridge"
        ) from None
    code, reply = _decode_answer(data)
    if code != 200 or not isinstance(reply, dict):
        raise DriverError(
            f"pybridge on {socket_path} does not say who calls it (an older version?): run "
            "this version of pybridge to use prune"
        )
    try:
        status = p.parse_status_reply(reply)
    except DriverError as err:
        raise DriverError(f"pybridge on {socket_path} answered its status oddly: {err}") from None
    same = peer.pid > 0 and peer.pid == status.pid
    running = {}
    if same:  # the callers' pids are ours too: which are still running, as what
        for caller in status.callers:
            name = process_name(caller.pid)
            if name is not None:
                running[caller.pid] = name
    return PluginFacts(
        socket_path, status.pid, peer.pid, status.callers, running, status.state_file
    )


@dataclass
class Pruned:
    plan: Plan
    removed: bool  # False: only listed (--dry-run), or declined


def prune(
    socket_path: str,
    state_dir: Path,
    *,
    dry_run: bool,
    yes: bool,
    ask: Callable[[Plan], bool] | None,
    done: Callable[[str], None] = lambda line: None,
) -> Pruned:
    """Remove, through the running pybridge, the networks and IPAM pools it has that the Docker
    daemon using it no longer knows (removed while pybridge was away). The daemon is the one
    the docker CLI talks to, and only if it is shown to be the one using this pybridge (see
    pruning.check_same_daemon). ``ask`` confirms on a terminal (None: there is none); ``done``
    hears each thing removed."""
    plugin = plugin_facts(socket_path)
    try:
        here = (state_dir / DB_NAME).stat()
    except OSError as err:
        raise DriverError(f"no pybridge state at {state_dir / DB_NAME} ({err.strerror})") from None
    if plugin.state_file is not None and plugin.state_file != (here.st_dev, here.st_ino):
        raise Refused(
            f"pybridge on {socket_path} keeps its state in another database than "
            f"{state_dir / DB_NAME}: give prune the --state-dir that pybridge uses"
        )
    read_at = time.monotonic()
    networks, endpoints = read_state(state_dir)
    pools = read_pools(state_dir)
    host = docker_host()
    path = pruning.daemon_socket(host)
    daemon = look_at(host, path)
    pruning.check_same_daemon(plugin, daemon, [n.id for n in networks], yes)
    plan = pruning.stale(networks, endpoints, pools, daemon.networks, time.time())
    if plan.empty:
        return Pruned(plan, False)
    go = pruning.how_to_go(dry_run, yes, ask is not None)
    if go == "list" or (go == "ask" and ask is not None and not ask(plan)):
        return Pruned(plan, False)
    # Look again, after the prompt and at least SETTLE_SECONDS after reading the state: a
    # network Docker was creating (pybridge answers before Docker stores it) shows up by then.
    time.sleep(max(0.0, read_at + pruning.SETTLE_SECONDS - time.monotonic()))
    again = look_at(host, path)
    if again.pids != daemon.pids:
        raise Refused(
            f"the process serving {host} changed while prune ran (pid "
            f"{', '.join(map(str, sorted(daemon.pids)))} before, "
            f"{', '.join(map(str, sorted(again.pids)))} now); run prune again"
        )
    plan = plan.still_unknown(again.networks)
    for stale_network in plan.networks:
        network_id = stale_network.network.id
        for endpoint_id in stale_network.endpoint_ids:
            post(
                socket_path,
                "NetworkDriver.DeleteEndpoint",
                {"NetworkID": network_id, "EndpointID": endpoint_id},
            )
        status, reply = post(socket_path, "NetworkDriver.DeleteNetwork", {"NetworkID": network_id})
        if status != 200:
            raise DriverError(f"pybridge refused to remove network {network_id[:12]}: {reply}")
        done(stale_network.describe())
    for pool in plan.pools:
        status, reply = post(socket_path, "IpamDriver.ReleasePool", {"PoolID": pool.id})
        if status != 200:
            raise DriverError(f"pybridge refused to release {pool.describe()}: {reply}")
        done(pool.describe())
    return Pruned(plan, True)
