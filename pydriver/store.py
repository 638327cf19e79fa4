"""State on disk: the only module that touches the state directory.

SQLite in WAL mode. Every change is committed before pybridge acts on it and before it replies
to Docker. Two strengths, by what a change is about:

* durable (fsync, ``synchronous=FULL``): networks, pools, gateway/aux/static addresses and
  every release -- what must survive a power cut, because dockerd keeps its networks;
* committed to the WAL without an fsync (``synchronous=NORMAL``): endpoints and addresses
  handed out dynamically to containers. That survives a ``kill -9`` of pybridge (the write is
  in the kernel's page cache); a power cut takes those containers down with it, and whatever
  was lost was about them. It saves an fsync or two per container start.

Each public method is one transaction. All calls run on one worker thread, so the event loop
never waits on the disk. Copying the WAL into the database (a checkpoint, with an fsync) runs on
a worker thread and connection of its own every ``CHECKPOINT_EVERY`` commits: left to SQLite
alone, the commit that fills the WAL (1,000 pages) does it all, and the container start waiting
for that commit took 4-5 ms longer. SQLite still does it on the commit that fills the WAL, which
is how the WAL starts over under a steady stream of commits (a checkpoint beside a commit never
finishes it), but finds most of it copied already (2 ms at most).

One row that cannot be decoded (a bug, a hand edit, a damaged page) must not keep pybridge
from serving everything else: loading moves such rows, with what depends on them, into the
``quarantine`` table (logged, and reported by `pydriver doctor`) and serves the rest. An older
pybridge refuses a database a newer one wrote before it writes anything to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from .errors import HostError
from .ipam import AnswerKind, Pool, UnacknowledgedAnswer
from .model import Endpoint, IPNetwork, Network

T = TypeVar("T")
R = TypeVar("R", Network, Endpoint, Pool)

log = logging.getLogger(__name__)

DB_NAME = "state.db"
SCHEMA_VERSION = 3
# A passive checkpoint after this many commits (a container start makes 4-6).
CHECKPOINT_EVERY = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS networks (id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS endpoints (
    id TEXT PRIMARY KEY, network_id TEXT NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS endpoints_by_network ON endpoints (network_id);
CREATE TABLE IF NOT EXISTS pools (
    id TEXT PRIMARY KEY, data TEXT NOT NULL, pending INTEGER NOT NULL DEFAULT 0,
    recorded_at REAL);
CREATE TABLE IF NOT EXISTS addresses (
    pool_id TEXT NOT NULL, address TEXT NOT NULL,
    pending INTEGER NOT NULL DEFAULT 0, kind TEXT NOT NULL DEFAULT 'dynamic',
    recorded_at REAL, endpoint_name TEXT,
    PRIMARY KEY (pool_id, address));
-- Rows set aside because they could not be decoded (source: the table they came from). Only
-- ever added to, never read back by the plugin, so it needs no new schema version: an older
-- pybridge just ignores it.
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, key TEXT NOT NULL,
    data TEXT NOT NULL, error TEXT NOT NULL, time REAL NOT NULL);
"""

# The "pending" columns mark an IPAM answer that is unacknowledged: written before it was sent
# and not yet known to have reached Docker (they keep their name: renaming a column needs a
# migration). With when it was recorded and what identifies the request (kind, endpoint
# name), so only Docker's retry of that request gets it again: see ipam.Pool.unacknowledged.
# Rows from before version 3 have no time and count as expired.
_MIGRATIONS = {
    2: [
        "ALTER TABLE pools ADD COLUMN pending INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE addresses ADD COLUMN pending INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE addresses ADD COLUMN kind TEXT NOT NULL DEFAULT 'dynamic'",
    ],
    3: [
        "ALTER TABLE pools ADD COLUMN recorded_at REAL",
        "ALTER TABLE addresses ADD COLUMN recorded_at REAL",
        "ALTER TABLE addresses ADD COLUMN endpoint_name TEXT",
    ],
}


@dataclass(frozen=True)
class SetAside:
    """A state row that cannot be decoded: in the quarantine table, or still in place."""

    source: str  # the table it is (or was) in
    key: str
    error: str
    time: float | None = None  # when it was set aside; None: not yet


class _Unreadable(Exception):
    pass


# What a row of each table is, for messages.
ROW_KIND = {
    "networks": "network",
    "endpoints": "endpoint",
    "pools": "pool",
    "addresses": "address",
    "meta": "setting",
}

# Spelled out per table (no SQL is ever built from a name).
_ROWS = {
    "networks": "SELECT rowid, CAST(id AS BLOB), CAST(data AS BLOB) FROM networks ORDER BY id",
    "endpoints": "SELECT rowid, CAST(id AS BLOB), CAST(data AS BLOB) FROM endpoints ORDER BY id",
}
_DELETE_ROW = {
    "networks": "DELETE FROM networks WHERE rowid=?",
    "endpoints": "DELETE FROM endpoints WHERE rowid=?",
    "pools": "DELETE FROM pools WHERE rowid=?",
    "meta": "DELETE FROM meta WHERE rowid=?",
}


def _decode(raw_key: bytes, raw_data: bytes, decode: Callable[[dict[str, Any]], R]) -> R:
    """A record from its row, or _Unreadable saying why not. Rows are read as bytes, so that
    not even a text that is not UTF-8 can make the query itself fail."""
    try:
        key = raw_key.decode()
        data = json.loads(raw_data.decode())
        if not isinstance(data, dict):
            raise ValueError("the row is not a JSON object")
        record = decode(data)
        if record.id != key:
            raise ValueError(f"the row's id {str(record.id)[:70]!r} is not its key")
    except Exception as err:  # whatever a damaged row makes the (pure) decoding raise
        raise _Unreadable(f"{type(err).__name__}: {err}"[:300]) from None
    return record


def _text(raw: bytes) -> str:
    return raw.decode(errors="replace")


def _addresses_of(
    db: sqlite3.Connection, raw_pool_id: bytes, *, answers: bool = False
) -> list[Any]:
    """The addresses of a pool, as bytes, each in a 1-tuple; with ``answers``, as (address,
    unacknowledged, kind, recorded_at, endpoint_name), texts as bytes (columns of schema 3: a
    read-only reader of an older database asks for the address only). By the text of its id
    when it is text, which uses the index (a CAST in the condition would read every address
    of every pool)."""
    select = (
        "SELECT CAST(address AS BLOB), pending, CAST(kind AS BLOB), recorded_at, "
        "CAST(endpoint_name AS BLOB) FROM addresses WHERE "
        if answers
        else "SELECT CAST(address AS BLOB) FROM addresses WHERE "
    )
    try:
        pool_id = raw_pool_id.decode()
    except UnicodeDecodeError:
        return db.execute(select + "CAST(pool_id AS BLOB)=?", (raw_pool_id,)).fetchall()
    return db.execute(select + "pool_id=?", (pool_id,)).fetchall()


def stored_schema_version(path: Path) -> int | None:
    """The schema version of the database at ``path`` (None for a new one), read without
    writing anything: not even a -wal or -shm file is created."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    wal = path.with_name(path.name + "-wal")
    # Without a WAL the main file holds every commit and nobody has the database open (a
    # connection in WAL mode keeps the -wal file): read it as immutable, which takes no lock
    # and creates nothing. A WAL may hold the latest commits (a migration by a newer version
    # that was then killed): read through it, which needs the -shm file.
    mode = "mode=ro" if wal.exists() and wal.stat().st_size > 0 else "immutable=1"
    db = sqlite3.connect(f"file:{quote(str(path))}?{mode}", uri=True, timeout=5)
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone():
            return None
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    finally:
        db.close()
    if row is None:
        return None
    try:
        return int(row[0])
    except (TypeError, ValueError):
        raise HostError(
            f"the state database {path} has an unreadable schema version {str(row[0])[:40]!r}; "
            "restore the state directory from a backup"
        ) from None


def _refuse_newer(path: Path, version: int | None) -> None:
    if version is not None and version > SCHEMA_VERSION:
        raise HostError(
            f"the state database {path} is from a newer pybridge (schema {version}, this "
            f"version knows {SCHEMA_VERSION}); run that version or a newer one"
        )


class SyncStore:
    """The SQLite state database. Not thread-safe by itself: use it from one thread."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / DB_NAME
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Before anything writes: the WAL pragma and the schema would change the file.
            _refuse_newer(self.path, stored_schema_version(self.path))
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as err:
            raise HostError(f"cannot open the state database {self.path}: {err}") from None
        self.commits = 0  # by this connection, for the caller's checkpoints
        try:
            os.chmod(self.path, 0o600)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA busy_timeout=5000")
            self.db.executescript(_SCHEMA)
            self._check_version()
        except (OSError, sqlite3.Error) as err:
            self.db.close()
            raise HostError(f"cannot open the state database {self.path}: {err}") from None
        except BaseException:
            self.db.close()
            raise

    def _check_version(self) -> None:
        row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self.db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            return
        version = int(row[0])
        _refuse_newer(self.path, version)  # checked before opening; this is a second look
        statements: list[tuple[str, tuple[Any, ...]]] = []
        for target in range(version + 1, SCHEMA_VERSION + 1):
            statements += [(sql, ()) for sql in _MIGRATIONS.get(target, [])]
        if statements:
            statements.append(
                ("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
            )
            self._tx(statements)

    def close(self) -> None:
        self.db.close()

    def _tx(
        self, statements: Iterable[tuple[str, tuple[Any, ...]]], *, durable: bool = True
    ) -> None:
        cur = self.db.cursor()
        if not durable:
            cur.execute("PRAGMA synchronous=NORMAL")
        try:
            cur.execute("BEGIN IMMEDIATE")
            for sql, params in statements:
                cur.execute(sql, params)
            cur.execute("COMMIT")
            self.commits += 1
        except BaseException:
            if self.db.in_transaction:
                cur.execute("ROLLBACK")
            raise
        finally:
            if not durable:
                cur.execute("PRAGMA synchronous=FULL")

    # -- meta ----------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._tx([("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))])

    # -- networks and endpoints ----------------------------------------------------------------

    # -- quarantine ----------------------------------------------------------------------------

    def _set_aside(
        self, source: str, rowid: int, key: str, data: bytes | str, error: str
    ) -> list[tuple[str, tuple[Any, ...]]]:
        """The statements that move one row into the quarantine table (its data as it was,
        byte for byte, even if it is not text)."""
        log.warning(
            "state: the %s row %s cannot be read (%s); it is set aside in the quarantine "
            "table and pybridge serves the rest (pydriver doctor lists it)",
            ROW_KIND.get(source, source),
            key,
            error,
        )
        if isinstance(data, bytes):
            with contextlib.suppress(UnicodeDecodeError):  # else kept as the bytes it was
                data = data.decode()
        return [
            (
                "INSERT INTO quarantine (source, key, data, error, time) VALUES (?, ?, ?, ?, ?)",
                (source, key, data, error, time.time()),
            ),
            (_DELETE_ROW[source], (rowid,)),
        ]

    def _load(self, table: str, decode: Callable[[dict[str, Any]], R]) -> list[R]:
        rows = self.db.execute(_ROWS[table]).fetchall()
        records: list[R] = []
        moves: list[tuple[str, tuple[Any, ...]]] = []
        for rowid, raw_key, raw_data in rows:
            try:
                records.append(_decode(raw_key, raw_data, decode))
            except _Unreadable as err:
                moves += self._set_aside(table, rowid, _text(raw_key), raw_data, str(err))
                if table == "networks":
                    moves += self._endpoints_follow(raw_key)
        if moves:
            self._tx(moves)
        return records

    def _endpoints_follow(self, raw_network_id: bytes) -> list[tuple[str, tuple[Any, ...]]]:
        """Endpoints of a network set aside go with it. Left in place, nothing could serve them
        (every request needs the network) and start-up would delete them as interrupted;
        set aside together, the quarantine keeps the whole network for whoever repairs it.
        Either way its bridge and veths are removed as leftovers, and its rules go: the state
        and the kernel keep agreeing."""
        moves: list[tuple[str, tuple[Any, ...]]] = []
        dependents = self.db.execute(
            "SELECT rowid, CAST(id AS BLOB), CAST(data AS BLOB) FROM endpoints "
            "WHERE CAST(network_id AS BLOB)=?",
            (raw_network_id,),
        ).fetchall()
        for rowid, raw_key, raw_data in dependents:
            reason = f"its network {_text(raw_network_id)} cannot be read"
            moves += self._set_aside("endpoints", rowid, _text(raw_key), raw_data, reason)
        return moves

    def load_networks(self) -> list[Network]:
        return self._load("networks", Network.from_dict)

    def load_endpoints(self) -> list[Endpoint]:
        return self._load("endpoints", Endpoint.from_dict)

    def put_network(self, network: Network) -> None:
        self._tx(
            [
                (
                    "INSERT OR REPLACE INTO networks (id, data) VALUES (?, ?)",
                    (network.id, json.dumps(network.to_dict())),
                )
            ]
        )

    def delete_network(self, network_id: str) -> None:
        self._tx(
            [
                ("DELETE FROM endpoints WHERE network_id=?", (network_id,)),
                ("DELETE FROM networks WHERE id=?", (network_id,)),
            ]
        )

    def put_endpoint(self, endpoint: Endpoint) -> None:
        self._tx(
            [
                (
                    "INSERT OR REPLACE INTO endpoints (id, network_id, data) VALUES (?, ?, ?)",
                    (endpoint.id, endpoint.network_id, json.dumps(endpoint.to_dict())),
                )
            ],
            durable=False,
        )

    def delete_endpoint(self, endpoint_id: str) -> None:
        self._tx([("DELETE FROM endpoints WHERE id=?", (endpoint_id,))], durable=False)

    # -- IPAM ----------------------------------------------------------------------------------

    def load_pools(self) -> list[Pool]:
        """Pools with their addresses, and their unacknowledged answers.

        A pool that cannot be read, or one of whose addresses cannot, is set aside with all
        its addresses: a pool serving without a trustworthy list of what it handed out could
        hand an address out twice. Docker's requests for it then fail by name."""
        pools: list[Pool] = []
        moves: list[tuple[str, tuple[Any, ...]]] = []
        rows = self.db.execute(
            "SELECT rowid, CAST(id AS BLOB), CAST(data AS BLOB), pending, recorded_at FROM pools "
            "ORDER BY id"
        ).fetchall()
        for rowid, raw_key, raw_data, pool_unacknowledged, pool_recorded_at in rows:
            addresses = _addresses_of(self.db, raw_key, answers=True)

            def decode(
                data: dict[str, Any],
                rows: list[Any] = addresses,
                unacknowledged_pool: Any = pool_unacknowledged,
                pool_at: Any = pool_recorded_at,
            ) -> Pool:
                listed = [
                    (a.decode(), unacked, kind.decode(), at, name.decode() if name else None)
                    for a, unacked, kind, at, name in rows
                ]
                return Pool.from_dict(
                    data,
                    [row[0] for row in listed],
                    {
                        a: UnacknowledgedAnswer(_kind(kind), at, name)
                        for a, unacked, kind, at, name in listed
                        if unacked
                    },
                    bool(unacknowledged_pool),
                    pool_at if unacknowledged_pool else None,
                )

            try:
                pools.append(_decode(raw_key, raw_data, decode))
            except _Unreadable as err:
                key = _text(raw_key)
                moves += self._set_aside("pools", rowid, key, raw_data, str(err))
                if addresses:
                    log.warning(
                        "state: the %d address(es) of pool %s are set aside with it",
                        len(addresses),
                        key,
                    )
                moves += [
                    (
                        "INSERT INTO quarantine (source, key, data, error, time) "
                        "SELECT 'addresses', pool_id, address, ?, ? FROM addresses "
                        "WHERE CAST(pool_id AS BLOB)=?",
                        (f"its pool {key} cannot be read", time.time(), raw_key),
                    ),
                    ("DELETE FROM addresses WHERE CAST(pool_id AS BLOB)=?", (raw_key,)),
                ]
        if moves:
            self._tx(moves)
        return pools

    def put_pool_data(self, pool_id: str, pool_data: dict[str, Any], recorded_at: float) -> None:
        self._tx(
            [
                (
                    "INSERT OR REPLACE INTO pools (id, data, pending, recorded_at) "
                    "VALUES (?, ?, 1, ?)",
                    (pool_id, json.dumps(pool_data), recorded_at),
                )
            ]
        )

    def delete_pool(self, pool_id: str) -> None:
        self._tx(
            [
                ("DELETE FROM addresses WHERE pool_id=?", (pool_id,)),
                ("DELETE FROM pools WHERE id=?", (pool_id,)),
            ]
        )

    def add_address(
        self, pool_id: str, pool_data: dict[str, Any], address: str, answer: UnacknowledgedAnswer
    ) -> None:
        # The pool row carries the allocation cursor, so both change in one transaction.
        self._tx(
            [
                (
                    "INSERT INTO addresses "
                    "(pool_id, address, pending, kind, recorded_at, endpoint_name) "
                    "VALUES (?, ?, 1, ?, ?, ?)",
                    (pool_id, address, answer.kind, answer.recorded_at, answer.endpoint_name),
                ),
                ("UPDATE pools SET data=? WHERE id=?", (json.dumps(pool_data), pool_id)),
            ],
            durable=answer.kind != "dynamic",
        )

    def acknowledge(self, pool_id: str, address: str | None) -> None:
        """The answer reached Docker. Needs no fsync: it only has to survive a kill -9, and the
        write to the WAL does (a power cut takes the containers down anyway)."""
        if address is None:
            self._tx([("UPDATE pools SET pending=0 WHERE id=?", (pool_id,))], durable=False)
        else:
            sql = "UPDATE addresses SET pending=0 WHERE pool_id=? AND address=?"
            self._tx([(sql, (pool_id, address))], durable=False)

    def remove_address(self, pool_id: str, address: str) -> None:
        self._tx([("DELETE FROM addresses WHERE pool_id=? AND address=?", (pool_id, address))])

    def remove_addresses(self, addresses: Iterable[tuple[str, str]]) -> None:
        sql = "DELETE FROM addresses WHERE pool_id=? AND address=?"
        self._tx([(sql, (pool_id, address)) for pool_id, address in addresses])

    def check_integrity(self) -> str:
        row = self.db.execute("PRAGMA integrity_check").fetchone()
        return str(row[0]) if row else "no answer"

    def quick_check(self) -> str:
        """SQLite's quick_check: "ok", or what is damaged. It reads every page once but does
        not match indexes against tables: 1 ms for 1000 endpoints, 12 ms for 10,000."""
        try:
            rows = self.db.execute("PRAGMA quick_check(5)").fetchall()
        except sqlite3.DatabaseError as err:  # too damaged even to check
            return str(err)
        return "; ".join(str(r[0]) for r in rows) or "no answer"

    def quarantined_keys(self, source: str) -> list[str]:
        """Keys of the rows of ``source`` set aside so far (pool ids are their subnets)."""
        rows = self.db.execute(
            "SELECT CAST(key AS BLOB) FROM quarantine WHERE source=?", (source,)
        ).fetchall()
        return [_text(row[0]) if isinstance(row[0], bytes) else str(row[0]) for row in rows]

    def quarantine_meta(self, key: str, error: str) -> None:
        """Set aside a meta value that cannot be read (its owner chooses a new one)."""
        row = self.db.execute("SELECT rowid, value FROM meta WHERE key=?", (key,)).fetchone()
        if row is not None:
            self._tx(self._set_aside("meta", row[0], key, str(row[1]), error))


def _read_rows(
    db: sqlite3.Connection, table: str, decode: Callable[[dict[str, Any]], R]
) -> tuple[list[R], list[SetAside]]:
    records: list[R] = []
    unreadable: list[SetAside] = []
    for _, raw_key, raw_data in db.execute(_ROWS[table]):
        try:
            records.append(_decode(raw_key, raw_data, decode))
        except _Unreadable as err:
            unreadable.append(SetAside(table, _text(raw_key), str(err)))
    return records, unreadable


def _kind(value: object) -> AnswerKind:
    if value == "gateway":
        return "gateway"
    return "specific" if value == "specific" else "dynamic"


def _read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot write (safe while pybridge runs)."""
    return sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=5)


def read_state(state_dir: Path) -> tuple[list[Network], list[Endpoint]]:
    """Networks and endpoints from a state directory, read-only (safe while pybridge runs).
    Rows that cannot be decoded are skipped, as pybridge itself does (see ``unreadable``)."""
    path = state_dir / DB_NAME
    if not path.exists():
        raise HostError(f"no pybridge state at {path}; is --state-dir right?")
    try:
        db = _read_only(path)
    except sqlite3.Error as err:
        raise HostError(f"cannot read the state database {path}: {err}") from None
    try:
        networks, bad = _read_rows(db, "networks", Network.from_dict)
        endpoints, _ = _read_rows(db, "endpoints", Endpoint.from_dict)
    except sqlite3.Error as err:
        raise HostError(f"cannot read the state database {path}: {err}") from None
    finally:
        db.close()
    gone = {row.key for row in bad}  # their endpoints go with them
    return networks, [e for e in endpoints if e.network_id not in gone]


@dataclass(frozen=True)
class PoolRecord:
    """An IPAM pool as `pydriver prune` needs it: its id, subnet and when it was requested
    (None: a row from before schema 3, long ago)."""

    id: str
    subnet: IPNetwork
    recorded_at: float | None


def read_meta(state_dir: Path, key: str) -> str | None:
    """One meta value of a state directory, read-only (safe while pybridge runs)."""
    path = state_dir / DB_NAME
    if not path.exists():
        return None
    try:
        db = _read_only(path)
    except sqlite3.Error:
        return None
    try:
        row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return None if row is None else str(row[0])


def read_pools(state_dir: Path) -> list[PoolRecord]:
    """The IPAM pools in a state directory, read-only (safe while pybridge runs). Rows that
    cannot be decoded are skipped, as pybridge itself does."""
    path = state_dir / DB_NAME
    if not path.exists():
        raise HostError(f"no pybridge state at {path}; is --state-dir right?")
    try:
        db = _read_only(path)
    except sqlite3.Error as err:
        raise HostError(f"cannot read the state database {path}: {err}") from None
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(pools)")}
        when = "recorded_at" if "recorded_at" in columns else "NULL"
        rows = db.execute(
            f"SELECT CAST(id AS BLOB), CAST(data AS BLOB), {when} FROM pools ORDER BY id"  # noqa: S608 (a column name from the schema)
        ).fetchall()
    except sqlite3.Error as err:
        raise HostError(f"cannot read the state database {path}: {err}") from None
    finally:
        db.close()
    pools = []
    for raw_key, raw_data, recorded_at in rows:
        try:
            data = json.loads(raw_data.decode())
            subnet = ipaddress.ip_network(data["subnet"])
            pools.append(
                PoolRecord(
                    raw_key.decode(),
                    subnet,
                    float(recorded_at) if recorded_at is not None else None,
                )
            )
        except Exception:  # noqa: S112 (a damaged row: pybridge sets it aside itself)
            continue
    return pools


def unreadable(db: sqlite3.Connection) -> list[SetAside]:
    """Rows set aside so far, then rows that cannot be decoded but are still in place (pybridge
    sets those aside when it next starts)."""
    found: list[SetAside] = []
    if db.execute("SELECT 1 FROM sqlite_master WHERE name='quarantine'").fetchone():
        found += [
            SetAside(str(source), _text(key) if isinstance(key, bytes) else str(key), error, when)
            for source, key, error, when in db.execute(
                "SELECT source, CAST(key AS BLOB), error, time FROM quarantine ORDER BY id"
            )
        ]
    found += _read_rows(db, "networks", Network.from_dict)[1]
    found += _read_rows(db, "endpoints", Endpoint.from_dict)[1]
    pools = db.execute("SELECT CAST(id AS BLOB), CAST(data AS BLOB) FROM pools ORDER BY id")
    for raw_key, raw_data in pools.fetchall():
        addresses = _addresses_of(db, raw_key)

        def decode(data: dict[str, Any], listed: list[Any] = addresses) -> Pool:
            return Pool.from_dict(data, [row[0].decode() for row in listed])

        try:
            _decode(raw_key, raw_data, decode)
        except _Unreadable as err:
            found.append(SetAside("pools", _text(raw_key), str(err)))
    return found


@dataclass(frozen=True)
class StateHealth:
    """A state database as `pydriver doctor` judges it, read without writing anything."""

    path: Path
    found: bool = True
    error: str | None = None  # why it cannot be read at all
    integrity: str = "ok"  # SQLite's integrity_check: "ok", or what is damaged
    schema_version: int | None = None  # None: not recorded, or not a number
    set_aside: tuple[SetAside, ...] = ()  # rows that cannot be decoded (read only if intact)


def state_health(state_dir: Path) -> StateHealth:
    path = state_dir / DB_NAME
    if not path.exists():
        return StateHealth(path, found=False)
    try:
        db = _read_only(path)
        try:
            integrity = str(db.execute("PRAGMA integrity_check").fetchone()[0])
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            set_aside = tuple(unreadable(db)) if integrity == "ok" else ()
        finally:
            db.close()
    except sqlite3.Error as err:
        return StateHealth(path, error=str(err))
    try:
        version = int(row[0]) if row is not None else None
    except (TypeError, ValueError):
        version = None
    return StateHealth(path, integrity=integrity, schema_version=version, set_aside=set_aside)


class Checkpoints:
    """Passive WAL checkpoints on a worker thread of their own connection: they copy committed
    pages into the database while the store's thread goes on committing (WAL mode lets a
    checkpoint run beside a writer), so no commit waits for one. They run on the event loop's
    default executor, whose threads exist anyway (a thread of their own cost 1-2 MB of RSS)."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()  # one checkpoint at a time; close() waits for it
        self._running = False
        self._closed = False
        self.done = 0

    def start(self) -> bool:
        """One checkpoint in the background, unless one is still running (False)."""
        if self._running or self._closed:
            return False
        self._running = True  # (before: the worker clears it when done)
        try:
            asyncio.get_running_loop().run_in_executor(None, self._checkpoint)
        except RuntimeError:  # the executor is shut down: the loop is closing
            self._running = False
            return False
        return True

    def _checkpoint(self) -> None:
        try:
            with self._lock:
                if not self._closed:
                    self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.done += 1
        except sqlite3.Error as err:  # the next commit that fills the WAL does it instead
            log.warning("could not checkpoint the state database's WAL: %s", err)
        finally:
            self._running = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()


class SqliteStore:
    """Async facade: runs every SyncStore call on one dedicated thread."""

    def __init__(self, state_dir: Path) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pydriver-store")
        self._sync = SyncStore(state_dir)
        try:
            self.checkpoints = Checkpoints(self._sync.path)
        except sqlite3.Error as err:
            self._sync.close()
            raise HostError(f"cannot open the state database {self.path}: {err}") from None
        self._checkpointed_at = 0  # the commit count when the last checkpoint was started

    @property
    def path(self) -> Path:
        return self._sync.path

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as err:
            raise HostError(f"could not write pybridge's state database: {err}") from None
        finally:
            commits = self._sync.commits
            if commits - self._checkpointed_at >= CHECKPOINT_EVERY and self.checkpoints.start():
                self._checkpointed_at = commits

    def close(self) -> None:
        self.checkpoints.close()
        self._executor.submit(self._sync.close).result()
        self._executor.shutdown(wait=True)

    # Thin async wrappers, named as in SyncStore.
    async def get_meta(self, key: str) -> str | None:
        return await self.call(self._sync.get_meta, key)

    async def set_meta(self, key: str, value: str) -> None:
        await self.call(self._sync.set_meta, key, value)

    async def load_networks(self) -> list[Network]:
        return await self.call(self._sync.load_networks)

    async def load_endpoints(self) -> list[Endpoint]:
        return await self.call(self._sync.load_endpoints)

    async def put_network(self, network: Network) -> None:
        await self.call(self._sync.put_network, network)

    async def delete_network(self, network_id: str) -> None:
        await self.call(self._sync.delete_network, network_id)

    async def put_endpoint(self, endpoint: Endpoint) -> None:
        await self.call(self._sync.put_endpoint, endpoint)

    async def delete_endpoint(self, endpoint_id: str) -> None:
        await self.call(self._sync.delete_endpoint, endpoint_id)

    async def load_pools(self) -> list[Pool]:
        return await self.call(self._sync.load_pools)

    async def put_pool(self, pool: Pool, recorded_at: float | None = None) -> None:
        # Serialise on the caller's thread: the pool may change again once we yield.
        at = time.time() if recorded_at is None else recorded_at
        await self.call(self._sync.put_pool_data, pool.id, pool.to_dict(), at)

    async def delete_pool(self, pool_id: str) -> None:
        await self.call(self._sync.delete_pool, pool_id)

    async def add_address(
        self,
        pool: Pool,
        address: str,
        kind: AnswerKind,
        recorded_at: float | None = None,
        endpoint_name: str | None = None,
    ) -> None:
        """Record an answer about to be sent (unacknowledged until acknowledged), with when (now,
        unless given) and the endpoint name of the request."""
        at = time.time() if recorded_at is None else recorded_at
        answer = UnacknowledgedAnswer(kind, at, endpoint_name)
        await self.call(self._sync.add_address, pool.id, pool.to_dict(), address, answer)

    async def acknowledge(self, pool_id: str, address: str | None = None) -> None:
        await self.call(self._sync.acknowledge, pool_id, address)

    async def remove_address(self, pool_id: str, address: str) -> None:
        await self.call(self._sync.remove_address, pool_id, address)

    async def remove_addresses(self, addresses: list[tuple[str, str]]) -> None:
        await self.call(self._sync.remove_addresses, addresses)

    async def check_integrity(self) -> str:
        return await self.call(self._sync.check_integrity)

    async def quick_check(self) -> str:
        return await self.call(self._sync.quick_check)

    async def quarantined_keys(self, source: str) -> list[str]:
        return await self.call(self._sync.quarantined_keys, source)

    async def quarantine_meta(self, key: str, error: str) -> None:
        await self.call(self._sync.quarantine_meta, key, error)
