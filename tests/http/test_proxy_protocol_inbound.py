"""HTTP mode's listener behind a TCP-passthrough balancer (``http.proxy_protocol: true``): the
trusted balancer's PROXY header gives the client address the upstream sees in
X-Forwarded-For (and that policy and audit use); a header from anyone else is refused."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from tunnel_protocol.proxyheader import encode_v2
from tunnel_server.app import RunningServer

from ..helpers import UNIT, capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from .harness import APP_AUDIENCE

BALANCER, STRANGER = "127.0.0.1", "127.0.0.2"
CLIENT = ("198.51.100.7", 51000)


@asynccontextmanager
async def upstream() -> AsyncIterator[int]:
    """An app that answers with the X-Forwarded-For it was given."""

    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("X-Forwarded-For", "-"))

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


@asynccontextmanager
async def relay_with_http(issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with upstream() as app_port:
        data: dict[str, Any] = relay_config_data(issuer, tmp_path, tls=False)
        data["oidc"]["audiences"] = ["tunnel", APP_AUDIENCE]
        data["http"] = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "issuer_url": "http://127.0.0.1:1",
            "external_scheme": "http",
            "proxy_protocol": True,
            "trusted_proxies": [f"{BALANCER}/32"],
            "header_timeout": 40 * UNIT,
            "routes": [{"name": "demo", "host": "demo.localhost",
                        "upstream": f"http://127.0.0.1:{app_port}",
                        "audiences": [APP_AUDIENCE]}],
        }  # fmt: skip
        policy = tmp_path / "policy.yaml"
        policy.write_text(yaml.safe_dump({"bindings": [
            {"members": ["user:alice@example.com"], "role": "webUser",
             "resources": {"apps": ["demo"]}}]}))  # fmt: skip
        data["policy_file"] = str(policy)
        async with start_relay(data) as relay:
            yield relay


async def _get(port: int, token: str, source: str, preamble: bytes) -> bytes:
    """One request on a fresh connection from ``source``, ``preamble`` first; the response."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind((source, 0))
    await loop.sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(preamble + (
        f"GET / HTTP/1.1\r\nHost: demo.localhost\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n").encode())  # fmt: skip
    try:
        async with asyncio.timeout(100 * UNIT):
            return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def test_the_balancers_header_gives_the_client_address(
    issuer: TestIssuer, tmp_path: Path
) -> None:
    async with relay_with_http(issuer, tmp_path) as relay:
        assert relay.http_port is not None
        token = issuer.mint(aud=APP_AUDIENCE)
        header = encode_v2(CLIENT, ("127.0.0.1", relay.http_port))
        response = await _get(relay.http_port, token, BALANCER, header)
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        assert response.endswith(CLIENT[0].encode())  # the upstream's X-Forwarded-For
        # No header from the balancer's address: its own address, as any direct client.
        response = await _get(relay.http_port, token, BALANCER, b"")
        assert response.endswith(BALANCER.encode())


async def test_a_header_from_anyone_else_is_refused(issuer: TestIssuer, tmp_path: Path) -> None:
    async with relay_with_http(issuer, tmp_path) as relay:
        assert relay.http_port is not None
        audit = capture_audit(relay)
        token = issuer.mint(aud=APP_AUDIENCE)
        header = encode_v2(CLIENT, ("127.0.0.1", relay.http_port))
        assert await _get(relay.http_port, token, STRANGER, header) == b""
        assert [(r["event"], r["decision"], r["source_ip"]) for r in audit] == [
            ("proxy_header", "deny", STRANGER)
        ]
        # Without a header the same peer is an ordinary client.
        response = await _get(relay.http_port, token, STRANGER, b"")
        assert response.endswith(STRANGER.encode())
