"""A host reboot, simulated on a live machine (testing.md): every process of Docker and pybridge
killed with SIGKILL, what a reboot wipes wiped (kernel links, every iptables rule, the contents
of /run that Docker and iptables use, mounts under Docker's directories), then pybridge and
dockerd started as a boot would start them.

Only processes this test run started are killed, each by pid: the dockerd named by its pid
file, its children (containerd), the containerd shims serving that containerd's address, and
the processes under those shims (containers, and a managed plugin)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from pydriver.naming import VXLAN_PREFIX, is_pybridge_bridge, is_pybridge_veth
from tests.hostenv import ROOT, leak_guard_rules, run

DOCKERD_SERVICE = ROOT / "scripts" / "dockerd-service.sh"
PYBRIDGE_SERVICE = ROOT / "scripts" / "pybridge-service.sh"
PLUGIN_SOCKETS = Path("/run/docker/plugins")
XTABLES_LOCK = Path("/run/xtables.lock")
DOCKER_BRIDGE = re.compile(r"docker0|br-[0-9a-f]{12}")  # Docker's own, gone at a reboot
TABLES = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}


@dataclass(frozen=True)
class Daemon:
    pid: int
    exec_root: Path
    data_root: Path
    pidfile: Path


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _option(argv: list[str], name: str, default: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def running_daemon() -> Daemon:
    pid = int(run([str(DOCKERD_SERVICE), "pid"]).stdout.strip())
    argv = _cmdline(pid)
    return Daemon(
        pid=pid,
        exec_root=Path(_option(argv, "--exec-root", "/var/run/docker")).resolve(),
        data_root=Path(_option(argv, "--data-root", "/var/lib/docker")).resolve(),
        pidfile=Path(_option(argv, "--pidfile", "/var/run/docker.pid")),
    )


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the ppid follows the last ")".
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def docker_processes(daemon: Daemon) -> set[int]:
    """dockerd, its children, the shims of its containerd, and everything under them."""
    parents = _parents()
    address = daemon.exec_root / "containerd" / "containerd.sock"  # resolved: /var/run -> /run
    roots = {daemon.pid}
    for pid in parents:
        argv = _cmdline(pid)
        # (dockerd 20.10 runs managed plugins under the v1 shim, `containerd-shim`.)
        if not argv or not Path(argv[0]).name.startswith("containerd-shim"):
            continue
        if address in {Path(arg).resolve() for arg in argv if arg.startswith("/")}:
            roots.add(pid)
    found = set(roots)
    changed = True
    while changed:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= children
        changed = bool(children)
    return found


def _mounts_under(prefixes: list[Path]) -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == str(p) or point.startswith(str(p) + "/") for p in prefixes):
            points.append(point)
    return sorted(set(points), key=len, reverse=True)  # the deepest first


def _flush_firewall() -> None:
    """Every table of every iptables flavour and family back to a boot's empty ACCEPT state,
    then the leak guard at once."""
    flavours = ["iptables-nft", "ip6tables-nft"]
    for names, tool in (
        ("/proc/net/ip_tables_names", "iptables-legacy"),
        ("/proc/net/ip6_tables_names", "ip6tables-legacy"),
    ):
        if Path(names).exists() and Path(names).read_text().split():
            flavours.append(tool)
    for tool in flavours:
        text = "".join(
            f"*{table}\n" + "".join(f":{chain} ACCEPT [0:0]\n" for chain in chains) + "COMMIT\n"
            for table, chains in TABLES.items()
        )
        run([f"{tool}-restore"], input=text)
    for tool, rule in leak_guard_rules():
        run([tool, "-t", "mangle", "-I", "POSTROUTING", *rule])


def power_off(daemon: Daemon) -> None:
    """Everything a reboot takes away, Docker's and pybridge's processes first."""
    victims = docker_processes(daemon)
    service = Path("/run/pydriver.pid")
    if service.exists():
        pid = int(service.read_text().strip() or 0)
        if pid and "pydriver" in " ".join(_cmdline(pid)):
            victims.add(pid)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and _cmdline(pid) for pid in victims):
        assert time.monotonic() < deadline, "processes did not die"
        time.sleep(0.1)
    # tmpfs and mounts do not survive: container namespaces (and with them their veths),
    # root filesystems, plugin sockets, the iptables lock, pid files.
    for point in _mounts_under([daemon.exec_root, daemon.data_root, PLUGIN_SOCKETS]):
        run(["umount", "-l", point], check=False)
    run(["rm", "-rf", str(daemon.exec_root), str(PLUGIN_SOCKETS)])
    for path in (XTABLES_LOCK, daemon.pidfile, service):
        path.unlink(missing_ok=True)
    # Kernel links of pybridge and Docker (the veths went with the namespaces).
    for line in run(["ip", "-o", "link", "show"]).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if (
            is_pybridge_bridge(name)
            or is_pybridge_veth(name)
            or name.startswith(VXLAN_PREFIX)
            or DOCKER_BRIDGE.fullmatch(name)
        ):
            run(["ip", "link", "del", name], check=False)
    _flush_firewall()
    for forwarding in ("ipv4/ip_forward", "ipv6/conf/all/forwarding"):
        Path(f"/proc/sys/net/{forwarding}").write_text("0\n")


def boot(*, service: bool) -> None:
    """Start pybridge (the host service: before dockerd, as its unit orders it) and dockerd."""
    if service:
        run([str(PYBRIDGE_SERVICE), "start"], timeout=60)
    run([str(DOCKERD_SERVICE), "start"], timeout=240)
