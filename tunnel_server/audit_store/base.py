"""What every audit store backend shares: the row a record is indexed by, the search query and
its SQL, pages and keyset cursors, the activity histogram, and the ``AuditBackend`` protocol.

A record is stored whole, as the exact JSON line the audit log wrote, next to the columns the
searches use: ``principal`` (user), ``target`` (the policy resource, ``instance:P/Z/N``,
``group:...`` or ``app:NAME``), ``outcome`` (``allow``, ``deny``, ``forward``, or for records
without a decision one derived from the event: ``closed``, ``revoked``, ...), ``time``, plus
``event``, ``node``, ``tunnel_id``, ``port`` and ``source_ip``."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

MAX_PAGE = 1000  # rows one search returns at most
MAX_FILTER = 512  # characters of one filter value
# Outcomes of records that carry no ``decision``.
EVENT_OUTCOMES: Mapping[str, str] = {
    "tunnel_closed": "closed",
    "revoke": "revoked",
    "revocation_received": "revoked",
    "limit_warning": "warning",
    "backpressure": "warning",
    "drain": "drain",
    "http_close": "closed",
    "http_logout": "allow",
    "console": "allow",
}


class AuditStoreUnavailable(Exception):
    """The store cannot be reached, or did not answer in time (the writer counts the batch as
    dropped and retries later; a search answers 503)."""


class AuditStoreError(Exception):
    """The store answered but cannot be used: a schema newer than this relay knows."""


@dataclass(frozen=True, slots=True)
class Row:
    """One record as stored: its indexed columns and the JSON line itself."""

    time: float
    event: str
    node: str
    principal: str | None
    target: str | None
    port: int | None
    outcome: str | None
    tunnel_id: str | None
    source_ip: str | None
    line: str

    def values(self) -> tuple[Any, ...]:
        return (
            self.time, self.event, self.node, self.principal, self.target, self.port,
            self.outcome, self.tunnel_id, self.source_ip, self.line,
        )  # fmt: skip


COLUMNS = (
    "time", "event", "node", "principal", "target", "port", "outcome", "tunnel_id", "source_ip",
    "record",
)  # fmt: skip


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text[: MAX_FILTER * 2]


def row_from_record(record: Mapping[str, Any], line: str) -> Row:
    """The columns of one audit record (``line`` is its JSON text, stored as written)."""
    event = str(record.get("event", ""))
    decision = record.get("decision")
    outcome = decision if isinstance(decision, str) else EVENT_OUTCOMES.get(event)
    target = record.get("resource")
    if target is None and record.get("app") is not None:
        target = f"app:{record['app']}"
    port = record.get("port")
    raw_time = record.get("time")
    when = float(raw_time) if isinstance(raw_time, int | float) else 0.0
    return Row(
        time=when if math.isfinite(when) else 0.0,
        event=event,
        node=str(record.get("node", "")),
        principal=_text(record.get("principal")),
        target=_text(target),
        port=port if isinstance(port, int) and not isinstance(port, bool) else None,
        outcome=_text(outcome),
        tunnel_id=_text(record.get("tunnel_id")),
        source_ip=_text(record.get("source_ip")),
        line=line,
    )


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    """Where the next page starts: strictly older than (time, id)."""

    time: float
    id: int

    def encode(self) -> str:
        return f"{self.time!r}_{self.id}"

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """ValueError for anything this did not encode."""
        when, sep, ident = text.partition("_")
        if not sep or len(text) > 64:
            raise ValueError("bad cursor")
        value = float(when)
        if not math.isfinite(value):
            raise ValueError("bad cursor")
        return cls(value, int(ident))


# Filter -> index, most selective first (both backends create these names).
_INDEXES = (
    ("tunnel_id", "audit_tunnel"),
    ("principal", "audit_principal"),
    ("target", "audit_target"),
    ("outcome", "audit_outcome"),
    ("event", "audit_event"),
)


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Filters (all optional, combined with AND; exact matches) and a page. ``since`` is
    inclusive, ``until`` exclusive (Unix seconds). Newest first."""

    principal: str | None = None
    target: str | None = None
    outcome: str | None = None
    event: str | None = None
    node: str | None = None
    tunnel_id: str | None = None
    since: float | None = None
    until: float | None = None
    before: Cursor | None = None
    limit: int = 50

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_PAGE:
            raise ValueError(f"limit must be 1..{MAX_PAGE}")
        for name in ("principal", "target", "outcome", "event", "node", "tunnel_id"):
            value = getattr(self, name)
            if value is not None and len(value) > MAX_FILTER:
                raise ValueError(f"{name} is longer than {MAX_FILTER} characters")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite time")

    def where(self, mark: str) -> tuple[str, list[Any]]:
        """The WHERE clause (``mark``: the driver's placeholder) and its parameters."""
        clauses: list[str] = []
        params: list[Any] = []
        for name in ("principal", "target", "outcome", "event", "node", "tunnel_id"):
            value = getattr(self, name)
            if value is not None:
                clauses.append(f"{name} = {mark}")
                params.append(value)
        if self.since is not None:
            clauses.append(f"time >= {mark}")
            params.append(self.since)
        if self.until is not None:
            clauses.append(f"time < {mark}")
            params.append(self.until)
        if self.before is not None:
            clauses.append(f"(time < {mark} OR (time = {mark} AND id < {mark}))")
            params += [self.before.time, self.before.time, self.before.id]
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def index(self) -> str:
        """The index that serves this query best whatever the data: the most selective filter
        given (a tunnel, a user, a target), else the (filter, time) index whose order is the
        page's, else time. SQLite is told to use it (``INDEXED BY``): its planner has no
        statistics unless ANALYZE ran, and a wrong guess scans most of the table."""
        for name, index in _INDEXES:
            if getattr(self, name) is not None:
                return index
        return "audit_time"

    def sql(self, mark: str, *, indexed_by: bool = False) -> tuple[str, list[Any]]:
        """One page (plus one row, to know whether there is a next page), newest first."""
        where, params = self.where(mark)
        table = f"audit_records INDEXED BY {self.index()}" if indexed_by else "audit_records"
        sql = f"SELECT id, time, record FROM {table}{where} ORDER BY time DESC, id DESC"
        return f"{sql} LIMIT {mark}", [*params, self.limit + 1]


@dataclass(frozen=True, slots=True)
class StoredRecord:
    id: int
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AuditPage:
    records: list[StoredRecord]
    next: Cursor | None  # None: this was the last page


def page_from_rows(rows: Sequence[tuple[Any, Any, Any]], limit: int) -> AuditPage:
    """Rows (id, time, record JSON) fetched with ``limit + 1``: the page and its cursor."""
    records = []
    for ident, _when, text in rows[:limit]:
        try:
            record = json.loads(text)
        except ValueError:
            record = {"unreadable": str(text)[:200]}
        records.append(StoredRecord(int(ident), record if isinstance(record, dict) else {}))
    following = None
    if len(rows) > limit:
        last = rows[limit - 1]
        following = Cursor(float(last[1]), int(last[0]))
    return AuditPage(records, following)


@dataclass(frozen=True, slots=True)
class Activity:
    """Counts per bucket of ``width`` seconds from ``start``: tunnels opened (``decision``
    records that allowed and dialed a tunnel) and denials (any record that denied)."""

    start: float
    width: float
    opened: list[int] = field(default_factory=list)
    denied: list[int] = field(default_factory=list)


ACTIVITY_SQL = (
    "SELECT {bucket} AS bucket,"
    " SUM(CASE WHEN event = 'decision' AND outcome = 'allow' AND tunnel_id IS NOT NULL"
    " THEN 1 ELSE 0 END),"
    " SUM(CASE WHEN outcome = 'deny' THEN 1 ELSE 0 END)"
    " FROM audit_records WHERE time >= {m} AND time < {m} GROUP BY bucket"
)


def activity_query(
    mark: str, bucket: str, start: float, width: float, buckets: int
) -> tuple[str, list[Any]]:
    """``bucket``: the backend's expression for the bucket number of ``time`` given the start
    and the width as parameters (rounding down; rows are never before the start)."""
    sql = ACTIVITY_SQL.format(m=mark, bucket=bucket)
    return sql, [start, width, start, start + width * buckets]


def activity_from_rows(
    rows: Sequence[tuple[Any, Any, Any]], start: float, width: float, buckets: int
) -> Activity:
    opened, denied = [0] * buckets, [0] * buckets
    for bucket, allowed, refused in rows:
        if bucket is not None and 0 <= int(bucket) < buckets:
            opened[int(bucket)] = int(allowed or 0)
            denied[int(bucket)] = int(refused or 0)
    return Activity(start, width, opened, denied)


class AuditBackend(Protocol):
    """One database. ``open`` connects and migrates the schema (idempotent; called again after
    an outage); every other method may raise AuditStoreUnavailable."""

    name: str

    async def open(self) -> None: ...

    async def write(self, rows: Sequence[Row]) -> None:
        """Store rows in one transaction."""

    async def search(self, query: AuditQuery) -> AuditPage: ...

    async def activity(self, start: float, width: float, buckets: int) -> Activity: ...

    async def prune(self, now: float) -> int:
        """Apply retention; how many records were deleted."""

    async def aclose(self) -> None: ...
