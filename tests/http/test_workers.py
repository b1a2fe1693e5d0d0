"""``http.workers``: several HTTP-mode processes on the relay's HTTP port (SO_REUSEPORT), each
with its own signing key; a user revocation and a policy change reach every one of them; more
than one worker needs the shared Redis store."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tunnel_server.app import running
from tunnel_server.build import build_policy
from tunnel_server.config import ConfigError, parse_config

from ..helpers import UNIT, relay_config_data
from ..oidc_fixture import TestIssuer
from ..redis_fixture import RedisServer
from .harness import APP_AUDIENCE

ALICE, BOB = "user:alice@example.com", "user:bob@example.com"


@asynccontextmanager
async def kid_upstream() -> AsyncIterator[int]:
    """An upstream that answers the ``kid`` of the assertion it got (which process signed)."""

    async def handle(request: web.Request) -> web.Response:
        head = request.headers["X-Tunnel-Jwt-Assertion"].split(".")[0]
        kid = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["kid"]
        return web.json_response({"kid": kid})

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


def config_data(issuer: TestIssuer, tmp_path: Path, upstream: int, **state: Any) -> dict[str, Any]:
    data: dict[str, Any] = relay_config_data(issuer, tmp_path, tls=False)
    data["oidc"]["audiences"] = ["tunnel", APP_AUDIENCE]
    data["http"] = {
        "listen": {"host": "127.0.0.1", "port": 0}, "issuer_url": "http://127.0.0.1:1",
        "external_scheme": "http", "workers": 2,
        "routes": [{"name": "demo", "host": "demo.localhost", "audiences": [APP_AUDIENCE],
                    "upstream": f"http://127.0.0.1:{upstream}"}],
    }  # fmt: skip
    data.update(state)
    return data


def write_policy(path: Path, members: list[str]) -> None:
    binding = {
        "name": "web",
        "members": members,
        "role": "webUser",
        "resources": {"apps": ["demo"]},
    }
    path.write_text(yaml.safe_dump({"bindings": [binding]}))


async def answers(port: int, token: str, count: int) -> list[tuple[int, str | None]]:
    """``count`` requests, each on a new connection (so the kernel spreads them)."""
    out = []
    headers = {"Host": "demo.localhost", "Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(count):
            async with http.get(f"http://127.0.0.1:{port}/", headers=headers) as response:
                body = await response.json() if response.status == 200 else {}
                out.append((response.status, body.get("kid")))
    return out


async def until_all(port: int, token: str, status: int) -> None:
    """Until 30 fresh connections in a row get ``status`` (bounded)."""
    for _ in range(100):
        if all(s == status for s, _ in await answers(port, token, 30)):
            return
        await asyncio.sleep(UNIT)
    raise AssertionError(f"some process still does not answer {status}")


async def test_more_than_one_worker_needs_redis(issuer: TestIssuer, tmp_path: Path) -> None:
    """A config error (check-config reports it), not a failure at serve time."""
    async with kid_upstream() as upstream:
        with pytest.raises(ConfigError, match="needs state.backend: redis"):
            parse_config(config_data(issuer, tmp_path, upstream), env={})


@pytest.mark.e2e
async def test_workers_share_the_port_and_hear_revocations_and_policy(
    issuer: TestIssuer, tmp_path: Path, redis: RedisServer
) -> None:
    policy = tmp_path / "policy.yaml"
    write_policy(policy, [ALICE, BOB])
    async with kid_upstream() as upstream:
        data = config_data(
            issuer, tmp_path, upstream, policy_file=str(policy),
            state={"backend": "redis", "redis_url": redis.url},
            cluster={"advertise_url": "ws://127.0.0.1:1", "secret": "s" * 32},
        )  # fmt: skip
        config = parse_config(data, env={})
        async with running(config, node="relay") as server:
            port = server.http_port
            assert port is not None
            alice = issuer.mint(aud=APP_AUDIENCE)
            bob = issuer.mint(sub="bob", email="bob@example.com", aud=APP_AUDIENCE)
            seen = await answers(port, alice, 40)
            assert {status for status, _ in seen} == {200}
            assert len({kid for _, kid in seen}) == 2, "both processes serve, each signs"
            # A revocation (admin API or another node) reaches the worker too.
            server.revocations.revoke_user(ALICE)
            server.revoke_web_user(ALICE)
            await until_all(port, alice, 401)
            # A policy reload too: the worker rebuilds it from the same file.
            write_policy(policy, [ALICE])
            server.relay.set_policy(build_policy(config))
            await until_all(port, bob, 403)
