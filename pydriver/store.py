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
never waits on the disk.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .errors import HostError
from .ipam import AnswerKind, PendingAnswer, Pool
from .model import Endpoint, Network

T = TypeVar("T")

DB_NAME = "state.db"
SCHEMA_VERSION = 3

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
"""

# "pending" marks an IPAM answer that was written before it was sent and not yet known to
# have reached Docker; with when it was recorded and what identifies the request (kind,
# endpoint name), so only Docker's retry of that request gets it again: see
# ipam.Pool.replayable. Rows from before version 3 have no time and count as expired.
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


class SyncStore:
    """The SQLite state database. Not thread-safe by itself: use it from one thread."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / DB_NAME
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as err:
            raise HostError(f"cannot open the state database {self.path}: {err}") from None
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
        if version > SCHEMA_VERSION:
            raise HostError(
                f"the state database {self.path} is from a newer pybridge "
                f"(schema {version}, this version knows {SCHEMA_VERSION})"
            )
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

    def load_networks(self) -> list[Network]:
        rows = self.db.execute("SELECT data FROM networks ORDER BY id").fetchall()
        return [Network.from_dict(json.loads(r[0])) for r in rows]

    def load_endpoints(self) -> list[Endpoint]:
        rows = self.db.execute("SELECT data FROM endpoints ORDER BY id").fetchall()
        return [Endpoint.from_dict(json.loads(r[0])) for r in rows]

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
        """Pools with their addresses. Answers still pending come back as replayable."""
        pools = []
        rows = self.db.execute(
            "SELECT id, data, pending, recorded_at FROM pools ORDER BY id"
        ).fetchall()
        for pool_id, data, pool_pending, pool_recorded_at in rows:
            addresses = self.db.execute(
                "SELECT address, pending, kind, recorded_at, endpoint_name FROM addresses "
                "WHERE pool_id=?",
                (pool_id,),
            ).fetchall()
            pools.append(
                Pool.from_dict(
                    json.loads(data),
                    [row[0] for row in addresses],
                    {
                        a: PendingAnswer(_kind(kind), at, name)
                        for a, pending, kind, at, name in addresses
                        if pending
                    },
                    bool(pool_pending),
                    pool_recorded_at if pool_pending else None,
                )
            )
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
        self, pool_id: str, pool_data: dict[str, Any], address: str, answer: PendingAnswer
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


def _kind(value: object) -> AnswerKind:
    if value == "gateway":
        return "gateway"
    return "specific" if value == "specific" else "dynamic"


def read_state(state_dir: Path) -> tuple[list[Network], list[Endpoint]]:
    """Networks and endpoints from a state directory, read-only (safe while pybridge runs)."""
    path = state_dir / DB_NAME
    if not path.exists():
        raise HostError(f"no pybridge state at {path}; is --state-dir right?")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error as err:
        raise HostError(f"cannot read the state database {path}: {err}") from None
    try:
        networks = [
            Network.from_dict(json.loads(r[0]))
            for r in db.execute("SELECT data FROM networks ORDER BY id")
        ]
        endpoints = [
            Endpoint.from_dict(json.loads(r[0]))
            for r in db.execute("SELECT data FROM endpoints ORDER BY id")
        ]
    except sqlite3.Error as err:
        raise HostError(f"cannot read the state database {path}: {err}") from None
    finally:
        db.close()
    return networks, endpoints


class Store:
    """Async facade: runs every SyncStore call on one dedicated thread."""

    def __init__(self, state_dir: Path) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pydriver-store")
        self._sync = SyncStore(state_dir)

    @property
    def path(self) -> Path:
        return self._sync.path

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as err:
            raise HostError(f"could not write pybridge's state database: {err}") from None

    def close(self) -> None:
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
        """Record an answer about to be sent (pending until acknowledged), with when (now,
        unless given) and the endpoint name of the request."""
        at = time.time() if recorded_at is None else recorded_at
        answer = PendingAnswer(kind, at, endpoint_name)
        await self.call(self._sync.add_address, pool.id, pool.to_dict(), address, answer)

    async def acknowledge(self, pool_id: str, address: str | None = None) -> None:
        await self.call(self._sync.acknowledge, pool_id, address)

    async def remove_address(self, pool_id: str, address: str) -> None:
        await self.call(self._sync.remove_address, pool_id, address)

    async def remove_addresses(self, addresses: list[tuple[str, str]]) -> None:
        await self.call(self._sync.remove_addresses, addresses)

    async def check_integrity(self) -> str:
        return await self.call(self._sync.check_integrity)
