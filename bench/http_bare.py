"""The calibration point of issue 17's HTTP-mode targets: a bare reverse proxy on the same stack
as HTTP mode (aiohttp server and keep-alive client session, on uvloop unless ``--asyncio``), no
authentication, policy, header rewriting or assertion. Prints ``Listening on PORT``.

    python -m bench.http_bare UPSTREAM_PORT PORT [--asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import socket

import aiohttp
from aiohttp import web

from tunnel_runtime.loop import run

SKIP = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "content-length"})


async def main(upstream: int, port: int) -> None:
    client = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )  # fmt: skip
    base = f"http://127.0.0.1:{upstream}"

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in SKIP}
        async with client.request(
            request.method, base + request.raw_path, headers=headers, allow_redirects=False,
            data=request.content if request.body_exists else None,
        ) as upstream_response:  # fmt: skip
            body = await upstream_response.read()
            out = {k: v for k, v in upstream_response.headers.items() if k.lower() not in SKIP}
            return web.Response(status=upstream_response.status, body=body, headers=out)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    await web.SockSite(runner, sock, backlog=1024).start()
    print(f"Listening on {port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("upstream", type=int)
    parser.add_argument("port", type=int)
    parser.add_argument("--asyncio", action="store_true", help="plain asyncio, not uvloop")
    args = parser.parse_args()
    run(main(args.upstream, args.port), use_uvloop=not args.asyncio)
