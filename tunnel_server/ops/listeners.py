"""Serving a small aiohttp application (admin API, metrics) on its own address; the protocol
factory of a websockets server, for a listener of our own (PROXY protocol)."""

from __future__ import annotations

import inspect
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web


@asynccontextmanager
async def serve_app(
    app: web.Application, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    """Run ``app`` on host:port (0: any free port; HTTPS with ``ssl_context``) without access
    logs; yields the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


def websockets_factory(server: Any) -> Callable[[], Any]:
    """The protocol factory of a websockets ``serve(...)`` that has not started yet: the one
    its ``create_server`` hands to ``loop.create_server``, so that a ProxiedListener makes the
    very same connections (websockets has no public hook for a listener of one's own)."""
    found = inspect.getclosurevars(server.create_server).nonlocals.get("protocol_factory")
    if not callable(found):
        raise RuntimeError("this websockets version hides its protocol factory: PROXY protocol off")
    return found  # type: ignore[no-any-return]
