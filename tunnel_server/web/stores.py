"""The browser-session store the relay's ``state:`` config names: in memory (one node) or in
Redis (several nodes share sessions)."""

from __future__ import annotations

import time
from collections.abc import Callable

from redis.asyncio import Redis

from ..config import StateConfig
from .redis_sessions import RedisSessionStore
from .sessions import MemorySessionStore, SessionStore


def build_session_store(
    state: StateConfig, redis: Redis | None = None, *, clock: Callable[[], float] = time.time
) -> SessionStore:
    """The session store for the relay's ``state:`` config: in memory for ``backend: memory``;
    for ``backend: redis``, sessions in Redis at ``state.redis_url`` under ``state.key_prefix``,
    every command bounded by ``state.timeout``. With ``redis`` given, that client is used (and
    left open: its owner closes it); otherwise the store makes its own and closes it in
    ``aclose`` (which ``HttpProxy.aclose`` calls)."""
    if state.backend == "memory":
        return MemorySessionStore(clock)
    if redis is not None:
        return RedisSessionStore(redis, state.key_prefix, timeout=state.timeout, clock=clock)
    if not state.redis_url:
        raise ValueError("state.backend 'redis' needs redis_url for the session store")
    return RedisSessionStore.from_url(
        state.redis_url, state.key_prefix, timeout=state.timeout, clock=clock
    )
