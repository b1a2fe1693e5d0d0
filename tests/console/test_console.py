"""The console over HTTP, on a real relay with a real audit store: sign-in required, strict
headers, a live tunnel listed and revoked, CSRF and cross-site refusals, non-admins refused,
markup shown as text, audit search and export, policy explain. (Sign-in through the identity
provider and the pages in a browser: tests/e2e/test_console_browser.py.)"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tunnel_server.audit_store import AuditQuery
from tunnel_server.console.app import CSP

from ..helpers import UNIT, TcpTarget
from ..oidc_fixture import TestIssuer
from .harness import ConsoleStack, closed_code, console_stack, identity, open_tunnel

ALICE = identity("alice@example.com")  # group ops: an admin
BOB = identity("bob@example.com", ("dev",))  # not an admin
MARKUP_EMAIL = "<script>document.title='pwned'</script>@example.com"
MARKUP_INSTANCE = "<img src=x onerror=alert(1)>"


@pytest.fixture
async def stack(issuer: TestIssuer, tmp_path: Path) -> Any:
    async with console_stack(issuer, tmp_path) as found:
        yield found


async def records(stack: ConsoleStack, **filters: Any) -> list[dict[str, Any]]:
    store = stack.server.audit_store
    assert store is not None
    await store.flush()
    page = await store.search(AuditQuery(**filters, limit=200))
    return [r.record for r in page.records]


async def test_sign_in_required_and_static_files(stack: ConsoleStack) -> None:
    async with stack.browser(None) as (client, _):
        async with client.get("/console/tunnels?x=1", allow_redirects=False) as response:
            assert response.status == 302
            location = "/console/sign_in?rd=%2Fconsole%2Ftunnels%3Fx%3D1"
            assert response.headers["Location"] == location
            assert response.headers["Content-Security-Policy"] == CSP
        async with client.get("/console/api/tunnels") as response:
            assert response.status == 401
        async with client.post("/console/api/revoke", json={}) as response:
            assert response.status == 401
        async with client.get("/", allow_redirects=False) as response:
            assert response.headers["Location"] == "/console/"
        async with client.get("/console/static/console.js") as response:
            assert response.status == 200
            assert response.content_type == "text/javascript"
            assert "X-Console-Csrf" in await response.text()
        async with client.get("/console/static/../app.py") as response:
            assert response.status == 404
        # The bearer-token admin API is unchanged beside it.
        async with client.get("/admin/sessions") as response:
            assert response.status == 401


async def test_pages_have_no_inline_script_or_style(stack: ConsoleStack) -> None:
    async with stack.browser(ALICE) as (client, _):
        for path in ("/console/", "/console/tunnels", "/console/audit", "/console/policy"):
            async with client.get(path) as response:
                assert response.status == 200, path
                assert response.headers["Content-Security-Policy"] == CSP
                assert response.headers["Cache-Control"] == "no-store"
                assert response.headers["X-Frame-Options"] == "DENY"
                html = await response.text()
            scripts = re.findall(r"<script[^>]*>", html)
            assert scripts == ["<script src='/console/static/console.js' defer>"], path
            assert " style=" not in html
            assert "<style" not in html
            assert "alice@example.com" in html


async def test_a_live_tunnel_is_listed_and_revoked(
    stack: ConsoleStack, issuer: TestIssuer, echo: TcpTarget
) -> None:
    async with (
        open_tunnel(stack.server.url, issuer.mint(), echo.port) as tunnel,
        stack.browser(ALICE) as (client, csrf),
    ):
        async with client.get("/console/api/tunnels") as response:
            listed = (await response.json())["tunnels"]
        assert len(listed) == 1
        row = listed[0]
        assert row["principal"] == "user:alice@example.com"
        assert row["target"] == "instance:p/z/vm1"
        assert (row["port"], row["client"]) == (echo.port, "127.0.0.1")
        assert (row["node"], row["dialect"], row["state"]) == ("test-node", "native", "attached")
        assert (row["bytes_from_client"], row["bytes_to_client"]) == (5, 5)
        headers = {"X-Console-Csrf": csrf, "Origin": stack.origin}
        body = {"kind": "session", "subject": row["sid"]}
        async with client.post("/console/api/revoke", json=body, headers=headers) as response:
            assert response.status == 200
            assert await response.json() == {"closed": 1}
        assert await closed_code(tunnel) == 4033
        relay = stack.server.relay
        async with asyncio.timeout(40 * UNIT):
            await relay.wait_until(lambda: not relay.sessions)
    revokes = await records(stack, event="revoke")
    assert revokes[0]["by"] == "user:alice@example.com"
    console = await records(stack, event="console")
    assert console[0]["action"] == "revoke_session"
    assert console[0]["subject"] == row["sid"]


async def test_cross_site_and_tokenless_posts_are_refused(
    stack: ConsoleStack, issuer: TestIssuer, echo: TcpTarget
) -> None:
    async with (
        open_tunnel(stack.server.url, issuer.mint(), echo.port) as tunnel,
        stack.browser(ALICE) as (client, csrf),
    ):
        sid = next(iter(stack.server.relay.sessions))
        body = {"kind": "session", "subject": sid}
        attempts: list[dict[str, str]] = [
            {},  # no token
            {"X-Console-Csrf": "wrong"},
            {"X-Console-Csrf": csrf, "Origin": "http://evil.example"},
            {"X-Console-Csrf": csrf, "Sec-Fetch-Site": "cross-site"},
            {"X-Console-Csrf": csrf, "Origin": "null"},
        ]
        for headers in attempts:
            async with client.post("/console/api/revoke", json=body, headers=headers) as resp:
                assert resp.status == 403, headers
        form = {"kind": "session", "subject": sid}  # a cross-site form post has no token
        evil = {"Origin": "http://127.0.0.1:1"}
        async with client.post("/console/revoke", data=form, headers=evil) as resp:
            assert resp.status == 403
        async with client.post("/console/sign_out", data={"csrf": "nope"}) as resp:
            assert resp.status == 403
        assert sid in stack.server.relay.sessions  # untouched
        tunnel.send(b"still")
        async with asyncio.timeout(40 * UNIT):
            while tunnel.result.received < 10:
                assert await tunnel._read_once()
    denied = await records(stack, event="console", outcome="deny")
    assert len(denied) == len(attempts) + 2
    reasons = {r["reason"] for r in denied}
    assert reasons == {"bad csrf token", "cross-origin request", "cross-site request"}


async def test_non_admins_are_refused(stack: ConsoleStack) -> None:
    async with stack.browser(BOB) as (client, csrf):
        async with client.get("/console/") as response:
            assert response.status == 403
            assert "admins only" in await response.text()
        async with client.get("/console/api/tunnels") as response:
            assert response.status == 403
        headers = {"X-Console-Csrf": csrf}
        body = {"kind": "user", "subject": "user:alice@example.com"}
        async with client.post("/console/api/revoke", json=body, headers=headers) as response:
            assert response.status == 403
    refused = await records(stack, event="console", principal="user:bob@example.com")
    assert len(refused) == 3
    assert all(r["reason"] == "not an admin" for r in refused)


async def test_markup_in_an_email_and_an_instance_name_is_text(stack: ConsoleStack) -> None:
    """An admin whose email claim holds markup; an instance name with markup in an audit
    record, in a search (reflected from the query string) and in an explain: all shown
    escaped, never as elements. (The relay's URL parser refuses such a name on a connect; a
    record can still carry one from another node or another version.)"""
    resource = f"instance:p/z/{MARKUP_INSTANCE}"
    stack.server.relay.audit.record(
        "decision", decision="deny", reason="no binding", principal=f"user:{MARKUP_EMAIL}",
        resource=resource, port=22,
    )  # fmt: skip
    await records(stack)
    raw_email, raw_instance = "<script>document.title", "<img src=x"
    escaped_email = "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;@example.com"
    escaped_instance = "&lt;img src=x onerror=alert(1)&gt;"
    async with stack.browser(identity(MARKUP_EMAIL)) as (client, csrf):
        async with client.get("/console/audit?range=1h") as response:
            html = await response.text()
        for raw, escaped in ((raw_email, escaped_email), (raw_instance, escaped_instance)):
            assert raw not in html
            assert escaped in html
        async with client.get("/console/audit", params={"target": resource}) as response:
            html = await response.text()
        assert raw_instance not in html
        assert html.count(escaped_instance) >= 2  # the form's value and the record
        form = {"csrf": csrf, "members": "group:ops", "target": f"p/z/{MARKUP_INSTANCE}",
                "port": "22"}  # fmt: skip
        async with client.post("/console/policy/explain", data=form) as response:
            html = await response.text()
        assert "id='verdict'>DENY<" in html
        assert raw_instance not in html
        assert escaped_instance in html


async def test_audit_search_pages_and_exports(stack: ConsoleStack) -> None:
    audit = stack.server.relay.audit
    for n in range(60):
        audit.record(
            "decision", decision="deny", reason=f"=HYPERLINK({n})",
            principal="user:bob@example.com", resource="instance:p/z/db", port=5432,
        )  # fmt: skip
    audit.record("decision", decision="allow", principal="user:alice@example.com")
    await records(stack)
    async with stack.browser(ALICE) as (client, _):
        async with client.get("/console/audit?user=bob@example.com&outcome=deny") as response:
            html = await response.text()
        assert html.count("<td>=HYPERLINK(") == 50  # a page
        href = re.search(r"href='(/console/audit\?[^']*)' id='next-page'", html)
        assert href is not None
        async with client.get(href.group(1).replace("&amp;", "&")) as response:
            assert (await response.text()).count("<td>=HYPERLINK(") == 10
        query = "user=bob@example.com&format="
        async with client.get(f"/console/audit/export?{query}jsonl") as response:
            assert response.headers["Content-Disposition"] == "attachment; filename=audit.jsonl"
            lines = (await response.text()).splitlines()
        assert len(lines) == 60
        assert all(json.loads(line)["principal"] == "user:bob@example.com" for line in lines)
        async with client.get(f"/console/audit/export?{query}csv") as response:
            rows = list(csv.reader(io.StringIO(await response.text())))
        assert rows[0][:3] == ["time", "event", "node"]
        assert len(rows) == 61
        assert all(row[9].startswith("'=HYPERLINK(") for row in rows[1:])  # never a formula
        async with client.get("/console/audit?since=yesterday") as response:
            assert "since: not a time" in await response.text()
    exports = await records(stack, event="console")
    assert [r["action"] for r in exports] == ["export", "export"]


async def test_policy_explain(stack: ConsoleStack) -> None:
    async with stack.browser(ALICE) as (client, csrf):
        async with client.get("/console/policy") as response:
            html = await response.text()
        assert "access[0]" in html
        form = {"csrf": csrf, "members": "bob@example.com group:dev", "target": "vm1", "port": "22"}
        async with client.post("/console/policy/explain", data=form) as response:
            html = await response.text()
        assert "id='verdict'>DENY<" in html
        form |= {"members": "user:alice@example.com"}
        async with client.post("/console/policy/explain", data=form) as response:
            html = await response.text()
        assert "id='verdict'>ALLOW<" in html
        assert "access[0]" in html
        form |= {"port": "99999"}
        async with client.post("/console/policy/explain", data=form) as response:
            assert response.status == 400
            assert "port: an integer" in await response.text()
        del form["csrf"]
        async with client.post("/console/policy/explain", data=form) as response:
            assert response.status == 403
    explained = await records(stack, event="console", outcome="allow")
    assert [r["allowed"] for r in explained] == [None, True, False]


async def test_overview_json_has_charts_and_nodes(stack: ConsoleStack) -> None:
    async with stack.browser(ALICE) as (client, _):
        async with client.get("/console/api/overview") as response:
            fragments = (await response.json())["fragments"]
    assert set(fragments) == {"summary", "charts", "nodes"}
    assert fragments["charts"].count("<svg") == 3
    assert "test-node (this node)" in fragments["nodes"]
    assert "sqlite up, 0 dropped" in fragments["nodes"]
