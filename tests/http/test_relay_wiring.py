"""HTTP mode inside the relay process: configured from the relay's YAML (`http:`), one policy for
tunnels and web apps, its listener registered as an own endpoint (never a tunnel target)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from tunnel_server.app import running
from tunnel_server.config import parse_config
from tunnel_upstream import verify_assertion

from ..helpers import relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from ..redis_fixture import RedisServer
from .harness import APP_AUDIENCE


@asynccontextmanager
async def plain_upstream() -> AsyncIterator[int]:
    """An upstream that reports whether the signed assertion arrived."""

    async def handle(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "assertion": "X-Tunnel-Jwt-Assertion" in request.headers,
                "email": request.headers.get("X-Tunnel-Authenticated-User-Email"),
            }  # fmt: skip
        )

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def test_http_mode_from_the_relay_config(issuer: TestIssuer, tmp_path: Path) -> None:
    async with plain_upstream() as upstream_port:
        data: dict[str, Any] = relay_config_data(issuer, tmp_path)
        data["oidc"]["audiences"] = ["tunnel", APP_AUDIENCE]
        data["http"] = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "issuer_url": "http://127.0.0.1:1",
            "external_scheme": "http",
            "routes": [
                {
                    "name": "demo",
                    "host": "demo.localhost",
                    "upstream": f"http://127.0.0.1:{upstream_port}",
                    "audiences": [APP_AUDIENCE],
                }
            ],
        }
        policy = tmp_path / "policy.yaml"
        policy.write_text(
            yaml.safe_dump(
                {
                    "bindings": [
                        {
                            "members": ["user:alice@example.com"],
                            "role": "webUser",
                            "resources": {"apps": ["demo"]},
                        }
                    ]
                }  # fmt: skip
            )
        )
        data["policy_file"] = str(policy)
        parse_config(data)  # the http block validates as part of the relay config
        async with start_relay(data) as relay:
            assert relay.http is not None
            assert relay.http_port is not None
            url = f"http://127.0.0.1:{relay.http_port}/"
            # One policy for tunnels and apps: alice has a webUser binding on app:demo, bob none.
            for sub, status in (("alice", 200), ("bob", 403)):
                token = issuer.mint(sub=sub, email=f"{sub}@example.com", aud=APP_AUDIENCE)
                headers = {"Host": "demo.localhost", "Authorization": f"Bearer {token}",
                           "Accept": "application/json"}  # fmt: skip
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(url, headers=headers) as response,
                ):
                    assert response.status == status
                    if status == 200:
                        body = await response.json()
                        assert body == {"assertion": True, "email": "alice@example.com"}
            # The relay never tunnels to its own HTTP listener.
            assert relay.relay.destinations.check("127.0.0.1", relay.http_port) is not None


async def test_two_relays_sharing_redis_share_assertion_keys(
    issuer: TestIssuer, tmp_path: Path, redis: RedisServer
) -> None:
    """The relay's own wiring (`state.backend: redis`): HTTP mode's sessions and signing keys
    go to the shared store, so node A's JWKS lists node B's key and verifies B's assertions."""
    async with plain_upstream() as upstream_port, AsyncExitStack() as stack:
        relays = []
        for index in range(2):
            data: dict[str, Any] = relay_config_data(issuer, tmp_path, tls=False)
            data["http"] = {
                "listen": {"host": "127.0.0.1", "port": 0},
                "issuer_url": "http://127.0.0.1:1",
                "external_scheme": "http",
                "routes": [
                    {
                        "name": "demo",
                        "host": "demo.localhost",
                        "upstream": f"http://127.0.0.1:{upstream_port}",
                        "audiences": [APP_AUDIENCE],
                    }
                ],
            }
            data["state"] = {"backend": "redis", "redis_url": redis.url}
            data["cluster"] = {"advertise_url": "ws://127.0.0.1:1", "secret": "s" * 32}
            config = parse_config(data, env={})
            relays.append(await stack.enter_async_context(running(config, node=f"relay-{index}")))
        a, b = relays
        assert a.http is not None
        assert b.http is not None
        url = f"http://127.0.0.1:{a.http_port}/.well-known/tunnel/jwks.json"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            jwks = await response.json()
        assertion = b.http.signer.sign(
            audience=APP_AUDIENCE, subject="alice", email="alice@example.com", groups=(),
            principal="user:alice@example.com",
        )  # fmt: skip
        claims = verify_assertion(
            assertion, audience=APP_AUDIENCE, issuer=b.http.signer.issuer, jwks=jwks
        )
        assert claims["email"] == "alice@example.com"
