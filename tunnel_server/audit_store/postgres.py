"""The cluster audit store: PostgreSQL through psycopg 3 (asyncio). Every node writes its batches
with COPY on its own connection and searches on another; the schema is migrated on open under
an advisory lock (several nodes may start at once); retention by age (every node prunes, in
short chunks). A broken or slow connection is dropped and opened again on the next call."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg

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

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE audit_records ("
        " id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        " time double precision NOT NULL, event text NOT NULL, node text NOT NULL,"
        " principal text, target text, port integer, outcome text, tunnel_id text,"
        " source_ip text, record text NOT NULL)",
        "CREATE INDEX audit_time ON audit_records (time, id)",
        "CREATE INDEX audit_principal ON audit_records (principal, time, id)",
        "CREATE INDEX audit_target ON audit_records (target, time, id)",
        "CREATE INDEX audit_outcome ON audit_records (outcome, time, id)",
        "CREATE INDEX audit_event ON audit_records (event, time, id)",
        "CREATE INDEX audit_tunnel ON audit_records (tunnel_id)",
    ),
)
LOCK_KEY = 0x61756469  # pg_advisory_xact_lock key held while migrating ("audi")
PRUNE_CHUNK = 5000
BUCKET = "FLOOR((time - %s) / %s)::integer"
_COPY = f"COPY audit_records ({', '.join(COLUMNS)}) FROM STDIN"

Connection = psycopg.AsyncConnection[tuple[Any, ...]]


class PostgresBackend:
    """``dsn``: a libpq connection string or URL. ``timeout`` bounds every call (connect
    included) and is the server's statement timeout."""

    name = "postgres"

    def __init__(self, dsn: str, *, max_age: float, timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.max_age = max_age
        self.timeout = timeout
        self._write: Connection | None = None
        self._read: Connection | None = None
        self._write_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()

    async def _connect(self) -> Connection:
        try:
            async with asyncio.timeout(self.timeout):
                return await psycopg.AsyncConnection.connect(
                    self.dsn,
                    autocommit=True,
                    connect_timeout=max(1, int(self.timeout)),
                    options=f"-c statement_timeout={int(self.timeout * 1000)}",
                    application_name="identity-tunnel audit",
                )
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise AuditStoreUnavailable(f"postgres: {type(exc).__name__}: {exc}") from None

    @contextlib.asynccontextmanager
    async def _using(self, role: str) -> AsyncIterator[Connection]:
        """The writer's or the reader's connection (opened when missing), one caller at a
        time; dropped on any failure so that the next call starts from a fresh connection."""
        lock = self._write_lock if role == "write" else self._read_lock
        async with lock:
            attr = f"_{role}"
            conn: Connection | None = getattr(self, attr)
            if conn is None or conn.closed:
                conn = await self._connect()
                setattr(self, attr, conn)
            try:
                async with asyncio.timeout(self.timeout):
                    yield conn
            except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError) as exc:
                setattr(self, attr, None)
                await _close(conn)
                raise AuditStoreUnavailable(f"postgres: {type(exc).__name__}: {exc}") from None

    async def open(self) -> None:
        async with self._using("write") as conn:
            await migrate(conn)
        async with self._using("read"):
            pass

    async def aclose(self) -> None:
        for attr in ("_write", "_read"):
            conn = getattr(self, attr)
            setattr(self, attr, None)
            if conn is not None:
                await _close(conn)

    async def write(self, rows: Sequence[Row]) -> None:
        async with self._using("write") as conn, conn.transaction():
            async with conn.cursor() as cursor, cursor.copy(_COPY) as copy:
                for row in rows:
                    await copy.write_row(row.values())

    async def prune(self, now: float) -> int:
        deleted = 0
        sql = (
            "DELETE FROM audit_records WHERE id IN (SELECT id FROM audit_records"
            " WHERE time < %s ORDER BY time, id LIMIT %s)"
        )
        while True:
            async with self._using("write") as conn:
                cursor = await conn.execute(sql, (now - self.max_age, PRUNE_CHUNK))
                count = cursor.rowcount
            deleted += count
            if count < PRUNE_CHUNK:
                return deleted

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        async with self._using("read") as conn:
            cursor = await conn.execute(sql, params)
            return list(await cursor.fetchall())

    async def search(self, query: AuditQuery) -> AuditPage:
        sql, params = query.sql("%s")
        return page_from_rows(await self._fetch(sql, params), query.limit)

    async def activity(self, start: float, width: float, buckets: int) -> Activity:
        sql, params = activity_query("%s", BUCKET, start, width, buckets)
        return activity_from_rows(await self._fetch(sql, params), start, width, buckets)


async def migrate(conn: Connection) -> int:
    """Apply the missing steps in one transaction, under an advisory lock (nodes starting
    together migrate once); returns the schema version."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        await conn.execute("CREATE TABLE IF NOT EXISTS audit_schema (version integer NOT NULL)")
        cursor = await conn.execute("SELECT max(version) FROM audit_schema")
        found = await cursor.fetchone()
        version = int(found[0]) if found is not None and found[0] is not None else 0
        if version > len(MIGRATIONS):
            raise AuditStoreError(
                f"the audit database has schema version {version}; this relay knows "
                f"{len(MIGRATIONS)} (a newer relay wrote it)"
            )
        for step in MIGRATIONS[version:]:
            for statement in step:
                await conn.execute(statement)
        if version < len(MIGRATIONS):
            await conn.execute("DELETE FROM audit_schema")
            await conn.execute("INSERT INTO audit_schema VALUES (%s)", (len(MIGRATIONS),))
    return len(MIGRATIONS)


async def _close(conn: Connection) -> None:
    with contextlib.suppress(psycopg.Error, OSError):
        await conn.close()
