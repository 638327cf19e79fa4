"""Network options (`docker network create -o KEY=VALUE`): the same keys as the built-in bridge.

Pure: validates the generic option map into ``NetworkOptions``, each value as Docker's own
bridge driver reads it (moby v28.5.2 libnetwork/drivers/bridge/bridge_linux.go fromLabels),
and, where that costs nothing, more strictly (an IPv4 address for host_ipv4, interface names
pybridge can write into iptables rules). Every key some Docker version's bridge driver knows
is accepted; a key none knows is refused by name, listing what is supported, so users learn
at `network create`. Also the endpoint options (`--network name=N,driver-opt=K=V`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

from .errors import InvalidRequest, Unsupported
from .model import GATEWAY_MODES, Family, GatewayMode, IPAddress, NetworkOptions
from .rules import named_like_docker
from .segments import CLUSTER_KEYS

BRIDGE_NAME = "com.docker.network.bridge.name"
ENABLE_IP_MASQUERADE = "com.docker.network.bridge.enable_ip_masquerade"
ENABLE_ICC = "com.docker.network.bridge.enable_icc"
HOST_BINDING_IPV4 = "com.docker.network.bridge.host_binding_ipv4"
MTU = "com.docker.network.driver.mtu"
MTU_SHORT = "mtu"  # `-o mtu=1400` arrives under this key; accepted as an alias of MTU
CONTAINER_IFACE_PREFIX = "com.docker.network.container_iface_prefix"
GATEWAY_MODE_IPV4 = "com.docker.network.bridge.gateway_mode_ipv4"
GATEWAY_MODE_IPV6 = "com.docker.network.bridge.gateway_mode_ipv6"
INHIBIT_IPV4 = "com.docker.network.bridge.inhibit_ipv4"
TRUSTED_HOST_INTERFACES = "com.docker.network.bridge.trusted_host_interfaces"
HOST_IPV4 = "com.docker.network.host_ipv4"
HOST_IPV6 = "com.docker.network.host_ipv6"
# Set by dockerd on its own default network (docker0) only; "false" changes nothing.
DEFAULT_BRIDGE = "com.docker.network.bridge.default_bridge"
# Gratuitous ARP / unsolicited neighbour advertisements when a container's interface comes up
# (dockerd 28+): dockerd itself validates and applies them, for every driver.
ADVERTISE_ADDR_NMSGS = "com.docker.network.advertise_addr_nmsgs"
ADVERTISE_ADDR_MS = "com.docker.network.advertise_addr_ms"
ADVERTISE_NMSGS_RANGE = (0, 3)
ADVERTISE_MS_RANGE = (100, 2000)

# Endpoint options (CreateEndpoint). dockerd applies the sysctls itself, after it has moved
# the interface into the container; the interface name it takes from the driver alone.
ENDPOINT_SYSCTLS = "com.docker.network.endpoint.sysctls"
ENDPOINT_IFNAME = "com.docker.network.endpoint.ifname"

# Docker's own network flags (--ipv4, --ipv6), which dockerd 28+ also takes as `-o` (or from
# daemon.json's default-network-opts) and then leaves in the options it passes on (moby
# v28.5.2 daemon/network.go:314-338). The flags themselves reach pybridge as booleans.
ENABLE_IPV4 = "com.docker.network.enable_ipv4"
ENABLE_IPV6 = "com.docker.network.enable_ipv6"
DAEMON_FLAGS = {ENABLE_IPV4: "--ipv4", ENABLE_IPV6: "--ipv6"}

SUPPORTED = (
    BRIDGE_NAME,
    ENABLE_IP_MASQUERADE,
    ENABLE_ICC,
    HOST_BINDING_IPV4,
    MTU,
    CONTAINER_IFACE_PREFIX,
    GATEWAY_MODE_IPV4,
    GATEWAY_MODE_IPV6,
    INHIBIT_IPV4,
    TRUSTED_HOST_INTERFACES,
    HOST_IPV4,
    HOST_IPV6,
    DEFAULT_BRIDGE,
    ADVERTISE_ADDR_NMSGS,
    ADVERTISE_ADDR_MS,
)
GATEWAY_MODE_KEYS: dict[Family, str] = {4: GATEWAY_MODE_IPV4, 6: GATEWAY_MODE_IPV6}

# strconv.ParseBool, which Docker's own bridge driver uses for these options.
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}

_IFNAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")
_DIGITS_RE = re.compile(r"[0-9]{1,6}", re.ASCII)
_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,9}$")

MIN_MTU = 68
MAX_MTU = 65535
# Directories of /proc/sys/net/ipv{4,6}/conf/ that are not interfaces: a bridge of that name
# would have pybridge change the settings of every interface on the host.
RESERVED_BRIDGE_NAMES = ("all", "default")


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def valid_interface_name(name: str) -> bool:
    """A Linux interface name we are willing to use: 1-15 safe characters."""
    return bool(_IFNAME_RE.fullmatch(name)) and name not in (".", "..")


def parse_network_options(
    generic: Mapping[str, str],
    *,
    enable_ipv4: bool = True,
    enable_ipv6: bool = False,
    internal: bool = False,
) -> NetworkOptions:
    """``enable_ipv4``/``enable_ipv6``/``internal``: what the daemon decided (the request's
    flags)."""
    _refuse_unknown(generic)
    for key, applied in ((ENABLE_IPV4, enable_ipv4), (ENABLE_IPV6, enable_ipv6)):
        if _parse_bool(generic, key, applied) != applied:
            # A daemon before 28 passes the option on without applying it.
            flag = DAEMON_FLAGS[key]
            raise InvalidRequest(
                f"option {key}={_clip(generic[key])} was not applied by this Docker daemon "
                f"(dockerd 28 and later apply it); use {flag}={str(not applied).lower()}"
            )
    if MTU in generic and MTU_SHORT in generic and generic[MTU] != generic[MTU_SHORT]:
        raise InvalidRequest(f"options {MTU} and {MTU_SHORT} disagree; give the MTU once")

    bridge_name = generic.get(BRIDGE_NAME) or None
    if bridge_name is not None and not valid_interface_name(bridge_name):
        raise InvalidRequest(
            f"{BRIDGE_NAME} {_clip(bridge_name)!r} is not a valid interface name; use 1 to 15 "
            "letters, digits, '_', '.' or '-'"
        )
    if bridge_name in RESERVED_BRIDGE_NAMES:
        raise InvalidRequest(
            f"{BRIDGE_NAME} {bridge_name!r} is not allowed: /proc/sys/net uses that name for the "
            "settings of every interface; choose another name"
        )

    mtu = _parse_mtu(generic)
    # Any address, IPv6 too (Docker's net.ParseIP; "0.0.0.0" and no option mean every IPv4
    # and IPv6 address, "::" every IPv6 one: ports.plan).
    host_binding = _parse_address(generic, HOST_BINDING_IPV4, None)
    host_ipv4 = _parse_address(generic, HOST_IPV4, 4)
    host_ipv6 = _parse_address(generic, HOST_IPV6, 6)
    modes = {family: _parse_gateway_mode(generic, family, internal) for family in (4, 6)}
    if _parse_bool(generic, DEFAULT_BRIDGE, False):
        raise InvalidRequest(
            f"{DEFAULT_BRIDGE}=true marks Docker's own default network (docker0); a pybridge "
            "network cannot be that network"
        )
    _parse_count(generic, ADVERTISE_ADDR_NMSGS, ADVERTISE_NMSGS_RANGE, "")
    _parse_count(generic, ADVERTISE_ADDR_MS, ADVERTISE_MS_RANGE, " milliseconds")

    prefix = generic.get(CONTAINER_IFACE_PREFIX) or "eth"
    if not _PREFIX_RE.fullmatch(prefix):
        raise InvalidRequest(
            f"{CONTAINER_IFACE_PREFIX} {_clip(prefix)!r} is not valid; use a letter followed "
            "by up to 9 letters, digits or '_'"
        )

    return NetworkOptions(
        bridge_name=bridge_name,
        enable_ip_masquerade=_parse_bool(generic, ENABLE_IP_MASQUERADE, True),
        enable_icc=_parse_bool(generic, ENABLE_ICC, True),
        host_binding_ipv4=host_binding,
        mtu=mtu,
        container_iface_prefix=prefix,
        gateway_mode_v4=modes[4],
        gateway_mode_v6=modes[6],
        inhibit_ipv4=_parse_bool(generic, INHIBIT_IPV4, False),
        trusted_host_interfaces=_parse_interfaces(generic),
        host_ipv4=host_ipv4 if isinstance(host_ipv4, ipaddress.IPv4Address) else None,
        host_ipv6=host_ipv6 if isinstance(host_ipv6, ipaddress.IPv6Address) else None,
    )


def gateway_skips(options: NetworkOptions, *, internal: bool) -> tuple[bool, bool]:
    """GwAllocCheck (Docker 28+): whether Docker should leave the IPv4 and IPv6 gateway
    addresses unallocated, as its own bridge driver answers (GetSkipGwAlloc): an isolated
    family has none, and an internal network's inhibited IPv4 gateway would serve nothing
    (no default route either)."""
    v4 = options.gateway_mode_v4 == "isolated" or (options.inhibit_ipv4 and internal)
    return v4, options.gateway_mode_v6 == "isolated"


def check_endpoint_options(options: Mapping[str, str]) -> None:
    """Endpoint options (`docker run --network name=N,driver-opt=K=V`). Those dockerd applies
    itself (``ENDPOINT_SYSCTLS``) and any a Docker driver might read are accepted, as Docker's
    own bridge driver does; the interface name is refused: dockerd does not pass it on to a
    network plugin, which can only choose the prefix."""
    ifname = options.get(ENDPOINT_IFNAME)
    if ifname:
        raise InvalidRequest(
            f"driver option {ENDPOINT_IFNAME}={_clip(ifname)} cannot be honoured by a network "
            "plugin: Docker does not pass the interface name on to it; leave it out (the "
            f"network's {CONTAINER_IFACE_PREFIX} sets the name's prefix)"
        )


def check_host_binding(options: NetworkOptions, *, has_ipv6: bool) -> None:
    """An IPv6 host_binding_ipv4 on a network without IPv6. Docker's driver carries such ports
    to the containers' IPv4 addresses through its userland proxy (or, without one, publishes
    nothing); pybridge has no proxy and publishes a port only in the container's own family,
    so every `docker run -p` there would fail: say it once, at network create."""
    binding = options.host_binding_ipv4
    if binding is not None and binding.version == 6 and not has_ipv6:
        raise InvalidRequest(
            f"{HOST_BINDING_IPV4}={binding} is an IPv6 address but the network has no IPv6 "
            "subnet, and pybridge publishes a port only in the container's own address family "
            "(it has no userland proxy to carry IPv6 to IPv4): add --ipv6, or use an IPv4 "
            "address (0.0.0.0 publishes on every IPv4 and IPv6 address)"
        )


def _parse_gateway_mode(generic: Mapping[str, str], family: Family, internal: bool) -> GatewayMode:
    key = GATEWAY_MODE_KEYS[family]
    raw = generic.get(key)
    if not raw:
        return "nat"
    mode = next((m for m in GATEWAY_MODES if m == raw), None)
    if mode is None:
        raise InvalidRequest(
            f"{key} {_clip(raw)!r} is not valid; use nat, nat-unprotected, routed or isolated"
        )
    if mode == "isolated" and not internal:
        raise InvalidRequest(
            f"{key}=isolated can only be used for an internal network; add --internal"
        )
    return mode


def _parse_address(generic: Mapping[str, str], key: str, family: int | None) -> IPAddress | None:
    """An address (of ``family`` if given); an IPv4-mapped IPv6 address is its IPv4 address, as
    Docker reads it."""
    raw = generic.get(key)
    if not raw:
        return None
    kind = {None: "an IP address", 4: "an IPv4 address", 6: "an IPv6 address"}[family]
    try:
        address = ipaddress.ip_address(raw) if "%" not in raw else None
    except ValueError:
        address = None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address is None or (family is not None and address.version != family):
        raise InvalidRequest(f"{key} {_clip(raw)!r} is not {kind}")
    if family is not None and address.is_unspecified:
        raise InvalidRequest(f"{key} {raw!r} is not valid; give the address to use as source")
    return address


def _parse_interfaces(generic: Mapping[str, str]) -> tuple[str, ...]:
    raw = generic.get(TRUSTED_HOST_INTERFACES) or ""
    names: list[str] = []
    for name in raw.split(":"):  # empty parts are skipped, as strings.FieldsFunc does
        if not name:
            continue
        if not valid_interface_name(name):
            raise InvalidRequest(
                f"{TRUSTED_HOST_INTERFACES}: {_clip(name)!r} is not a valid interface name; "
                "give host interface names (1 to 15 letters, digits, '_', '.' or '-') "
                "separated by ':'"
            )
        if named_like_docker(name):
            raise InvalidRequest(
                f"{TRUSTED_HOST_INTERFACES}: {name} is named like one of Docker's container "
                "bridges (docker0, docker_gwbridge, br-...), and pybridge leaves traffic from "
                "those to Docker's own rules, so trusting it would have no effect; rename the "
                "host interface, or leave it out"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


def _parse_count(
    generic: Mapping[str, str], key: str, limits: tuple[int, int], unit: str
) -> int | None:
    raw = generic.get(key)
    if not raw:
        return None
    low, high = limits
    value = int(raw) if _DIGITS_RE.fullmatch(raw) else -1
    if not low <= value <= high:
        raise InvalidRequest(
            f"{key} {_clip(raw)!r} is not valid; it must be a whole number from {low} to "
            f"{high}{unit}"
        )
    return value


def _refuse_unknown(generic: Mapping[str, str]) -> None:
    unknown = sorted(
        k
        for k in generic
        if k not in SUPPORTED
        and k != MTU_SHORT
        and k not in DAEMON_FLAGS
        # Read by segments.py (networks that span hosts).
        and k not in CLUSTER_KEYS
    )
    if unknown:
        names = ", ".join(_clip(k) for k in unknown[:5])
        if len(unknown) > 5:
            names += f" and {len(unknown) - 5} more"
        noun = "option" if len(unknown) == 1 else "options"
        raise Unsupported(
            f"pybridge does not support the network {noun} {names}; "
            f"supported options are {', '.join(SUPPORTED)}"
        )


def _parse_mtu(generic: Mapping[str, str]) -> int | None:
    raw_mtu = generic.get(MTU) or generic.get(MTU_SHORT)
    if not raw_mtu:
        return None
    # Digits only, as Go's strconv.Atoi in Docker's own driver (int() takes " 1_400").
    mtu = int(raw_mtu) if _DIGITS_RE.fullmatch(raw_mtu) else -1
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise InvalidRequest(
            f"{MTU} {_clip(raw_mtu)!r} is not valid; it must be a whole number from "
            f"{MIN_MTU} to {MAX_MTU}"
        )
    return mtu


def _parse_bool(generic: Mapping[str, str], key: str, default: bool) -> bool:
    raw = generic.get(key)
    if raw is None or raw == "":
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise InvalidRequest(f"{key} {_clip(raw)!r} is not valid; it must be true or false")
