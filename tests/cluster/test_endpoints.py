"""Several etcd endpoints in --cluster: one gRPC target, a dead one passed over."""

from __future__ import annotations

import socket

import pytest

from pydriver.errors import InvalidRequest
from pydriver.etcdstore import EtcdStore, grpc_target
from tests.cluster.conftest import Etcd


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_two_endpoints_both_alive_and_a_dead_first(etcd: Etcd) -> None:
    host, port = etcd.endpoint
    for endpoints in ([(host, port), (host, port)], [(host, _closed_port()), (host, port)]):
        store = EtcdStore(endpoints, timeout=3.0)
        try:
            assert await store.get("/pybridge/v1/nothing") is None
        finally:
            await store.close()


def test_targets() -> None:
    assert grpc_target([("etcd.example", 2379)]) == ("etcd.example", 2379)
    assert grpc_target([("10.0.0.1", 2379), ("10.0.0.2", 2380)]) == (
        "ipv4:10.0.0.1:2379,10.0.0.2",
        2380,
    )
    assert grpc_target([("fd00::1", 2379), ("fd00::2", 2379)]) == (
        "ipv6:[fd00::1]:2379,[fd00::2]",
        2379,
    )
    with pytest.raises(InvalidRequest, match="by address when there are several"):
        grpc_target([("a.example", 2379), ("10.0.0.2", 2379)])
