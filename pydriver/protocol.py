"""The wire layer: Docker's JSON requests in, typed requests out; typed replies back to JSON.

This is the only module that knows Docker's PascalCase field names. Every parser raises
``InvalidRequest`` with one sentence naming the field that is wrong and what is allowed.
Parsing is pure: no I/O, no state.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequest
from .model import IPAddress, IPInterface, IPNetwork, PortBinding, Protocol

# ---------------------------------------------------------------------------------------------
# Constants Docker uses on the wire
# ---------------------------------------------------------------------------------------------

GENERIC_OPTIONS = "com.docker.network.generic"
ENABLE_IPV6 = "com.docker.network.enable_ipv6"
ENABLE_IPV4 = "com.docker.network.enable_ipv4"
INTERNAL = "com.docker.network.internal"
EXPOSED_PORTS = "com.docker.network.endpoint.exposedports"
PORT_MAP = "com.docker.network.portmap"
REQUEST_ADDRESS_TYPE = "RequestAddressType"
GATEWAY_ADDRESS_TYPE = "com.docker.network.gateway"
# Docker 29+ names the endpoint (the container's name) in RequestAddress options.
ENDPOINT_NAME = "com.docker.network.endpoint.name"
# Docker 28+ in ProgramExternalConnectivity options: the container's IPv4 and IPv6 gateways
# are different endpoints (28 sends it always, true or false, to either gateway: moby v28.5.2
# libnetwork/endpoint.go:644-645,701-705; 29 only sends true, only to an endpoint that is not
# the IPv6 gateway: docker-v29.0.3 daemon/libnetwork/drivers/remote/driver.go:392-402).
NO_PROXY_6TO4 = "com.docker.network.driver.private.no_proxy_6to4"

CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"

_ID_RE = re.compile(r"^[0-9a-f]{64}$")
# Docker ids are 64 lowercase hex digits. Accepting nothing else means an id can never carry
# characters into interface names, iptables arguments or SQL.
MAX_BODY_BYTES = 1024 * 1024

_PROTOCOLS: dict[int, Protocol] = {6: "tcp", 17: "udp", 132: "sctp"}


# ---------------------------------------------------------------------------------------------
# Typed requests
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IPData:
    """One entry of IPv4Data/IPv6Data in CreateNetwork: a subnet already allocated by IPAM."""

    pool: IPNetwork
    gateway: IPInterface | None
    aux_addresses: dict[str, IPInterface] = field(default_factory=dict)
    address_space: str = ""


@dataclass(frozen=True)
class CreateNetworkRequest:
    network_id: str
    generic_options: dict[str, str]
    ipv4_data: tuple[IPData, ...]
    ipv6_data: tuple[IPData, ...]
    enable_ipv6: bool = False
    enable_ipv4: bool = True
    internal: bool = False


@dataclass(frozen=True)
class NetworkRef:
    network_id: str


@dataclass(frozen=True)
class EndpointRef:
    network_id: str
    endpoint_id: str


@dataclass(frozen=True)
class PortOptions:
    """Exposed ports and port bindings that arrive in endpoint/join/program options."""

    exposed: tuple[tuple[Protocol, int], ...] = ()
    bindings: tuple[PortBinding, ...] = ()
    present: bool = False  # whether Docker sent any port information at all


@dataclass(frozen=True)
class CreateEndpointRequest:
    network_id: str
    endpoint_id: str
    address: ipaddress.IPv4Interface | None
    address_v6: ipaddress.IPv6Interface | None
    mac_address: str | None
    ports: PortOptions
    driver_options: dict[str, str]


@dataclass(frozen=True)
class JoinRequest:
    network_id: str
    endpoint_id: str
    sandbox_key: str
    ports: PortOptions


@dataclass(frozen=True)
class ProgramExternalRequest:
    network_id: str
    endpoint_id: str
    ports: PortOptions
    # NO_PROXY_6TO4: another endpoint of the container is its gateway for the other family.
    other_gateway: bool = False


@dataclass(frozen=True)
class GwAllocCheckRequest:
    """Docker 28+ asks this before it allocates a new network's gateway addresses, of a
    driver whose capabilities say GwAllocChecker; its Options are CreateNetwork's (moby
    v28.5.2 libnetwork/controller.go:622-627, drivers/remote/driver.go:175-184)."""

    generic_options: dict[str, str]
    enable_ipv4: bool = True
    enable_ipv6: bool = False
    internal: bool = False


@dataclass(frozen=True)
class RequestPoolRequest:
    address_space: str
    pool: IPNetwork | None
    sub_pool: IPNetwork | None
    options: dict[str, str]
    v6: bool


@dataclass(frozen=True)
class ReleasePoolRequest:
    pool_id: str


@dataclass(frozen=True)
class RequestAddressRequest:
    pool_id: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    is_gateway: bool
    options: dict[str, str]
    endpoint_name: str | None = None  # Docker 29+


@dataclass(frozen=True)
class ReleaseAddressRequest:
    pool_id: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address


# ---------------------------------------------------------------------------------------------
# Body decoding and field helpers
# ---------------------------------------------------------------------------------------------


def decode_body(raw: bytes) -> dict[str, Any]:
    """Decode a request body. Docker sends an empty body for argument-less calls."""
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidRequest(f"request body is larger than the {MAX_BODY_BYTES} bytes allowed")
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        reason = getattr(err, "msg", None) or type(err).__name__
        raise InvalidRequest(f"request body is not valid JSON ({reason})") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"request body must be a JSON object, not {_json_type(value)}")
    return value


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    return (json.dumps(reply, separators=(",", ":")) + "\n").encode()


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _show(value: object, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _string(body: Mapping[str, Any], name: str, *, required: bool = False) -> str:
    value = body.get(name)
    if value is None or value == "":
        if required:
            raise InvalidRequest(f"{name} is missing; it is required")
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string, not {_json_type(value)}")
    return value


def _bool(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidRequest(f"{name} must be true or false, not {_show(value)}")


def _object(body: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{name} must be a JSON object, not {_json_type(value)}")
    return value


def _id(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None or value == "":
        raise InvalidRequest(f"{name} is missing; it must be a 64-character hexadecimal id")
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidRequest(
            f"{name} {_show(value)} is not valid; it must be a 64-character hexadecimal id"
        )
    return value


def _string_map(value: object, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{name} must be a JSON object of strings, not {_json_type(value)}")
    result: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, bool):
            item = "true" if item else "false"
        elif isinstance(item, (int, float)):
            item = str(item)
        if not isinstance(item, str):
            raise InvalidRequest(
                f"option {key!r} in {name} must be a string, not {_json_type(item)}"
            )
        result[str(key)] = item
    return result


def parse_cidr_interface(value: object, name: str) -> IPInterface:
    """Parse an address with prefix length, e.g. ``10.1.0.2/24`` (Docker sends CIDR strings)."""
    if not isinstance(value, str) or "/" not in value:
        raise InvalidRequest(
            f"{name} {_show(value)} is not an address with a prefix length like 10.1.0.2/24"
        )
    try:
        return ipaddress.ip_interface(value)
    except ValueError:
        raise InvalidRequest(
            f"{name} {_show(value)} is not an address with a prefix length like 10.1.0.2/24"
        ) from None


def parse_network(value: object, name: str) -> IPNetwork:
    """Parse a subnet like ``10.1.0.0/24``; host bits are cleared (10.1.0.5/24 -> 10.1.0.0/24)."""
    if not isinstance(value, str) or "/" not in value:
        raise InvalidRequest(f"{name} {_show(value)} is not a subnet in CIDR form like 10.1.0.0/24")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise InvalidRequest(
            f"{name} {_show(value)} is not a subnet in CIDR form like 10.1.0.0/24"
        ) from None


POOL_PREFIX_LIMITS = {4: (8, 30), 6: (16, 126)}


def parse_pool(value: object, name: str) -> IPNetwork:
    """A subnet a network can use: not a default route's worth of addresses, and room for a
    gateway and at least one container."""
    pool = parse_network(value, name)
    low, high = POOL_PREFIX_LIMITS[pool.version]
    if not low <= pool.prefixlen <= high:
        raise InvalidRequest(
            f"{name} {pool} is not usable for a network; IPv{pool.version} subnets must have a "
            f"prefix length from /{low} to /{high}"
        )
    return pool


def parse_address(value: object, name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse a plain address. A prefix length, if present, is ignored."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be an IP address string, not {_json_type(value)}")
    text = value.split("/", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidRequest(f"{name} {_show(value)} is not a valid IP address") from None


# ---------------------------------------------------------------------------------------------
# NetworkDriver requests
# ---------------------------------------------------------------------------------------------


def _ip_data_list(body: Mapping[str, Any], name: str, version: int) -> tuple[IPData, ...]:
    value = body.get(name)
    if value is None:
        return ()  # Docker 25 sends null here (net-dhcp#46)
    if not isinstance(value, list):
        raise InvalidRequest(f"{name} must be a list, not {_json_type(value)}")
    result = []
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be a JSON object, not {_json_type(item)}")
        pool = parse_pool(item.get("Pool"), f"{where}.Pool")
        if pool.version != version:
            raise InvalidRequest(f"{where}.Pool {pool} is not an IPv{version} subnet")
        gateway = None
        if item.get("Gateway"):
            gateway = parse_cidr_interface(item["Gateway"], f"{where}.Gateway")
            if gateway.ip not in pool:
                raise InvalidRequest(f"{where}.Gateway {gateway.ip} is outside the subnet {pool}")
        aux: dict[str, IPInterface] = {}
        raw_aux = item.get("AuxAddresses")
        if raw_aux is not None:
            if not isinstance(raw_aux, dict):
                raise InvalidRequest(
                    f"{where}.AuxAddresses must be a JSON object, not {_json_type(raw_aux)}"
                )
            for key, addr in raw_aux.items():
                aux[str(key)] = parse_cidr_interface(addr, f"{where}.AuxAddresses[{key!r}]")
        space = item.get("AddressSpace") or ""
        if not isinstance(space, str):
            raise InvalidRequest(f"{where}.AddressSpace must be a string")
        result.append(IPData(pool=pool, gateway=gateway, aux_addresses=aux, address_space=space))
    return tuple(result)


def _network_options(body: Mapping[str, Any]) -> GwAllocCheckRequest:
    """What the Options of CreateNetwork and GwAllocCheck say: the -o options and the flags."""
    options = _object(body, "Options")
    return GwAllocCheckRequest(
        generic_options=_string_map(options.get(GENERIC_OPTIONS), f"Options[{GENERIC_OPTIONS!r}]"),
        enable_ipv4=_bool(options, ENABLE_IPV4, default=True),
        enable_ipv6=_bool(options, ENABLE_IPV6),
        internal=_bool(options, INTERNAL),
    )


def parse_create_network(body: Mapping[str, Any]) -> CreateNetworkRequest:
    network_id = _id(body, "NetworkID")
    options = _network_options(body)
    return CreateNetworkRequest(
        network_id=network_id,
        generic_options=options.generic_options,
        ipv4_data=_ip_data_list(body, "IPv4Data", 4),
        ipv6_data=_ip_data_list(body, "IPv6Data", 6),
        enable_ipv6=options.enable_ipv6,
        enable_ipv4=options.enable_ipv4,
        internal=options.internal,
    )


def parse_network_ref(body: Mapping[str, Any]) -> NetworkRef:
    return NetworkRef(network_id=_id(body, "NetworkID"))


def parse_endpoint_ref(body: Mapping[str, Any]) -> EndpointRef:
    return EndpointRef(network_id=_id(body, "NetworkID"), endpoint_id=_id(body, "EndpointID"))


_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def parse_port_options(options: Mapping[str, Any]) -> PortOptions:
    present = EXPOSED_PORTS in options or PORT_MAP in options
    exposed: list[tuple[Protocol, int]] = []
    raw_exposed = options.get(EXPOSED_PORTS)
    if raw_exposed is not None:
        if not isinstance(raw_exposed, list):
            raise InvalidRequest(f"{EXPOSED_PORTS} must be a list, not {_json_type(raw_exposed)}")
        for i, item in enumerate(raw_exposed):
            where = f"{EXPOSED_PORTS}[{i}]"
            if not isinstance(item, dict):
                raise InvalidRequest(f"{where} must be a JSON object, not {_json_type(item)}")
            exposed.append((_proto(item.get("Proto"), where), _port(item.get("Port"), where)))
    bindings: list[PortBinding] = []
    raw_map = options.get(PORT_MAP)
    if raw_map is not None:
        if not isinstance(raw_map, list):
            raise InvalidRequest(f"{PORT_MAP} must be a list, not {_json_type(raw_map)}")
        for i, item in enumerate(raw_map):
            where = f"{PORT_MAP}[{i}]"
            if not isinstance(item, dict):
                raise InvalidRequest(f"{where} must be a JSON object, not {_json_type(item)}")
            proto = _proto(item.get("Proto"), where)
            port = _port(item.get("Port"), where)
            host_ip = None
            if item.get("HostIP"):
                host_ip = parse_address(item["HostIP"], f"{where}.HostIP")
            host_port = _port(item.get("HostPort", 0), where, "HostPort", allow_zero=True)
            host_port_end = _port(item.get("HostPortEnd", 0), where, "HostPortEnd", allow_zero=True)
            if host_port_end and host_port_end < host_port:
                raise InvalidRequest(
                    f"{where}.HostPortEnd {host_port_end} is below HostPort {host_port}"
                )
            bindings.append(
                PortBinding(
                    proto=proto,
                    port=port,
                    host_ip=host_ip,
                    host_port=host_port,
                    host_port_end=host_port_end or host_port,
                )
            )
    return PortOptions(exposed=tuple(exposed), bindings=tuple(bindings), present=present)


def _proto(value: object, where: str) -> Protocol:
    if isinstance(value, int) and not isinstance(value, bool) and value in _PROTOCOLS:
        return _PROTOCOLS[value]
    raise InvalidRequest(
        f"{where}.Proto {_show(value)} is not supported; use 6 (tcp), 17 (udp) or 132 (sctp)"
    )


def _port(value: object, where: str, name: str = "Port", *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= 65535:
        return value
    raise InvalidRequest(f"{where}.{name} {_show(value)} is not a port number from {low} to 65535")


def parse_create_endpoint(body: Mapping[str, Any]) -> CreateEndpointRequest:
    network_id = _id(body, "NetworkID")
    endpoint_id = _id(body, "EndpointID")
    iface = _object(body, "Interface")
    address = None
    if iface.get("Address"):
        parsed = parse_cidr_interface(iface["Address"], "Interface.Address")
        if not isinstance(parsed, ipaddress.IPv4Interface):
            raise InvalidRequest(f"Interface.Address {parsed} is not an IPv4 address")
        address = parsed
    address_v6 = None
    if iface.get("AddressIPv6"):
        parsed = parse_cidr_interface(iface["AddressIPv6"], "Interface.AddressIPv6")
        if not isinstance(parsed, ipaddress.IPv6Interface):
            raise InvalidRequest(f"Interface.AddressIPv6 {parsed} is not an IPv6 address")
        address_v6 = parsed
    mac = None
    if iface.get("MacAddress"):
        raw_mac = iface["MacAddress"]
        if not isinstance(raw_mac, str) or not _MAC_RE.fullmatch(raw_mac):
            raise InvalidRequest(
                f"Interface.MacAddress {_show(raw_mac)} is not a MAC address like 02:42:ac:11:00:02"
            )
        mac = raw_mac.lower()
        # The kernel refuses these on an interface (only at the veth's set-up, in its words).
        if int(mac[:2], 16) & 1:
            raise InvalidRequest(
                f"Interface.MacAddress {mac} is a multicast address; a container's MAC address "
                "must be unicast (an even first byte), like 02:42:ac:11:00:02"
            )
        if mac == "00:00:00:00:00:00":
            raise InvalidRequest(
                "Interface.MacAddress 00:00:00:00:00:00 is not usable; give a unicast MAC "
                "address like 02:42:ac:11:00:02"
            )
    options = _object(body, "Options")
    driver_options = {
        key: value
        for key, value in options.items()
        if key not in (EXPOSED_PORTS, PORT_MAP) and isinstance(value, str)
    }
    return CreateEndpointRequest(
        network_id=network_id,
        endpoint_id=endpoint_id,
        address=address,
        address_v6=address_v6,
        mac_address=mac,
        ports=parse_port_options(options),
        driver_options=driver_options,
    )


def parse_join(body: Mapping[str, Any]) -> JoinRequest:
    return JoinRequest(
        network_id=_id(body, "NetworkID"),
        endpoint_id=_id(body, "EndpointID"),
        sandbox_key=_string(body, "SandboxKey"),
        ports=parse_port_options(_object(body, "Options")),
    )


def parse_program_external(body: Mapping[str, Any]) -> ProgramExternalRequest:
    options = _object(body, "Options")
    return ProgramExternalRequest(
        network_id=_id(body, "NetworkID"),
        endpoint_id=_id(body, "EndpointID"),
        ports=parse_port_options(options),
        other_gateway=_bool(options, NO_PROXY_6TO4),
    )


def parse_gw_alloc_check(body: Mapping[str, Any]) -> GwAllocCheckRequest:
    return _network_options(body)


# ---------------------------------------------------------------------------------------------
# IpamDriver requests
# ---------------------------------------------------------------------------------------------


def parse_request_pool(body: Mapping[str, Any]) -> RequestPoolRequest:
    pool = parse_pool(body["Pool"], "Pool") if body.get("Pool") else None
    sub_pool = parse_network(body["SubPool"], "SubPool") if body.get("SubPool") else None
    v6 = _bool(body, "V6")
    if pool is not None and (pool.version == 6) != v6:
        raise InvalidRequest(
            f"Pool {pool} is an IPv{pool.version} subnet but V6 is {str(v6).lower()}"
        )
    if sub_pool is not None:
        if pool is None:
            raise InvalidRequest("SubPool (--ip-range) needs a Pool (--subnet) to be given too")
        if sub_pool.version != pool.version or not sub_pool.subnet_of(pool):  # type: ignore[arg-type]
            raise InvalidRequest(f"SubPool (--ip-range) {sub_pool} is not inside the subnet {pool}")
    return RequestPoolRequest(
        address_space=_string(body, "AddressSpace"),
        pool=pool,
        sub_pool=sub_pool,
        options=_string_map(body.get("Options"), "Options"),
        v6=v6,
    )


def parse_release_pool(body: Mapping[str, Any]) -> ReleasePoolRequest:
    return ReleasePoolRequest(pool_id=_string(body, "PoolID", required=True))


def parse_request_address(body: Mapping[str, Any]) -> RequestAddressRequest:
    pool_id = _string(body, "PoolID", required=True)
    address = parse_address(body["Address"], "Address") if body.get("Address") else None
    options = _string_map(body.get("Options"), "Options")
    return RequestAddressRequest(
        pool_id=pool_id,
        address=address,
        is_gateway=options.get(REQUEST_ADDRESS_TYPE) == GATEWAY_ADDRESS_TYPE,
        options=options,
        endpoint_name=options.get(ENDPOINT_NAME) or None,
    )


def parse_release_address(body: Mapping[str, Any]) -> ReleaseAddressRequest:
    pool_id = _string(body, "PoolID", required=True)
    if not body.get("Address"):
        raise InvalidRequest("Address is missing; it is required")
    return ReleaseAddressRequest(pool_id=pool_id, address=parse_address(body["Address"], "Address"))


# ---------------------------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------------------------


def activate_reply() -> dict[str, Any]:
    return {"Implements": ["NetworkDriver", "IpamDriver"]}


def network_capabilities_reply() -> dict[str, Any]:
    # GwAllocChecker (Docker 28+ reads it; older ones ignore it): Docker asks GwAllocCheck
    # before allocating a network's gateways, so that an isolated family takes no address
    # from the pool.
    return {"Scope": "local", "ConnectivityScope": "local", "GwAllocChecker": True}


def gw_alloc_check_reply(skip_v4: bool, skip_v6: bool) -> dict[str, Any]:
    """Whether Docker should leave each family's gateway unallocated."""
    return {"SkipIPv4": skip_v4, "SkipIPv6": skip_v6}


def ipam_capabilities_reply() -> dict[str, Any]:
    return {"RequiresMACAddress": False, "RequiresRequestReplay": False}


def address_spaces_reply(local: str, global_: str) -> dict[str, Any]:
    return {"LocalDefaultAddressSpace": local, "GlobalDefaultAddressSpace": global_}


def request_pool_reply(pool_id: str, pool: IPNetwork) -> dict[str, Any]:
    return {"PoolID": pool_id, "Pool": str(pool), "Data": {}}


def request_address_reply(address: IPInterface) -> dict[str, Any]:
    return {"Address": str(address), "Data": {}}


def create_endpoint_reply(generated_mac: str | None) -> dict[str, Any]:
    # Only fields Docker left empty may be filled; echoing a supplied one fails the request.
    return {"Interface": {"MacAddress": generated_mac} if generated_mac else {}}


def join_reply(
    src_name: str,
    dst_prefix: str,
    gateway: ipaddress.IPv4Address | None,
    gateway_v6: ipaddress.IPv6Address | None,
    *,
    disable_gateway_service: bool = False,
) -> dict[str, Any]:
    """``disable_gateway_service``: the network is internal, so Docker must not connect the
    container to docker_gwbridge for a way out."""
    reply: dict[str, Any] = {
        "InterfaceName": {"SrcName": src_name, "DstPrefix": dst_prefix},
        "StaticRoutes": [],
        "DisableGatewayService": disable_gateway_service,
    }
    if gateway is not None:
        reply["Gateway"] = str(gateway)
    if gateway_v6 is not None:
        reply["GatewayIPv6"] = str(gateway_v6)
    return reply


def oper_info_reply(value: Mapping[str, Any]) -> dict[str, Any]:
    return {"Value": dict(value)}


def error_reply(message: str) -> dict[str, Any]:
    return {"Err": message}


# ---------------------------------------------------------------------------------------------
# What a request names, for the log
# ---------------------------------------------------------------------------------------------

# The fields that identify what a request is about, by the names the log gives them.
_LOGGED_FIELDS = (
    ("NetworkID", "network"),
    ("EndpointID", "endpoint"),
    ("PoolID", "pool"),
    ("Address", "address"),
)
MAX_LOGGED_ID = 64  # a body is not validated yet when it is logged: never more than this


def request_ids(body: Mapping[str, Any]) -> dict[str, str]:
    """The network, endpoint, pool and address a request body names (whichever it has, as
    non-empty strings, cut to MAX_LOGGED_ID characters), keyed "network", "endpoint", "pool"
    and "address". Works on any body, valid or not: it is what the log says of a request."""
    ids = {}
    for key, name in _LOGGED_FIELDS:
        value = body.get(key)
        if isinstance(value, str) and value:
            ids[name] = value[:MAX_LOGGED_ID]
    return ids


# ---------------------------------------------------------------------------------------------
# Request bodies as Docker sends them, for pydriver's tools and the tests (the other side of
# the parsers above)
# ---------------------------------------------------------------------------------------------

_PROTOCOL_NUMBERS: dict[Protocol, int] = {name: number for number, name in _PROTOCOLS.items()}


def network_ref_body(network_id: str) -> dict[str, Any]:
    """DeleteNetwork's body."""
    return {"NetworkID": network_id}


def endpoint_ref_body(network_id: str, endpoint_id: str) -> dict[str, Any]:
    """The body of DeleteEndpoint, Leave, EndpointOperInfo and RevokeExternalConnectivity."""
    return {"NetworkID": network_id, "EndpointID": endpoint_id}


def ip_data_body(
    pool: str | IPNetwork,
    gateway: str | IPInterface | None = None,
    *,
    aux_addresses: Mapping[str, str | IPInterface] | None = None,
    address_space: str = "",
) -> dict[str, Any]:
    """One entry of CreateNetwork's IPv4Data/IPv6Data."""
    entry: dict[str, Any] = {"AddressSpace": address_space, "Pool": str(pool)}
    if gateway is not None:
        entry["Gateway"] = str(gateway)
    if aux_addresses:
        entry["AuxAddresses"] = {key: str(value) for key, value in aux_addresses.items()}
    return entry


def create_network_body(
    network_id: str,
    ipv4_data: Sequence[Mapping[str, Any]] = (),
    ipv6_data: Sequence[Mapping[str, Any]] = (),
    *,
    generic: Mapping[str, str] | None = None,
    enable_ipv6: bool = False,
    enable_ipv4: bool | None = None,
    internal: bool = False,
) -> dict[str, Any]:
    """CreateNetwork's body (``enable_ipv4`` None: left out, as Docker before 28 does)."""
    options: dict[str, Any] = {ENABLE_IPV6: enable_ipv6, GENERIC_OPTIONS: dict(generic or {})}
    if enable_ipv4 is not None:
        options[ENABLE_IPV4] = enable_ipv4
    if internal:
        options[INTERNAL] = True
    return {
        "NetworkID": network_id,
        "Options": options,
        "IPv4Data": [dict(d) for d in ipv4_data],
        "IPv6Data": [dict(d) for d in ipv6_data],
    }


def port_options_body(
    bindings: Sequence[PortBinding] = (), exposed: Sequence[tuple[Protocol, int]] = ()
) -> dict[str, Any]:
    """The Options entries that carry a container's ports (exposed, and published with -p)."""
    return {
        EXPOSED_PORTS: [
            {"Proto": _PROTOCOL_NUMBERS[proto], "Port": port} for proto, port in exposed
        ],
        PORT_MAP: [
            {
                "Proto": _PROTOCOL_NUMBERS[b.proto],
                "IP": "",
                "Port": b.port,
                "HostIP": str(b.host_ip) if b.host_ip is not None else "",
                "HostPort": b.host_port,
                "HostPortEnd": b.host_port_end,
            }
            for b in bindings
        ],
    }


def create_endpoint_body(
    network_id: str,
    endpoint_id: str,
    address: str | IPInterface | None = None,
    *,
    address_v6: str | IPInterface | None = None,
    mac_address: str = "",
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """CreateEndpoint's body (an address left out is an empty string, as Docker sends it)."""
    return {
        "NetworkID": network_id,
        "EndpointID": endpoint_id,
        "Interface": {
            "Address": str(address or ""),
            "AddressIPv6": str(address_v6 or ""),
            "MacAddress": mac_address,
        },
        "Options": dict(options or {}),
    }


def join_body(
    network_id: str, endpoint_id: str, sandbox_key: str, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "NetworkID": network_id,
        "EndpointID": endpoint_id,
        "SandboxKey": sandbox_key,
        "Options": dict(options or {}),
    }


def program_external_body(
    network_id: str,
    endpoint_id: str,
    options: Mapping[str, Any] | None = None,
    *,
    other_gateway: bool | None = None,
) -> dict[str, Any]:
    """ProgramExternalConnectivity's body (``other_gateway`` None: no NO_PROXY_6TO4 at all)."""
    body_options = dict(options or {})
    if other_gateway is not None:
        body_options[NO_PROXY_6TO4] = other_gateway
    return {"NetworkID": network_id, "EndpointID": endpoint_id, "Options": body_options}


def request_pool_body(
    pool: str | IPNetwork | None = None,
    sub_pool: str | IPNetwork | None = None,
    *,
    v6: bool = False,
    address_space: str = "",
    options: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "AddressSpace": address_space,
        "Pool": str(pool or ""),
        "SubPool": str(sub_pool or ""),
        "Options": dict(options or {}),
        "V6": v6,
    }


def release_pool_body(pool_id: str) -> dict[str, Any]:
    return {"PoolID": pool_id}


def request_address_body(
    pool_id: str,
    address: str | IPAddress | None = None,
    *,
    gateway: bool = False,
    endpoint_name: str | None = None,
) -> dict[str, Any]:
    options: dict[str, str] = {}
    if gateway:
        options[REQUEST_ADDRESS_TYPE] = GATEWAY_ADDRESS_TYPE
    if endpoint_name:
        options[ENDPOINT_NAME] = endpoint_name
    return {"PoolID": pool_id, "Address": str(address or ""), "Options": options}


def release_address_body(pool_id: str, address: str | IPAddress) -> dict[str, Any]:
    return {"PoolID": pool_id, "Address": str(address)}


# ---------------------------------------------------------------------------------------------
# pybridge's own route (Docker never calls it): who has been calling pybridge
# ---------------------------------------------------------------------------------------------

STATUS_METHOD = "Pybridge.Status"
# pydriver's own commands (doctor, prune) mark their requests with this header, so pybridge
# does not count them among the daemons calling it.
TOOL_HEADER = "X-Pybridge-Tool"


@dataclass(frozen=True)
class Caller:
    """A process that has called pybridge since it started, from the peer credentials of its
    connections (SO_PEERCRED), in pybridge's pid namespace: 0 when the caller is outside it."""

    pid: int
    uid: int
    first_seen: float  # time.time()
    last_seen: float
    requests: int


@dataclass(frozen=True)
class Status:
    pid: int  # pybridge's own pid, in its own pid namespace
    started: float  # time.time() when it started serving
    callers: tuple[Caller, ...]
    # (st_dev, st_ino) of its state database: the same file whatever the mount namespace, so a
    # tool reading a state directory can tell it is the one this pybridge serves from.
    state_file: tuple[int, int] | None = None


def status_request() -> tuple[str, dict[str, Any]]:
    """The request `pydriver prune` sends: (method, body)."""
    return STATUS_METHOD, {}


def status_reply(status: Status) -> dict[str, Any]:
    return {
        "Pid": status.pid,
        "Started": status.started,
        "StateFile": list(status.state_file) if status.state_file else None,
        "Callers": [
            {
                "Pid": c.pid,
                "Uid": c.uid,
                "FirstSeen": c.first_seen,
                "LastSeen": c.last_seen,
                "Requests": c.requests,
            }
            for c in status.callers
        ],
    }


def _number(body: Mapping[str, Any], name: str, where: str) -> float:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{where}{name} must be a number, not {_json_type(value)}")
    return float(value)


def _count(body: Mapping[str, Any], name: str, where: str) -> int:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"{where}{name} must be a whole number from 0, not {_show(value)}")
    return value


def parse_status_reply(body: Mapping[str, Any]) -> Status:
    """pybridge's answer to STATUS_METHOD (the tool side of the route)."""
    raw = body.get("Callers")
    if not isinstance(raw, list):
        raise InvalidRequest(f"Callers must be a list, not {_json_type(raw)}")
    callers = []
    for i, item in enumerate(raw):
        where = f"Callers[{i}]."
        if not isinstance(item, dict):
            raise InvalidRequest(f"Callers[{i}] must be a JSON object, not {_json_type(item)}")
        callers.append(
            Caller(
                pid=_count(item, "Pid", where),
                uid=_count(item, "Uid", where),
                first_seen=_number(item, "FirstSeen", where),
                last_seen=_number(item, "LastSeen", where),
                requests=_count(item, "Requests", where),
            )
        )
    state_file = body.get("StateFile")
    if state_file is not None and not (
        isinstance(state_file, list)
        and len(state_file) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) for n in state_file)
    ):
        raise InvalidRequest(f"StateFile must be [device, inode], not {_show(state_file)}")
    return Status(
        pid=_count(body, "Pid", ""),
        started=_number(body, "Started", ""),
        state_file=(state_file[0], state_file[1]) if state_file else None,
        callers=tuple(callers),
    )


# ---------------------------------------------------------------------------------------------
# Requests pydriver's own commands send (doctor's probe, prune's removals): (method, body)
# ---------------------------------------------------------------------------------------------


def activate_request() -> tuple[str, dict[str, Any]]:
    return "Plugin.Activate", {}


def implements(reply: object) -> tuple[str, ...]:
    """The APIs a Plugin.Activate reply names (none when it is not such a reply)."""
    names = reply.get("Implements") if isinstance(reply, dict) else None
    return tuple(n for n in names if isinstance(n, str)) if isinstance(names, list) else ()


def delete_endpoint_request(network_id: str, endpoint_id: str) -> tuple[str, dict[str, Any]]:
    return "NetworkDriver.DeleteEndpoint", {"NetworkID": network_id, "EndpointID": endpoint_id}


def delete_network_request(network_id: str) -> tuple[str, dict[str, Any]]:
    return "NetworkDriver.DeleteNetwork", {"NetworkID": network_id}


def release_pool_request(pool_id: str) -> tuple[str, dict[str, Any]]:
    return "IpamDriver.ReleasePool", {"PoolID": pool_id}
