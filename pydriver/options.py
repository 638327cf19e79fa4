"""Network options (`docker network create -o KEY=VALUE`): the same keys as the built-in bridge.

Pure: validates the generic option map into ``NetworkOptions``. Anything pybridge does not
support is refused by name, listing what is supported, so users learn at `network create`.
"""

from __future__ import annotations

import ipaddress
import re

from .errors import InvalidRequest, Unsupported
from .model import NetworkOptions

BRIDGE_NAME = "com.docker.network.bridge.name"
ENABLE_IP_MASQUERADE = "com.docker.network.bridge.enable_ip_masquerade"
ENABLE_ICC = "com.docker.network.bridge.enable_icc"
HOST_BINDING_IPV4 = "com.docker.network.bridge.host_binding_ipv4"
MTU = "com.docker.network.driver.mtu"
MTU_SHORT = "mtu"  # `-o mtu=1400` arrives under this key; accepted as an alias of MTU
CONTAINER_IFACE_PREFIX = "com.docker.network.container_iface_prefix"

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
)

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
    generic: dict[str, str], *, enable_ipv4: bool = True, enable_ipv6: bool = False
) -> NetworkOptions:
    """``enable_ipv4``/``enable_ipv6``: what the daemon decided (the request's flags)."""
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

    host_binding = None
    raw_binding = generic.get(HOST_BINDING_IPV4)
    if raw_binding:
        try:
            host_binding = ipaddress.ip_address(raw_binding)
        except ValueError:
            raise InvalidRequest(
                f"{HOST_BINDING_IPV4} {_clip(raw_binding)!r} is not an IP address"
            ) from None

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
    )


def _refuse_unknown(generic: dict[str, str]) -> None:
    unknown = sorted(
        k for k in generic if k not in SUPPORTED and k != MTU_SHORT and k not in DAEMON_FLAGS
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


def _parse_mtu(generic: dict[str, str]) -> int | None:
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


def _parse_bool(generic: dict[str, str], key: str, default: bool) -> bool:
    raw = generic.get(key)
    if raw is None or raw == "":
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise InvalidRequest(f"{key} {_clip(raw)!r} is not valid; it must be true or false")
