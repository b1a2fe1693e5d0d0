"""Audit records: one JSON line per access decision and per tunnel close, on their own logger."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

AUDIT_LOGGER = "tunnel.audit"


class AuditLog:
    """Writes records to ``sink`` (default: the ``tunnel.audit`` logger). Values are JSON-encoded,
    so untrusted strings are escaped; callers never pass tokens or secrets."""

    def __init__(
        self,
        node: str,
        sink: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.sink = sink or logging.getLogger(AUDIT_LOGGER).info
        self._clock = clock

    def record(self, event: str, **fields: Any) -> None:
        record = {"time": self._clock(), "event": event, "node": self.node, **fields}
        self.sink(json.dumps(record, separators=(",", ":"), default=str, sort_keys=True))
