"""The state database."""

from __future__ import annotations

import ipaddress
import sqlite3
import stat
from pathlib import Path

import pytest

from pydriver.errors import HostError
from pydriver.ipam import PendingAnswer, Pool
from pydriver.model import Endpoint, Network, NetworkOptions, PortBinding, Subnet
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


async def test_pools_and_addresses(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    try:
        pool = Pool(id="10.1.0.0/24", subnet=ipaddress.ip_network("10.1.0.0/24"))
        await store.put_pool(pool, 1000.0)
        address = pool.allocate()
        answer = PendingAnswer("dynamic", 1000.5, "web")
        await store.add_address(pool, str(address), "dynamic", 1000.5, "web")
        # Not yet acknowledged: a restart sees both as answers Docker may retry, with when
        # they were given and to what request.
        (loaded,) = await store.load_pools()
        assert loaded.replayable == {int(address): answer}
        assert loaded.replayable_pool and loaded.pool_recorded_at == 1000.0
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


V2_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE networks (id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE endpoints (id TEXT PRIMARY KEY, network_id TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE pools (id TEXT PRIMARY KEY, data TEXT NOT NULL, pending INTEGER NOT NULL DEFAULT 0);
CREATE TABLE addresses (
    pool_id TEXT NOT NULL, address TEXT NOT NULL,
    pending INTEGER NOT NULL DEFAULT 0, kind TEXT NOT NULL DEFAULT 'dynamic',
    PRIMARY KEY (pool_id, address));
INSERT INTO meta VALUES ('schema_version', '2');
INSERT INTO pools VALUES ('10.1.0.0/24', '{"id": "10.1.0.0/24", "subnet": "10.1.0.0/24"}', 1);
INSERT INTO addresses VALUES ('10.1.0.0/24', '10.1.0.1', 1, 'gateway');
INSERT INTO addresses VALUES ('10.1.0.0/24', '10.1.0.2', 1, 'dynamic');
INSERT INTO addresses VALUES ('10.1.0.0/24', '10.1.0.3', 0, 'dynamic');
"""


async def test_schema_2_is_migrated_and_its_pending_answers_count_as_expired(
    tmp_path: Path,
) -> None:
    """Pending answers of a pybridge before schema 3 carry no time: nobody can say whether
    Docker's retry window is over, so they are never replayed (they stay allocated)."""
    (tmp_path / "state").mkdir()
    db = sqlite3.connect(tmp_path / "state" / DB_NAME)
    db.executescript(V2_SCHEMA)
    db.close()
    store = Store(tmp_path / "state")
    try:
        assert await store.get_meta("schema_version") == str(SCHEMA_VERSION) == "3"
        (pool,) = await store.load_pools()
        assert pool.replayable == {
            int(ipaddress.ip_address("10.1.0.1")): PendingAnswer("gateway"),
            int(ipaddress.ip_address("10.1.0.2")): PendingAnswer("dynamic"),
        }
        assert pool.replayable_pool and pool.pool_recorded_at is None
        assert not pool.pool_replayable(0.0)
        assert pool.claim_replay(None, gateway=True, now=0.0) is None
        assert len(pool.allocated) == 3
    finally:
        store.close()
