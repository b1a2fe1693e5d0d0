"""A tiny WebSocket server on 127.0.0.1:0 that answers like the relay will, exactly as scripted:
a 401 with a given ``WWW-Authenticate`` header, or an upgrade closed at once with a given close
code and reason. It stands in for relay behaviour that the server side has not shipped yet
(the ``<category>; ref=<REFERENCE>`` grammar, RFC 6750 challenges)."""

from __future__ import annotations

import http
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from tunnel_protocol import NATIVE_SUBPROTOCOL


@dataclass
class Script:
    status: int | None = None  # answer the handshake with this HTTP status
    www_authenticate: str | None = None
    close_code: int = 4033
    close_reason: str = ""
    requests: list[str] = field(default_factory=list)


@asynccontextmanager
async def fake_relay(script: Script) -> AsyncIterator[str]:
    """Yields the server's ws:// URL."""

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        script.requests.append(request.path)
        if request.path.startswith("/.well-known/"):
            return connection.respond(http.HTTPStatus.NOT_FOUND, "no login configuration\n")
        if script.status is None:
            return None
        headers = Headers()
        if script.www_authenticate is not None:
            headers["WWW-Authenticate"] = script.www_authenticate
        body = b"refused\n"
        headers["Content-Length"] = str(len(body))
        phrase = http.HTTPStatus(script.status).phrase
        return Response(script.status, phrase, headers, body)

    async def handler(connection: ServerConnection) -> None:
        await connection.close(script.close_code, script.close_reason)

    server: Server = await serve(
        handler,
        "127.0.0.1",
        0,
        process_request=process_request,
        subprotocols=[NATIVE_SUBPROTOCOL],  # type: ignore[list-item]
        compression=None,
    )
    try:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()
