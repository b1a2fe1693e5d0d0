"""The audit store: every audit record, besides its JSON log line, in a database that the admin
console searches (by user, target, outcome, event, node, tunnel and time range) and charts.

- ``base``: the row, the query, pages, the ``AuditBackend`` protocol;
- ``sqlite``: the embedded default for one node (WAL, retention by age and size);
- ``postgres``: PostgreSQL for clusters (psycopg 3, the ``postgres`` extra; every node writes,
  any node searches; imported only when configured);
- ``writer``: ``AuditWriter``, the bounded queue and batching task between the audit log and
  the backend: the data path never waits on the database.

Errors::

    AuditStoreUnavailable   the database cannot be reached or did not answer in time (the
                            batch is counted as dropped; a search answers 503)
    AuditStoreError         the database holds a schema from a newer relay
    ValueError              an invalid query (limit, filter length, cursor)

Schema migrations run when a backend opens. docs/audit.md has the details."""

from .base import (
    EVENT_OUTCOMES,
    MAX_PAGE,
    Activity,
    AuditBackend,
    AuditPage,
    AuditQuery,
    AuditStoreError,
    AuditStoreUnavailable,
    Cursor,
    Row,
    StoredRecord,
    row_from_record,
)
from .sqlite import SqliteBackend
from .writer import AuditWriter, StoreStats

__all__ = [
    "EVENT_OUTCOMES",
    "MAX_PAGE",
    "Activity",
    "AuditBackend",
    "AuditPage",
    "AuditQuery",
    "AuditStoreError",
    "AuditStoreUnavailable",
    "AuditWriter",
    "Cursor",
    "Row",
    "SqliteBackend",
    "StoreStats",
    "StoredRecord",
    "row_from_record",
]
