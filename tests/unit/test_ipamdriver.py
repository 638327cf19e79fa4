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
