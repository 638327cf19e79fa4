"""The IPAM driver's options for networks that span hosts (--ipam-opt pybridge.segment)."""

from __future__ import annotations

from typing import Any

import pytest

from pydriver.errors import InvalidRequest, Unsupported
from pydriver.ipamdriver import IpamDriver
from pydriver.protocol import RequestPoolRequest
from tests.unit.fakes import FakeStore


async def test_the_segment_ipam_option_needs_a_cluster() -> None:
    async def no_routes() -> list[Any]:
        return []

    ipam = IpamDriver(FakeStore(), no_routes)
    await ipam.load()
    req = RequestPoolRequest("PybridgeLocal", None, None, {"pybridge.segment": "seg"}, False)
    with pytest.raises(InvalidRequest, match="needs pybridge started in a cluster"):
        await ipam.request_pool(req)
    other = RequestPoolRequest("PybridgeLocal", None, None, {"foo": "1"}, False)
    with pytest.raises(Unsupported, match=r"takes only --ipam-opt pybridge\.segment=NAME"):
        await ipam.request_pool(other)


async def test_a_segment_address_waiting_on_etcd_holds_up_no_other_pool() -> None:
    """A claim waits on the cluster (up to 2 s); the IPAM driver's lock is not held meanwhile,
    so addresses of every other pool come at once."""
    import asyncio
    import ipaddress

    from pydriver.errors import HostError
    from pydriver.protocol import RequestAddressRequest

    class SlowSegments:
        seg_pool = ""

        def pool_segment(self, pool_id: str) -> str | None:
            return "seg" if pool_id == self.seg_pool else None

        async def segment_subnet(self, name: str, *, v6: bool) -> Any:
            raise AssertionError

        def pick(self, pool_id: str, subnet: Any, used: Any, wanted: Any) -> Any:
            return None

        async def claim_for(self, pool_id: str, subnet: Any, wanted: Any) -> None:
            await asyncio.sleep(2.0)  # etcd away, no free address: the stated bound
            raise HostError("pybridge cannot reach the cluster store and holds no free address")

        async def release_pool(self, pool_id: str) -> None:
            pass

    async def no_routes() -> list[Any]:
        return []

    segments = SlowSegments()
    ipam = IpamDriver(FakeStore(), no_routes, segments=segments)
    await ipam.load()
    seg_id, _, _ = await ipam.request_pool(
        RequestPoolRequest("PybridgeLocal", ipaddress.ip_network("10.70.0.0/16"), None, {}, False)
    )
    segments.seg_pool = seg_id
    local_id, _, _ = await ipam.request_pool(
        RequestPoolRequest("PybridgeLocal", ipaddress.ip_network("10.80.0.0/24"), None, {}, False)
    )
    waiting = asyncio.create_task(
        ipam.request_address(RequestAddressRequest(seg_id, None, False, {}))
    )
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await ipam.request_address(RequestAddressRequest(local_id, None, False, {}))
    assert loop.time() - start < 0.5
    with pytest.raises(HostError, match="cannot reach the cluster store"):
        await waiting
