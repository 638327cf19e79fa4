"""Command line and composition root: wires the real adapters together; the only module that
binds sockets."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from . import __version__
from .clustermodel import DEFAULT_VXLAN_PORT, parse_cluster
from .clusterreport import forget_host, format_cluster, gather_cluster, read_record
from .clusterstart import join_cluster
from .dockerapi import docker_names
from .doctor import doctor as run_doctor
from .driver import NetworkDriver
from .errors import DriverError
from .firewall import IptablesFirewall, detect_backend
from .hostports import SocketReservations, port_holder
from .instance import claim_state_dir
from .ipamdriver import IpamDriver
from .logs import setup_logging
from .metrics import Metrics
from .model import IPAddress
from .netlink import Netlink
from .pauses import freeze_startup_objects
from .ports import DEFAULT_EPHEMERAL_RANGE
from .prune import prune as run_prune
from .pruning import Plan, confirmed
from .report import (
    Names,
    findings_json,
    findings_text,
    format_ports,
    format_status,
    healthy,
    port_rows,
    status_data,
)
from .sandboxes import sandbox_released
from .server import Api, make_app, make_failure_app, make_metrics_app
from .spares import MAX_SPARE_PAIRS, SPARE_PAIRS
from .store import SqliteStore, read_state
from .sysctl import Sysctl
from .upkeep import Intervals, Upkeep

log = logging.getLogger("pydriver")

DEFAULT_SOCKET = "/run/docker/plugins/pybridge.sock"
DEFAULT_STATE_DIR = "/var/lib/pydriver"
SHUTDOWN_TIMEOUT = 8.0  # dockerd waits 10 s before SIGKILL for managed plugins
PORT_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _port(text: str) -> int:
    """A UDP port number (argparse also runs this on the default taken from the environment,
    so a bad PYDRIVER_VXLAN_PORT is one sentence too)."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a port number (1-65535)")
    return int(text)


def _socket_arg(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--socket",
        default=_env("PYDRIVER_SOCKET", DEFAULT_SOCKET),
        help=f"{help_text} (env PYDRIVER_SOCKET; default {DEFAULT_SOCKET})",
    )


def _state_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        default=_env("PYDRIVER_STATE_DIR", DEFAULT_STATE_DIR),
        help=f"state directory (env PYDRIVER_STATE_DIR; default {DEFAULT_STATE_DIR})",
    )


def _backend_arg(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--firewall-backend",
        default=_env("PYDRIVER_FIREWALL_BACKEND", "auto"),
        choices=["auto", "nft", "legacy"],
        help=f"{help_text} (env PYDRIVER_FIREWALL_BACKEND; default auto = the one Docker uses)",
    )


def _flag(parser: argparse.ArgumentParser, name: str, help_text: str) -> None:
    parser.add_argument(name, action="store_true", help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pydriver", description="pybridge: a Docker network driver and IPAM driver."
    )
    parser.add_argument("--version", action="version", version=f"pydriver {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the plugin in the foreground")
    _socket_arg(serve, "Unix socket to listen on")
    _state_dir_arg(serve)
    serve.add_argument(
        "--log-level",
        default=_env("PYDRIVER_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log level (env PYDRIVER_LOG_LEVEL; default info)",
    )
    serve.add_argument(
        "--log-format",
        default=_env("PYDRIVER_LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="text lines, or JSON lines for log collectors (env PYDRIVER_LOG_FORMAT)",
    )
    _backend_arg(serve, "iptables flavour to write rules with")
    serve.add_argument(
        "--metrics-address",
        default=_env("PYDRIVER_METRICS_ADDRESS", ""),
        help="serve Prometheus metrics at HOST:PORT (e.g. 127.0.0.1:9327) or a Unix socket "
        "path (env PYDRIVER_METRICS_ADDRESS; default off)",
    )
    serve.add_argument(
        "--heal-interval",
        type=float,
        default=float(_env("PYDRIVER_HEAL_INTERVAL", "2")),
        help="seconds between firewall checks; 0 turns self-healing off (default 2)",
    )
    serve.add_argument(
        "--gc-interval",
        type=float,
        default=float(_env("PYDRIVER_GC_INTERVAL", "10")),
        help="seconds between scans for endpoints of vanished containers; 0 turns it off "
        "(default 10)",
    )
    serve.add_argument(
        "--spare-veths",
        type=int,
        default=int(_env("PYDRIVER_SPARE_VETHS", str(SPARE_PAIRS))),
        help="veth pairs made ahead for the next containers, so that starting one does not "
        f"wait for the kernel to make one; 0 turns it off (default {SPARE_PAIRS}, at most "
        f"{MAX_SPARE_PAIRS})",
    )
    serve.add_argument(
        "--cluster",
        default=_env("PYDRIVER_CLUSTER", ""),
        help="etcd://HOST[:PORT][,HOST[:PORT]...]: take part in a cluster, so that networks "
        "created with -o pybridge.segment=NAME span the hosts that join them (env "
        "PYDRIVER_CLUSTER; default: this host alone)",
    )
    serve.add_argument(
        "--advertise-address",
        default=_env("PYDRIVER_ADVERTISE_ADDRESS", ""),
        help="the address of this host other hosts reach it at (the tunnels' source; env "
        "PYDRIVER_ADVERTISE_ADDRESS; default: the address of the default route's interface)",
    )
    serve.add_argument(
        "--vxlan-port",
        type=_port,
        default=_env("PYDRIVER_VXLAN_PORT", str(DEFAULT_VXLAN_PORT)),
        help=f"UDP port of the tunnels between hosts (env PYDRIVER_VXLAN_PORT; default "
        f"{DEFAULT_VXLAN_PORT}); the same on every host of the cluster",
    )

    names_help = "do not ask the docker CLI for container and network names"
    ports = sub.add_parser(
        "ports", help="list the ports pybridge publishes (docker ps cannot show them)"
    )
    _state_dir_arg(ports)
    _flag(ports, "--json", "print JSON for scripts")
    _flag(ports, "--no-names", names_help)

    status = sub.add_parser("status", help="networks, endpoints and ports pybridge manages")
    _state_dir_arg(status)
    _flag(status, "--json", "print JSON for scripts")
    _flag(status, "--no-names", names_help)

    doctor = sub.add_parser(
        "doctor", help="check the host and pybridge; exit status 0 only when healthy"
    )
    _socket_arg(doctor, "pybridge's socket")
    _state_dir_arg(doctor)
    _backend_arg(doctor, "the backend pybridge was told to use")
    _flag(doctor, "--json", "print JSON for scripts")
    _flag(doctor, "--no-docker", "do not ask the docker CLI which networks exist")

    cluster = sub.add_parser("cluster", help="networks that span hosts: tools")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    forget = cluster_sub.add_parser(
        "forget",
        help="free the address blocks of a host that is gone for good",
        description="Free what a host that will never come back still holds in the cluster: "
        "its address blocks (kept on purpose while it might return, so that its containers' "
        "addresses are never given twice) and any record of it left. Refused while that host's "
        "pybridge is up. Host ids: pydriver status.",
    )
    forget.add_argument("host", help="the host's id (its state directory's host-id file)")
    _state_dir_arg(forget)
    forget.add_argument(
        "--cluster",
        default=_env("PYDRIVER_CLUSTER", ""),
        help="etcd://HOST[:PORT][,...] (default: the cluster this host's pybridge is in)",
    )

    prune = sub.add_parser(
        "prune",
        help="remove networks and IPAM pools the Docker daemon using pybridge no longer knows "
        "(removed while pybridge was away)",
        description="Remove, through the running pybridge, the networks and IPAM pools it has "
        "that the Docker daemon using it no longer knows (removed while pybridge was away). The "
        "daemon asked is the one the docker CLI talks to (DOCKER_HOST, the docker context), and "
        "prune refuses unless that is a Unix socket on this host served by the daemon that "
        "calls this pybridge (a managed plugin: a daemon that has this plugin). It lists what "
        "it would remove and asks first.",
    )
    _socket_arg(prune, "pybridge's socket (a managed plugin's: /run/docker/plugins/<id>/...)")
    _state_dir_arg(prune)
    _flag(prune, "--dry-run", "only list what would be removed")
    prune.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="do not ask (required without a terminal). When no Docker daemon has called "
        "pybridge since it started (after a pybridge restart; a managed plugin needs no call), "
        "--yes also lets prune go on trusting the daemon, provided it knows at least one of "
        "pybridge's networks; safer: let the daemon call pybridge first (create and remove a "
        "network with its driver)",
    )
    return parser


def status_command(args: argparse.Namespace) -> int:
    networks, endpoints = read_state(Path(args.state_dir))
    names = Names({}, {}) if args.no_names else docker_names()
    data = status_data(networks, endpoints, names)
    cluster = asyncio.run(gather_cluster(Path(args.state_dir), networks))
    if args.json:
        if cluster is not None:
            data["cluster"] = cluster.to_dict()
        print(json.dumps(data, indent=2))
    else:
        print(format_status(data))
        if cluster is not None:
            print("\n".join(format_cluster(cluster)))
    return 0


def doctor_command(args: argparse.Namespace) -> int:
    findings = run_doctor(
        args.socket, Path(args.state_dir), args.firewall_backend, not args.no_docker
    )
    print(findings_json(findings) if args.json else findings_text(findings))
    return 0 if healthy(findings) else 1


def prune_command(args: argparse.Namespace) -> int:
    def ask(plan: Plan) -> bool:
        for line in plan.lines():
            print(f"stale: {line}")
        try:
            return confirmed(input(plan.question()))
        except EOFError:
            return False

    def done(line: str) -> None:
        print(f"removed {line}", flush=True)

    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    result = run_prune(
        args.socket,
        Path(args.state_dir),
        dry_run=args.dry_run,
        yes=args.yes,
        ask=ask if terminal else None,
        done=done,
    )
    if result.plan.empty:
        print("nothing to remove: the Docker daemon knows every network and pool pybridge has")
    elif args.dry_run:
        for line in result.plan.lines():
            print(f"would remove {line}")
    elif not result.removed:
        print("nothing removed")
    if result.plan.recent_pools:
        print(
            f"left alone: {result.plan.recent_pools} unused IPAM pool(s) requested in the last "
            "minute (a network may be being created with them)"
        )
    return 0


def cluster_command(args: argparse.Namespace) -> int:
    url = args.cluster
    if not url:
        record = read_record(Path(args.state_dir))
        url = str(record["cluster"]) if record else ""
    if not url:
        print("pydriver: this host's pybridge is in no cluster; give --cluster", file=sys.stderr)
        return 2

    async def forget() -> list[str]:
        from .etcdstore import EtcdStore  # gRPC only for the cluster's tools

        store = EtcdStore(parse_cluster(url))
        try:
            return await forget_host(store, args.host)
        finally:
            await store.close()

    removed = asyncio.run(forget())
    for key in removed:
        print(f"removed {key}")
    print(f"host {args.host}: {len(removed)} record(s) freed")
    return 0


def ports_command(args: argparse.Namespace) -> int:
    networks, endpoints = read_state(Path(args.state_dir))
    names = Names({}, {}) if args.no_names else docker_names()
    rows = port_rows(networks, endpoints, names)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print(format_ports(rows))
    else:
        print("pybridge publishes no ports")
    return 0


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range, which Docker also uses for -P."""
    try:
        low, high = (int(v) for v in Path(PORT_RANGE_FILE).read_text().split())
        return low, high
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL_RANGE


def socket_in_use(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def prepare_socket_path(path: str) -> None:
    """Refuse to start next to a live instance; remove a stale socket (moby#22653)."""
    if os.path.exists(path):
        if socket_in_use(path):
            raise DriverError(f"another process is already serving {path}")
        os.unlink(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one; returns (before, after).

    pybridge keeps a socket open per published port (so no host process can take it), and
    `-p 20000-22999:20000-22999` on a dual-stack container is 6000 of them, where the usual
    soft limit is 1024. The hard limit is the administrator's (LimitNOFILE=, `ulimit -Hn`).
    Nothing in pybridge uses select(), which cannot watch descriptors above 1023."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft, soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft, soft
    return soft, target


async def serve(args: argparse.Namespace) -> int:
    os.umask(0o077)  # state files, the WAL and the socket: root only
    if args.metrics_address and not args.metrics_address.startswith("/"):
        parse_metrics_address(args.metrics_address)
    before, after = raise_fd_limit()
    if after != before:
        log.info("open file limit raised from %d to %d (one per published port)", before, after)
    else:
        log.info("open file limit: %d (one per published port)", after)
    # Kept open (and so locked) until the process ends. Before the socket is touched: a
    # second pybridge must not remove a live one's socket on its way to being refused.
    managed = _env("PYDRIVER_MANAGED", "") == "1"
    claim_state_dir(
        Path(args.state_dir),
        f"the managed plugin, pid {os.getpid()} in its namespace"
        if managed
        else f"the host service, pid {os.getpid()}",
    )
    prepare_socket_path(args.socket)
    store = SqliteStore(Path(args.state_dir))
    damage = await store.quick_check()
    if damage != "ok":
        log.error(
            "the state database %s is damaged (%s); pybridge serves what it can still read: "
            "stop it, restore the state directory from a backup and start it again",
            store.path,
            damage,
        )
    netlink = Netlink()
    await netlink.open()
    backend = await detect_backend(args.firewall_backend)
    log.info(
        "pydriver %s starting: state %s, firewall backend %s%s",
        __version__,
        store.path,
        backend,
        "" if args.firewall_backend == "auto" else " (set explicitly)",
    )
    if backend == "legacy" and _env("PYDRIVER_MANAGED", "") == "1":
        log.warning(
            "this host uses iptables-legacy: inside a managed plugin pybridge cannot take the "
            "host's iptables lock (/run/xtables.lock may not exist at boot, so it is not "
            "mounted), and its rule writes may interleave with dockerd's; on such hosts "
            "prefer pybridge as a host service (scripts/install.sh)"
        )
    firewall = IptablesFirewall(backend)
    host_ports = SocketReservations()

    async def release_addresses(addresses: Sequence[tuple[str, IPAddress]]) -> None:
        await ipam.release_owned(addresses)

    cluster = None
    if args.cluster:
        cluster = await join_cluster(
            args.cluster,
            args.advertise_address,
            args.vxlan_port,
            Path(args.state_dir),
            netlink,
            store,
            lambda: driver.networks.values(),
            lambda network_id: driver.state.endpoints_of(network_id),
        )

    driver = NetworkDriver(
        store,
        netlink,
        firewall,
        Sysctl(Path(_env("PYDRIVER_SYSCTL_ROOT", "/proc/sys"))),
        host_ports=host_ports,
        port_holder=port_holder,
        ephemeral_range=ephemeral_range(),
        release_addresses=release_addresses,
        sandbox_released=sandbox_released,
        cluster=cluster,
        spare_veths=args.spare_veths,
    )
    # Each sees the other through one narrow function: the IPAM driver reads which addresses
    # the network driver's endpoints use; the network driver gives back addresses of
    # endpoints whose containers are gone.
    ipam = IpamDriver(
        store,
        netlink.routes,
        endpoint_addresses=driver.state.addresses_in_pool,
        segments=cluster,
    )
    await driver.load()
    await ipam.load()
    repairs = await driver.reconcile()
    if cluster is not None:
        await cluster.restore()  # from the state database: etcd may be away
    metrics = Metrics()
    metrics.count_repairs("startup", len(repairs))
    log.info(
        "state loaded: %d network(s), %d endpoint(s), %d pool(s); %d repair(s)",
        len(driver.networks),
        len(driver.endpoints),
        len(ipam.pools),
        len(repairs),
    )

    log.debug("%d start-up objects frozen", freeze_startup_objects())  # pauses.py
    runner = web.AppRunner(
        make_app(Api(driver, ipam, state_path=store.path), metrics),
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    await runner.setup()
    site = web.UnixSite(runner, args.socket)
    await site.start()
    os.chmod(args.socket, 0o600)
    log.info("listening on %s", args.socket)
    metrics_runner = await start_metrics(args.metrics_address, metrics, driver, ipam)
    upkeep = Upkeep(driver, ipam, metrics, Intervals(heal=args.heal_interval, gc=args.gc_interval))
    upkeep.start()
    if cluster is not None:
        cluster.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing requests in flight, leaving the data plane up")
    # Stop accepting first, let in-flight requests finish, then drop the socket file.
    await upkeep.stop()
    await runner.cleanup()
    if cluster is not None:
        await cluster.close()  # leaves the tunnels up; the lease ends them elsewhere
    await driver.close()  # background writes and removals still under way
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.socket)
    await netlink.close()
    host_ports.close()  # the DNAT rules stay: published ports keep working while we are down
    store.close()
    log.info("stopped")
    return 0


FAILURE_REMINDER = 60.0  # seconds between log lines saying pybridge is not working


async def serve_failure(socket_path: str, reason: str) -> int:
    """Serve make_failure_app until SIGTERM, repeating the reason in the log."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    Path(socket_path).parent.mkdir(parents=True, exist_ok=True)
    runner = web.AppRunner(make_failure_app(reason), access_log=None)
    await runner.setup()
    await web.UnixSite(runner, socket_path).start()
    os.chmod(socket_path, 0o600)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while True:
        log.error("pybridge is not working: %s", reason)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), FAILURE_REMINDER)
        if stop.is_set():
            break
    await runner.cleanup()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    return 1


def parse_metrics_address(address: str) -> tuple[str, int]:
    """HOST:PORT of --metrics-address (checked before anything starts: a typo there must not
    leave pybridge half started)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DriverError(
            f"--metrics-address {address!r} is not HOST:PORT (e.g. 127.0.0.1:9327) or a socket path"
        )
    return host.strip("[]"), int(port)


async def start_metrics(
    address: str, metrics: Metrics, driver: NetworkDriver, ipam: IpamDriver
) -> web.AppRunner | None:
    """Serve /metrics on HOST:PORT or on a Unix socket path, if asked to."""
    if not address:
        return None

    def gauges() -> dict[str, float]:
        return {
            "networks": len(driver.networks),
            "endpoints": len(driver.endpoints),
            "published_ports": sum(len(e.mappings) for e in driver.endpoints.values()),
            "ipam_pools": len(ipam.pools),
        }

    runner = web.AppRunner(make_metrics_app(metrics, gauges), access_log=None)
    await runner.setup()
    site: web.BaseSite
    if address.startswith("/"):
        site = web.UnixSite(runner, address)
    else:
        host, port = parse_metrics_address(address)
        site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as err:
        # Metrics are a convenience: a port someone else holds must not stop the driver.
        log.error("metrics are not served: cannot listen on %s: %s", address, err.strerror)
        await runner.cleanup()
        return None
    log.info("metrics on %s/metrics", address)
    return runner


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        setup_logging(args.log_level, args.log_format, _env("PYDRIVER_LOG_STREAM", "stderr"))
        try:
            return asyncio.run(serve(args))
        except DriverError as err:
            log.error("%s", err)
            reason = str(err)
        except Exception as err:  # a managed plugin must say why whatever went wrong
            log.exception("pybridge could not start")
            reason = f"{type(err).__name__}: {err} (see the plugin's log)"
        if _env("PYDRIVER_MANAGED", "") != "1":
            return 1
        # A managed plugin stays up and says why on every call instead (see
        # server.make_failure_app).
        return asyncio.run(serve_failure(args.socket, reason))
    try:
        if args.command == "ports":
            return ports_command(args)
        if args.command == "status":
            return status_command(args)
        if args.command == "doctor":
            return doctor_command(args)
        if args.command == "prune":
            return prune_command(args)
        if args.command == "cluster":
            return cluster_command(args)
    except DriverError as err:
        print(f"pydriver: {err}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
