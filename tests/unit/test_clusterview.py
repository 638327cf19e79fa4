"""This host's copy of the cluster store, change by change."""

from __future__ import annotations

import ipaddress
import json

from pydriver.clustermodel import (
    PREFIX,
    Segment,
    block_key,
    endpoint_key,
    host_key,
    member_key,
    segment_key,
)
from pydriver.clusterview import ClusterView
from pydriver.tunnel import RemoteEndpoint

ip = ipaddress.ip_address


def j(**values: object) -> bytes:
    return json.dumps(values).encode()


def test_a_read_then_changes() -> None:
    segment = Segment("web", ("10.70.0.0/16",), ("10.70.0.1",), vni=42)
    view = ClusterView.read(
        10,
        [
            (host_key("h1"), j(vtep="203.0.113.1")),
            (segment_key("web"), segment.to_json().encode()),
            (member_key("web", "h2"), j(vtep="203.0.113.2")),
            (block_key("web", ipaddress.ip_network("10.70.1.0/26")), j(host="h2")),
            (
                endpoint_key("web", ip("10.70.1.5")),
                j(host="h2", mac="02:00:00:00:00:05", vtep="203.0.113.2"),
            ),
            (
                endpoint_key("web", ip("fd70::1:5")),
                j(host="h2", mac="02:00:00:00:00:05", vtep="203.0.113.2"),
            ),
        ],
    )
    web = view.segments["web"]
    assert view.revision == 10
    assert view.hosts == {"h1": ip("203.0.113.1")}
    assert web.definition == segment
    assert web.members == {"h2": ip("203.0.113.2")}
    assert web.blocks == {ipaddress.ip_network("10.70.1.0/26"): "h2"}
    assert web.remote_endpoints() == [
        RemoteEndpoint("02:00:00:00:00:05", ip("203.0.113.2"), (ip("10.70.1.5"), ip("fd70::1:5")))
    ]
    assert view.apply("delete", member_key("web", "h2"), b"", 11) == "web"
    assert view.apply("delete", endpoint_key("web", ip("10.70.1.5")), b"", 12) == "web"
    assert web.members == {}
    assert [e.addresses for e in web.remote_endpoints()] == [(ip("fd70::1:5"),)]
    assert view.revision == 12


def test_what_cannot_be_read_is_passed_over() -> None:
    view = ClusterView()
    assert view.apply("put", member_key("web", "h2"), b"not json", 3) is None
    assert view.apply("put", f"{PREFIX}future/thing", b"{}", 4) is None
    assert view.apply("put", "/elsewhere/x", b"{}", 5) is None
    assert view.apply("put", endpoint_key("web", ip("10.70.0.9")), j(host="h2"), 6) is None
    assert view.revision == 6
    assert view.segments["web"].endpoints == {}
