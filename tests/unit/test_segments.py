"""A segment's options and definition as one host sees them at network create."""

from __future__ import annotations

import ipaddress

import pytest

from pydriver import protocol as p
from pydriver.clustermodel import Segment, differences
from pydriver.errors import InvalidRequest
from pydriver.segments import (
    SegmentOptions,
    check_underlay,
    definition,
    segment_options,
)
from tests.unit.fakes import create_network_body, hexid


def test_options() -> None:
    assert segment_options({}) is None
    assert segment_options({"pybridge.segment": "web"}) == SegmentOptions("web")
    assert segment_options(
        {"pybridge.segment": "web", "pybridge.vni": "77", "pybridge.block_size": "16"}
    ) == SegmentOptions("web", 77, 16)
    with pytest.raises(InvalidRequest, match=r"only meaningful with pybridge\.segment"):
        segment_options({"pybridge.vni": "5"})
    with pytest.raises(InvalidRequest, match="not a whole number from 1 to 16777215"):
        segment_options({"pybridge.segment": "web", "pybridge.vni": "0"})
    with pytest.raises(InvalidRequest, match="not a valid segment name"):
        segment_options({"pybridge.segment": "web/1"})


def _request(internal: bool = False) -> p.CreateNetworkRequest:
    body = create_network_body(hexid("n1"), "10.70.0.0/16", "10.70.0.1/16", internal=internal)
    return p.parse_create_network(body)


def test_definition_and_what_a_second_host_is_told() -> None:
    ours = definition(
        SegmentOptions("web"),
        _request(),
        icc=True,
        underlay_mtu=1500,
        underlay_version=4,
        pool_owned_by_pybridge=True,
    )
    assert ours == Segment("web", ("10.70.0.0/16",), ("10.70.0.1",), vni=0, mtu=1450)
    recorded = Segment("web", ("10.70.0.0/16",), ("10.70.0.1",), vni=42, mtu=1400)
    assert differences(ours, recorded) is None  # VNI and MTU are the first host's choice
    internal = definition(
        SegmentOptions("web"),
        _request(internal=True),
        icc=True,
        underlay_mtu=1500,
        underlay_version=4,
        pool_owned_by_pybridge=True,
    )
    assert "--internal true (the cluster has false)" in str(differences(internal, recorded))


def test_dockers_own_address_management_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="--ipam-driver pybridge"):
        definition(
            SegmentOptions("web"),
            _request(),
            icc=True,
            underlay_mtu=1500,
            underlay_version=4,
            pool_owned_by_pybridge=False,
        )


def test_an_underlay_too_small_for_the_segment() -> None:
    segment = Segment("web", ("10.70.0.0/16",), ("10.70.0.1",), vni=42, mtu=1450)
    check_underlay(segment, 1500, 4)
    with pytest.raises(InvalidRequest, match="carries at most 1430 once encapsulated"):
        check_underlay(segment, 1500, 6)
    assert ipaddress.ip_network(segment.subnets[0]).num_addresses == 65536


def test_block_sizes_and_aux_addresses_are_checked_before_anything_is_recorded() -> None:
    def define(options: SegmentOptions, subnet: str, aux: bool = False) -> Segment:
        net = ipaddress.ip_network(subnet)
        body = create_network_body(hexid("n1"), subnet, f"{net[1]}/{net.prefixlen}")
        if aux:
            body["IPv4Data"][0]["AuxAddresses"] = {"router": f"{net[2]}/{net.prefixlen}"}
        return definition(
            options,
            p.parse_create_network(body),
            icc=True,
            underlay_mtu=1500,
            underlay_version=4,
            pool_owned_by_pybridge=True,
        )

    # The default is chosen per subnet (0 in the record): a /24 gets 16 blocks of 16.
    assert define(SegmentOptions("web"), "10.70.0.0/24").block_size == 0
    with pytest.raises(InvalidRequest, match=r"pybridge\.block_size 256: blocks of 256"):
        define(SegmentOptions("web", block_size=256), "10.70.0.0/25")
    with pytest.raises(InvalidRequest, match="--aux-address is not supported"):
        define(SegmentOptions("web"), "10.70.0.0/24", aux=True)
