"""Forwarding one decided request to its app (aiohttp client): request and response bodies
stream both ways; a WebSocket is bridged after an Origin check. Both stay registered as open
streams while they last, so that a later decision can close them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from tunnel_runtime.wsbridge import forward_messages

from ..access.policy import AccessRequest
from ..audit import AuditLog
from ..config import RouteConfig
from .callers import Caller
from .decide import OpenStreams
from .headers import response_headers
from .responses import json_response

CHUNK = 64 * 1024
# A response's own re-decision deadline is computed once it has lasted this long (seconds):
# the bound on how late a deadline falling inside a response's first moments is enforced.
STREAM_GRACE = 1.0
WS_MAX_MESSAGE = 4 * 1024 * 1024


class Forwarder:
    """``client``: the upstream client session (made when HTTP mode starts)."""

    def __init__(
        self,
        *,
        client: Callable[[], aiohttp.ClientSession | None],
        streams: OpenStreams,
        audit: AuditLog,
    ) -> None:
        self._client = client
        self._streams = streams
        self._audit = audit

    def _session(self) -> aiohttp.ClientSession:
        client = self._client()
        if client is None:  # pragma: no cover - start() makes it before serving
            raise RuntimeError("HTTP mode is not started")
        return client

    async def http(
        self,
        request: web.Request,
        route: RouteConfig,
        caller: Caller,
        access: AccessRequest,
        target: URL,
        headers: Any,
    ) -> web.StreamResponse:
        body = request.content if request.body_exists else None
        try:
            upstream = await self._session().request(
                request.method,
                target,
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=None,
            )
        except (TimeoutError, aiohttp.ClientError, OSError):
            return web.Response(status=502, text="Bad gateway: the application did not answer\n")
        response: web.StreamResponse | None = None
        transport = request.transport

        def close() -> None:
            upstream.close()
            if transport is not None:
                transport.close()

        stream = self._streams.open(route, caller, access, close, grace=STREAM_GRACE)
        try:
            headers = response_headers(upstream.headers, authenticated=True)
            small = await self._small(request, upstream, headers)
            if small is not None:
                return small
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=headers
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await response.write(chunk)
            await response.write_eof()
            return response
        except (TimeoutError, aiohttp.ClientError, ConnectionError):
            if response is None or not response.prepared:
                return web.Response(status=502, text="Bad gateway\n")
            if transport is not None:
                transport.close()
            return response
        finally:
            self._streams.done(stream)
            upstream.release()

    @staticmethod
    async def _small(
        request: web.Request, upstream: aiohttp.ClientResponse, headers: Any
    ) -> web.Response | None:
        """A small response with a known length and type, answered in one write (None:
        stream it)."""
        length = upstream.content_length
        if length is None or length > CHUNK or request.method == "HEAD":
            return None
        if "Content-Type" not in headers:
            return None
        data = await upstream.read()
        headers.popall("Content-Length", None)
        return web.Response(
            status=upstream.status, reason=upstream.reason, headers=headers, body=data
        )

    async def websocket(
        self,
        request: web.Request,
        route: RouteConfig,
        origin: str,
        caller: Caller,
        access: AccessRequest,
        target: URL,
        headers: Any,
    ) -> web.StreamResponse:
        refused = self._refuse_upgrade(request, route, origin, caller)
        if refused is not None:
            return refused
        try:
            upstream = await self._connect_upstream(request, target, headers)
        except (TimeoutError, aiohttp.ClientError, OSError):
            return web.Response(status=502, text="Bad gateway: the application refused\n")
        server = web.WebSocketResponse(
            protocols=[upstream.protocol] if upstream.protocol else (),
            max_msg_size=WS_MAX_MESSAGE,
            compress=False,
            heartbeat=30,
        )
        await server.prepare(request)
        tasks: list[asyncio.Task[None]] = []

        def close() -> None:
            for task in tasks:
                task.cancel()

        stream = self._streams.open(route, caller, access, close)
        revoked = False
        try:
            tasks += [
                asyncio.create_task(forward_messages(server, upstream)),
                asyncio.create_task(forward_messages(upstream, server)),
            ]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            revoked = not self._streams.done(stream)
            for task in tasks:
                task.cancel()
        code = aiohttp.WSCloseCode.POLICY_VIOLATION if revoked else aiohttp.WSCloseCode.OK
        await upstream.close()
        await server.close(code=code, message=b"access revoked" if revoked else b"")
        return server

    def _refuse_upgrade(
        self, request: web.Request, route: RouteConfig, origin: str, caller: Caller
    ) -> web.Response | None:
        """403 when the app takes no WebSockets, or for a cross-site upgrade (WebSocket
        hijacking): a browser (cookie) upgrade must come from the app's own origin; bearer
        clients may omit Origin but not send a foreign one."""
        if not route.websockets:
            return json_response({"error": "WebSockets are not enabled for this app"}, 403)
        sent_origin = request.headers.get("Origin")
        if (sent_origin is not None and sent_origin.lower() != origin) or (
            sent_origin is None and caller.session is not None
        ):
            self._audit.record(
                "http", decision="deny", reason="websocket origin not allowed", app=route.name,
                principal=caller.identity.principal, status=403,
            )  # fmt: skip
            return json_response({"error": "origin not allowed"}, 403)
        return None

    async def _connect_upstream(
        self, request: web.Request, target: URL, headers: Any
    ) -> aiohttp.ClientWebSocketResponse:
        """The app's WebSocket, with the client's subprotocols and our headers (the client's
        own ``Sec-WebSocket-*`` handshake headers are the client library's to make)."""
        protocols = [
            p.strip()
            for v in request.headers.getall("Sec-WebSocket-Protocol", [])
            for p in v.split(",")
            if p.strip()
        ]
        for name in list(headers.keys()):
            if name.lower().startswith("sec-websocket-"):
                headers.popall(name, None)
        ws_target = target.with_scheme("wss" if target.scheme == "https" else "ws")
        return await self._session().ws_connect(
            ws_target,
            headers=headers,
            protocols=protocols,
            autoping=True,
            max_msg_size=WS_MAX_MESSAGE,
            compress=0,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5),
        )
