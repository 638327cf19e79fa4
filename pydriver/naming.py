"""Deterministic kernel names and MAC addresses derived from Docker's ids, and how messages
name those ids (pure).

Ids are validated as 64 hex digits before they get here, so every name is safe to pass to
netlink and iptables. Linux interface names are at most 15 characters.
"""

from __future__ import annotations

import hashlib

from .model import IPAddress

BRIDGE_PREFIX = "pyb-"
HOST_VETH_PREFIX = "pyv"
CONTAINER_VETH_PREFIX = "pyc"
# Spare veth pairs, made ahead of the endpoints that take them (spares.py): an endpoint given a
# spare keeps its names (renaming an interface waits as long as creating one).
SPARE_HOST_PREFIX = "pys"
SPARE_PEER_PREFIX = "pyt"
VXLAN_PREFIX = "pyx-"  # the tunnel of a network that spans hosts
# The interface group (`ip link ... group N`) of removed containers' veths waiting to be
# deleted together (veths.Veths): "pybr" in ASCII, a number nobody else picks by chance.
RETIRED_LINK_GROUP = 0x70796272


def short(identifier: str) -> str:
    """How messages and logs name a Docker id: its first 12 hex digits, as the docker CLI."""
    return identifier[:12]


def bridge_name(network_id: str) -> str:
    return BRIDGE_PREFIX + network_id[:11]


def vxlan_name(network_id: str) -> str:
    return VXLAN_PREFIX + network_id[:11]


def host_veth_name(endpoint_id: str) -> str:
    return HOST_VETH_PREFIX + endpoint_id[:12]


def container_veth_name(endpoint_id: str) -> str:
    return CONTAINER_VETH_PREFIX + endpoint_id[:12]


def is_pybridge_bridge(name: str) -> bool:
    return name.startswith(BRIDGE_PREFIX)


def spare_veth_names(token: str) -> tuple[str, str]:
    """The host and peer names of a spare pair, from 12 random hex digits."""
    return SPARE_HOST_PREFIX + token, SPARE_PEER_PREFIX + token


def is_spare_veth(name: str) -> bool:
    return name.startswith((SPARE_HOST_PREFIX, SPARE_PEER_PREFIX)) and len(name) == 15


def is_pybridge_veth(name: str) -> bool:
    """An endpoint's veth or a spare pair's (either end)."""
    prefixes = (HOST_VETH_PREFIX, CONTAINER_VETH_PREFIX, SPARE_HOST_PREFIX, SPARE_PEER_PREFIX)
    return name.startswith(prefixes) and len(name) == 15


def _mac_from(seed: str) -> str:
    digest = hashlib.sha256(seed.encode()).digest()
    # 0x02: locally administered, unicast.
    octets = [0x02, *digest[:5]]
    return ":".join(f"{b:02x}" for b in octets)


def endpoint_mac(endpoint_id: str, address: IPAddress | None = None, attempt: int = 0) -> str:
    """The MAC given to a container interface when Docker supplies none, derived from its
    address, so a container that restarts with the same address comes back with the same MAC
    and nobody's ARP or neighbour cache points at a MAC that no longer exists:

    * IPv4: 02:50 followed by the four bytes of the address (as Docker's bridge used to do
      with 02:42), so two addresses never share one;
    * IPv6: 02 and 40 bits of a hash of the whole address (its low bits alone would repeat
      across prefixes, and in a /64 anything can differ above them);
    * no address: a hash of the endpoint id.

    ``attempt`` > 0 gives the next candidates of a fixed sequence, for when another endpoint
    of the network already has the first (the driver checks)."""
    if address is None:
        return _mac_from("endpoint:" + endpoint_id + (f"#{attempt}" if attempt else ""))
    if address.version == 4 and not attempt:
        return ":".join(f"{b:02x}" for b in (0x02, 0x50, *address.packed))
    return _mac_from(f"address:{address}" + (f"#{attempt}" if attempt else ""))


def bridge_mac(network_id: str) -> str:
    """A fixed bridge MAC, so it does not change as ports come and go (as CNI's bridge does)."""
    return _mac_from("bridge:" + network_id)
