"""Vectors for HTTP mode's pure parts: path normalization, return URLs, header hygiene, cache
control, assertion audience; and sign-out CSRF, cookies and 401-vs-redirect in process."""

from __future__ import annotations

import time

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from tunnel_server.access.identity import Identity
from tunnel_server.access.source import client_address
from tunnel_server.web.assertion import AssertionCache, AssertionSigner
from tunnel_server.web.headers import (
    is_identity_header,
    response_headers,
    upstream_headers,
)
from tunnel_server.web.paths import (
    BadRequest,
    normalize_host,
    normalize_path,
    safe_return_path,
)
from tunnel_server.web.sessions import WebSession
from tunnel_upstream import AssertionError_, verify_assertion

from ..oidc_fixture import TestIssuer
from .harness import Stack, proxy_stack, web_policy

ORIGIN = "https://wiki.example.com"


@pytest.mark.parametrize(
    ("raw", "forwarded", "decoded"),
    [
        ("/a//b", "/a/b", "/a/b"),
        ("/a/./b/", "/a/b/", "/a/b/"),
        ("/a/%2e/b", "/a/b", "/a/b"),
        ("/a/b/../c", "/a/c", "/a/c"),
        ("/a/%2E%2e/c", "/c", "/c"),
        ("/%41dmin", "/Admin", "/Admin"),
        ("/a%20b", "/a%20b", "/a b"),
        ("/caf%c3%a9", "/caf%C3%A9", "/café"),
        ("/a;v=1", "/a", "/a"),  # the parameter is reported (test_hardening.py)
    ],
)
def test_path_normalized(raw: str, forwarded: str, decoded: str) -> None:
    path = normalize_path(raw)
    assert (path.raw, path.decoded) == (forwarded, decoded)


@pytest.mark.parametrize(
    "raw",
    [
        "/a/..;/b", "/..;/admin", "/a/.;/b", "/a/;/b",  # ..; (Tomcat)
        "/a%2fb", "/a%2F..%2Fb", "/a%5cb", "/a\\b",  # encoded and raw (back)slashes
        "/%252e%252e/x", "/a%25", "/a%2", "/a%zz",  # double / bad encoding
        "/..", "/a/../..", "/%2e%2e",  # above the root
        "/a%00", "/a%0d%0a", "/a%7f", "/%c0%ae",  # NUL, CRLF, DEL, overlong UTF-8
        "a/b", "*",
    ],
)  # fmt: skip
def test_path_ambiguous_rejected(raw: str) -> None:
    with pytest.raises(BadRequest):
        normalize_path(raw)


@pytest.mark.parametrize(
    ("host", "expected"),
    [("Wiki.Example.COM", ("wiki.example.com", None)), ("wiki.example.com.:8443",
     ("wiki.example.com", 8443)), ("a.localhost:80", ("a.localhost", 80))],
)  # fmt: skip
def test_host_normalized(host: str, expected: tuple[str, int | None]) -> None:
    assert normalize_host(host) == expected


@pytest.mark.parametrize(
    "host", ["", "wiki.example.com:0", "wiki.example.com:99999", "[::1]:80", "a b", "wikí.com",
             "wiki..com", "wiki.example.com:8x", "-a.com"],
)  # fmt: skip
def test_host_rejected(host: str) -> None:
    with pytest.raises(BadRequest):
        normalize_host(host)


@pytest.mark.parametrize(
    ("rd", "expected"),
    [
        ("/docs?page=2", "/docs?page=2"),
        ("https://wiki.example.com/x?y=1", "/x?y=1"),
        (None, "/"),
        # protocol-relative and backslash tricks
        ("//evil.com", "/"), ("///evil.com", "/"), ("/\\evil.com", "/"), ("\\\\evil.com", "/"),
        ("/%2fevil.com", "/"),
        # scheme tricks
        ("http:evil.com", "/"), ("https:evil.com", "/"), ("javascript:alert(1)", "/"),
        ("JavaScript:alert(1)", "/"), ("data:text/html,x", "/"), (" javascript:alert(1)", "/"),
        # other hosts, look-alikes, ports, userinfo, other scheme
        ("https://evil.com/", "/"), ("https://wiki.example.com.evil.com/", "/"),
        ("https://wiki.example.com@evil.com/", "/"), ("https://evil.com@wiki.example.com/", "/"),
        ("https://wiki.example.com:8443/", "/"), ("http://wiki.example.com/", "/"),
        # control characters
        ("/\r\nLocation: https://evil.com", "/"), ("/\tx", "/"), ("/x\x00", "/"),
    ],
)  # fmt: skip
def test_return_url(rd: str | None, expected: str) -> None:
    assert safe_return_path(rd, ORIGIN) == expected


@pytest.mark.parametrize(
    "name",
    ["X-Tunnel-Jwt-Assertion", "x-tunnel-authenticated-user-email", "X_TUNNEL_JWT_ASSERTION",
     "x_Tunnel-Authenticated_User-Id", "X-Forwarded-For", "x_forwarded_host", "Forwarded",
     "X-Real-IP", "X-Goog-Authenticated-User-Email", "X-Forwarded-User"],
)  # fmt: skip
def test_identity_headers_recognized(name: str) -> None:
    assert is_identity_header(name)


def test_upstream_headers_strip_and_add() -> None:
    sent = CIMultiDictProxy(
        CIMultiDict(
            [
                ("Host", "wiki.example.com"), ("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"),
                ("Keep-Alive", "5"), ("TE", "trailers"), ("Transfer-Encoding", "chunked"),
                ("Upgrade", "h2c"), ("Proxy-Authorization", "Bearer t"),
                ("Authorization", "Bearer t"), ("X_Tunnel_Jwt_Assertion", "forged"),
                ("x-tunnel-authenticated-user-email", "mallory@example.com"),
                ("Cookie", "__Host-tunnel_session=s; app=1"), ("Accept", "text/html"),
            ]
        )
    )  # fmt: skip
    out = upstream_headers(
        sent,
        consumed_authorization=True,
        identity={"X-Tunnel-Authenticated-User-Email": "alice@example.com"},
        forwarded_for="10.0.0.1",
        proto="https",
        host="wiki.example.com",
    )
    assert dict(out) == {
        "Cookie": "app=1",
        "Accept": "text/html",
        "X-Tunnel-Authenticated-User-Email": "alice@example.com",
        "X-Forwarded-For": "10.0.0.1",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "wiki.example.com",
    }


def test_forwarded_for_trusted_only_from_proxies() -> None:
    import ipaddress

    lb = [ipaddress.ip_network("10.0.0.0/8")]
    assert client_address("203.0.113.5", ["1.2.3.4"], lb) == ("203.0.113.5", "203.0.113.5")
    assert client_address("10.0.0.2", ["198.51.100.7"], lb) == (
        "198.51.100.7",
        "198.51.100.7, 10.0.0.2",
    )
    assert client_address("10.0.0.2", ["6.6.6.6, 198.51.100.7, 10.0.0.3"], lb)[0] == (
        "198.51.100.7"
    )
    assert client_address("10.0.0.2", ["1.2.3.4"], [])[0] == "10.0.0.2"


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [(None, "private"), ("public, max-age=60", "private, max-age=60"),
     ("s-maxage=600", "private"), ("no-store", "no-store"), ("private, max-age=5",
     "private, max-age=5")],
)  # fmt: skip
def test_cache_control(upstream: str | None, expected: str) -> None:
    headers = CIMultiDict([("Cache-Control", upstream)] if upstream else [])
    out = response_headers(CIMultiDictProxy(headers), authenticated=True)
    assert out["Cache-Control"] == expected


def test_assertion_audience_lifetime_and_rotation() -> None:
    signer = AssertionSigner("https://relay.example.com", lifetime=300)
    token = signer.sign(
        audience="app:a", subject="alice", email="a@x", groups=["g"], principal="user:a@x"
    )
    claims = verify_assertion(token, audience="app:a", issuer=signer.issuer, jwks=signer.jwks())
    assert claims["exp"] - claims["iat"] == 300
    with pytest.raises(AssertionError_):
        verify_assertion(token, audience="app:b", issuer=signer.issuer, jwks=signer.jwks())
    with pytest.raises(AssertionError_):
        verify_assertion(token, audience="app:a", issuer="https://evil", jwks=signer.jwks())
    old = signer.current.kid
    signer.rotate()
    assert {k["kid"] for k in signer.jwks()["keys"]} == {old, signer.current.kid}
    verify_assertion(token, audience="app:a", issuer=signer.issuer, jwks=signer.jwks())
    signer.rotate()
    with pytest.raises(AssertionError_):  # two rotations later the old key is gone
        verify_assertion(token, audience="app:a", issuer=signer.issuer, jwks=signer.jwks())
    with pytest.raises(AssertionError_):
        verify_assertion(None, audience="app:a", issuer=signer.issuer, jwks=signer.jwks())


# -- in process: sessions, CSRF, 401 vs redirect ---------------------------------------------------

LOGIN = {"issuer": "http://127.0.0.1:9/", "client_id": "tunnel-web", "client_secret": "s"}


async def _session(stack: Stack, email: str = "alice@example.com") -> WebSession:
    now = time.time()
    identity = Identity(
        principal=f"user:{email}", subject=email.split("@")[0], issuer="https://idp",
        email=email, groups=(), expires_at=now + 3600, members=frozenset({f"user:{email}"}),
        valid_until=now + 3600, issued_at=now,
    )  # fmt: skip
    session = WebSession(
        sid="sid-" + email, identity=identity, origin=f"http://demo.localhost:{stack.port}",
        created=now, auth_time=now, expires=now + 3600,
    )  # fmt: skip
    await stack.proxy.store.put(session)
    return session


async def test_session_cookie_csrf_and_sign_out(issuer: TestIssuer) -> None:
    policy = web_policy({"demo": ["user:alice@example.com"]})
    async with proxy_stack(issuer.issuer, policy, login=LOGIN) as stack:
        session = await _session(stack)
        cookie = {"Cookie": f"__Host-tunnel_session={session.sid}", "Host": stack.host()}
        async with aiohttp.ClientSession() as http:
            async with http.get(stack.base + "/headers", headers=cookie) as resp:
                assert resp.status == 200
                seen = {k.lower(): v for k, v in (await resp.json())["headers"]}
                assert "__Host-tunnel_session" not in seen.get("cookie", "")
            async with http.get(stack.base + "/_tunnel/identity", headers=cookie) as resp:
                assert (await resp.json())["csrf_token"] == session.csrf
            # A tampered or unknown cookie is no session.
            bad = {**cookie, "Cookie": f"__Host-tunnel_session={session.sid}x"}
            async with http.get(stack.base + "/headers", headers=bad) as resp:
                assert resp.status == 401
            # Session bound to its origin (another app's host).
            other = {**cookie, "Host": stack.host("other")}
            async with http.get(stack.base + "/headers", headers=other) as resp:
                assert resp.status == 401
            # Sign-out: no token, wrong token, cross-origin, GET: the session survives.
            url = stack.base + "/_tunnel/sign_out"
            for headers, data in [
                (cookie, {}),
                (cookie, {"csrf": "wrong"}),
                ({**cookie, "Origin": "http://evil.example"}, {"csrf": session.csrf}),
            ]:
                async with http.post(url, headers=headers, data=data) as resp:
                    assert resp.status == 403
            async with http.get(url, headers=cookie) as resp:
                assert resp.status == 200
            assert await stack.proxy.store.get(session.sid) is not None
            async with http.post(url, headers=cookie, data={"csrf": session.csrf}) as resp:
                assert resp.status == 200
                set_cookie = resp.headers["Set-Cookie"]
                assert set_cookie.startswith("__Host-tunnel_session=")
            assert await stack.proxy.store.get(session.sid) is None
            async with http.get(stack.base + "/headers", headers=cookie) as resp:
                assert resp.status == 401
            # Header form of the CSRF token works too.
            second = await _session(stack)
            async with http.post(url, headers={**cookie, "X-Tunnel-Csrf": second.csrf}) as resp:
                assert resp.status == 200


@pytest.mark.parametrize(
    ("headers", "method", "status"),
    [
        ({"Accept": "text/html"}, "GET", 302),
        ({"Accept": "text/html", "X-Requested-With": "XMLHttpRequest"}, "GET", 401),
        ({"Accept": "text/html", "Sec-Fetch-Mode": "cors"}, "GET", 401),
        ({"Accept": "application/json"}, "GET", 401),
        ({}, "GET", 401),
        ({"Accept": "text/html"}, "POST", 401),
    ],
)
async def test_unauthenticated_redirect_or_401(
    issuer: TestIssuer, headers: dict[str, str], method: str, status: int
) -> None:
    async with proxy_stack(issuer.issuer, web_policy({}), login=LOGIN) as stack:
        async with aiohttp.ClientSession() as http, http.request(
            method, stack.base + "/x", headers={"Host": stack.host(), **headers},
            allow_redirects=False,
        ) as resp:  # fmt: skip
            assert resp.status == status


async def test_sign_in_cookie_flags_and_pkce(issuer: TestIssuer) -> None:
    login = {**LOGIN, "issuer": issuer.issuer}
    issuer.discovery_overrides["authorization_endpoint"] = issuer.issuer + "/auth"
    async with proxy_stack(issuer.issuer, web_policy({}), login=login) as stack:
        async with aiohttp.ClientSession() as http, http.get(
            stack.base + "/_tunnel/sign_in?rd=//evil.com", headers={"Host": stack.host()},
            allow_redirects=False,
        ) as resp:  # fmt: skip
            assert resp.status == 302
            location = resp.headers["Location"]
            cookie = resp.headers["Set-Cookie"]
    assert location.startswith(issuer.issuer + "/auth?")
    for part in ("code_challenge_method=S256", "code_challenge=", "state=", "nonce=",
                 "redirect_uri=http%3A%2F%2Fdemo.localhost%3A"):  # fmt: skip
        assert part in location
    assert cookie.startswith("__Host-tunnel_login=")
    for flag in ("HttpOnly", "Secure", "SameSite=Lax", "Path=/"):
        assert flag in cookie
    assert "Domain" not in cookie


def test_assertion_cache_reuses_until_near_expiry_and_rotation() -> None:
    now = [1_000_000.0]
    signer = AssertionSigner("https://relay.example.com", lifetime=300, clock=lambda: now[0])
    cache = AssertionCache(signer)

    def sign(audience: str = "app:a", groups: tuple[str, ...] = ("g",), levels: tuple[str, ...] = ()
             ) -> str:  # fmt: skip
        return cache.sign(audience=audience, subject="alice", email="a@x", groups=groups,
                          access_levels=levels, principal="user:a@x")  # fmt: skip

    first = sign()
    assert sign() == first
    assert sign("app:b") != first  # per audience
    assert sign(groups=("h",)) != first  # per identity
    assert sign(levels=("corp",)) != first  # per access levels met
    now[0] += 300 - cache.margin - 1
    assert sign() == first  # still more than the margin left
    now[0] += 2
    renewed = sign()
    assert renewed != first
    signer.rotate()
    assert sign() != renewed  # a new key signs at once
