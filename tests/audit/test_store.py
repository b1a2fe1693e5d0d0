"""The audit store against both real backends, SQLite (a file in tmp) and PostgreSQL (Debian's
server, started on loopback by tests/postgres_fixture.py): every record type round-trips, the
searches (user, target, outcome, event, node, tunnel, time range) with keyset pages, the
activity histogram, retention, migrations, and a store that is down."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tunnel_server.audit import AuditLog
from tunnel_server.audit_store import (
    AuditBackend,
    AuditQuery,
    AuditStoreError,
    AuditWriter,
    Cursor,
    SqliteBackend,
)
from tunnel_server.audit_store.postgres import PostgresBackend
from tunnel_server.audit_store.sqlite import used_bytes

from ..helpers import UNIT
from ..postgres_fixture import PostgresServer
from .records import ALICE, BOB, EVERY_TYPE, VM1

DAY = 86400.0
T0 = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fast_retries() -> Iterator[float]:
    return itertools.repeat(UNIT)


def make_backend(kind: str, tmp_path: Path, dsn: str, **kwargs: Any) -> AuditBackend:
    if kind == "sqlite":
        return SqliteBackend(
            tmp_path / "audit.db", max_age=kwargs.get("max_age", 30 * DAY),
            max_bytes=kwargs.get("max_bytes", 1024**3),
        )  # fmt: skip
    return PostgresBackend(dsn, max_age=kwargs.get("max_age", 30 * DAY))


@pytest.fixture(params=["sqlite", "postgres"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def dsn(kind: str, request: pytest.FixtureRequest) -> str:
    """A fresh PostgreSQL database for the postgres runs (none is started for SQLite)."""
    if kind != "postgres":
        return ""
    return str(request.getfixturevalue("postgres_dsn"))


@pytest.fixture
async def writer(kind: str, tmp_path: Path, dsn: str) -> AsyncIterator[AuditWriter]:
    store = AuditWriter(make_backend(kind, tmp_path, dsn), batch_size=50, delays=fast_retries)
    await store.start()
    yield store
    await store.aclose()


def audit_log(
    store: AuditWriter, clock: Clock, lines: list[str], node: str = "relay-1"
) -> AuditLog:
    log = AuditLog(node, sink=lines.append, clock=clock)
    log.listeners.append(store.offer)
    return log


async def everything(store: AuditWriter, **filters: Any) -> list[dict[str, Any]]:
    """Every record matching ``filters``, following the pages to the end."""
    found: list[dict[str, Any]] = []
    before: Cursor | None = None
    for _ in range(1000):
        page = await store.search(AuditQuery(**filters, before=before, limit=7))
        found += [stored.record for stored in page.records]
        if page.next is None:
            return found
        before = page.next
    raise AssertionError("too many pages")


async def test_every_record_type_round_trips(writer: AuditWriter) -> None:
    clock, lines = Clock(), list[str]()
    log = audit_log(writer, clock, lines)
    for event, fields in EVERY_TYPE:
        clock.now += 1.25
        log.record(event, **fields)
    await writer.flush()
    assert writer.written == len(EVERY_TYPE)
    assert writer.dropped == 0
    page = await writer.search(AuditQuery(limit=1000))
    stored = [s.record for s in page.records]
    # Newest first, each exactly the JSON line the log wrote.
    assert stored == [json.loads(line) for line in reversed(lines)]
    for event in {event for event, _ in EVERY_TYPE}:
        expected = [json.loads(line) for line in lines if json.loads(line)["event"] == event]
        assert sorted(await everything(writer, event=event), key=str) == sorted(expected, key=str)


async def test_searches_by_user_target_outcome_and_time(writer: AuditWriter) -> None:
    clock, lines = Clock(), list[str]()
    logs = {node: audit_log(writer, clock, lines, node) for node in ("relay-1", "relay-2")}
    for n in range(240):
        clock.now = T0 + n
        logs["relay-1" if n % 3 else "relay-2"].record(
            "decision",
            decision="allow" if n % 4 else "deny",
            principal=(ALICE, BOB, "user:carol@example.com")[n % 3],
            resource=(VM1, "instance:p/z/vm2")[n % 2],
            port=22,
            tunnel_id=f"t{n}" if n % 4 else None,
        )
    await writer.flush()
    records = [json.loads(line) for line in lines]

    def expect(**match: Any) -> list[dict[str, Any]]:
        since, until = match.pop("since", None), match.pop("until", None)
        rows = [
            r for r in records
            if all(r.get(k) == v for k, v in match.items())
            and (since is None or r["time"] >= since) and (until is None or r["time"] < until)
        ]  # fmt: skip
        return sorted(rows, key=lambda r: -float(r["time"]))

    assert await everything(writer, principal=BOB) == expect(principal=BOB)
    assert await everything(writer, target=VM1) == expect(resource=VM1)
    assert await everything(writer, outcome="deny") == expect(decision="deny")
    assert await everything(writer, node="relay-2") == expect(node="relay-2")
    assert await everything(writer, tunnel_id="t7") == expect(tunnel_id="t7")
    combined = {"principal": ALICE, "target": VM1, "outcome": "allow"}
    assert await everything(writer, **combined, since=T0 + 30, until=T0 + 150) == expect(
        principal=ALICE, resource=VM1, decision="allow", since=T0 + 30, until=T0 + 150
    )
    assert await everything(writer, principal="user:nobody@example.com") == []
    window = await everything(writer, since=T0 + 100, until=T0 + 110)
    assert [r["time"] for r in window] == [T0 + n for n in range(109, 99, -1)]


async def test_pages_do_not_skip_records_at_the_same_time(writer: AuditWriter) -> None:
    clock, lines = Clock(), list[str]()
    log = audit_log(writer, clock, lines)
    for n in range(20):
        log.record("admin", decision="deny", reason=f"r{n}", status=403)  # all at one instant
    await writer.flush()
    found = await everything(writer, event="admin")
    assert sorted(r["reason"] for r in found) == sorted(f"r{n}" for n in range(20))
    assert Cursor.decode(Cursor(T0, 5).encode()) == Cursor(T0, 5)
    for bad in ("", "x", "1_", "nan_3", "1e999_2", "1_" + "9" * 70):
        with pytest.raises(ValueError, match="cursor|could not convert|invalid literal"):
            Cursor.decode(bad)


async def test_activity_counts_opened_tunnels_and_denials(writer: AuditWriter) -> None:
    clock, lines = Clock(), list[str]()
    log = audit_log(writer, clock, lines)
    for minute, opened, denied in ((0, 2, 1), (3, 0, 4), (59, 1, 0)):
        clock.now = T0 + minute * 60 + 5
        for n in range(opened):
            log.record("decision", decision="allow", principal=ALICE, tunnel_id=f"m{minute}-{n}")
        for _ in range(denied):
            log.record("handshake", decision="deny", reason="expired", status=401)
    log.record("decision", decision="allow", principal=ALICE)  # allowed, dial failed: no tunnel
    clock.now = T0 + 3600 + 1  # past the window
    log.record("decision", decision="allow", principal=ALICE, tunnel_id="late")
    await writer.flush()
    activity = await writer.activity(T0, 60.0, 60)
    assert len(activity.opened) == len(activity.denied) == 60
    assert (activity.opened[0], activity.denied[0]) == (2, 1)
    assert (activity.opened[3], activity.denied[3]) == (0, 4)
    assert (activity.opened[59], activity.denied[59]) == (1, 0)
    assert sum(activity.opened) == 3
    assert sum(activity.denied) == 5


async def test_retention_by_age(kind: str, tmp_path: Path, dsn: str) -> None:
    """The writer applies retention after a batch (then every ``retention_interval``)."""
    clock, now, lines = Clock(), Clock(T0 + 29 * 3600), list[str]()
    backend = make_backend(kind, tmp_path, dsn, max_age=DAY)
    store = AuditWriter(backend, retention_interval=3600, clock=now, delays=fast_retries)
    await store.start()
    try:
        log = audit_log(store, clock, lines)
        for n in range(30):
            clock.now = T0 + n * 3600  # hourly for 30 hours
            log.record("drain", phase="start", grace=1.0, tunnels=n)
        await store.flush()
        kept = await everything(store)
        assert [r["tunnels"] for r in kept] == list(range(29, 4, -1))  # a day or younger
        assert await backend.prune(now.now + 3600) == 1
    finally:
        await store.aclose()


async def test_sqlite_retention_by_size(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    backend = SqliteBackend(path, max_age=30 * DAY, max_bytes=1024**2)
    clock, lines = Clock(), list[str]()
    store = AuditWriter(backend, batch_size=500, retention_interval=1e9, clock=clock)
    await store.start()
    try:
        log = audit_log(store, clock, lines)
        for n in range(3000):  # ~3 MB of records
            clock.now = T0 + n
            log.record("admin", decision="deny", reason="x" * 900, status=n)
        await store.flush()
        big = path.stat().st_size
        deleted = await backend.prune(clock.now)
        assert deleted > 1000
        newest = (await store.search(AuditQuery(limit=1))).records[0].record
        assert newest["status"] == 2999  # the oldest went first
    finally:
        await store.aclose()
    with sqlite3.connect(path) as db:
        assert used_bytes(db) <= 1024**2
        assert db.execute("SELECT count(*) FROM audit_records").fetchone()[0] == 3000 - deleted
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert path.stat().st_size < big


async def test_sqlite_migrations_run_once_and_refuse_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    for _ in range(2):  # migrated, then opened again as it is
        backend = SqliteBackend(path, max_age=DAY, max_bytes=1024**3)
        await backend.open()
        await backend.aclose()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        db.execute("PRAGMA user_version = 7")
    db.close()
    assert {"audit_principal", "audit_target", "audit_outcome", "audit_time"} <= indexes
    backend = SqliteBackend(path, max_age=DAY, max_bytes=1024**3)
    with pytest.raises(AuditStoreError, match="schema version 7"):
        await backend.open()
    await backend.aclose()


async def test_postgres_nodes_migrate_together_once(
    postgres_dsn: str, postgres_cluster: PostgresServer
) -> None:
    backends = [PostgresBackend(postgres_dsn, max_age=DAY) for _ in range(3)]
    try:
        await asyncio.gather(*(b.open() for b in backends))
    finally:
        for backend in backends:
            await backend.aclose()
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        cursor = await conn.execute("SELECT version FROM audit_schema")
        assert await cursor.fetchall() == [(1,)]
        await conn.execute("UPDATE audit_schema SET version = 9")
    backend = PostgresBackend(postgres_dsn, max_age=DAY)
    with pytest.raises(AuditStoreError, match="schema version 9"):
        await backend.open()
    await backend.aclose()


async def test_store_down_drops_what_does_not_fit_and_recovers(
    postgres_cluster: PostgresServer,
) -> None:
    """A database that is not there yet: the relay's side never waits (offer returns at once),
    what does not fit the queue is counted as dropped, and the rest is written once the
    database exists."""
    dsn = postgres_cluster.dsn("t_not_yet")
    store = AuditWriter(
        PostgresBackend(dsn, max_age=DAY, timeout=2.0), queue_size=10, delays=fast_retries
    )
    await store.start()  # down: retried in the background, not raised
    clock, lines = Clock(), list[str]()
    try:
        assert not store.stats().up
        log = audit_log(store, clock, lines)
        for n in range(25):
            log.record("drain", phase="start", grace=0.0, tunnels=n)
        assert len(lines) == 25  # every record is in the JSON log
        assert store.stats().dropped == 15
        assert store.stats().queued == 10
        with psycopg.connect(postgres_cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE t_not_yet")
        async with asyncio.timeout(200 * UNIT):
            await store.flush()
        stats = store.stats()
        assert (stats.written, stats.dropped, stats.up) == (10, 15, True)
        assert [r["tunnels"] for r in await everything(store)] == list(range(9, -1, -1))
    finally:
        await store.aclose()
        postgres_cluster.drop_database(dsn)


async def test_invalid_queries_are_refused() -> None:
    bad_queries: list[dict[str, Any]] = [
        {"limit": 0}, {"limit": 1001}, {"principal": "x" * 513}, {"since": float("nan")},
    ]  # fmt: skip
    for bad in bad_queries:
        with pytest.raises(ValueError, match="limit|longer|finite"):
            AuditQuery(**bad)
