"""HTTP mode: identity-aware reverse proxy for web apps (docs/http-mode.md).

Only the config models load eagerly (``tunnel_server.config`` imports them); the proxy itself
loads on first use, so that importing the config never imports aiohttp, policy or identity."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config.http import HttpModeConfig, RouteConfig, SessionConfig, WebLoginConfig

if TYPE_CHECKING:
    from .assertion import AssertionSigner
    from .proxy import HttpProxy, serving
    from .redis_sessions import RedisSessionStore
    from .sessions import (
        MemorySessionStore,
        SessionStore,
        SessionStoreUnavailable,
        WebSession,
        build_session_store,
        session_key,
    )

_LAZY = {
    "AssertionSigner": ".assertion",
    "HttpProxy": ".proxy",
    "serving": ".proxy",
    "MemorySessionStore": ".sessions",
    "RedisSessionStore": ".redis_sessions",
    "SessionStore": ".sessions",
    "SessionStoreUnavailable": ".sessions",
    "WebSession": ".sessions",
    "build_session_store": ".sessions",
    "session_key": ".sessions",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(module, __name__), name)


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
