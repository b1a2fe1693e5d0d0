"""HTTP mode: an identity-aware reverse proxy for web apps on its own listener
(docs/http-mode.md): browser sign-in and server-side sessions, bearer tokens for programs, a
decision per request, and signed identity assertions to the upstream."""

from __future__ import annotations

from ..config import HttpModeConfig, RouteConfig, SessionConfig, WebLoginConfig
from .assertion import AssertionSigner
from .proxy import HttpProxy, serving
from .redis_sessions import RedisSessionStore
from .sessions import (
    MemorySessionStore,
    SessionStore,
    SessionStoreUnavailable,
    WebSession,
    session_key,
)
from .stores import build_session_store

__all__ = [
    "AssertionSigner",
    "HttpModeConfig",
    "HttpProxy",
    "MemorySessionStore",
    "RedisSessionStore",
    "RouteConfig",
    "SessionConfig",
    "SessionStore",
    "SessionStoreUnavailable",
    "WebLoginConfig",
    "WebSession",
    "build_session_store",
    "serving",
    "session_key",
]
