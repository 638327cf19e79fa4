"""The cluster's shared vocabulary: the store's address, the keys, a segment's record and the
sentence that says how two hosts' definitions differ."""

from __future__ import annotations

import ipaddress

import pytest

from pydriver.clustermodel import (
    PREFIX,
    VNI_RANGE,
    Segment,
    block_from_key,
    block_key,
    check_segment_name,
    differences,
    endpoint_key,
    member_key,
    parse_cluster,
    vni_candidates,
)
from pydriver.errors import InvalidRequest


def test_cluster_addresses() -> None:
    assert parse_cluster("etcd://10.0.0.5") == [("10.0.0.5", 2379)]
    assert parse_cluster("etcd://10.0.0.5:2380,etcd-b:2379,[fd00::5]:12379,[fd00::6]") == [
        ("10.0.0.5", 2380),
        ("etcd-b", 2379),
        ("fd00::5", 12379),
        ("fd00::6", 2379),
    ]


@pytest.mark.parametrize(
    "text",
    ["http://10.0.0.5:2379", "etcd://", "etcd://a b", "etcd://h:0", "etcd://h:99999", "etcd://h,"],
)
def test_bad_cluster_addresses_are_one_sentence(text: str) -> None:
    with pytest.raises(InvalidRequest, match="--cluster"):
        parse_cluster(text)


def test_segment_names() -> None:
    assert check_segment_name("prod-web_1.a") == "prod-web_1.a"
    for bad in ("", "-x", "a/b", "a" * 64, "x\n"):
        with pytest.raises(InvalidRequest, match="not a valid segment name"):
            check_segment_name(bad)


def test_keys() -> None:
    block = ipaddress.ip_network("10.70.1.0/26")
    assert block_key("web", block) == f"{PREFIX}blocks/web/10.70.1.0-26"
    assert block_from_key(block_key("web", block)) == block
    six = ipaddress.ip_network("fd00:70::40/122")
    assert block_from_key(block_key("web", six)) == six
    assert member_key("web", "h1") == f"{PREFIX}members/web/h1"
    assert (
        endpoint_key("web", ipaddress.ip_address("10.70.1.5")) == f"{PREFIX}endpoints/web/10.70.1.5"
    )


def test_a_segment_round_trips_and_ignores_fields_it_does_not_know() -> None:
    segment = Segment("web", ("10.70.0.0/16",), ("10.70.0.1",), vni=42)
    assert Segment.from_json(segment.to_json()) == segment
    newer = segment.to_json()[:-1] + ', "encrypted": true}'
    assert Segment.from_json(newer) == segment


def test_differences_name_each_setting_in_one_sentence() -> None:
    recorded = Segment("web", ("10.70.0.0/16",), ("10.70.0.1",), vni=42)
    assert differences(Segment("web", ("10.70.0.0/16",), ("10.70.0.1",), vni=0), recorded) is None
    wanted = Segment("web", ("10.71.0.0/16",), ("10.71.0.1",), vni=0, internal=True)
    sentence = differences(wanted, recorded)
    assert sentence == (
        "segment web already exists in the cluster with other settings: subnets 10.71.0.0/16 "
        "(the cluster has 10.70.0.0/16); gateways 10.71.0.1 (the cluster has 10.70.0.1); "
        "--internal true (the cluster has false); create the network with the cluster's "
        "settings, or use another segment name"
    )


def test_vnis_stay_below_dockers_overlay_range() -> None:
    candidates = vni_candidates("web")
    assert len(set(candidates)) == 16
    assert all(v in VNI_RANGE and v < 4096 for v in candidates)
    assert vni_candidates("web") == candidates  # every host tries the same ones
