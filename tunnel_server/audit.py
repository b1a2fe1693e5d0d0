"""Audit records: one JSON line per access decision and per tunnel close, on their own logger.

Observers (metrics) see each record's event and fields after its line is written; listeners
(the audit store's writer) get the whole record and its line."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

AUDIT_LOGGER = "tunnel.audit"

# Called with the event and the record's fields (without time and node); must be cheap and
# must not keep or change the mapping.
AuditObserver = Callable[[str, Mapping[str, Any]], None]
# Called with the whole record (time, event and node included) and its JSON line; must be cheap
# (the data path calls it) and must not change the mapping.
RecordListener = Callable[[Mapping[str, Any], str], None]

log = logging.getLogger(__name__)


class AuditLog:
    """Writes records to ``sink`` (default: the ``tunnel.audit`` logger). Values are JSON-encoded,
    so untrusted strings are escaped; callers never pass tokens or secrets.

    ``observers`` and ``listeners`` (both appendable later) are called after the line is
    written; one that raises is logged and never fails the caller: a metrics or audit-store bug
    must not refuse a tunnel."""

    def __init__(
        self,
        node: str,
        sink: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        observers: Iterable[AuditObserver] = (),
    ) -> None:
        self.node = node
        self.sink = sink or logging.getLogger(AUDIT_LOGGER).info
        self._clock = clock
        self.observers: list[AuditObserver] = list(observers)
        self.listeners: list[RecordListener] = []

    def record(self, event: str, **fields: Any) -> None:
        record = {"time": self._clock(), "event": event, "node": self.node, **fields}
        line = json.dumps(record, separators=(",", ":"), default=str, sort_keys=True)
        self.sink(line)
        for listener in self.listeners:
            try:
                listener(record, line)
            except Exception:
                log.exception("audit listener %r failed on a %s record", listener, event)
        for observer in self.observers:
            try:
                observer(event, fields)
            except Exception:
                log.exception("audit observer %r failed on a %s record", observer, event)
