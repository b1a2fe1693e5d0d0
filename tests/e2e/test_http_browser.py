"""HTTP mode end to end: the real dev IdP (oidc-provider, confidential client ``tunnel-web``),
Debian's Chromium driven by Playwright, the proxy and the demo upstream. Screenshots go to
test-artifacts/http-*.png."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from ..http.harness import APP_AUDIENCE, Stack, proxy_stack, web_policy
from ..idp import PASSWORD, WEB_CLIENT_ID, WEB_CLIENT_SECRET, DevIdp, missing_tools
from .browser import ARTIFACTS, chromium_page, missing_chromium

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or ""),
]

LIMIT = 30.0


@pytest.fixture
async def web_stack() -> AsyncIterator[tuple[Stack, DevIdp]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    redirect = f"http://demo.localhost:{port}/_tunnel/callback"
    async with DevIdp(web_redirects=[redirect]) as idp:
        login = {
            "issuer": idp.issuer,
            "client_id": WEB_CLIENT_ID,
            "client_secret": WEB_CLIENT_SECRET,
        }
        policy = web_policy({"demo": ["user:alice@example.com", "serviceAccount:svc-backup"]})
        async with proxy_stack(
            idp.issuer, policy, login=login, sock=sock, audiences={"demo": ["tunnel"]}
        ) as stack:
            yield stack, idp


async def _sign_in(page: object, email: str, name: str) -> None:
    from playwright.async_api import Page

    assert isinstance(page, Page)
    await page.wait_for_selector('#login input[name="login"]')
    await page.fill('#login input[name="login"]', email)
    await page.fill('#login input[name="password"]', PASSWORD)
    await page.screenshot(path=ARTIFACTS / f"http-{name}-1-idp.png", full_page=True)
    await page.click('#login button[type="submit"]')
    await page.wait_for_selector('#consent button[type="submit"]')
    await page.click('#consent button[type="submit"]')


@pytest.mark.skipif(missing_chromium() is not None, reason=missing_chromium() or "")
async def test_browser_login_demo_app_and_sign_out(web_stack: tuple[Stack, DevIdp]) -> None:
    stack, _ = web_stack
    ARTIFACTS.mkdir(exist_ok=True)
    app = f"http://demo.localhost:{stack.port}"
    async with chromium_page(LIMIT) as page:
        await page.goto(app + "/?x=1")
        await _sign_in(page, "alice@example.com", "alice")
        await page.wait_for_selector("#email")
        assert page.url == app + "/?x=1"
        assert await page.inner_text("#email") == "alice@example.com"
        await page.screenshot(path=ARTIFACTS / "http-alice-2-demo-app.png", full_page=True)
        cookies = await page.context.cookies()
        session = [c for c in cookies if c["name"] == "__Host-tunnel_session"]
        assert len(session) == 1
        assert session[0]["secure"]
        assert session[0]["httpOnly"]
        assert session[0]["sameSite"] == "Lax"
        assert session[0]["path"] == "/"
        # The CSRF token reaches the form through /_tunnel/identity; sign-out ends the session.
        await page.wait_for_function("document.getElementById('csrf').value.length > 0")
        await page.click("#sign-out")
        await page.wait_for_selector("#signed-out")
        await page.screenshot(path=ARTIFACTS / "http-alice-3-signed-out.png", full_page=True)
        sid = session[0]["value"]
        assert await stack.proxy.store.get(sid) is None
        response = await page.goto(app + "/_tunnel/identity")
        assert response is not None
        assert response.status == 401


@pytest.mark.skipif(missing_chromium() is not None, reason=missing_chromium() or "")
async def test_browser_denied_user_sees_denied_page(web_stack: tuple[Stack, DevIdp]) -> None:
    stack, _ = web_stack
    ARTIFACTS.mkdir(exist_ok=True)
    async with chromium_page(LIMIT) as page:
        await page.goto(f"http://demo.localhost:{stack.port}/")
        await _sign_in(page, "mallory@example.com", "mallory")
        await page.wait_for_selector("#denied")
        assert await page.inner_text("#who") == "mallory@example.com"
        body = await page.inner_text("body")
        assert "web-demo" not in body
        assert "binding" not in body
        await page.screenshot(path=ARTIFACTS / "http-mallory-denied.png", full_page=True)


async def test_service_account_and_id_token_bearer(web_stack: tuple[Stack, DevIdp]) -> None:
    """Programmatic access with the dev IdP's tokens: a service account (client credentials)
    and a user's access token, both with the app's audience; XHR without a token gets 401."""
    stack, idp = web_stack
    tokens = await idp.client_credentials()
    headers = {"Host": stack.host(), "Authorization": f"Bearer {tokens['access_token']}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(stack.base + "/headers", headers=headers) as resp:
            assert resp.status == 200
            assert (await resp.json())["claims"]["principal"] == "serviceAccount:svc-backup"
        bob = await idp.code_login("bob@example.com")
        headers["Authorization"] = f"Bearer {bob['access_token']}"
        async with session.get(stack.base + "/headers", headers=headers) as resp:
            assert resp.status == 403
        xhr = {"Host": stack.host(), "Accept": "text/html", "X-Requested-With": "XMLHttpRequest"}
        async with session.get(stack.base + "/", headers=xhr, allow_redirects=False) as resp:
            assert resp.status == 401
        html = {"Host": stack.host(), "Accept": "text/html"}
        async with session.get(stack.base + "/a?b=1", headers=html, allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Location"] == "/_tunnel/sign_in?rd=%2Fa%3Fb%3D1"
    assert APP_AUDIENCE
