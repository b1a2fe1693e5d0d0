"""Audit search on 1,000,000 records: SQLite (a file in a temporary directory) and PostgreSQL
(Debian's server in a temporary directory on a loopback port, as the tests start it). Loads the
records through the store's own write path (batches), then times the console's searches (a page
of 50, newest first, JSON decoded) by user, target, outcome, time range and combinations, each
with many different values; prints a markdown table and writes it to ``--out``.

    .venv/bin/python -m bench.audit_search [--records 1000000] [--backend sqlite|postgres|both]
        [--repeat 30] [--out docs/benchmarks-audit.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import gate
from tunnel_server.audit_store import AuditBackend, AuditQuery, Row, row_from_record
from tunnel_server.audit_store.sqlite import SqliteBackend

USERS = 5000
TARGETS = 2000
SPAN = 30 * 86400.0  # the records cover 30 days
T0 = 1_800_000_000.0
BATCH = 10_000
PAGE = 50


def records(count: int, seed: int = 7) -> Iterator[Row]:
    """Realistic records, oldest first: decisions (allow/deny), tunnel closes, handshakes."""
    rng = random.Random(seed)
    step = SPAN / count
    for n in range(count):
        user = f"user:u{rng.randrange(USERS)}@example.com"
        target = f"instance:p/z/vm{rng.randrange(TARGETS)}"
        kind = rng.random()
        record: dict[str, object] = {"time": T0 + n * step, "node": f"relay-{n % 3}"}
        if kind < 0.45:
            record |= {
                "event": "decision",
                "decision": "allow",
                "principal": user,
                "resource": target,
                "port": 22,
                "tunnel_id": f"t{n}",
                "reason": "allowed by bindings[3]",
                "source_ip": "203.0.113.7",
            }
        elif kind < 0.55:
            record |= {
                "event": "decision",
                "decision": "deny",
                "principal": user,
                "resource": target,
                "port": 5432,
                "source_ip": "198.51.100.9",
                "reason": "no binding grants tunnelUser on this resource",
            }
        elif kind < 0.97:
            record |= {
                "event": "tunnel_closed",
                "principal": user,
                "resource": target,
                "port": 22,
                "tunnel_id": f"t{n}",
                "bytes_from_client": n,
                "bytes_to_client": 2 * n,
                "duration": 31.5,
                "close_code": 1000,
                "close_reason": "finished",
            }
        else:
            record |= {"event": "handshake", "decision": "deny", "reason": "expired",
                       "status": 401, "source_ip": "192.0.2.1"}  # fmt: skip
        line = json.dumps(record, separators=(",", ":"), sort_keys=True)
        yield row_from_record(record, line)


async def load(backend: AuditBackend, count: int) -> float:
    """Write ``count`` records in batches; seconds taken."""
    started = time.perf_counter()
    batch: list[Row] = []
    for row in records(count):
        batch.append(row)
        if len(batch) == BATCH:
            await backend.write(batch)
            batch = []
    if batch:
        await backend.write(batch)
    return time.perf_counter() - started


def queries(rng: random.Random) -> dict[str, Callable[[], AuditQuery]]:
    def user() -> str:
        return f"user:u{rng.randrange(USERS)}@example.com"

    def target() -> str:
        return f"instance:p/z/vm{rng.randrange(TARGETS)}"

    def instant() -> float:
        return T0 + rng.random() * (SPAN - 86400)

    def day(**filters: object) -> AuditQuery:
        since = instant()
        return AuditQuery(**filters, since=since, until=since + 86400, limit=PAGE)  # type: ignore[arg-type]

    return {
        "user": lambda: AuditQuery(principal=user(), limit=PAGE),
        "target": lambda: AuditQuery(target=target(), limit=PAGE),
        "outcome (deny)": lambda: AuditQuery(outcome="deny", limit=PAGE),
        "time range (1 h)": lambda: (lambda s: AuditQuery(since=s, until=s + 3600, limit=PAGE))(
            instant()
        ),
        "user + 1 day": lambda: day(principal=user()),
        "outcome deny + 1 day": lambda: day(outcome="deny"),
        "target + outcome allow": lambda: AuditQuery(target=target(), outcome="allow", limit=PAGE),
        "user + target + outcome + 30 days": lambda: AuditQuery(
            principal=user(),
            target=target(),
            outcome="deny",
            since=T0,
            until=T0 + SPAN,
            limit=PAGE,
        ),  # fmt: skip
    }


@dataclass
class Timing:
    name: str
    median_ms: float
    p95_ms: float
    max_ms: float
    rows: float


async def time_searches(backend: AuditBackend, repeat: int) -> list[Timing]:
    rng = random.Random(11)
    timings = []
    for name, make in queries(rng).items():
        await backend.search(make())  # warm the cache for this shape once
        samples, rows = [], []
        for _ in range(repeat):
            query = make()
            started = time.perf_counter()
            page = await backend.search(query)
            samples.append((time.perf_counter() - started) * 1000)
            rows.append(len(page.records))
        samples.sort()
        p95 = samples[min(len(samples) - 1, int(len(samples) * 0.95))]
        timings.append(
            Timing(name, statistics.median(samples), p95, samples[-1], statistics.mean(rows))
        )
    return timings


async def run_backend(
    kind: str, count: int, repeat: int, directory: Path
) -> tuple[float, list[Timing]]:
    backend: AuditBackend
    if kind == "sqlite":
        backend = SqliteBackend(directory / "audit.db", max_age=1e12, max_bytes=1 << 40)
        await backend.open()
        try:
            return await load(backend, count), await time_searches(backend, repeat)
        finally:
            await backend.aclose()
    from tests.postgres_fixture import postgres_server
    from tunnel_server.audit_store.postgres import PostgresBackend

    with postgres_server() as server:
        backend = PostgresBackend(server.create_database(), max_age=1e12, timeout=60)
        await backend.open()
        try:
            loaded = await load(backend, count)
            await analyze(backend)
            return loaded, await time_searches(backend, repeat)
        finally:
            await backend.aclose()


async def analyze(backend: AuditBackend) -> None:
    """Fresh planner statistics after the bulk load (autovacuum would do it a little later)."""
    import psycopg

    from tunnel_server.audit_store.postgres import PostgresBackend

    assert isinstance(backend, PostgresBackend)
    async with await psycopg.AsyncConnection.connect(backend.dsn, autocommit=True) as conn:
        await conn.execute("ANALYZE audit_records")


def table(results: dict[str, tuple[float, list[Timing]]], count: int, load: str) -> str:
    lines = [
        f"# Audit search: {count:,} records",
        "",
        f"`python -m bench.audit_search` on {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; {load} A page of {PAGE} "
        "records, newest first, JSON decoded, through the store's `search` (what the console "
        "calls); each line is 30 searches with different values (users, targets, instants).",
        "",
        "| backend | search | median ms | p95 ms | max ms | rows per page |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for kind, (_, timings) in results.items():
        for t in timings:
            lines.append(
                f"| {kind} | {t.name} | {t.median_ms:.2f} | {t.p95_ms:.2f} | {t.max_ms:.2f} "
                f"| {t.rows:.0f} |"
            )
    lines += ["", "Loading (batches of 10,000 through the store's write path, 6 indexes):", ""]
    for kind, (seconds, _) in results.items():
        lines.append(f"- {kind}: {seconds:.1f} s ({count / seconds:,.0f} records/s)")
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> str:
    kinds = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    before = gate.start_load()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        for kind in kinds:
            print(f"{kind}: loading {args.records:,} records ...", file=sys.stderr, flush=True)
            results[kind] = await run_backend(kind, args.records, args.repeat, Path(tmp))
    after = os.getloadavg()[0]
    return table(results, args.records, gate.verdict(before, after))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = asyncio.run(main_async(args))
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    gate.exit_if_busy(gate.start_load(), gate.load1())


if __name__ == "__main__":
    main()
