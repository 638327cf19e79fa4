"""The state database."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pydriver import protocol as p
from pydriver.checks import check_database
from pydriver.errors import Conflict, HostError
from pydriver.instance import LOCK_NAME
from pydriver.ipam import Pool, UnacknowledgedAnswer
from pydriver.ipamdriver import ULA_META_KEY, IpamDriver
from pydriver.model import (
    BridgeSettings,
    Endpoint,
    HostRoute,
    Network,
    NetworkOptions,
    PortBinding,
    Subnet,
)
from pydriver.store import (
    CHECKPOINT_EVERY,
    DB_NAME,
    SCHEMA_VERSION,
    PoolRecord,
    SqliteStore,
    StateHealth,
    SyncStore,
    read_pools,
    read_state,
    state_health,
)

from .fakes import FakeKernel, FakeStore, hexid

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


@pytest.fixture(params=["sqlite", "memory"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqliteStore | FakeStore]:
    """The SQLite store, and the tests' in-memory one, which must behave the same."""
    if request.param == "memory":
        yield FakeStore()
        return
    store = SqliteStore(tmp_path / "state")
    yield store
    assert store._sync.check_integrity() == "ok"
    store.close()


async def test_round_trip_and_cascade(any_store: SqliteStore | FakeStore) -> None:
    store = any_store
    await store.put_network(network())
    await store.put_endpoint(endpoint())
    assert await store.load_networks() == [network()]
    assert await store.load_endpoints() == [endpoint()]
    await store.delete_network(NET)
    assert await store.load_networks() == []
    assert await store.load_endpoints() == []


def test_a_network_record_from_before_previous_settings_loads() -> None:
    data = network().to_dict()
    del data["previous_settings"]
    assert Network.from_dict(data) == network().with_changes(previous_settings=BridgeSettings())
    data["previous_settings"] = {"accept_ra": "2"}
    assert Network.from_dict(data).previous_settings == BridgeSettings(accept_ra="2")


async def test_pools_and_addresses(any_store: SqliteStore | FakeStore) -> None:
    store = any_store
    pool = Pool(id="10.1.0.0/24", subnet=ipaddress.ip_network("10.1.0.0/24"))
    await store.put_pool(pool, 1000.0)
    address = pool.allocate()
    answer = UnacknowledgedAnswer("dynamic", 1000.5, "web")
    await store.add_address(pool, str(address), "dynamic", 1000.5, "web")
    # Not yet acknowledged: a restart sees both as answers Docker may retry, with when
    # they were given and to what request.
    (loaded,) = await store.load_pools()
    assert loaded.unacknowledged == {int(address): answer}
    assert loaded.pool_unacknowledged
    assert loaded.pool_recorded_at == 1000.0
    await store.acknowledge(pool.id)
    await store.acknowledge(pool.id, str(address))
    (loaded,) = await store.load_pools()
    assert loaded == pool
    with pytest.raises(HostError):
        # the primary key refuses a duplicate
        await store.add_address(pool, str(address), "dynamic")
    second = pool.allocate()
    await store.add_address(pool, str(second), "gateway")
    await store.remove_addresses([(pool.id, str(address)), (pool.id, str(second))])
    assert (await store.load_pools())[0].allocated == set()
    await store.add_address(pool, str(address), "specific")
    await store.remove_address(pool.id, str(address))
    assert (await store.load_pools())[0].allocated == set()
    await store.delete_pool(pool.id)
    assert await store.load_pools() == []


async def test_settings_and_what_is_set_aside(any_store: SqliteStore | FakeStore) -> None:
    store = any_store
    assert await store.get_meta("ula_prefix") is None
    await store.set_meta("ula_prefix", "fd00:1::/48")
    assert await store.get_meta("ula_prefix") == "fd00:1::/48"
    await store.quarantine_meta("ula_prefix", "ValueError: no")
    assert await store.get_meta("ula_prefix") is None
    assert await store.quarantined_keys("meta") == ["ula_prefix"]
    assert await store.quarantined_keys("pools") == []


async def test_the_wal_is_checkpointed_beside_the_commits_not_by_them(tmp_path: Path) -> None:
    """Every CHECKPOINT_EVERY commits a passive checkpoint runs on another thread and
    connection, and the WAL stays as small as SQLite keeps it on its own (1,000 pages)."""
    store = SqliteStore(tmp_path / "state")
    try:
        e = endpoint()
        for i in range(CHECKPOINT_EVERY * 3):
            await store.put_endpoint(dataclasses.replace(e, id=hexid(f"ckpt-{i}")))
        for _ in range(200):
            if store.checkpoints.done >= 3:
                break
            await asyncio.sleep(0.01)
        assert store.checkpoints.done >= 3
        assert len(await store.load_endpoints()) == CHECKPOINT_EVERY * 3
        assert (tmp_path / "state" / f"{DB_NAME}-wal").stat().st_size < 1100 * 4096
    finally:
        store.close()
    # All of it can be read back once the store is closed.
    assert len(read_state(tmp_path / "state")[1]) == CHECKPOINT_EVERY * 3


def test_database_file_is_private(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state")
    store.close()
    mode = stat.S_IMODE((tmp_path / "state" / DB_NAME).stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "state").close()
    db = sqlite3.connect(tmp_path / "state" / DB_NAME)
    with db:
        db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    db.close()
    with pytest.raises(HostError, match="newer pybridge"):
        SqliteStore(tmp_path / "state")


def test_unusable_state_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(HostError, match="cannot open the state database"):
        SqliteStore(blocker / "state")


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


async def test_schema_2_is_migrated_and_its_unacknowledged_answers_count_as_expired(
    tmp_path: Path,
) -> None:
    """Pending answers of a pybridge before schema 3 carry no time: nobody can say whether
    Docker's retry window is over, so they are never replayed (they stay allocated)."""
    (tmp_path / "state").mkdir()
    db = sqlite3.connect(tmp_path / "state" / DB_NAME)
    db.executescript(V2_SCHEMA)
    db.close()
    store = SqliteStore(tmp_path / "state")
    try:
        assert await store.get_meta("schema_version") == str(SCHEMA_VERSION) == "3"
        (pool,) = await store.load_pools()
        assert pool.unacknowledged == {
            int(ipaddress.ip_address("10.1.0.1")): UnacknowledgedAnswer("gateway"),
            int(ipaddress.ip_address("10.1.0.2")): UnacknowledgedAnswer("dynamic"),
        }
        assert pool.pool_unacknowledged
        assert pool.pool_recorded_at is None
        assert not pool.pool_may_be_replayed(0.0)
        assert pool.claim_replay(None, gateway=True, now=0.0) is None
        assert len(pool.allocated) == 3
    finally:
        store.close()


# -- rows that cannot be read, and databases from a newer pybridge -------------------------------

OTHER_NET = hexid("store-net-2")
OTHER_EP, BAD_EP = hexid("store-ep-2"), hexid("store-ep-bad")


def corrupt(state_dir: Path, sql: str, *params: object) -> None:
    db = sqlite3.connect(state_dir / DB_NAME)
    with db:
        db.execute(sql, params)
    db.close()


def quarantine(state_dir: Path) -> list[tuple[str, str, object, str]]:
    db = sqlite3.connect(state_dir / DB_NAME)
    try:
        rows = db.execute("SELECT source, key, data, error FROM quarantine ORDER BY id").fetchall()
    finally:
        db.close()
    return [(str(a), str(b), c, str(d)) for a, b, c, d in rows]


async def fill(state_dir: Path) -> None:
    """Two networks with an endpoint each, a third endpoint, and two pools with addresses."""
    store = SqliteStore(state_dir)
    try:
        await store.put_network(network().with_changes(state="ready"))
        await store.put_network(network().with_changes(id=OTHER_NET, bridge="other"))
        await store.put_endpoint(endpoint())
        await store.put_endpoint(endpoint().with_changes(id=OTHER_EP, network_id=OTHER_NET))
        await store.put_endpoint(endpoint().with_changes(id=BAD_EP, network_id=OTHER_NET))
        for subnet in ("10.1.0.0/24", "10.2.0.0/24"):
            pool = Pool(id=subnet, subnet=ipaddress.ip_network(subnet))
            await store.put_pool(pool)
            await store.add_address(pool, str(pool.allocate()), "dynamic")
    finally:
        store.close()


async def test_rows_that_cannot_be_read_are_set_aside_and_the_rest_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    await fill(state)
    corrupt(state, "UPDATE networks SET data='{\"id\": broken' WHERE id=?", NET)
    bad_bytes = b"\xff\xfe not utf-8 {"
    corrupt(state, "UPDATE endpoints SET data=CAST(? AS BLOB) WHERE id=?", bad_bytes, BAD_EP)
    corrupt(state, "UPDATE addresses SET address='10.2.0.999' WHERE pool_id='10.2.0.0/24'")
    with caplog.at_level(logging.WARNING, logger="pydriver.store"):
        store = SqliteStore(state)
        try:
            networks = await store.load_networks()
            endpoints = await store.load_endpoints()
            pools = await store.load_pools()
        finally:
            store.close()
    # Served: the other network, its readable endpoint, the readable pool.
    assert [n.id for n in networks] == [OTHER_NET]
    assert [e.id for e in endpoints] == [OTHER_EP]
    assert [p.id for p in pools] == ["10.1.0.0/24"]
    # Set aside: the network and (with it) its endpoint, the unreadable endpoint byte for
    # byte, the pool with an unreadable address and its addresses.
    rows = quarantine(state)
    assert [(source, key) for source, key, _, _ in rows] == [
        ("networks", NET),
        ("endpoints", EP),
        ("endpoints", BAD_EP),
        ("pools", "10.2.0.0/24"),
        ("addresses", "10.2.0.0/24"),
    ]
    assert rows[0][2] == '{"id": broken'
    assert "JSONDecodeError" in rows[0][3]
    assert rows[1][3] == f"its network {NET} cannot be read"
    assert rows[2][2] == bad_bytes
    assert "UnicodeDecodeError" in rows[2][3]
    assert "10.2.0.999" in rows[3][3]
    assert rows[4][2] == "10.2.0.999"
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 5
    assert all("set aside" in r.getMessage() for r in caplog.records)
    # Nothing left that cannot be read; the next start serves the same and moves nothing.
    store = SqliteStore(state)
    try:
        assert [n.id for n in await store.load_networks()] == [OTHER_NET]
        assert [e.id for e in await store.load_endpoints()] == [OTHER_EP]
        assert [p.id for p in await store.load_pools()] == ["10.1.0.0/24"]
        assert await store.quick_check() == "ok"
    finally:
        store.close()
    assert len(quarantine(state)) == 5


@pytest.mark.parametrize(
    "data",
    [
        "[]",
        "null",
        json.dumps({"id": NET}),  # a field missing
        json.dumps({"id": NET, "bridge": "b", "bridge_owned": True, "subnets_v4": [{"pool": "x"}]}),
        json.dumps({**network().to_dict(), "id": OTHER_NET}),  # not its key
    ],
)
async def test_any_undecodable_network_is_set_aside(tmp_path: Path, data: str) -> None:
    state = tmp_path / "state"
    await fill(state)
    corrupt(state, "UPDATE networks SET data=? WHERE id=?", data, NET)
    store = SqliteStore(state)
    try:
        assert [n.id for n in await store.load_networks()] == [OTHER_NET]
    finally:
        store.close()
    assert [r[1] for r in quarantine(state)] == [NET, EP]


async def test_read_only_readers_skip_what_cannot_be_read(tmp_path: Path) -> None:
    state = tmp_path / "state"
    await fill(state)
    corrupt(state, "UPDATE networks SET data='{' WHERE id=?", NET)
    corrupt(state, "UPDATE pools SET data='{' WHERE id='10.1.0.0/24'")
    networks, endpoints = read_state(state)  # status, ports and doctor use this
    assert [n.id for n in networks] == [OTHER_NET]
    assert sorted(e.id for e in endpoints) == sorted([OTHER_EP, BAD_EP])
    findings = check_database(state_health(state))
    assert findings[0].kind == "state-intact"
    problems = [f for f in findings if not f.ok]
    assert len(problems) == 1
    assert problems[0].what.startswith("2 row(s) of pybridge's state cannot be read: network ")
    assert "pool 10.1.0.0/24" in problems[0].what
    assert problems[0].fix == "restart pybridge: it sets them aside and serves the rest"
    # Once pybridge has started, doctor reports what it set aside.
    store = SqliteStore(state)
    try:
        await store.load_networks()
        await store.load_endpoints()
        await store.load_pools()
    finally:
        store.close()
    findings = check_database(state_health(state))
    assert findings[0].kind == "state-intact"
    (problem,) = [f for f in findings if not f.ok]
    assert problem.what.startswith("4 row(s) of pybridge's state could not be read and were set")
    assert "network " + NET[:40] in problem.what
    assert "address 10.1.0.0/24" in problem.what
    assert "DELETE FROM quarantine" in problem.fix
    assert "docker network rm" in problem.fix


async def test_state_health_as_doctor_reads_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert state_health(state) == StateHealth(state / DB_NAME, found=False)
    await fill(state)
    health = state_health(state)
    assert (health.found, health.error, health.integrity) == (True, None, "ok")
    assert (health.schema_version, health.set_aside) == (SCHEMA_VERSION, ())
    corrupt(state, "UPDATE meta SET value='x' WHERE key='schema_version'")
    assert state_health(state).schema_version is None  # unknown, not a crash
    corrupt(state, "DELETE FROM meta WHERE key='schema_version'")
    assert state_health(state).schema_version is None
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / DB_NAME).write_bytes(b"not sqlite at all" * 100)
    junk = state_health(tmp_path / "junk")
    assert junk.error == "file is not a database"
    assert not (tmp_path / "junk" / f"{DB_NAME}-wal").exists()  # read-only: nothing written


async def test_an_unreadable_ula_prefix_is_set_aside_and_replaced(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = SqliteStore(state)
    try:
        await store.set_meta(ULA_META_KEY, "fd00:zz::/48")
        ipam = IpamDriver(store, FakeKernel().routes)
        await ipam.load()
        assert ipam.ula_prefix is not None
        assert ipam.ula_prefix.prefixlen == 48
        assert await store.get_meta(ULA_META_KEY) == str(ipam.ula_prefix)
    finally:
        store.close()
    ((source, key, data, error),) = quarantine(state)
    assert (source, key, data) == ("meta", ULA_META_KEY, "fd00:zz::/48")
    assert error.startswith("ValueError: ")


def snapshot(state_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(state_dir.iterdir())}


def test_newer_schema_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    state = tmp_path / "state"
    SqliteStore(state).close()
    corrupt(state, "UPDATE meta SET value=? WHERE key='schema_version'", str(SCHEMA_VERSION + 1))
    # A newer schema need not have our tables: creating them would already be a write.
    corrupt(state, "ALTER TABLE addresses RENAME TO leases")
    before = snapshot(state)
    assert list(before) == [DB_NAME]  # no -wal or -shm after a clean close
    with pytest.raises(HostError) as err:
        SqliteStore(state)
    assert str(err.value) == (
        f"the state database {state / DB_NAME} is from a newer pybridge (schema "
        f"{SCHEMA_VERSION + 1}, this version knows {SCHEMA_VERSION}); run that version or a "
        "newer one"
    )
    assert snapshot(state) == before  # byte for byte, and no file created


def test_newer_schema_only_in_the_wal_is_refused(tmp_path: Path) -> None:
    """A newer pybridge killed before a checkpoint: its migration is only in the -wal."""
    state = tmp_path / "state"
    SqliteStore(state).close()
    newer = sqlite3.connect(state / DB_NAME, isolation_level=None)
    try:
        newer.execute("PRAGMA wal_autocheckpoint=0")
        newer.execute(
            "UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),)
        )
        assert (state / f"{DB_NAME}-wal").stat().st_size > 0
        with pytest.raises(HostError, match="is from a newer pybridge"):
            SqliteStore(state)
    finally:
        newer.close()


def test_serve_refuses_a_newer_database_in_one_sentence(tmp_path: Path) -> None:
    state = tmp_path / "state"
    SqliteStore(state).close()
    corrupt(state, "UPDATE meta SET value='99' WHERE key='schema_version'")
    corrupt(state, "ALTER TABLE addresses RENAME TO leases")
    before = snapshot(state)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pydriver.cli",
            "serve",
            "--socket",
            str(tmp_path / "pb.sock"),
            "--state-dir",
            str(state),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1
    assert errors[0].endswith(
        f"is from a newer pybridge (schema 99, this version knows {SCHEMA_VERSION}); run that "
        "version or a newer one"
    )
    after = snapshot(state)
    after.pop(LOCK_NAME)  # serve's claim on the directory, taken before the database is opened
    assert after == before


def test_quick_check_names_damage(tmp_path: Path) -> None:
    state = tmp_path / "state"
    sync = SyncStore(state)
    sync._tx(
        [
            ("INSERT INTO networks (id, data) VALUES (?, ?)", (hexid(str(i)), "x" * 3000))
            for i in range(50)
        ]
    )
    assert sync.quick_check() == "ok"
    sync.close()
    path = state / DB_NAME
    raw = bytearray(path.read_bytes())
    page = 4096
    raw[5 * page : 5 * page + 64] = b"\xa5" * 64  # the header of a table page
    path.write_bytes(bytes(raw))
    sync = SyncStore(state)
    try:
        result = sync.quick_check()
    finally:
        sync.close()
    assert result != "ok"
    assert result


async def test_read_pools_for_prune(tmp_path: Path) -> None:
    """prune reads each pool's id, subnet and when it was requested; a row it cannot read is
    skipped, as pybridge skips it."""
    state = tmp_path / "state"
    await fill(state)
    before = read_pools(state)
    assert [(p.id, str(p.subnet)) for p in before] == [
        ("10.1.0.0/24", "10.1.0.0/24"),
        ("10.2.0.0/24", "10.2.0.0/24"),
    ]
    assert all(p.recorded_at is not None and p.recorded_at > 0 for p in before)
    corrupt(state, "UPDATE pools SET data='{' WHERE id='10.1.0.0/24'")
    corrupt(state, "UPDATE pools SET recorded_at=NULL WHERE id='10.2.0.0/24'")
    assert read_pools(state) == [
        PoolRecord("10.2.0.0/24", ipaddress.ip_network("10.2.0.0/24"), None)
    ]
    with pytest.raises(HostError, match="no pybridge state at"):
        read_pools(tmp_path / "nothing")
    # A database of schema 2 has no recorded_at column: its pools are long requested.
    corrupt(state, "ALTER TABLE pools DROP COLUMN recorded_at")
    assert [p.recorded_at for p in read_pools(state)] == [None]


async def test_the_subnet_of_a_pool_set_aside_stays_taken(tmp_path: Path) -> None:
    """A pool whose row cannot be read may still be some network's: an automatic request (or
    a --subnet) must not get its subnet."""
    state = tmp_path / "state"
    store = SqliteStore(state)
    try:
        pool = Pool(id="172.31.0.0/16", subnet=ipaddress.ip_network("172.31.0.0/16"), auto=True)
        await store.put_pool(pool)
    finally:
        store.close()
    corrupt(state, "UPDATE pools SET data='{' WHERE id='172.31.0.0/16'")
    store = SqliteStore(state)
    try:
        ipam = IpamDriver(store, _no_routes)
        await ipam.load()
        assert ipam.pools == {}
        request = {
            "AddressSpace": "PybridgeLocal",
            "Pool": "",
            "SubPool": "",
            "Options": {},
            "V6": False,
        }
        _, subnet, _ = await ipam.request_pool(p.parse_request_pool(request))
        assert subnet == ipaddress.ip_network("172.30.0.0/16")
        with pytest.raises(Conflict):
            await ipam.request_pool(p.parse_request_pool({**request, "Pool": "172.31.5.0/24"}))
    finally:
        store.close()


async def _no_routes() -> list[HostRoute]:
    return []
