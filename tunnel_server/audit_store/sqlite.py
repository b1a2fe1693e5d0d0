"""The embedded audit store (one node): SQLite in WAL mode, one writer thread and one reader
thread (WAL lets searches run while batches are written), schema migrations on open, and
retention by age and by size (oldest records first; freed pages go back to the file system
through incremental vacuum)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .base import (
    COLUMNS,
    Activity,
    AuditPage,
    AuditQuery,
    AuditStoreError,
    AuditStoreUnavailable,
    Row,
    activity_from_rows,
    activity_query,
    page_from_rows,
)

T = TypeVar("T")

# Each step moves the schema from its index to index + 1 (never edit a released step).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE audit_records ("
        " id INTEGER PRIMARY KEY, time REAL NOT NULL, event TEXT NOT NULL, node TEXT NOT NULL,"
        " principal TEXT, target TEXT, port INTEGER, outcome TEXT, tunnel_id TEXT,"
        " source_ip TEXT, record TEXT NOT NULL)",
        "CREATE INDEX audit_time ON audit_records (time, id)",
        "CREATE INDEX audit_principal ON audit_records (principal, time, id)",
        "CREATE INDEX audit_target ON audit_records (target, time, id)",
        "CREATE INDEX audit_outcome ON audit_records (outcome, time, id)",
        "CREATE INDEX audit_event ON audit_records (event, time, id)",
        "CREATE INDEX audit_tunnel ON audit_records (tunnel_id)",
    ),
)
PRUNE_CHUNK = 5000  # rows deleted per transaction by retention
BUCKET = "CAST((time - ?) / ? AS INTEGER)"
_INSERT = f"INSERT INTO audit_records ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * 10)})"


class SqliteBackend:
    """``path``: the database file (created with its directory). ``max_age`` seconds and
    ``max_bytes`` (pages in use, indexes included) bound what is kept."""

    name = "sqlite"

    def __init__(self, path: Path, *, max_age: float, max_bytes: int, timeout: float = 5.0) -> None:
        self.path = path
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._writer: ThreadPoolExecutor | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._write_db: sqlite3.Connection | None = None
        self._read_db: sqlite3.Connection | None = None

    # -- threads --------------------------------------------------------------------------------

    async def _on(self, executor: ThreadPoolExecutor | None, call: Callable[[], T]) -> T:
        if executor is None:
            raise AuditStoreUnavailable("the audit store is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, call)
        except (sqlite3.OperationalError, sqlite3.DatabaseError, OSError) as exc:
            raise AuditStoreUnavailable(f"sqlite: {exc}") from None

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="audit-sqlite-write")
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="audit-sqlite-read")
        if self._write_db is None:
            self._write_db = await self._on(self._writer, self._open_writer)
        if self._read_db is None:
            self._read_db = await self._on(self._reader, self._connect)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        db.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        return db

    def _open_writer(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connect()
        try:
            # Before the first table: lets retention hand freed pages back to the file system.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            migrate(db)
        except BaseException:
            db.close()
            raise
        return db

    async def aclose(self) -> None:
        for executor, attr in ((self._writer, "_write_db"), (self._reader, "_read_db")):
            db = getattr(self, attr)
            setattr(self, attr, None)
            if executor is not None and db is not None:
                with contextlib.suppress(sqlite3.Error):
                    await asyncio.get_running_loop().run_in_executor(executor, db.close)
        for executor in (self._writer, self._reader):
            if executor is not None:
                executor.shutdown(wait=True)
        self._writer = self._reader = None

    # -- writes ---------------------------------------------------------------------------------

    async def write(self, rows: Sequence[Row]) -> None:
        db = self._write_db
        if db is None:
            raise AuditStoreUnavailable("the audit store is not open")
        values = [row.values() for row in rows]

        def insert() -> None:
            with transaction(db):
                db.executemany(_INSERT, values)

        await self._on(self._writer, insert)

    async def prune(self, now: float) -> int:
        db = self._write_db
        if db is None:
            raise AuditStoreUnavailable("the audit store is not open")
        return await self._on(self._writer, lambda: prune(db, now - self.max_age, self.max_bytes))

    # -- reads ----------------------------------------------------------------------------------

    def _read(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        if self._read_db is None:
            raise AuditStoreUnavailable("the audit store is not open")
        return list(self._read_db.execute(sql, params).fetchall())

    async def search(self, query: AuditQuery) -> AuditPage:
        sql, params = query.sql("?", indexed_by=True)
        rows = await self._on(self._reader, lambda: self._read(sql, params))
        return page_from_rows(rows, query.limit)

    async def activity(self, start: float, width: float, buckets: int) -> Activity:
        sql, params = activity_query("?", BUCKET, start, width, buckets)
        rows = await self._on(self._reader, lambda: self._read(sql, params))
        return activity_from_rows(rows, start, width, buckets)


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Any:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def migrate(db: sqlite3.Connection) -> int:
    """Apply the missing steps in one transaction; returns the schema version."""
    with transaction(db):
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise AuditStoreError(
                f"the audit database has schema version {version}; this relay knows "
                f"{len(MIGRATIONS)} (a newer relay wrote it)"
            )
        for step in MIGRATIONS[version:]:
            for statement in step:
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
    return len(MIGRATIONS)


def used_bytes(db: sqlite3.Connection) -> int:
    pages = int(db.execute("PRAGMA page_count").fetchone()[0])
    free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
    size = int(db.execute("PRAGMA page_size").fetchone()[0])
    return (pages - free) * size


def prune(db: sqlite3.Connection, cutoff: float, max_bytes: int) -> int:
    """Delete records older than ``cutoff``, then the oldest until the pages in use fit
    ``max_bytes``; in chunks (short transactions: the reader and the next batch wait little)."""
    deleted = 0
    oldest = "SELECT id FROM audit_records ORDER BY time, id LIMIT ?"
    while True:
        with transaction(db):
            count = db.execute(
                "DELETE FROM audit_records WHERE id IN"
                " (SELECT id FROM audit_records WHERE time < ? ORDER BY time, id LIMIT ?)",
                (cutoff, PRUNE_CHUNK),
            ).rowcount
        deleted += count
        if count < PRUNE_CHUNK:
            break
    while (used := used_bytes(db)) > max_bytes:
        # The share of the rows that is over the bound (plus 1%), oldest first.
        total = int(db.execute("SELECT count(*) FROM audit_records").fetchone()[0])
        share = (used - max_bytes) / used + 0.01
        chunk = max(1, min(PRUNE_CHUNK, math.ceil(total * share)))
        with transaction(db):
            count = db.execute(
                f"DELETE FROM audit_records WHERE id IN ({oldest})", (chunk,)
            ).rowcount
        deleted += count
        if count == 0:
            break
    if deleted:  # frees one page per step: executescript steps it to the end
        db.executescript("PRAGMA incremental_vacuum;")
    return deleted
