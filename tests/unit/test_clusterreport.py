"""What `pydriver status` and `doctor` say about the cluster (clusterreport.compare and
checks.check_cluster, pure)."""

from __future__ import annotations

import ipaddress
import json

import pytest

from pydriver.checks import check_cluster
from pydriver.clusterreport import compare, format_cluster
from pydriver.clusterview import ClusterView
from pydriver.model import Network, Subnet
from pydriver.tunnel import TunnelEntries

ip = ipaddress.ip_address
NETWORK = Network(
    id="a" * 64,
    bridge="pyb-aaaaaaaaaaa",
    bridge_owned=True,
    subnets_v4=(Subnet(ipaddress.ip_network("10.70.0.0/16"), None),),
    subnets_v6=(),
    raw_options={"pybridge.segment": "seg"},
)
RECORD = {
    "cluster": "etcd://203.0.113.254:2379",
    "host": "h1",
    "vtep": "203.0.113.1",
    "vxlan_port": 4789,
    "segments": {"seg": json.dumps({"vni": 7, "mtu": 1450, "subnets": ["10.70.0.0/16"]})},
    "blocks": {"seg": ["10.70.1.0/26"]},
}


def view() -> ClusterView:
    return ClusterView.read(
        5,
        [
            ("/pybridge/v1/hosts/h1", b'{"vtep": "203.0.113.1"}'),
            ("/pybridge/v1/hosts/h2", b'{"vtep": "203.0.113.2"}'),
            ("/pybridge/v1/members/seg/h1", b'{"vtep": "203.0.113.1"}'),
            ("/pybridge/v1/members/seg/h2", b'{"vtep": "203.0.113.2"}'),
            (
                "/pybridge/v1/endpoints/seg/10.70.2.5",
                b'{"host": "h2", "mac": "02:00:00:00:00:02", "vtep": "203.0.113.2"}',
            ),
        ],
    )


def test_a_tunnel_as_the_store_says_is_reported_ok() -> None:
    entries = TunnelEntries(
        frozenset({ip("203.0.113.2")}),
        {"02:00:00:00:00:02": ip("203.0.113.2")},
        {ip("10.70.2.5"): "02:00:00:00:00:02"},
    )
    report = compare(RECORD, [NETWORK], view(), {"pyx-aaaaaaaaaaa": entries}, None)
    (seg,) = report.segments
    assert (seg.vni, seg.mtu, seg.blocks, seg.disagreements) == (7, 1450, ("10.70.1.0/26",), ())
    assert report.hosts == {"h1": "203.0.113.1", "h2": "203.0.113.2"}
    assert [f.kind for f in check_cluster(report)] == ["tunnel-ok"]
    assert "tunnel entries: as the cluster store says" in "\n".join(format_cluster(report))


def test_missing_and_stale_entries_are_named() -> None:
    entries = TunnelEntries(frozenset(), {}, {ip("10.70.9.9"): "02:00:00:00:00:09"})
    report = compare(RECORD, [NETWORK], view(), {"pyx-aaaaaaaaaaa": entries}, None)
    (seg,) = report.segments
    assert "stale neighbour entry 10.70.9.9" in seg.disagreements
    assert "no flood entry for member 203.0.113.2" in seg.disagreements
    (finding,) = check_cluster(report)
    assert (finding.ok, finding.kind) == (False, "tunnel-drift")
    text = "\n".join(format_cluster(report))
    assert "PROBLEM: 4 tunnel entries disagree" in text


def test_a_missing_device_and_an_unreachable_store() -> None:
    report = compare(RECORD, [NETWORK], view(), {"pyx-aaaaaaaaaaa": None}, None)
    assert [f.kind for f in check_cluster(report)] == ["tunnel-missing"]
    away = compare(RECORD, [NETWORK], None, {"pyx-aaaaaaaaaaa": None}, "etcd did not answer")
    assert [f.kind for f in check_cluster(away)] == ["cluster-unreachable"]
    assert "could not be read: etcd did not answer" in "\n".join(format_cluster(away))
    assert check_cluster(None) == []


async def test_forget_frees_a_gone_hosts_blocks_and_nothing_else() -> None:
    from pydriver.clusterreport import forget_host
    from pydriver.errors import Conflict
    from tests.unit.fakecluster import MemoryClusterStore

    store = MemoryClusterStore()
    lease = await store.grant(10)
    await store.put("/pybridge/v1/hosts/h2", b'{"vtep": "203.0.113.2"}', lease=lease)
    await store.put("/pybridge/v1/blocks/seg/10.70.0.0-26", b'{"host": "h2"}')
    await store.put("/pybridge/v1/blocks/seg/10.70.0.64-26", b'{"host": "h1"}')
    await store.put("/pybridge/v1/members/seg/h2", b'{"vtep": "203.0.113.2"}')
    await store.put("/pybridge/v1/segments/seg", b"{}")
    with pytest.raises(Conflict, match="is up"):
        await forget_host(store, "h2")
    await store.expire(lease)  # it stopped: its lease ended
    removed = await forget_host(store, "h2")
    assert sorted(removed) == [
        "/pybridge/v1/blocks/seg/10.70.0.0-26",
        "/pybridge/v1/members/seg/h2",
    ]
    assert sorted(store.keys) == [
        "/pybridge/v1/blocks/seg/10.70.0.64-26",
        "/pybridge/v1/segments/seg",
    ]
