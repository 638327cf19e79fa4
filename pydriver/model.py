"""Plain records shared by the pure logic and the adapters, with their JSON storage form."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Any, Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Protocol = Literal["tcp", "udp", "sctp"]
State = Literal["creating", "ready", "deleting"]
Family = Literal[4, 6]
# Per-interface sysctls pybridge sets on a bridge: net.ipv4.conf.B.route_localnet,
# net.ipv6.conf.B.accept_ra and, for an isolated IPv6 network, net.ipv6.conf.B.disable_ipv6.
InterfaceSetting = Literal["route_localnet", "accept_ra", "disable_ipv6"]
# How a network's containers reach, and are reached from, beyond their bridge, per address
# family (Docker's com.docker.network.bridge.gateway_mode_ipv4/_ipv6; rules.py has the rules):
# "nat" masquerades egress and lets nothing in but published host ports; "nat-unprotected"
# also lets hosts that route to the subnet reach every container port; "routed" does not
# masquerade and lets them reach published container ports (no host port); "isolated"
# (internal networks only) puts no address of the family on the bridge.
GatewayMode = Literal["nat", "nat-unprotected", "routed", "isolated"]
GATEWAY_MODES: tuple[GatewayMode, ...] = ("nat", "nat-unprotected", "routed", "isolated")


@dataclass(frozen=True)
class Link:
    """A network interface of the host, as the kernel lists it."""

    index: int
    name: str
    kind: str | None  # "bridge", "veth", ...; None for a device without link info
    master: int | None  # the index of the bridge it is on
    mtu: int
    up: bool
    mac: str
    group: int = 0  # the interface group (`ip link set ... group N`)


@dataclass(frozen=True)
class HostRoute:
    """A route in the host's main table, used to avoid subnets that are already reachable."""

    destination: IPNetwork
    device: str


@dataclass(frozen=True)
class PortBinding:
    """One `-p` mapping as Docker sent it (host_port 0 = choose one)."""

    proto: Protocol
    port: int
    host_ip: IPAddress | None = None
    host_port: int = 0
    host_port_end: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "proto": self.proto,
            "port": self.port,
            "host_ip": str(self.host_ip) if self.host_ip else None,
            "host_port": self.host_port,
            "host_port_end": self.host_port_end,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PortBinding:
        return cls(
            proto=data["proto"],
            port=int(data["port"]),
            host_ip=ipaddress.ip_address(data["host_ip"]) if data.get("host_ip") else None,
            host_port=int(data.get("host_port", 0)),
            host_port_end=int(data.get("host_port_end", 0)),
        )


@dataclass(frozen=True)
class PortMapping:
    """One published port: host address (None = every address of the family) -> container."""

    proto: Protocol
    host_ip: IPAddress | None
    host_port: int
    container_ip: IPAddress
    container_port: int

    @property
    def family(self) -> Family:
        return 4 if self.container_ip.version == 4 else 6

    @property
    def direct(self) -> bool:
        """A publication of a routed network: the container's own address and port are opened
        to whoever routes to it, and no host port is used (host_port 0, host_ip None)."""
        return self.host_port == 0

    def host_text(self) -> str:
        if self.direct:
            return "-"
        if self.host_ip is None:
            return f"{'0.0.0.0' if self.family == 4 else '[::]'}:{self.host_port}"  # noqa: S104
        if self.family == 6:
            return f"[{self.host_ip}]:{self.host_port}"
        return f"{self.host_ip}:{self.host_port}"

    def container_text(self) -> str:
        if self.family == 6:
            return f"[{self.container_ip}]:{self.container_port}"
        return f"{self.container_ip}:{self.container_port}"

    def describe(self) -> str:
        if self.direct:
            return f"{self.container_text()}/{self.proto} (routed: no host port)"
        return f"{self.host_text()}/{self.proto} -> {self.container_text()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "proto": self.proto,
            "host_ip": str(self.host_ip) if self.host_ip else None,
            "host_port": self.host_port,
            "container_ip": str(self.container_ip),
            "container_port": self.container_port,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PortMapping:
        return cls(
            proto=data["proto"],
            host_ip=ipaddress.ip_address(data["host_ip"]) if data.get("host_ip") else None,
            host_port=int(data["host_port"]),
            container_ip=ipaddress.ip_address(data["container_ip"]),
            container_port=int(data["container_port"]),
        )


@dataclass(frozen=True)
class Subnet:
    """A subnet of a network with the gateway address pybridge puts on the bridge."""

    pool: IPNetwork
    gateway: IPInterface | None
    aux_addresses: tuple[IPAddress, ...] = ()
    # The id of the pybridge IPAM pool this subnet came from; None when another IPAM (Docker's
    # own, say) allocated it, or for records of an older pybridge: pybridge then never
    # releases addresses of this subnet itself.
    ipam_pool: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pool": str(self.pool),
            "gateway": str(self.gateway) if self.gateway else None,
            "aux": [str(a) for a in self.aux_addresses],
            "ipam_pool": self.ipam_pool,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Subnet:
        return cls(
            pool=ipaddress.ip_network(data["pool"]),
            gateway=ipaddress.ip_interface(data["gateway"]) if data.get("gateway") else None,
            aux_addresses=tuple(ipaddress.ip_address(a) for a in data.get("aux", [])),
            ipam_pool=data.get("ipam_pool") or None,
        )


@dataclass(frozen=True)
class NetworkOptions:
    """Validated driver options of a network (see options.py for the wire keys)."""

    bridge_name: str | None = None
    enable_ip_masquerade: bool = True
    enable_icc: bool = True
    host_binding_ipv4: IPAddress | None = None
    mtu: int | None = None
    container_iface_prefix: str = "eth"
    gateway_mode_v4: GatewayMode = "nat"
    gateway_mode_v6: GatewayMode = "nat"
    # No IPv4 address on the bridge (the containers' gateway is elsewhere on its LAN).
    inhibit_ipv4: bool = False
    # Host interfaces that may reach published container ports at the containers' addresses.
    trusted_host_interfaces: tuple[str, ...] = ()
    # Source address of traffic leaving the network (SNAT instead of MASQUERADE).
    host_ipv4: ipaddress.IPv4Address | None = None
    host_ipv6: ipaddress.IPv6Address | None = None

    def gateway_mode(self, family: Family) -> GatewayMode:
        return self.gateway_mode_v4 if family == 4 else self.gateway_mode_v6

    def host_address(self, family: Family) -> IPAddress | None:
        return self.host_ipv4 if family == 4 else self.host_ipv6

    def gateway_on_bridge(self, family: Family) -> bool:
        """Whether the family's gateway address goes on the bridge: not for an isolated
        family, nor for IPv4 with inhibit_ipv4 (that gateway is elsewhere on the LAN)."""
        if self.gateway_mode(family) == "isolated":
            return False
        return not (family == 4 and self.inhibit_ipv4)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bridge_name": self.bridge_name,
            "enable_ip_masquerade": self.enable_ip_masquerade,
            "enable_icc": self.enable_icc,
            "host_binding_ipv4": str(self.host_binding_ipv4) if self.host_binding_ipv4 else None,
            "mtu": self.mtu,
            "container_iface_prefix": self.container_iface_prefix,
            "gateway_mode_v4": self.gateway_mode_v4,
            "gateway_mode_v6": self.gateway_mode_v6,
            "inhibit_ipv4": self.inhibit_ipv4,
            "trusted_host_interfaces": list(self.trusted_host_interfaces),
            "host_ipv4": str(self.host_ipv4) if self.host_ipv4 else None,
            "host_ipv6": str(self.host_ipv6) if self.host_ipv6 else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkOptions:
        # Records of an older pybridge have none of the gateway-mode fields: their defaults.
        hb = data.get("host_binding_ipv4")
        host4, host6 = data.get("host_ipv4"), data.get("host_ipv6")
        return cls(
            bridge_name=data.get("bridge_name"),
            enable_ip_masquerade=bool(data.get("enable_ip_masquerade", True)),
            enable_icc=bool(data.get("enable_icc", True)),
            host_binding_ipv4=ipaddress.ip_address(hb) if hb else None,
            mtu=data.get("mtu"),
            container_iface_prefix=data.get("container_iface_prefix") or "eth",
            gateway_mode_v4=_gateway_mode(data.get("gateway_mode_v4")),
            gateway_mode_v6=_gateway_mode(data.get("gateway_mode_v6")),
            inhibit_ipv4=bool(data.get("inhibit_ipv4", False)),
            trusted_host_interfaces=tuple(data.get("trusted_host_interfaces") or ()),
            host_ipv4=ipaddress.IPv4Address(host4) if host4 else None,
            host_ipv6=ipaddress.IPv6Address(host6) if host6 else None,
        )


def _gateway_mode(value: object) -> GatewayMode:
    for mode in GATEWAY_MODES:
        if value == mode:
            return mode
    if value is None:
        return "nat"
    raise ValueError(f"unknown gateway mode {value!r}")


@dataclass(frozen=True)
class BridgeSettings:
    """What an adopted bridge had before pybridge changed it, put back when the network goes.
    None: pybridge left that setting as it was (or never changes it), so nothing to restore."""

    route_localnet: str | None = None
    accept_ra: str | None = None
    mtu: int | None = None
    up: bool | None = None
    disable_ipv6: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "route_localnet": self.route_localnet,
            "accept_ra": self.accept_ra,
            "mtu": self.mtu,
            "up": self.up,
            "disable_ipv6": self.disable_ipv6,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BridgeSettings:
        up = data.get("up")
        mtu = data.get("mtu")
        return cls(
            route_localnet=data.get("route_localnet"),
            accept_ra=data.get("accept_ra"),
            mtu=int(mtu) if mtu is not None else None,
            up=bool(up) if up is not None else None,
            disable_ipv6=data.get("disable_ipv6"),
        )


def addresses_on_bridge(
    subnets: tuple[Subnet, ...], options: NetworkOptions
) -> tuple[IPInterface, ...]:
    """The gateways of ``subnets`` that go on the bridge: those of the families that have
    one there."""
    return tuple(
        s.gateway
        for s in subnets
        if s.gateway is not None and options.gateway_on_bridge(4 if s.pool.version == 4 else 6)
    )


@dataclass(frozen=True)
class Network:
    id: str
    bridge: str
    # False when the bridge already existed (the user's): pybridge then never deletes it.
    bridge_owned: bool
    subnets_v4: tuple[Subnet, ...]
    subnets_v6: tuple[Subnet, ...]
    options: NetworkOptions = field(default_factory=NetworkOptions)
    internal: bool = False
    enable_ipv6: bool = False
    raw_options: dict[str, str] = field(default_factory=dict)
    # Gateway addresses that were already on a user's bridge when pybridge adopted it: they
    # stay when the network is removed.
    foreign_addresses: tuple[IPInterface, ...] = ()
    # Settings of a bridge pybridge did not create, as they were before (see BridgeSettings).
    previous_settings: BridgeSettings = field(default_factory=BridgeSettings)
    # "creating" until Docker has been answered, "deleting" once removal has begun: after a
    # crash, reconcile rolls a half-created network back and finishes a half-deleted one.
    state: State = "ready"

    def with_changes(self, **changes: Any) -> Network:
        return replace(self, **changes)

    @property
    def subnets(self) -> tuple[Subnet, ...]:
        return self.subnets_v4 + self.subnets_v6

    @property
    def bridge_addresses(self) -> tuple[IPInterface, ...]:
        """The addresses pybridge puts on the bridge (NetworkOptions.gateway_on_bridge)."""
        return addresses_on_bridge(self.subnets, self.options)

    @property
    def gateway_v4(self) -> ipaddress.IPv4Address | None:
        for s in self.subnets_v4:
            if s.gateway is not None:
                return s.gateway.ip  # type: ignore[return-value]
        return None

    @property
    def gateway_v6(self) -> ipaddress.IPv6Address | None:
        for s in self.subnets_v6:
            if s.gateway is not None:
                return s.gateway.ip  # type: ignore[return-value]
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "bridge": self.bridge,
            "bridge_owned": self.bridge_owned,
            "subnets_v4": [s.to_dict() for s in self.subnets_v4],
            "subnets_v6": [s.to_dict() for s in self.subnets_v6],
            "options": self.options.to_dict(),
            "internal": self.internal,
            "enable_ipv6": self.enable_ipv6,
            "raw_options": self.raw_options,
            "state": self.state,
            "foreign_addresses": [str(a) for a in self.foreign_addresses],
            "previous_settings": self.previous_settings.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Network:
        return cls(
            id=data["id"],
            bridge=data["bridge"],
            bridge_owned=bool(data["bridge_owned"]),
            subnets_v4=tuple(Subnet.from_dict(s) for s in data.get("subnets_v4", [])),
            subnets_v6=tuple(Subnet.from_dict(s) for s in data.get("subnets_v6", [])),
            options=NetworkOptions.from_dict(data.get("options", {})),
            internal=bool(data.get("internal", False)),
            enable_ipv6=bool(data.get("enable_ipv6", False)),
            raw_options=dict(data.get("raw_options", {})),
            state=data.get("state", "ready"),
            foreign_addresses=tuple(
                ipaddress.ip_interface(a) for a in data.get("foreign_addresses", [])
            ),
            # Records written before pybridge restored anything have no such field.
            previous_settings=BridgeSettings.from_dict(data.get("previous_settings") or {}),
        )


@dataclass(frozen=True)
class Endpoint:
    id: str
    network_id: str
    host_veth: str
    container_veth: str
    mac_address: str
    mac_generated: bool
    address: ipaddress.IPv4Interface | None = None
    address_v6: ipaddress.IPv6Interface | None = None
    sandbox_key: str | None = None
    port_bindings: tuple[PortBinding, ...] = ()
    exposed_ports: tuple[tuple[Protocol, int], ...] = ()
    state: State = "ready"
    # Host ports currently published for this endpoint (while it is a gateway endpoint).
    mappings: tuple[PortMapping, ...] = ()
    created_at: float = 0.0  # time.time(); lets the collector find endpoints never joined
    # The mappings were made while another endpoint of the container was its gateway for the
    # other family (Docker's no_proxy_6to4), so that family's bindings were left to it.
    other_gateway: bool = False

    def with_changes(self, **changes: Any) -> Endpoint:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "network_id": self.network_id,
            "host_veth": self.host_veth,
            "container_veth": self.container_veth,
            "mac_address": self.mac_address,
            "mac_generated": self.mac_generated,
            "address": str(self.address) if self.address else None,
            "address_v6": str(self.address_v6) if self.address_v6 else None,
            "sandbox_key": self.sandbox_key,
            "port_bindings": [b.to_dict() for b in self.port_bindings],
            "exposed_ports": [[p, n] for p, n in self.exposed_ports],
            "state": self.state,
            "mappings": [mp.to_dict() for mp in self.mappings],
            "created_at": self.created_at,
            "other_gateway": self.other_gateway,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Endpoint:
        return cls(
            id=data["id"],
            network_id=data["network_id"],
            host_veth=data["host_veth"],
            container_veth=data["container_veth"],
            mac_address=data["mac_address"],
            mac_generated=bool(data.get("mac_generated", True)),
            address=ipaddress.IPv4Interface(data["address"]) if data.get("address") else None,
            address_v6=(
                ipaddress.IPv6Interface(data["address_v6"]) if data.get("address_v6") else None
            ),
            sandbox_key=data.get("sandbox_key"),
            port_bindings=tuple(PortBinding.from_dict(b) for b in data.get("port_bindings", [])),
            exposed_ports=tuple((p, int(n)) for p, n in data.get("exposed_ports", [])),
            state=data.get("state", "ready"),
            mappings=tuple(PortMapping.from_dict(mp) for mp in data.get("mappings", [])),
            created_at=float(data.get("created_at", 0.0)),
            other_gateway=bool(data.get("other_gateway", False)),
        )
