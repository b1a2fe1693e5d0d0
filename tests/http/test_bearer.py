"""Bearer access, header hygiene, streaming and WebSockets through the proxy, in process."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import time
import tracemalloc
from typing import Any

import aiohttp
import pytest
from yarl import URL

from scripts.demo_web import expected_download_digest
from tunnel_server.access.policy import parse_policy
from tunnel_upstream import AssertionError_, verify_assertion

from ..helpers import UNIT
from ..oidc_fixture import TestIssuer
from .harness import APP_AUDIENCE, Stack, proxy_stack, web_policy

ALICE = "user:alice@example.com"


async def get_json(
    stack: Stack, path: str, headers: dict[str, str], app: str = "demo"
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(stack.base + path, headers={"Host": stack.host(app), **headers}) as resp,
    ):
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


@pytest.fixture
async def stack(issuer: TestIssuer) -> Any:
    async with proxy_stack(issuer.issuer, web_policy({"demo": [ALICE], "other": [ALICE]})) as s:
        yield s


async def test_bearer_allowed_and_identity_headers(stack: Stack, issuer: TestIssuer) -> None:
    token = issuer.mint(aud=APP_AUDIENCE, groups=["ops"])
    spoofed = {
        "X-Tunnel-Authenticated-User-Email": "mallory@example.com",
        "x_tunnel_jwt_assertion": "forged",
        "X-TUNNEL-JWT-ASSERTION": "forged2",
        "X-Forwarded-For": "10.9.9.9",
        "X-Forwarded-User": "mallory",
        "Forwarded": "for=10.9.9.9",
        "Connection": "X-Secret-Hop",
        "X-Secret-Hop": "drop me",
    }
    status, body = await get_json(
        stack, "/headers", {"Authorization": f"Bearer {token}", **spoofed}
    )
    assert status == 200, body
    names: dict[str, list[str]] = {}
    for name, value in body["headers"]:
        names.setdefault(name.lower(), []).append(value)
    assert names["x-tunnel-authenticated-user-email"] == ["alice@example.com"]
    assert len(names["x-tunnel-jwt-assertion"]) == 1
    assert "x_tunnel_jwt_assertion" not in names
    assert "x-forwarded-user" not in names
    assert "forwarded" not in names
    assert "x-secret-hop" not in names
    assert "authorization" not in names
    assert names["x-forwarded-for"] == ["127.0.0.1"]
    assert names["x-forwarded-proto"] == ["http"]
    assert body["claims"]["email"] == "alice@example.com"
    assert body["claims"]["groups"] == ["ops"]
    assert body["claims"]["aud"] == "app:demo"
    assert body["claims"]["exp"] - body["claims"]["iat"] <= 600
    # App A's assertion is refused by app B's verifier.
    assertion = names["x-tunnel-jwt-assertion"][0]
    jwks = stack.proxy.signer.jwks()
    verify_assertion(assertion, audience="app:demo", issuer=stack.proxy.signer.issuer, jwks=jwks)
    with pytest.raises(AssertionError_):
        verify_assertion(
            assertion, audience="app:other", issuer=stack.proxy.signer.issuer, jwks=jwks
        )


async def test_proxy_authorization_leaves_authorization_to_the_app(
    stack: Stack, issuer: TestIssuer
) -> None:
    token = issuer.mint(aud=APP_AUDIENCE)
    status, body = await get_json(
        stack,
        "/headers",
        {"Proxy-Authorization": f"Bearer {token}", "Authorization": "Basic YXBwOnB3"},
    )
    assert status == 200
    names = {n.lower(): v for n, v in body["headers"]}
    assert names["authorization"] == "Basic YXBwOnB3"
    assert "proxy-authorization" not in names


@pytest.mark.parametrize(
    ("aud", "email", "expected"),
    [
        ("https://other.app", "alice@example.com", 401),  # another app's audience
        ("tunnel", "alice@example.com", 401),  # the relay's audience
        (APP_AUDIENCE, "bob@example.com", 403),  # valid but not granted
    ],
)
async def test_bearer_refused(
    stack: Stack, issuer: TestIssuer, aud: str, email: str, expected: int
) -> None:
    token = issuer.mint(aud=aud, email=email, sub=email.split("@")[0])
    status, body = await get_json(stack, "/headers", {"Authorization": f"Bearer {token}"})
    assert status == expected
    assert "assertion" not in json.dumps(body)


async def test_no_credentials_is_401_without_login(stack: Stack) -> None:
    status, _ = await get_json(stack, "/", {"Accept": "text/html"})
    assert status == 401


async def test_upstream_without_assertion_refuses(stack: Stack) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{stack.upstream_ports['demo']}/headers",
            headers={"X-Tunnel-Jwt-Assertion": "forged.token.value"},
        ) as resp,
    ):
        assert resp.status == 401


@pytest.mark.parametrize(
    "path",
    ["/a/%2e%2e/%2e%2e/x", "/a/..;/headers", "/a%2fb", "/a%5cb", "/%252e%252e/", "/a\\b",
     "/..", "/a/%00", "/%e0%80"],
)  # fmt: skip
async def test_ambiguous_paths_rejected(stack: Stack, issuer: TestIssuer, path: str) -> None:
    token = issuer.mint(aud=APP_AUDIENCE)
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            URL(stack.base + path, encoded=True),
            headers={"Host": stack.host(), "Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        assert resp.status == 400, path


async def test_path_policy_on_normalized_path(issuer: TestIssuer) -> None:
    deny_admin = [
        {
            "name": "no-admin",
            "members": [ALICE],
            "role": "webUser",
            "resources": {"apps": ["demo"]},
            "condition": "!request.path.startsWith('/headers/admin')",
        }
    ]
    policy = web_policy({}, deny_admin)
    async with proxy_stack(issuer.issuer, policy) as stack:
        token = issuer.mint(aud=APP_AUDIENCE)
        auth = {"Authorization": f"Bearer {token}"}
        status, body = await get_json(stack, "/headers/x//./y/%7Ez", auth)
        assert status == 200
        assert body["path"] == "/headers/x/y/~z"
        for sneaky in ("/headers/x/../admin", "/headers//admin", "/headers/./admin/",
                       "/headers/%61dmin", "/x/../headers/admin"):  # fmt: skip
            status, _ = await get_json(stack, sneaky, auth)
            assert status == 403, sneaky


async def test_cache_control_private(stack: Stack, issuer: TestIssuer) -> None:
    token = issuer.mint(aud=APP_AUDIENCE)
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            stack.base + "/headers",
            headers={"Host": stack.host(), "Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        assert "private" in resp.headers["Cache-Control"]


async def test_websocket_echo_and_origin(stack: Stack, issuer: TestIssuer) -> None:
    token = issuer.mint(aud=APP_AUDIENCE)
    headers = {"Host": stack.host(), "Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(stack.base + "/ws", headers=headers) as ws:
            await ws.send_str("hello")
            assert (await ws.receive_str()) == "hello"
            await ws.send_bytes(b"\x00\x01")
            assert (await ws.receive_bytes()) == b"\x00\x01"
            # Revoking the user closes the open WebSocket.
            assert stack.proxy.revoke_user(ALICE) == 1
            message = await ws.receive()
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await session.ws_connect(
                stack.base + "/ws", headers={**headers, "Origin": "http://evil.example"}
            )
        assert exc.value.status == 403


async def test_policy_change_closes_open_websocket(stack: Stack, issuer: TestIssuer) -> None:
    token = issuer.mint(aud=APP_AUDIENCE)
    headers = {"Host": stack.host(), "Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(stack.base + "/ws", headers=headers) as ws:
            assert stack.proxy.redecide_all() == 0
            stack.proxy.policy = lambda: web_policy({})
            assert stack.proxy.redecide_all() == 1
            message = await ws.receive()
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_a_websocket_closes_when_its_time_window_ends(issuer: TestIssuer) -> None:
    """Open streams are re-decided when their decision can next change (here a condition on
    request.time), not on the housekeeping interval (10 minutes in this stack)."""
    ends = time.time() + 20 * UNIT
    deadline = (
        datetime.datetime.fromtimestamp(ends, datetime.UTC).isoformat().replace("+00:00", "Z")
    )
    condition = {"expression": f"request.time < timestamp('{deadline}')"}
    windowed = parse_policy(
        {
            "bindings": [
                {"name": "until-deadline", "members": [ALICE], "role": "webUser",
                 "resources": {"apps": ["demo"]}, "condition": condition},
            ]
        }
    )  # fmt: skip
    async with proxy_stack(issuer.issuer, windowed, extra={"recheck_interval": 600}) as stack:
        token = issuer.mint(aud=APP_AUDIENCE, lifetime=600)
        headers = {"Host": stack.host(), "Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(stack.base + "/ws", headers=headers) as ws:
                async with asyncio.timeout(200 * UNIT):
                    message = await ws.receive()
                closed_at = time.time()
    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert closed_at >= ends
    assert any('"event":"http_close"' in line for line in stack.audit)


SIZE = 200 * 1024 * 1024


async def test_streaming_200_mib_both_ways_bounded_memory(stack: Stack, issuer: TestIssuer) -> None:
    token = issuer.mint(aud=APP_AUDIENCE, lifetime=600)
    headers = {"Host": stack.host(), "Authorization": f"Bearer {token}"}
    block = hashlib.sha256(b"x").digest() * 2048  # 64 KiB

    async def body() -> Any:
        for _ in range(SIZE // len(block)):
            yield block

    expected_up = hashlib.sha256()
    for _ in range(SIZE // len(block)):
        expected_up.update(block)
    tracemalloc.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(stack.base + "/upload", data=body(), headers=headers) as resp:
                assert resp.status == 200
                result = await resp.json()
            assert result == {"sha256": expected_up.hexdigest(), "bytes": SIZE}
            digest = hashlib.sha256()
            async with session.get(stack.base + f"/download?bytes={SIZE}", headers=headers) as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_chunked(1 << 16):
                    digest.update(chunk)
            assert digest.hexdigest() == expected_download_digest(SIZE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Client, proxy and upstream share this process: 200 MiB each way, a few MiB at most held.
    assert peak < 32 * 1024 * 1024, peak


async def test_assertion_carries_the_access_levels_met(issuer: TestIssuer) -> None:
    """`access_levels` in the signed assertion: the levels this request meets (from 127.0.0.1:
    the loopback level, not the office one)."""
    levels = {
        "loopback": {"ip_subnetworks": ["127.0.0.0/8"]},
        "office": {"ip_subnetworks": ["203.0.113.0/24"]},
    }
    policy = parse_policy(
        {
            "access_levels": levels,
            "bindings": [{"members": [ALICE], "role": "webUser", "resources": {"apps": ["demo"]}}],
        }
    )
    async with proxy_stack(issuer.issuer, policy, apps=("demo",)) as stack:
        token = issuer.mint(aud=APP_AUDIENCE)
        status, body = await get_json(stack, "/headers", {"Authorization": f"Bearer {token}"})
    assert status == 200, body
    assert body["claims"]["access_levels"] == ["loopback"]
