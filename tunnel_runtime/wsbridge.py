"""Forward messages between two aiohttp WebSockets (HTTP mode's proxy and the client's local
proxy both bridge a browser-side WebSocket to an upstream one)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

AnyWebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def forward_messages(src: AnyWebSocket, dst: AnyWebSocket) -> None:
    """Copy text and binary messages from ``src`` to ``dst`` until ``src`` closes or errs."""
    async for message in src:
        if message.type == aiohttp.WSMsgType.TEXT:
            await dst.send_str(message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            await dst.send_bytes(message.data)
        else:
            break
