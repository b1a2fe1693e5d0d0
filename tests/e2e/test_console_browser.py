"""The admin console end to end: the real dev IdP (oidc-provider, confidential client
``tunnel-web``), a relay with the console and a SQLite audit store, Debian's Chromium driven by
Playwright. An admin signs in, sees a tunnel the test opens appear, revokes it and the tunnel
closes (< 2 s); searches the audit for another user's denial; runs an explain. A non-admin is
refused; a cross-site form post is refused; markup in an email claim and an instance name is
shown as text; 1,000 tunnels (a peer node's, through Redis) render and filter. Screenshots go to
test-artifacts/console-*.png (the best are copied to docs/console/)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tunnel_server.app import RunningServer, running
from tunnel_server.config import parse_config

from ..console.harness import SECRET, closed_code, console_config_data, open_tunnel
from ..helpers import UNIT, TcpTarget
from ..idp import PASSWORD, DevIdp, missing_tools
from ..ports import free_port
from ..redis_fixture import RedisServer
from .browser import ARTIFACTS, chromium_page, missing_chromium

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or ""),
    pytest.mark.skipif(missing_chromium() is not None, reason=missing_chromium() or ""),
]

LIMIT = 30.0
ALICE, BOB = "alice@example.com", "bob@example.com"
MARKUP_EMAIL = "<script>document.title='pwned'</script>@example.com"
MARKUP_INSTANCE = "instance:p/z/<img src=x onerror=window.pwned=1>"
USERS = [
    {"sub": "alice", "email": ALICE, "name": "Alice Example", "groups": ["ops", "dev"]},
    {"sub": "bob", "email": BOB, "name": "Bob Example", "groups": ["dev"]},
    {"sub": "xss", "email": MARKUP_EMAIL, "name": "<b>xss</b>", "groups": ["ops"]},
]


@dataclass
class Stack:
    idp: DevIdp
    server: RunningServer
    origin: str
    echo: TcpTarget


@asynccontextmanager
async def console_stack(
    tmp_path: Path, echo: TcpTarget, redis_url: str | None = None
) -> AsyncIterator[Stack]:
    admin_port = free_port()
    origin = f"http://127.0.0.1:{admin_port}"
    async with DevIdp(users=USERS, web_redirects=[f"{origin}/console/callback"]) as idp:
        base: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "oidc": {"issuer": idp.issuer, "audiences": ["tunnel"]},
            "inventory": {"instances": [
                {"project": "p", "zone": "z", "name": "vm1", "address": "127.0.0.1"}]},
            "access": [{"members": [f"user:{ALICE}"], "instances": ["p/z/vm1"],
                        "ports": ["1-65535"]}],
            "log_format": "text",
        }  # fmt: skip
        if redis_url is not None:
            port = free_port()
            base["listen"]["port"] = port
            base["state"] = {"backend": "redis", "redis_url": redis_url}
            base["cluster"] = {"advertise_url": f"ws://127.0.0.1:{port}", "secret": SECRET}
        data = console_config_data(idp.issuer, tmp_path, admin_port, base=base, poll=0.5)
        async with running(parse_config(data), node="relay-1") as server:
            yield Stack(idp, server, origin, echo)


async def sign_in(page: Any, origin: str, login: str, shot: str | None = None) -> None:
    """Open the console; sign in at the IdP (login, consent) as ``login`` (an email or a sub)."""
    await page.goto(origin + "/console/")
    await page.wait_for_selector('#login input[name="login"]')
    await page.locator("#login").evaluate("form => { form.noValidate = true; }")
    await page.fill('#login input[name="login"]', login)
    await page.fill('#login input[name="password"]', PASSWORD)
    if shot:
        await page.screenshot(path=ARTIFACTS / f"console-{shot}-idp.png")
    await page.click('#login button[type="submit"]')
    await page.wait_for_selector('#consent button[type="submit"]')
    await page.click('#consent button[type="submit"]')


async def _text(scope: Any, selector: str, pattern: str) -> None:
    """Wait until the element's whole text matches ``pattern`` (locators: the page's CSP
    forbids the string evaluation that wait_for_function would need)."""
    await scope.locator(selector).filter(has_text=re.compile(f"^{pattern}$")).wait_for()


async def token_for(idp: DevIdp, email: str) -> str:
    tokens = await idp.code_login(email)
    return str(tokens["access_token"])


async def test_admin_signs_in_revokes_a_tunnel_searches_and_explains(
    tmp_path: Path, echo: TcpTarget
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    async with console_stack(tmp_path, echo) as stack, chromium_page(LIMIT) as page:
        server, origin = stack.server, stack.origin
        # Bob is refused a tunnel before anyone looks: the admin will find it in the audit.
        with pytest.raises(ConnectionError):
            async with open_tunnel(server.url, await token_for(stack.idp, BOB), echo.port):
                pass
        await sign_in(page, origin, ALICE, shot="alice")
        await page.wait_for_selector("#chart-opened")
        assert await page.inner_text("#who") == ALICE
        alice = await token_for(stack.idp, ALICE)
        async with open_tunnel(server.url, alice, echo.port) as tunnel:
            # The overview updates without a reload: one open tunnel.
            await _text(page, "#open-count", r"1")
            await page.screenshot(path=ARTIFACTS / "console-overview.png", full_page=True)
            await page.click("nav >> text=Live tunnels")
            sid = next(iter(server.relay.sessions))
            row = page.locator(f"tr[data-sid='{sid}']")
            await row.wait_for()
            assert ALICE in await row.inner_text()
            assert "instance:p/z/vm1" in await row.inner_text()
            await _text(row, "td:nth-child(7)", r"5 B / 5 B")
            await page.screenshot(path=ARTIFACTS / "console-tunnels.png", full_page=True)
            await row.locator("button[data-kind=session]").click()  # arms
            await row.locator("button.armed").wait_for()
            started = time.monotonic()
            await row.locator("button.armed").click()
            assert await closed_code(tunnel, limit=2.0) == 4033
            elapsed = time.monotonic() - started
            await row.wait_for(state="detached")
        assert elapsed < 2.0
        # The audit: bob's denial.
        await page.click("nav >> text=Audit")
        await page.fill("input[name=user]", BOB)
        await page.select_option("select[name=outcome]", "deny")
        await page.click("#search")
        await page.wait_for_selector("#audit tbody tr")
        text = await page.inner_text("#audit tbody")
        assert "user:bob@example.com" in text
        assert "no binding" in text or "not" in text
        await page.screenshot(path=ARTIFACTS / "console-audit.png", full_page=True)
        # Explain: could bob reach vm1 on 22?
        await page.click("nav >> text=Policy")
        await page.fill("#explain input[name=members]", "user:bob@example.com group:dev")
        await page.fill("#explain input[name=target]", "vm1")
        await page.fill("#explain input[name=port]", "22")
        await page.click("#explain-submit")
        await page.wait_for_selector("#verdict")
        assert await page.inner_text("#verdict") == "DENY"
        await page.screenshot(path=ARTIFACTS / "console-explain.png", full_page=True)
        await page.click("#sign-out")
        await page.wait_for_selector("#message")
        actions = [r.get("action") for r in await _console_records(stack)]
    assert {"sign_in", "revoke_session", "explain", "sign_out"} <= set(actions)
    print(f"revoke to close: {elapsed * 1000:.0f} ms")


async def _console_records(stack: Stack) -> list[dict[str, Any]]:
    from tunnel_server.audit_store import AuditQuery

    store = stack.server.audit_store
    assert store is not None
    await store.flush()
    page = await store.search(AuditQuery(event="console", limit=100))
    return [r.record for r in page.records]


async def test_non_admin_refused_markup_is_text_and_cross_site_post_refused(
    tmp_path: Path, echo: TcpTarget
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    async with console_stack(tmp_path, echo) as stack:
        origin, relay = stack.origin, stack.server.relay
        relay.audit.record(
            "decision", decision="deny", reason="no binding", principal=f"user:{MARKUP_EMAIL}",
            resource=MARKUP_INSTANCE, port=22,
        )  # fmt: skip
        async with chromium_page(LIMIT) as page:
            await sign_in(page, origin, BOB)
            await page.wait_for_selector("#message")
            assert "admins only" in await page.inner_text("#message")
            await page.screenshot(path=ARTIFACTS / "console-refused.png", full_page=True)
            cookies = await page.context.cookies()
            assert not [c for c in cookies if c["name"] == "__Host-tunnel_console"]
        async with chromium_page(LIMIT) as page:
            await sign_in(page, origin, "xss")
            await page.wait_for_selector("#who")
            assert await page.inner_text("#who") == MARKUP_EMAIL
            await page.goto(origin + "/console/audit?range=1h")
            await page.wait_for_selector("#audit tbody tr")
            assert MARKUP_INSTANCE in await page.inner_text("#audit tbody")
            assert await page.query_selector("main img") is None
            assert await page.evaluate("window.pwned") is None
            assert "pwned" not in await page.title()
            await page.screenshot(path=ARTIFACTS / "console-markup.png", full_page=True)
            # A page on another origin posts a revoke form to the console (the session
            # cookie goes with it: same site, other port).
            alice = await token_for(stack.idp, ALICE)
            async with (
                open_tunnel(stack.server.url, alice, echo.port) as tunnel,
                _attacker(origin, next(iter(relay.sessions))) as evil,
            ):
                await page.goto(evil)
                await page.wait_for_selector("#message")
                assert "did not come from this console" in await page.inner_text("#message")
                assert relay.sessions
                tunnel.send(b"alive")
                async with asyncio.timeout(40 * UNIT):
                    while tunnel.result.received < 10:
                        assert await tunnel._read_once()
        denied = [r for r in await _console_records(stack) if r["decision"] == "deny"]
    assert {r["reason"] for r in denied} >= {"not an admin", "cross-origin request"}


@asynccontextmanager
async def _attacker(origin: str, sid: str) -> AsyncIterator[str]:
    """A page on another port that submits a revoke form to the console at once."""
    html = (
        "<!doctype html><form id=f method=post action='" + origin + "/console/revoke'>"
        "<input name=kind value=session><input name=subject value='" + sid + "'></form>"
        "<script>document.getElementById('f').submit()</script>"
    )

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/"
    finally:
        await runner.cleanup()


async def test_a_thousand_tunnels_render_and_filter(
    tmp_path: Path, echo: TcpTarget, redis: RedisServer
) -> None:
    """A peer node's 1,000 tunnels (its registry and published snapshot in Redis) on the live
    tunnels page: rendered, filtered and sorted in the browser; render times printed."""
    ARTIFACTS.mkdir(exist_ok=True)
    async with console_stack(tmp_path, echo, redis.url) as stack:
        await _peer_with_tunnels(redis.url, 1000)
        async with chromium_page(LIMIT) as page:
            await sign_in(page, stack.origin, ALICE)
            await page.wait_for_selector("#who")
            await page.goto(stack.origin + "/console/tunnels")
            await _text(page, "#shown", r"1000 of 1000 tunnels")
            first = await page.evaluate("window.consoleRender.ms")
            await page.screenshot(path=ARTIFACTS / "console-1000-tunnels.png")
            await page.fill("#filter", "user7")  # user7, user70-79, user700-799
            await _text(page, "#shown", r"111 of 1000 tunnels")
            filtered = await page.evaluate("window.consoleRender.ms")
            await page.fill("#filter", "")
            await _text(page, "#shown", r"1000 of 1000 tunnels")
            await page.click("button.sort[data-sort=bytes]")  # descending: the most bytes first
            first_row = "#tunnels tbody tr:first-child td:nth-child(1)"
            await _text(page, first_row, r"user:user999@example\.com")
            sorted_ms = await page.evaluate("window.consoleRender.ms")
    print(f"1000 rows: render {first:.1f} ms, filter {filtered:.1f} ms, sort {sorted_ms:.1f} ms")
    assert max(first, filtered, sorted_ms) < 1000  # smooth: well under a second, every time


async def _peer_with_tunnels(redis_url: str, count: int) -> None:
    """A node ``relay-9`` in the shared state: its lease, registry and console snapshot."""
    tag, now = "peer0009", time.time()
    client = aioredis.Redis.from_url(redis_url)
    try:
        registry = {}
        rows = []
        for n in range(count):
            sid = f"sid-{n:04d}"
            principal = f"user:user{n}@example.com"
            registry[sid] = json.dumps(
                {
                    "principal": principal,
                    "created": now - n,
                    "subprotocol": "v1.native.tunnel.identity-tunnel",
                }
            )
            rows.append({"sid": sid, "principal": principal, "node": "relay-9",
                         "dialect": "native", "duration": float(n), "target":
                         f"instance:p/z/vm{n % 50}", "address": "10.0.0.1", "port": 22,
                         "client": f"198.51.100.{n % 250}", "state": "attached",
                         "bytes_from_client": n * 100, "bytes_to_client": n * 1000,
                         "resumes": 0})  # fmt: skip
        snapshot = {"node": {"node": "relay-9", "url": "ws://10.0.0.9:8443", "alive": True,
                             "tunnels": count, "draining": False, "state_up": True},
                    "tunnels": rows, "more": 0}  # fmt: skip
        await client.hset(f"tunnel:node:{tag}", mapping={"node": "relay-9", "url": ""})
        await client.hset(f"tunnel:tunnels:{tag}", mapping=registry)
        await client.set(f"tunnel:console:{tag}", json.dumps(snapshot), ex=600)
    finally:
        await client.aclose()
