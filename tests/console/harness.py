"""A relay with the console on its admin listener, for the console tests: real listeners, a real
audit store (SQLite in tmp), and helpers to hold a console session.

``signed_in`` puts a session straight into the console's session store (what a completed
sign-in leaves there), so that the pages, actions and checks are tested without an identity
provider; the sign-in itself is tested end to end with the dev IdP and Chromium
(tests/e2e/test_console_browser.py)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tunnel_protocol import NATIVE
from tunnel_server.access.identity import Identity
from tunnel_server.app import RunningServer, running
from tunnel_server.config import parse_config
from tunnel_server.console import Console
from tunnel_server.console.auth import SESSION_COOKIE
from tunnel_server.web.sessions import WebSession

from ..helpers import UNIT, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from ..ports import free_port
from ..rawclient import RawTunnelClient

WEB_CLIENT = ("tunnel-web", "tunnel-web-secret")


def console_config_data(
    issuer: str,
    tmp_path: Path,
    admin_port: int,
    *,
    base: dict[str, Any],
    poll: float = 0.5,
) -> dict[str, Any]:
    """``base`` (a relay config) with an admin listener on ``admin_port`` serving the console
    (admins: group ops), and an audit store in ``tmp_path``."""
    origin = f"http://127.0.0.1:{admin_port}"
    return base | {
        "admin": {
            "listen": {"host": "127.0.0.1", "port": admin_port},
            "members": ["group:ops"],
            "console": {
                "external_url": origin,
                "login": {"issuer": issuer, "client_id": WEB_CLIENT[0],
                          "client_secret": WEB_CLIENT[1]},
                "poll_interval": poll,
            },
        },
        "audit_store": {"path": str(tmp_path / "audit.db")},
    }  # fmt: skip


def identity(email: str, groups: tuple[str, ...] = ("ops",)) -> Identity:
    now = time.time()
    members = {f"user:{email}", *(f"group:{g}" for g in groups)}
    return Identity(
        principal=f"user:{email}", subject=email.split("@")[0], issuer="https://idp.test",
        email=email, groups=groups, expires_at=now + 3600, members=frozenset(members),
        valid_until=now + 3600, issued_at=now,
    )  # fmt: skip


@dataclass
class ConsoleStack:
    server: RunningServer
    console: Console
    origin: str

    async def session_for(self, who: Identity) -> WebSession:
        now = time.time()
        session = WebSession(
            sid=secrets.token_urlsafe(32), identity=who, origin=self.origin, created=now,
            auth_time=now, expires=now + 3600,
        )  # fmt: skip
        await self.console.auth.store.put(session)
        return session

    @asynccontextmanager
    async def browser(
        self, who: Identity | None
    ) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
        """An HTTP client holding ``who``'s console session cookie (none for None); yields it
        and the session's CSRF token."""
        cookies: dict[str, str] = {}
        csrf = ""
        if who is not None:
            session = await self.session_for(who)
            cookies[SESSION_COOKIE] = session.sid
            csrf = session.csrf
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(base_url=self.origin, cookie_jar=jar) as client:
            client.cookie_jar.update_cookies(cookies)
            yield client, csrf


@asynccontextmanager
async def console_stack(
    issuer: TestIssuer, tmp_path: Path, extra: dict[str, Any] | None = None, **relay: Any
) -> AsyncIterator[ConsoleStack]:
    """``extra``: top-level config sections added to the relay's (``ssh``, ...)."""
    port = free_port()
    base = relay_config_data(issuer, tmp_path, tls=False, **relay) | (extra or {})
    data = console_config_data(issuer.issuer, tmp_path, port, base=base)
    async with start_relay(data) as server:
        assert server.console is not None
        yield ConsoleStack(server, server.console, f"http://127.0.0.1:{port}")


@asynccontextmanager
async def open_tunnel(
    url: str, token: str, port: int, instance: str = "vm1"
) -> AsyncIterator[RawTunnelClient]:
    """A native tunnel to ``instance``:``port`` (an echo target) that has carried 5 bytes each
    way; closed on the way out."""
    path = f"/v4/connect?project=p&zone=z&instance={instance}&interface=nic0&port={port}"
    client = RawTunnelClient(url, path, token, NATIVE.subprotocol)
    try:
        async with asyncio.timeout(100 * UNIT):
            await client.open()
            client.send(b"12345")
            while client.result.received < 5:
                assert await client._read_once(), "closed before the echo"
        yield client
    finally:
        await client.close()


async def closed_code(client: RawTunnelClient, limit: float = 40 * UNIT) -> int | None:
    """Read until the relay closes the tunnel; its close code."""
    async with asyncio.timeout(limit):
        await client.finish()
    return client.result.close_code


SECRET = "cluster-secret-for-tests-0123456789abcdef"


@asynccontextmanager
async def cluster_node(
    issuer: TestIssuer, tmp_path: Path, redis_url: str, name: str
) -> AsyncIterator[ConsoleStack]:
    """One relay of a cluster sharing ``redis_url``, with the console (in-process)."""
    port, admin_port = free_port(), free_port()
    base = relay_config_data(issuer, tmp_path / name, tls=False)
    base["listen"]["port"] = port
    base["state"] = {"backend": "redis", "redis_url": redis_url, "lease_ttl": 2}
    base["cluster"] = {"advertise_url": f"ws://127.0.0.1:{port}", "secret": SECRET}
    (tmp_path / name).mkdir()
    data = console_config_data(issuer.issuer, tmp_path / name, admin_port, base=base)
    async with running(parse_config(data), node=name) as server:
        assert server.console is not None
        yield ConsoleStack(server, server.console, f"http://127.0.0.1:{admin_port}")
