"""The path from the audit log to the store, which never makes a tunnel wait: ``offer`` (the
``AuditLog`` record listener) appends to a bounded queue and returns; one task writes batches.
A full queue or a failed batch counts the records as dropped (they are still in the JSON log);
while the store is down the task retries with a capped backoff. Retention runs between
batches every ``retention_interval`` seconds."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .base import (
    Activity,
    AuditBackend,
    AuditPage,
    AuditQuery,
    AuditStoreError,
    AuditStoreUnavailable,
    row_from_record,
)

log = logging.getLogger("tunnel.audit_store")

BACKOFF_FIRST = 0.5  # seconds before the first retry after a failure, doubling
BACKOFF_MAX = 10.0
CLOSE_FLUSH = 2.0  # seconds ``aclose`` lets queued records reach the store


def backoff(first: float = BACKOFF_FIRST, cap: float = BACKOFF_MAX) -> Iterator[float]:
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)


@dataclass(frozen=True, slots=True)
class StoreStats:
    backend: str
    up: bool
    written: int
    dropped: int
    queued: int
    capacity: int
    last_error: str | None


class AuditWriter:
    """Owns the backend: ``start`` opens it (a store that is down at start is retried in the
    background: the relay serves anyway), ``aclose`` flushes for up to CLOSE_FLUSH seconds and
    closes it. Searches go straight to the backend."""

    def __init__(
        self,
        backend: AuditBackend,
        *,
        queue_size: int = 10_000,
        batch_size: int = 500,
        retention_interval: float = 300.0,
        clock: Callable[[], float] = time.time,
        delays: Callable[[], Iterator[float]] = backoff,
    ) -> None:
        self.backend = backend
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.retention_interval = retention_interval
        self._clock = clock
        self._delays = delays
        self._queue: collections.deque[tuple[Mapping[str, Any], str]] = collections.deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._open = False
        self._next_prune = 0.0
        self.written = 0
        self.dropped = 0
        self.last_error: str | None = None

    # -- the data path side ---------------------------------------------------------------------

    def offer(self, record: Mapping[str, Any], line: str) -> None:
        """Queue one record (O(1), never blocks, never raises); dropped when the queue is full."""
        if self._closing or len(self._queue) >= self.queue_size:
            self.dropped += 1
            return
        self._queue.append((record, line))
        self._idle.clear()
        self._wake.set()

    # -- state ----------------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._open and self.last_error is None

    def stats(self) -> StoreStats:
        return StoreStats(
            self.backend.name, self.up, self.written, self.dropped, len(self._queue),
            self.queue_size, self.last_error,
        )  # fmt: skip

    async def flush(self) -> None:
        """Wait until every record queued so far was written or dropped."""
        await self._idle.wait()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store (migrations) and start writing. AuditStoreError (a schema from a
        newer relay) is raised; an unreachable store is retried in the background."""
        try:
            await self.backend.open()
            self._open = True
        except AuditStoreUnavailable as exc:
            self._failed(exc)
        self._task = asyncio.create_task(self._run(), name="audit-store-writer")

    async def aclose(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_FLUSH):
                    await self.flush()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.dropped += len(self._queue)
        self._queue.clear()
        self._idle.set()
        await self.backend.aclose()

    # -- searches -------------------------------------------------------------------------------

    async def search(self, query: AuditQuery) -> AuditPage:
        return await self.backend.search(query)

    async def activity(self, start: float, width: float, buckets: int) -> Activity:
        return await self.backend.activity(start, width, buckets)

    # -- the writing task -----------------------------------------------------------------------

    def _failed(self, exc: Exception) -> None:
        if self.last_error is None:
            log.warning("audit store %s unavailable: %s", self.backend.name, exc)
        self.last_error = str(exc)[:300]

    async def _run(self) -> None:
        delays = self._delays()
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            try:
                if not self._open:
                    await self.backend.open()
                    self._open = True
                await self._write_batch()
                await self._maybe_prune()
            except AuditStoreUnavailable as exc:
                self._open = False
                self._failed(exc)
                await asyncio.sleep(next(delays))
                continue
            except AuditStoreError as exc:  # a newer schema appeared: nothing to do but wait
                self._failed(exc)
                await asyncio.sleep(BACKOFF_MAX)
                continue
            if self.last_error is not None:
                log.info("audit store %s available again", self.backend.name)
                self.last_error = None
            delays = self._delays()

    async def _write_batch(self) -> None:
        count = min(len(self._queue), self.batch_size)
        batch = [self._queue.popleft() for _ in range(count)]
        if not batch:
            return
        rows = [row_from_record(record, line) for record, line in batch]
        try:
            await self.backend.write(rows)
        except BaseException:
            self.dropped += len(rows)  # kept in the JSON log only
            raise
        self.written += len(rows)

    async def _maybe_prune(self) -> None:
        now = self._clock()
        if now < self._next_prune:
            return
        self._next_prune = now + self.retention_interval
        deleted = await self.backend.prune(now)
        if deleted:
            log.info("audit store retention deleted %d record(s)", deleted)
