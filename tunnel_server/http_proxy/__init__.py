"""HTTP mode: identity-aware reverse proxy for web apps (docs/http-mode.md).

Only the config models load eagerly (``tunnel_server.config`` imports them); the proxy itself
loads on first use, so that importing the config never imports aiohttp, policy or identity."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import HttpModeConfig, RouteConfig, SessionConfig, WebLoginConfig

if TYPE_CHECKING:
    from .assertion import AssertionSigner
    from .proxy import HttpProxy, serving
    from .sessions import MemorySessionStore, SessionStore, WebSession

_LAZY = {
    "AssertionSigner": ".assertion",
    "HttpProxy": ".proxy",
    "serving": ".proxy",
    "MemorySessionStore": ".sessions",
    "SessionStore": ".sessions",
    "WebSession": ".sessions",
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
    "RouteConfig",
    "SessionConfig",
    "SessionStore",
    "WebLoginConfig",
    "WebSession",
    "serving",
]
