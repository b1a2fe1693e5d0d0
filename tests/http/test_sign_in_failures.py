"""Failed browser sign-ins say what happened: each failure (the provider's error, a bad or
expired state, a refused code exchange, an ID token that does not verify, an unreachable
provider) answers its own status and page, with what to do and a reference that the audit
record carries, and never a stack trace or a secret. A host HTTP mode does not serve gets a
404 naming it."""

from __future__ import annotations

import json
import re
import socket
from html import escape
from typing import Any

import aiohttp
import pytest

from tunnel_server.web.oidc_code import FAILURE_KINDS
from tunnel_server.web.pages import SIGN_IN_FAILURES

from ..oidc_fixture import TestIssuer
from .harness import Stack, TokenEndpoint, proxy_stack, web_policy

HTML = {"Accept": "text/html"}


async def begin(http: aiohttp.ClientSession, stack: Stack) -> tuple[str, str]:
    """GET /_tunnel/sign_in: the authorization URL and the login cookie's value."""
    async with http.get(
        stack.base + "/_tunnel/sign_in", headers={"Host": stack.host()}, allow_redirects=False
    ) as resp:
        assert resp.status == 302, await resp.text()
        return resp.headers["Location"], resp.cookies["__Host-tunnel_login"].value


async def finish(
    http: aiohttp.ClientSession, stack: Stack, query: dict[str, str], browser: str
) -> tuple[int, str]:
    headers = {"Host": stack.host(), "Cookie": f"__Host-tunnel_login={browser}", **HTML}
    async with http.get(
        stack.base + "/_tunnel/callback", params=query, headers=headers, allow_redirects=False
    ) as resp:
        assert "__Host-tunnel_session" not in resp.cookies
        return resp.status, await resp.text()


def reported(stack: Stack, page: str) -> dict[str, Any]:
    """The page's reference, and the audit record that carries it."""
    found = re.search(r"<code id='reference'>([0-9a-f]{16})</code>", page)
    assert found is not None, page
    records: list[dict[str, Any]] = [json.loads(line) for line in stack.audit]
    (record,) = [r for r in records if r.get("reference") == found[1]]
    assert record["event"] == "http_login"
    assert record["decision"] == "deny"
    return record


def assert_page(page: str, kind: str) -> None:
    _, what, todo = SIGN_IN_FAILURES[kind]  # type: ignore[index]
    assert "<title>Sign-in failed</title>" in page
    assert escape(what.removesuffix(".")) in page
    assert escape(todo) in page
    assert "href='/_tunnel/sign_in'" in page
    for leak in ("Traceback", "Error(", "tunnel-web-secret", "code_verifier", "object at 0x"):
        assert leak not in page


def test_every_failure_kind_has_a_page() -> None:
    assert set(SIGN_IN_FAILURES) == set(FAILURE_KINDS)
    statuses = {kind: status for kind, (status, _, _) in SIGN_IN_FAILURES.items()}
    assert statuses == {
        "state": 400, "provider": 401, "unreachable": 503, "exchange": 502, "id_token": 401,
        "not_allowed": 403,
    }  # fmt: skip


async def test_state_unknown_expired_or_from_another_browser(issuer: TestIssuer) -> None:
    async with (
        TokenEndpoint(issuer) as idp,
        proxy_stack(issuer.issuer, web_policy({}), login=idp.login) as stack,
        aiohttp.ClientSession() as http,
    ):
        location, browser = await begin(http, stack)
        query = idp.authorize(location)
        status, page = await finish(http, stack, {**query, "state": "forged"}, browser)
        assert status == 400
        assert_page(page, "state")
        assert reported(stack, page)["reason"] == "unknown or expired state"
        status, page = await finish(http, stack, query, "another-browser")
        assert status == 400
        assert reported(stack, page)["reason"] == "state from another browser"
        status, page = await finish(http, stack, query, browser)  # used up by the try above
        assert (status, reported(stack, page)["reason"]) == (400, "unknown or expired state")


@pytest.mark.parametrize(
    ("error", "shown"), [("access_denied", " (it answered access_denied)"), ("<b>x</b>", "")]
)
async def test_provider_error(issuer: TestIssuer, error: str, shown: str) -> None:
    async with (
        TokenEndpoint(issuer) as idp,
        proxy_stack(issuer.issuer, web_policy({}), login=idp.login) as stack,
        aiohttp.ClientSession() as http,
    ):
        location, browser = await begin(http, stack)
        state = idp.authorize(location)["state"]
        query = {"state": state, "error": error, "error_description": "<i>call 555</i>"}
        status, page = await finish(http, stack, query, browser)
    assert status == 401
    assert_page(page, "provider")
    assert f"The identity provider did not sign you in{shown}.</p>" in page
    assert "555" not in page  # the provider's free text is not shown
    assert "<b>" not in page
    assert reported(stack, page)["failure"] == "provider"


async def test_code_exchange_refused(issuer: TestIssuer) -> None:
    async with (
        TokenEndpoint(issuer) as idp,
        proxy_stack(issuer.issuer, web_policy({}), login=idp.login) as stack,
        aiohttp.ClientSession() as http,
    ):
        location, browser = await begin(http, stack)
        query = idp.authorize(location)
        idp.codes.clear()  # the code expired at the provider: invalid_grant
        status, page = await finish(http, stack, query, browser)
    assert status == 502
    assert_page(page, "exchange")
    assert reported(stack, page)["reason"] == "code exchange refused: invalid_grant"


@pytest.mark.parametrize("wrong", ["nonce", "audience"])
async def test_id_token_that_does_not_verify(issuer: TestIssuer, wrong: str) -> None:
    async with (
        TokenEndpoint(issuer) as idp,
        proxy_stack(issuer.issuer, web_policy({}), login=idp.login) as stack,
        aiohttp.ClientSession() as http,
    ):
        location, browser = await begin(http, stack)
        query = idp.authorize(location)
        if wrong == "nonce":
            idp.codes[query["code"]]["nonce"] = "another-login"
        else:
            idp.client_id = "another-client"  # minted for another audience
        status, page = await finish(http, stack, query, browser)
    assert status == 401
    assert_page(page, "id_token")
    record = reported(stack, page)
    assert record["failure"] == "id_token"
    assert ("nonce" if wrong == "nonce" else "aud") in record["reason"]


async def test_provider_unreachable(issuer: TestIssuer) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    async with TokenEndpoint(issuer) as idp:
        # The provider publishes a token endpoint that nothing answers on.
        issuer.discovery_overrides["token_endpoint"] = f"http://127.0.0.1:{port}/token"
        async with (
            proxy_stack(issuer.issuer, web_policy({}), login=idp.login) as stack,
            aiohttp.ClientSession() as http,
        ):
            location, browser = await begin(http, stack)
            status, page = await finish(http, stack, idp.authorize(location), browser)
    assert status == 503
    assert_page(page, "unreachable")
    assert reported(stack, page)["reason"].startswith("code exchange: ")


async def test_sign_in_page_when_discovery_fails(issuer: TestIssuer) -> None:
    issuer.discovery_overrides["issuer"] = "https://somebody-else.example"
    async with (
        TokenEndpoint(issuer) as idp,
        proxy_stack(issuer.issuer, web_policy({}), login=idp.login) as stack,
        aiohttp.ClientSession() as http,
        http.get(stack.base + "/_tunnel/sign_in", headers={"Host": stack.host()}) as resp,
    ):
        page = await resp.text()
        assert resp.status == 503
        assert_page(page, "unreachable")
        assert reported(stack, page)["reason"] == "discovery document names another issuer"


async def test_unknown_host_is_named(issuer: TestIssuer) -> None:
    async with (
        proxy_stack(issuer.issuer, web_policy({}), apps=("demo",)) as stack,
        aiohttp.ClientSession() as http,
    ):
        host = {"Host": "typo.localhost:8080"}
        async with http.get(stack.base + "/x", headers={**host, **HTML}) as resp:
            page = await resp.text()
            assert resp.status == 404
        assert "This relay serves no application at <b>typo.localhost:8080</b>." in page
        assert "<code>http.routes</code>" in page
        async with http.get(stack.base + "/x", headers=host) as resp:
            assert resp.status == 404
            assert await resp.text() == "Not found: no application at typo.localhost:8080\n"
        evil = {"Host": "a<b>.localhost", **HTML}
        async with http.get(stack.base + "/", headers=evil) as resp:
            assert resp.status in (400, 404)
            assert "<b>.localhost" not in await resp.text()
