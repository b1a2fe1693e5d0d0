"""The console's sign-in on the shared code flow (web.oidc_code): an admin gets a session; a
member who is not an admin, a bad state and a provider's refusal get a page naming what
happened, what to do and a reference that the console's audit record carries."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tunnel_server.audit_store import AuditQuery

from ..http.harness import TokenEndpoint
from ..oidc_fixture import TestIssuer
from .harness import ConsoleStack, console_stack

LOGIN_COOKIE = "__Host-tunnel_console_login"


async def sign_in(
    stack: ConsoleStack, idp: TokenEndpoint, query: dict[str, str] | None = None, **mint: Any
) -> tuple[int, str, aiohttp.ClientResponse]:
    """Start at /console/sign_in, come back to the callback with ``query`` (default: what the
    provider answers after minting ``mint``)."""
    async with aiohttp.ClientSession(base_url=stack.origin) as http:
        async with http.get("/console/sign_in", allow_redirects=False) as resp:
            assert resp.status == 302, await resp.text()
            browser = resp.cookies[LOGIN_COOKIE].value
            location = resp.headers["Location"]
        answer = idp.authorize(location, **mint)
        headers = {"Cookie": f"{LOGIN_COOKIE}={browser}", "Accept": "text/html"}
        async with http.get(
            "/console/callback", params=query or answer, headers=headers, allow_redirects=False
        ) as resp:
            return resp.status, await resp.text(), resp


async def audited(stack: ConsoleStack, page: str) -> dict[str, Any]:
    found = re.search(r"<code id='reference'>([0-9a-f]{16})</code>", page)
    assert found is not None, page
    store = stack.server.audit_store
    assert store is not None
    await store.flush()
    records = [r.record for r in (await store.search(AuditQuery(event="console"))).records]
    (record,) = [r for r in records if r.get("reference") == found[1]]
    assert (record["action"], record["decision"]) == ("sign_in", "deny")
    return record


@pytest.fixture
async def idp(issuer: TestIssuer) -> Any:
    issuer.discovery_overrides["authorization_endpoint"] = issuer.issuer + "/auth"
    async with TokenEndpoint(issuer, client_id="tunnel-web") as endpoint:
        yield endpoint


async def test_admin_signs_in(issuer: TestIssuer, idp: TokenEndpoint, tmp_path: Path) -> None:
    async with console_stack(issuer, tmp_path) as stack:
        status, _, resp = await sign_in(stack, idp, groups=["ops"])
        assert status == 303
        assert resp.headers["Location"] == "/console/"
        assert resp.cookies["__Host-tunnel_console"].value


async def test_not_an_admin(issuer: TestIssuer, idp: TokenEndpoint, tmp_path: Path) -> None:
    async with console_stack(issuer, tmp_path) as stack:
        status, page, resp = await sign_in(
            stack, idp, sub="bob", email="bob@example.com", groups=["dev"]
        )
        assert status == 403
        assert "__Host-tunnel_console" not in resp.cookies
        assert "<p id='message'>The console is for relay admins only.</p>" in page
        assert "Ask an administrator for access, or sign in as another user." in page
        record = await audited(stack, page)
        assert record["principal"] == "user:bob@example.com"
        assert record["failure"] == "not_allowed"


async def test_bad_state_and_provider_error(
    issuer: TestIssuer, idp: TokenEndpoint, tmp_path: Path
) -> None:
    async with console_stack(issuer, tmp_path) as stack:
        status, page, _ = await sign_in(stack, idp, {"state": "forged", "code": "x"})
        assert status == 400
        assert "This sign-in link is invalid or has expired." in page
        assert (await audited(stack, page))["reason"] == "unknown or expired state"
        async with aiohttp.ClientSession(base_url=stack.origin) as http:
            async with http.get("/console/sign_in", allow_redirects=False) as resp:
                browser = resp.cookies[LOGIN_COOKIE].value
                state = idp.authorize(resp.headers["Location"])["state"]
            headers = {"Cookie": f"{LOGIN_COOKIE}={browser}", "Accept": "text/html"}
            query = {"state": state, "error": "access_denied"}
            async with http.get("/console/callback", params=query, headers=headers) as resp:
                assert resp.status == 401
                page = await resp.text()
        assert "did not sign you in (it answered access_denied)." in page
        assert (await audited(stack, page))["failure"] == "provider"
