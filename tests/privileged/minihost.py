"""A miniature Docker host in a throwaway network namespace, for tests of real packets.

The "host" namespace runs pybridge's NetworkDriver against its own links and firewall (FORWARD
DROP, bridged traffic through iptables as br_netfilter does); "containers" are namespaces that
get the container end of each veth as Docker would hand it over, and an "outside" namespace is a
LAN neighbour joined to the host by a veth on 198.51.100.0/24. Nothing touches the machine's
own namespace: host ports are not reserved (that would bind them in the test's namespace).
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from pydriver import protocol as p
from pydriver.driver import NetworkDriver
from pydriver.firewall import Backend, IptablesFirewall, tool
from pydriver.hostports import port_holder
from pydriver.model import PortMapping
from pydriver.netlink import Netlink
from pydriver.store import SqliteStore
from tests.hostenv import probe, require_root, run
from tests.privileged.netns_sysctl import NetnsSysctl

OUTSIDE_HOST_IP = "198.51.100.1"
OUTSIDE_IP = "198.51.100.2"
OUTSIDE_HOST_IP6 = "2001:db8:5100::1"
OUTSIDE_IP6 = "2001:db8:5100::2"

# Answers each TCP connection with the address it came from, on IPv4 and IPv6 (or only the
# address given), then closes it.
_SERVER = r"""
import socket, sys, threading
port, addrs = int(sys.argv[1]), sys.argv[2:]
def serve(addr):
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port)); s.listen(16)
    while True:
        c, peer = s.accept()
        try:
            c.sendall((peer[0] + "\n").encode())
        finally:
            c.close()
for addr in addrs[1:]:
    threading.Thread(target=serve, args=(addr,), daemon=True).start()
serve(addrs[0])
"""


def netns_add() -> str:
    name = "pbt-" + secrets.token_hex(4)
    run(["ip", "netns", "add", name])
    run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
    return name


def in_ns(ns: str, *argv: str, check: bool = True, timeout: float = 30) -> str:
    return run(["ip", "netns", "exec", ns, *argv], check=check, timeout=timeout).stdout


def _hex() -> str:
    return secrets.token_hex(32)


class NoHostPorts:
    def reserve(self, mapping: PortMapping) -> None:
        return None

    def release(self, mapping: PortMapping) -> None:
        return None


@dataclass
class Net:
    id: str
    gateway: str
    gateway6: str | None
    internal: bool


@dataclass
class Container:
    ns: str
    ip: str
    ip6: str | None
    endpoint_id: str
    network_id: str


@dataclass
class MiniHost:
    backend: Backend
    workdir: Path
    # The FORWARD policy of both families: DROP as Docker's iptables firewall leaves it, or
    # ACCEPT (Docker 29's nftables backend leaves it as the host had it).
    forward_policy: str = "DROP"
    ns: str = ""
    namespaces: list[str] = field(default_factory=list)
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _nl: Netlink | None = None
    _store: SqliteStore | None = None
    _driver: NetworkDriver | None = None

    @property
    def driver(self) -> NetworkDriver:
        assert self._driver is not None
        return self._driver

    @property
    def nl(self) -> Netlink:
        assert self._nl is not None
        return self._nl

    async def __aenter__(self) -> MiniHost:
        require_root()
        self.ns = netns_add()
        self.namespaces.append(self.ns)
        try:
            in_ns(self.ns, tool(self.backend, 4), "-P", "FORWARD", self.forward_policy)
            in_ns(self.ns, tool(self.backend, 6), "-P", "FORWARD", self.forward_policy)
            # Bridged traffic crosses iptables, as br_netfilter makes it on our hosts.
            assert NetnsSysctl(self.ns).read("/proc/sys/net/bridge/bridge-nf-call-iptables") == (
                "1"
            ), "these tests need br_netfilter (modprobe br_netfilter)"
            self._nl = Netlink(netns=self.ns)
            await self._nl.open()
            self._store = SqliteStore(self.workdir / f"state-{self.ns}")
            self._driver = NetworkDriver(
                self._store,
                self._nl,
                IptablesFirewall(self.backend, netns=self.ns),
                NetnsSysctl(self.ns),
                host_ports=NoHostPorts(),
                port_holder=port_holder,
            )
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for server in self.servers:
            server.kill()
            server.wait(timeout=10)
        if self._driver is not None:
            await self._driver.close()
        if self._nl is not None:
            await self._nl.close()
        if self._store is not None:
            self._store.close()
        for ns in reversed(self.namespaces):
            run(["ip", "netns", "del", ns], check=False)

    # -- building ------------------------------------------------------------------------------

    async def network(
        self,
        prefix: str,
        *,
        v6: str | None = None,
        internal: bool = False,
        options: dict[str, str] | None = None,
        gw_alloc_check: bool = False,
    ) -> Net:
        """A network on PREFIX.0/24 (gateway PREFIX.1), and V6::/64 (gateway V6::1).
        ``gw_alloc_check``: as Docker 28+ creates it, asking GwAllocCheck first and leaving
        out the gateways it says to skip (older daemons always send both)."""
        network_id = _hex()
        request_options = {
            p.GENERIC_OPTIONS: dict(options or {}),
            p.INTERNAL: internal,
            p.ENABLE_IPV6: v6 is not None,
        }
        skip_v4 = skip_v6 = False
        if gw_alloc_check:
            check = p.parse_gw_alloc_check({"Options": request_options})
            skip_v4, skip_v6 = self.driver.gw_alloc_check(check)
        v4_data: dict[str, str] = {"Pool": f"{prefix}.0/24"}
        if not skip_v4:
            v4_data["Gateway"] = f"{prefix}.1/24"
        v6_data: dict[str, str] = {"Pool": f"{v6}::/64"}
        if not skip_v6:
            v6_data["Gateway"] = f"{v6}::1/64"
        body: dict[str, object] = {
            "NetworkID": network_id,
            "Options": request_options,
            "IPv4Data": [v4_data],
            "IPv6Data": [v6_data] if v6 else [],
        }
        await self.driver.create_network(p.parse_create_network(body))
        return Net(network_id, f"{prefix}.1", f"{v6}::1" if v6 else None, internal)

    async def container(
        self,
        net: Net,
        ip: str,
        ip6: str | None = None,
        ports: tuple[tuple[str, int, int], ...] = (),
    ) -> Container:
        """A container namespace with IP (/24) and IP6 (/64) on ``net``, publishing
        ``ports`` as (host address or "", host port, container port) for TCP."""
        ns = netns_add()
        self.namespaces.append(ns)
        endpoint_id = _hex()
        await self.driver.create_endpoint(
            p.parse_create_endpoint(
                {
                    "NetworkID": net.id,
                    "EndpointID": endpoint_id,
                    "Interface": {
                        "Address": f"{ip}/24",
                        "AddressIPv6": f"{ip6}/64" if ip6 else "",
                        "MacAddress": "",
                    },
                    "Options": {},
                }
            )
        )
        joined = await self.driver.join(
            p.parse_join(
                {
                    "NetworkID": net.id,
                    "EndpointID": endpoint_id,
                    "SandboxKey": f"/run/netns/{ns}",
                    "Options": {},
                }
            )
        )
        # What Docker does with the Join answer.
        in_ns(self.ns, "ip", "link", "set", joined.src_name, "netns", ns)
        in_ns(ns, "ip", "link", "set", joined.src_name, "name", "eth0")
        in_ns(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        if ip6:
            in_ns(ns, "ip", "-6", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
        in_ns(ns, "ip", "link", "set", "eth0", "up")
        if joined.gateway is not None:
            in_ns(ns, "ip", "route", "add", "default", "via", str(joined.gateway))
        if joined.gateway_v6 is not None:
            in_ns(ns, "ip", "-6", "route", "add", "default", "via", str(joined.gateway_v6))
        if ports:
            portmap = [
                {"Proto": 6, "IP": "", "Port": cport, "HostIP": hip, "HostPort": hport}
                for hip, hport, cport in ports
            ]
            await self.driver.program_external_connectivity(
                p.parse_program_external(
                    {
                        "NetworkID": net.id,
                        "EndpointID": endpoint_id,
                        "Options": {p.PORT_MAP: portmap},
                    }
                )
            )
            await self.driver.settle()
        return Container(ns, ip, ip6, endpoint_id, net.id)

    def outside(self, *, v6: bool = False) -> str:
        """A LAN neighbour on 198.51.100.0/24 (the host is .1), and with ``v6`` on
        2001:db8:5100::/64 (the host is ::1), with no route back to any container subnet."""
        ns = netns_add()
        self.namespaces.append(ns)
        in_ns(self.ns, "ip", "link", "add", "pbt-up", "type", "veth", "peer", "name", "pbt-o")
        in_ns(self.ns, "ip", "link", "set", "pbt-o", "netns", ns)
        in_ns(self.ns, "ip", "addr", "add", f"{OUTSIDE_HOST_IP}/24", "dev", "pbt-up")
        in_ns(ns, "ip", "addr", "add", f"{OUTSIDE_IP}/24", "dev", "pbt-o")
        if v6:
            in_ns(
                self.ns,
                "ip",
                "-6",
                "addr",
                "add",
                f"{OUTSIDE_HOST_IP6}/64",
                "dev",
                "pbt-up",
                "nodad",
            )
            in_ns(ns, "ip", "-6", "addr", "add", f"{OUTSIDE_IP6}/64", "dev", "pbt-o", "nodad")
        in_ns(self.ns, "ip", "link", "set", "pbt-up", "up")
        in_ns(ns, "ip", "link", "set", "pbt-o", "up")
        return ns

    def serve(self, ns: str, port: int, *addresses: str) -> None:
        """A TCP server in ``ns`` answering with the client's address (all addresses, v4 and
        v6, unless some are given)."""
        addrs = addresses or ("0.0.0.0", "::")
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", _SERVER, str(port), *addrs],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.servers.append(server)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            listening = in_ns(ns, "ss", "-ltnH", f"sport = :{port}", check=False)
            if len(listening.splitlines()) >= len(addrs):
                return
            time.sleep(0.05)
        raise AssertionError(f"the test server on port {port} did not start")


def connect(ns: str, ip: str, port: int) -> str:
    """Connect from ``ns``: the address the server saw, or "" if nothing answered."""
    return probe(["ip", "netns", "exec", ns, "busybox", "nc", "-w", "1", ip, str(port)])


def route_to(ns: str, subnet: str, via: str) -> None:
    """What a router on the LAN does: send a container subnet to the host."""
    in_ns(ns, "ip", "-6" if ":" in subnet else "-4", "route", "add", subnet, "via", via)


def ping(ns: str, ip: str) -> bool:
    out = probe(["ip", "netns", "exec", ns, "busybox", "ping", "-c", "1", "-W", "1", ip])
    return " 1 packets received" in out


def route_loopback_out(ns: str, gateway: str, dev: str) -> None:
    """What a hostile container (or LAN neighbour) does in its own namespace to send packets
    for 127.0.0.0/8 to the host: look that up before the local table, route it via the host,
    and accept replies from 127.0.0.1 on its interface."""
    in_ns(ns, "ip", "rule", "add", "pref", "10", "lookup", "local")
    in_ns(ns, "ip", "rule", "del", "pref", "0")
    in_ns(ns, "ip", "rule", "add", "pref", "5", "to", "127.0.0.0/8", "lookup", "100")
    in_ns(ns, "ip", "route", "add", "127.0.0.0/8", "via", gateway, "dev", dev, "table", "100")
    in_ns(ns, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
