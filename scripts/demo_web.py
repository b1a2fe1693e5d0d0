"""A tiny upstream web app for HTTP mode (demo and tests): every request is checked with
``tunnel_upstream.verify_assertion``; ``/`` shows the verified email.

    python -m scripts.demo_web --port 8081 --issuer http://127.0.0.1:8445 --audience app:demo

Test routes: ``/headers`` (what the app received, JSON), ``/upload`` (sha256 of the body,
streamed), ``/download?bytes=N`` (N deterministic bytes, streamed), ``/ws`` (WebSocket echo)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import html
import json
from collections.abc import Awaitable, Callable

from aiohttp import WSMsgType, web

from tunnel_upstream import ASSERTION_HEADER, AssertionError_, verify_assertion

CLAIMS = web.RequestKey("claims", dict)
_BLOCK = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(2048))


def pattern(total: int, chunk: int = 65536) -> list[int]:
    return [min(chunk, total - n) for n in range(0, total, chunk)]


def make_app(*, issuer: str, audience: str, jwks_url: str | None = None) -> web.Application:
    jwks = jwks_url or issuer.rstrip("/") + "/.well-known/tunnel/jwks.json"

    @web.middleware
    async def verify(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        token = request.headers.get(ASSERTION_HEADER)
        try:
            claims = await asyncio.to_thread(
                verify_assertion, token, audience=audience, issuer=issuer, jwks_url=jwks
            )
        except AssertionError_ as exc:
            return web.Response(status=401, text=f"assertion refused: {exc}\n")
        request[CLAIMS] = claims
        return await handler(request)

    async def index(request: web.Request) -> web.Response:
        claims = request[CLAIMS]
        email = html.escape(str(claims.get("email")))
        groups = html.escape(", ".join(claims.get("groups") or []))
        return web.Response(
            content_type="text/html",
            text="<!doctype html><title>Demo app</title><h1>Demo app</h1>"
            f"<p>Verified identity: <b id='email'>{email}</b></p><p>Groups: {groups}</p>"
            "<form method='post' action='/_tunnel/sign_out' id='sign-out-form'>"
            "<input type='hidden' name='csrf' id='csrf'><button id='sign-out'>Sign out</button>"
            "</form><script>fetch('/_tunnel/identity').then(r=>r.json()).then(j=>"
            "{document.getElementById('csrf').value=j.csrf_token||''})</script>",
        )

    async def headers(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "headers": [[k, v] for k, v in request.headers.items()],
                "path": request.raw_path,
                "claims": request[CLAIMS],
            }  # fmt: skip
        )

    async def upload(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(65536):
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"sha256": digest.hexdigest(), "bytes": size})

    async def download(request: web.Request) -> web.StreamResponse:
        total = int(request.query.get("bytes", "0"))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = total
        await response.prepare(request)
        offset = 0
        for size in pattern(total):
            start = offset % len(_BLOCK)
            await response.write((_BLOCK[start:] + _BLOCK)[:size])
            offset += size
        await response.write_eof()
        return response

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            if message.type == WSMsgType.TEXT:
                await socket.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await socket.send_bytes(message.data)
        return socket

    app = web.Application(middlewares=[verify], client_max_size=0)
    app.router.add_get("/", index)
    app.router.add_get("/headers", headers)
    app.router.add_route("*", "/headers/{tail:.*}", headers)
    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    app.router.add_get("/ws", ws)
    return app


def expected_download_digest(total: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    for size in pattern(total):
        start = offset % len(_BLOCK)
        digest.update((_BLOCK[start:] + _BLOCK)[:size])
        offset += size
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--issuer", required=True, help="the proxy's issuer_url")
    parser.add_argument("--audience", required=True, help="the route's assertion audience")
    args = parser.parse_args()
    app = make_app(issuer=args.issuer, audience=args.audience)
    print(json.dumps({"port": args.port}), flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
