"""What hosts of a cluster share in the store (pure): the address of the store, the keys, and
the records of a segment (a pybridge network that spans hosts) with the one sentence that says
how two hosts' definitions of it differ.

Keys live under PREFIX (a version in the path lets a later layout live beside this one):

    hosts/<host id>                      a host that is up (under its lease)
    segments/<name>                      a segment's definition (written once, by the first host)
    vnis/<vni>                           the segment that has the VNI (created with the segment)
    members/<segment>/<host id>          a host that has the segment (under its lease)
    blocks/<segment>/<block>             which host holds a block of addresses (no lease: see
                                         blocks.py)
    endpoints/<segment>/<address>        a container's MAC and host (under its host's lease)
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from .errors import InvalidRequest
from .model import IPAddress, IPNetwork

PREFIX = "/pybridge/v1/"
DEFAULT_PORT = 2379
# Docker's overlay driver takes VNIs from 4096 up: pybridge's default range stays below.
VNI_RANGE = range(1, 4096)
DEFAULT_VXLAN_PORT = 4789
SEGMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True)
class Entry:
    """A key of the cluster store as read."""

    key: str
    value: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class Change:
    """A change the watch reports."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes
    revision: int


def parse_cluster(text: str) -> list[tuple[str, int]]:
    """``etcd://HOST[:PORT][,HOST[:PORT]...]`` as (host, port) pairs; IPv6 hosts in brackets."""
    scheme = "etcd://"
    if not text.startswith(scheme) or len(text) == len(scheme):
        raise InvalidRequest(
            f"--cluster {text!r} is not etcd://HOST[:PORT][,HOST[:PORT]...] "
            "(for example etcd://10.0.0.5:2379,10.0.0.6:2379)"
        )
    endpoints = []
    for part in text[len(scheme) :].split(","):
        match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([A-Za-z0-9.-]+)(?::(\d+))?", part)
        if match is None:
            raise InvalidRequest(f"--cluster: {part!r} is not HOST or HOST:PORT")
        host = match.group(1) or match.group(3)
        port = int(match.group(2) or match.group(4) or DEFAULT_PORT)
        if not 0 < port < 65536:
            raise InvalidRequest(f"--cluster: port {port} of {host} is not between 1 and 65535")
        endpoints.append((host, port))
    return endpoints


def check_segment_name(name: str) -> str:
    if not SEGMENT_NAME.fullmatch(name):
        raise InvalidRequest(
            f"pybridge.segment {name[:70]!r} is not a valid segment name: use 1 to 63 letters, "
            "digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


def host_key(host_id: str) -> str:
    return f"{PREFIX}hosts/{host_id}"


def segment_key(name: str) -> str:
    return f"{PREFIX}segments/{name}"


def vni_key(vni: int) -> str:
    return f"{PREFIX}vnis/{vni}"


def member_key(segment: str, host_id: str) -> str:
    return f"{PREFIX}members/{segment}/{host_id}"


def block_key(segment: str, block: IPNetwork) -> str:
    return f"{PREFIX}blocks/{segment}/{str(block).replace('/', '-')}"


def endpoint_key(segment: str, address: IPAddress) -> str:
    return f"{PREFIX}endpoints/{segment}/{address}"


def block_from_key(key: str) -> IPNetwork:
    """The block a blocks/ key names."""
    return ipaddress.ip_network(key.rsplit("/", 1)[-1].replace("-", "/"))


@dataclass(frozen=True)
class Segment:
    """What every host of a segment must agree on."""

    name: str
    subnets: tuple[str, ...]  # the pools, as CIDR text
    gateways: tuple[str, ...]  # one per pool: the same address on every host
    vni: int
    vxlan_port: int = DEFAULT_VXLAN_PORT
    mtu: int = 1450
    block_size: int = 0  # addresses per block; 0: chosen for each subnet
    internal: bool = False
    icc: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Segment:
        data: Any = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a segment record must be a JSON object")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["subnets"] = tuple(values.get("subnets", ()))
        values["gateways"] = tuple(values.get("gateways", ()))
        return cls(**values)


# How each field is named in the sentence a user sees.
_FIELD_NAMES: Mapping[str, str] = {
    "subnets": "subnets",
    "gateways": "gateways",
    "vni": "VNI",
    "vxlan_port": "VXLAN port",
    "mtu": "MTU",
    "block_size": "address block size",
    "internal": "--internal",
    "icc": "com.docker.network.bridge.enable_icc",
}


def _show(value: object) -> str:
    return ", ".join(value) if isinstance(value, tuple) else str(value).lower()


def differences(wanted: Segment, recorded: Segment) -> str | None:
    """One sentence naming what this host asks for that differs from the segment as the
    cluster has it (None when they agree). The VNI and block size are left out when this host
    did not choose them (0), and so is the MTU (the first host chose it)."""
    found = []
    for f in fields(Segment):
        if f.name == "name":
            continue
        ours, theirs = getattr(wanted, f.name), getattr(recorded, f.name)
        if f.name in ("vni", "block_size") and ours == 0:
            continue
        if f.name == "mtu":
            continue  # the first host's choice; segments.check_underlay tells if ours carries it
        if ours != theirs:
            found.append(f"{_FIELD_NAMES[f.name]} {_show(ours)} (the cluster has {_show(theirs)})")
    if not found:
        return None
    return (
        f"segment {wanted.name} already exists in the cluster with other settings: "
        + "; ".join(found)
        + "; create the network with the cluster's settings, or use another segment name"
    )


def vni_candidates(name: str, tries: int = 16) -> list[int]:
    """VNIs to try for a new segment, in order: a start chosen from its name, then the next
    ones (the store's compare-and-set on vnis/<vni> decides)."""
    start = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % len(VNI_RANGE)
    return [VNI_RANGE[(start + i) % len(VNI_RANGE)] for i in range(tries)]
