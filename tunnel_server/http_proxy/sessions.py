"""Server-side browser sessions. The cookie holds only a random id; everything else lives in a
``SessionStore`` (in memory here; a Redis store can implement the same interface so that a
sign-out ends the session on every node)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..identity import Identity


@dataclass
class WebSession:
    sid: str
    identity: Identity
    origin: str  # scheme://host[:port] the session was created on (cookies are per host)
    created: float
    auth_time: float
    expires: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))


@dataclass
class PendingLogin:
    state: str
    nonce: str
    verifier: str
    return_to: str
    host: str
    browser: str  # random value also set in a cookie: binds the callback to this browser
    expires: float


class SessionStore(Protocol):
    def get(self, sid: str) -> WebSession | None: ...
    def put(self, session: WebSession) -> None: ...
    def delete(self, sid: str) -> None: ...
    def delete_principal(self, principal: str) -> int: ...
    def put_pending(self, pending: PendingLogin) -> None: ...
    def pop_pending(self, state: str) -> PendingLogin | None: ...


class MemorySessionStore:
    """One process's sessions. Expired entries are dropped on access and on every put."""

    def __init__(self, clock: Callable[[], float] = time.time, max_pending: int = 10000) -> None:
        self._sessions: dict[str, WebSession] = {}
        self._pending: dict[str, PendingLogin] = {}
        self._clock = clock
        self._max_pending = max_pending

    def get(self, sid: str) -> WebSession | None:
        session = self._sessions.get(sid)
        if session is not None and session.expires <= self._clock():
            del self._sessions[sid]
            return None
        return session

    def put(self, session: WebSession) -> None:
        self._sweep()
        self._sessions[session.sid] = session

    def delete(self, sid: str) -> None:
        self._sessions.pop(sid, None)

    def delete_principal(self, principal: str) -> int:
        doomed = [s for s, v in self._sessions.items() if v.identity.principal == principal]
        for sid in doomed:
            del self._sessions[sid]
        return len(doomed)

    def put_pending(self, pending: PendingLogin) -> None:
        self._sweep()
        if len(self._pending) >= self._max_pending:
            self._pending.pop(next(iter(self._pending)))  # oldest first
        self._pending[pending.state] = pending

    def pop_pending(self, state: str) -> PendingLogin | None:
        pending = self._pending.pop(state, None)  # one use, whatever happens next
        if pending is None or pending.expires <= self._clock():
            return None
        return pending

    def sessions(self) -> list[WebSession]:
        return list(self._sessions.values())

    def _sweep(self) -> None:
        now = self._clock()
        for sid in [s for s, v in self._sessions.items() if v.expires <= now]:
            del self._sessions[sid]
        for state in [s for s, v in self._pending.items() if v.expires <= now]:
            del self._pending[state]
