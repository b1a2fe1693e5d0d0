"""Server-side browser sessions. The cookie holds only a random id; everything else lives in a
``SessionStore``: ``MemorySessionStore`` (one node) or ``RedisSessionStore`` (several nodes share
sessions; a sign-out or a revocation on any node ends the session on all of them,
``redis_sessions.py``). ``stores.build_session_store`` picks one from the relay's ``state:`` config.

Every store method is a coroutine. Errors::

    SessionStoreUnavailable   the store cannot be reached or did not answer in time: the
                              request fails closed with 503 + Retry-After (never a sign-in
                              redirect: a new login would need the store too)
    SessionTooLarge           (ValueError) a session or pending login too big to store

A store also tells the proxy about sessions that ended anywhere (``listen``): the proxy closes
its open WebSockets and streams bound to them. Those notifications carry ``session_key(sid)``
(a SHA-256 of the id), never the id itself: the id is the bearer credential in the cookie."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..access.identity import Identity

if TYPE_CHECKING:
    pass

# Called with the keys (session_key) of sessions that ended, on this node or another.
EndedCallback = Callable[[Collection[str]], object]
# Called each time notifications start flowing (first subscription, reconnections): any
# announced before may have been missed, so re-check sessions.
GapCallback = Callable[[], object]


class SessionStoreUnavailable(Exception):
    """The session store cannot be reached or did not answer in time (HTTP 503)."""


class SessionTooLarge(ValueError):
    """A session or pending login over the store's size bound."""


def session_key(sid: str) -> str:
    """What stores index and announce a session by: not the cookie value itself, so that keys,
    notifications and logs never carry a usable credential."""
    return hashlib.sha256(sid.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class WebSession:
    sid: str
    identity: Identity
    origin: str  # scheme://host[:port] the session was created on (cookies are per host)
    created: float
    auth_time: float
    expires: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))


def signed_in_session(
    identity: Identity, origin: str, claims: dict[str, Any], now: float, max_age: float
) -> WebSession:
    """The session a browser sign-in creates: always a new id (no session fixation), the ID
    token's ``auth_time`` when it has one, else now."""
    auth_time = claims.get("auth_time")
    return WebSession(
        sid=secrets.token_urlsafe(32),
        identity=identity,
        origin=origin,
        created=now,
        auth_time=float(auth_time) if isinstance(auth_time, int | float) else now,
        expires=now + max_age,
    )


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
    async def get(self, sid: str) -> WebSession | None:
        """The live session, or None (unknown, expired, unreadable)."""
        ...

    async def put(self, session: WebSession) -> None: ...

    async def delete(self, sid: str) -> None:
        """End one session (announced to ``listen`` on every node)."""
        ...

    async def delete_principal(self, principal: str) -> int:
        """End every session of ``principal`` (announced); how many there were."""
        ...

    async def put_pending(self, pending: PendingLogin) -> None: ...

    async def pop_pending(self, state: str) -> PendingLogin | None:
        """Take a pending login out: one use, atomically, whatever happens next."""
        ...

    async def listen(self, on_ended: EndedCallback, on_gap: GapCallback | None = None) -> None:
        """Until cancelled: call ``on_ended(keys)`` for sessions ended anywhere, this node
        included, and ``on_gap()`` each time notifications start flowing (the first time
        and after every interruption): those announced before may have been missed."""
        ...

    async def aclose(self) -> None:
        """Release what the store itself opened (``HttpProxy.aclose`` calls it)."""
        ...

    async def publish_key(self, jwk: dict[str, Any], expires: float) -> None:
        """Publish one of this node's assertion-signing public keys until ``expires``, so that
        the JWKS any node serves lists every node's keys (upstreams fetch it through the load
        balancer). Private keys never leave their node."""
        ...

    async def published_keys(self) -> list[dict[str, Any]]:
        """Every node's published public keys that have not expired."""
        ...


class MemorySessionStore:
    """One process's sessions. Expired entries are dropped on access and on every put."""

    def __init__(self, clock: Callable[[], float] = time.time, max_pending: int = 10000) -> None:
        self._sessions: dict[str, WebSession] = {}
        self._pending: dict[str, PendingLogin] = {}
        self._clock = clock
        self._max_pending = max_pending
        self._listeners: list[EndedCallback] = []
        self._keys: dict[str, tuple[dict[str, Any], float]] = {}

    async def get(self, sid: str) -> WebSession | None:
        session = self._sessions.get(sid)
        if session is not None and session.expires <= self._clock():
            del self._sessions[sid]
            return None
        return session

    async def put(self, session: WebSession) -> None:
        self._sweep()
        self._sessions[session.sid] = session

    async def delete(self, sid: str) -> None:
        if self._sessions.pop(sid, None) is not None:
            self._announce([session_key(sid)])

    async def delete_principal(self, principal: str) -> int:
        doomed = [s for s, v in self._sessions.items() if v.identity.principal == principal]
        for sid in doomed:
            del self._sessions[sid]
        if doomed:
            self._announce([session_key(sid) for sid in doomed])
        return len(doomed)

    async def put_pending(self, pending: PendingLogin) -> None:
        self._sweep()
        if len(self._pending) >= self._max_pending:
            self._pending.pop(next(iter(self._pending)))  # oldest first
        self._pending[pending.state] = pending

    async def pop_pending(self, state: str) -> PendingLogin | None:
        pending = self._pending.pop(state, None)  # one use, whatever happens next
        if pending is None or pending.expires <= self._clock():
            return None
        return pending

    async def listen(self, on_ended: EndedCallback, on_gap: GapCallback | None = None) -> None:
        self._listeners.append(on_ended)
        if on_gap is not None:
            on_gap()
        try:
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self._listeners.remove(on_ended)

    async def aclose(self) -> None:
        return None

    async def publish_key(self, jwk: dict[str, Any], expires: float) -> None:
        self._keys[str(jwk["kid"])] = (dict(jwk), expires)

    async def published_keys(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [dict(jwk) for jwk, expires in self._keys.values() if expires > now]

    def sessions(self) -> list[WebSession]:
        return list(self._sessions.values())

    def _announce(self, keys: list[str]) -> None:
        for listener in list(self._listeners):
            listener(keys)

    def _sweep(self) -> None:
        now = self._clock()
        for sid in [s for s, v in self._sessions.items() if v.expires <= now]:
            del self._sessions[sid]
        for state in [s for s, v in self._pending.items() if v.expires <= now]:
            del self._pending[state]
