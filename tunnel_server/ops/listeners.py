"""Serving a small aiohttp application (admin API, metrics) on its own address."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

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
