"""A network that spans hosts (a segment), as one host sees it at `docker network create`
(pure): the options that name and shape it, the definition the cluster must agree on, and the
checks a segment's network must pass on this host.

    docker network create -d pybridge --ipam-driver pybridge -o pybridge.segment=NAME \\
        --subnet 10.70.0.0/16 NAME

The first host records the definition (clustermodel.Segment) with a compare-and-set; every
later one must ask for the same, or is told in one sentence what differs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .blocks import SMALLEST_BLOCK, block_prefix
from .clustermodel import DEFAULT_VXLAN_PORT, VNI_RANGE, Segment, check_segment_name
from .errors import InvalidRequest
from .protocol import CreateNetworkRequest
from .tunnel import mtu_for

SEGMENT = "pybridge.segment"
VNI = "pybridge.vni"
BLOCK_SIZE = "pybridge.block_size"
CLUSTER_KEYS = (SEGMENT, VNI, BLOCK_SIZE)


@dataclass(frozen=True)
class SegmentOptions:
    name: str
    vni: int = 0  # 0: chosen when the segment is first recorded
    block_size: int = 0  # 0: the default for its pools


def segment_options(generic: Mapping[str, str]) -> SegmentOptions | None:
    """The segment a network joins, if its options name one."""
    name = generic.get(SEGMENT)
    if name is None:
        for key in (VNI, BLOCK_SIZE):
            if key in generic:
                raise InvalidRequest(f"{key} is only meaningful with {SEGMENT}=NAME")
        return None
    return SegmentOptions(
        check_segment_name(name),
        _number(generic, VNI, VNI_RANGE.start, 2**24 - 1),
        _number(generic, BLOCK_SIZE, SMALLEST_BLOCK, 2**16),
    )


def _number(generic: Mapping[str, str], key: str, low: int, high: int) -> int:
    raw = generic.get(key)
    if raw is None:
        return 0
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidRequest(f"{key} {raw[:20]!r} is not a whole number from {low} to {high}")
    return int(raw)


def definition(
    options: SegmentOptions,
    req: CreateNetworkRequest,
    *,
    icc: bool,
    underlay_mtu: int,
    underlay_version: int,
    vxlan_port: int = DEFAULT_VXLAN_PORT,
    pool_owned_by_pybridge: bool,
) -> Segment:
    """What this host asks the segment to be. Refused: a segment whose addresses Docker's own
    IPAM would hand out (each host would give out the same ones), and one without a subnet."""
    if not pool_owned_by_pybridge:
        raise InvalidRequest(
            f"a network with {SEGMENT} must take its addresses from pybridge "
            "(--ipam-driver pybridge): Docker's own address management on each host would "
            "give the same addresses to containers on different hosts"
        )
    data = (*req.ipv4_data, *req.ipv6_data)
    if not data:
        raise InvalidRequest(f"a network with {SEGMENT} needs a subnet; give one with --subnet")
    if any(d.aux_addresses for d in data):
        raise InvalidRequest(
            f"--aux-address is not supported on a network with {SEGMENT}: another host would "
            "hand the address out"
        )
    for d in data:
        try:
            block_prefix(d.pool, options.block_size or None)
        except ValueError as err:
            raise InvalidRequest(f"{BLOCK_SIZE} {options.block_size}: {err}") from None
    return Segment(
        name=options.name,
        subnets=tuple(str(d.pool) for d in data),
        gateways=tuple(str(d.gateway.ip) if d.gateway else "" for d in data),
        vni=options.vni,
        vxlan_port=vxlan_port,
        mtu=mtu_for(underlay_mtu, underlay_version),
        block_size=options.block_size,  # 0: chosen for each subnet (blocks.block_prefix)
        internal=req.internal,
        icc=icc,
    )


def check_underlay(segment: Segment, underlay_mtu: int, underlay_version: int) -> None:
    """Whether this host's underlay carries the segment's MTU once encapsulated."""
    largest = mtu_for(underlay_mtu, underlay_version)
    if largest < segment.mtu:
        raise InvalidRequest(
            f"segment {segment.name} uses MTU {segment.mtu}, but this host's underlay (MTU "
            f"{underlay_mtu}) carries at most {largest} once encapsulated in VXLAN; raise the "
            "underlay's MTU, or give --advertise-address an interface with a larger one"
        )
