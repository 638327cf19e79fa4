"""The state database."""

from __future__ import annotations

import ipaddress
import sqlite3
import stat
from pathlib import Path

import pytest

from pydriver.errors import HostError
from pydriver.ipam import Pool
from pydriver.model import (
    BridgeSettings,
    Endpoint,
    Network,
    NetworkOptions,
    PortBinding,
    Subnet,
)
from pydriver.store import DB_NAME, SCHEMA_VERSION, Store

from .fakes import hexid

NET = hexid("store-net")
EP = hexid("store-ep")


def network() -> Network:
    return Network(
        id=NET,
        bridge="recbr",
        bridge_owned=False,
        subnets_v4=(
            Subnet(
                ipaddress.ip_network("10.216.0.0/24"),
                ipaddress.ip_interface("10.216.0.1/24"),
                (ipaddress.ip_address("10.216.0.5"),),
            ),
        ),
        subnets_v6=(
            Subnet(ipaddress.ip_network("fd00:216::/64"), ipaddress.ip_interface("fd00:216::1/64")),
        ),
        options=NetworkOptions(
            bridge_name="recbr",
            enable_icc=False,
            host_binding_ipv4=ipaddress.ip_address("127.0.0.1"),
            mtu=1400,
            container_iface_prefix="lan",
        ),
        internal=True,
        enable_ipv6=True,
        raw_options={"mtu": "1400"},
        state="creating",
        previous_settings=BridgeSettings(route_localnet="0", accept_ra="2", mtu=9000, up=False),
    )


def endpoint() -> Endpoint:
    return Endpoint(
        id=EP,
        network_id=NET,
        host_veth="pyv" + EP[:12],
        container_veth="pyc" + EP[:12],
        mac_address="02:42:ac:11:00:02",
        mac_generated=False,
        address=ipaddress.IPv4Interface("10.216.0.200/24"),
        address_v6=ipaddress.IPv6Interface("fd00:216::2/64"),
        sandbox_key="/var/run/docker/netns/e61ac536cf4e",
        port_bindings=(PortBinding("udp", 53, ipaddress.ip_address("127.0.0.1"), 5300, 5310),),
        exposed_ports=(("tcp", 80), ("udp", 53)),
    )


async def test_round_trip_and_cascade(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    try:
        await store.put_network(network())
        await store.put_endpoint(endpoint())
        assert await store.load_networks() == [network()]
        assert await store.load_endpoints() == [endpoint()]
        await store.delete_network(NET)
        assert await store.load_networks() == []
        assert await store.load_endpoints() == []
        assert await store.check_integrity() == "ok"
    finally:
        store.close()


def test_a_network_record_from_before_previous_settings_loads() -> None:
    data = network().to_dict()
    del data["previous_settings"]
    assert Network.from_dict(data) == network().with_changes(previous_settings=BridgeSettings())
    data["previous_settings"] = {"accept_ra": "2"}
    assert Network.from_dict(data).previous_settings == BridgeSettings(accept_ra="2")


async def test_pools_and_addresses(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    try:
        pool = Pool(id="10.1.0.0/24", subnet=ipaddress.ip_network("10.1.0.0/24"))
        await store.put_pool(pool)
        address = pool.allocate()
        await store.add_address(pool, str(address), "dynamic")
        # Not yet acknowledged: a restart sees both as answers Docker may retry.
        (loaded,) = await store.load_pools()
        assert loaded.replayable == {int(address): "dynamic"} and loaded.replayable_pool
        await store.acknowledge(pool.id)
        await store.acknowledge(pool.id, str(address))
        (loaded,) = await store.load_pools()
        assert loaded == pool
        with pytest.raises(HostError):
            # the primary key refuses a duplicate
            await store.add_address(pool, str(address), "dynamic")
        await store.remove_address(pool.id, str(address))
        assert (await store.load_pools())[0].allocated == set()
        await store.delete_pool(pool.id)
        assert await store.load_pools() == []
    finally:
        store.close()


def test_database_file_is_private(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.close()
    mode = stat.S_IMODE((tmp_path / "state" / DB_NAME).stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "state").close()
    db = sqlite3.connect(tmp_path / "state" / DB_NAME)
    with db:
        db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    db.close()
    with pytest.raises(HostError, match="newer pybridge"):
        Store(tmp_path / "state")


def test_unusable_state_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(HostError, match="cannot open the state database"):
        Store(blocker / "state")
