"""The development IdP (deploy/dev-idp, npm oidc-provider) issues what the relay verifies: JWT
access tokens for audience ``tunnel`` from the device flow, authorization code + PKCE and client
credentials; refresh with rotation, revocation, key rotation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tunnel_server.access.identity import OidcVerifier

from ..idp import (
    ALICE,
    AUDIENCE,
    BOB,
    CLI_CLIENT_ID,
    MALLORY,
    SERVICE_CLIENT_ID,
    WEB_CLIENT_ID,
    WEB_CLIENT_SECRET,
    DevIdp,
    IdpError,
    TokenError,
    jwt_parts,
    missing_tools,
    pkce_pair,
)
from ..ports import free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or ""),
]

WEB_REDIRECT = "http://127.0.0.1:8181/oauth2/callback"


@pytest.fixture
async def idp() -> AsyncIterator[DevIdp]:
    async with DevIdp(web_redirects=[WEB_REDIRECT]) as running:
        yield running


@pytest.fixture
async def verifier(idp: DevIdp) -> AsyncIterator[OidcVerifier]:
    checker = OidcVerifier(idp.issuer, [AUDIENCE])
    yield checker
    await checker.aclose()


async def test_discovery(idp: DevIdp) -> None:
    meta = await idp.metadata()
    assert meta["issuer"] == idp.issuer == f"http://127.0.0.1:{idp.port}"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert set(meta["grant_types_supported"]) == {
        "authorization_code",
        "refresh_token",
        "client_credentials",
        "urn:ietf:params:oauth:grant-type:device_code",
    }
    assert meta["response_types_supported"] == ["code"]
    assert {"openid", "email", "profile", "groups", "offline_access"} <= set(
        meta["scopes_supported"]
    )
    for name in ("device_authorization_endpoint", "revocation_endpoint", "introspection_endpoint"):
        assert meta[name].startswith(idp.issuer + "/")
    keys = (await idp.jwks())["keys"]
    assert {k["alg"] for k in keys} == {"RS256", "ES256"}
    assert all(k["kid"] and "d" not in k for k in keys)


async def test_client_credentials(idp: DevIdp, verifier: OidcVerifier) -> None:
    tokens = await idp.client_credentials()
    assert "refresh_token" not in tokens
    assert "id_token" not in tokens
    header, claims = jwt_parts(tokens["access_token"])
    assert header["typ"] == "at+jwt"
    assert header["alg"] == "RS256"
    assert claims["aud"] == AUDIENCE
    assert claims["sub"] == claims["client_id"] == SERVICE_CLIENT_ID
    identity = await verifier.verify(tokens["access_token"])
    assert identity.principal == f"serviceAccount:{SERVICE_CLIENT_ID}"
    assert identity.email is None
    assert identity.groups == ()
    # The default resource applies when none is sent; other resources and bad secrets are refused.
    assert jwt_parts((await idp.client_credentials(resource=None))["access_token"])[1]["aud"] == (
        AUDIENCE
    )
    with pytest.raises(TokenError) as wrong_resource:
        await idp.client_credentials(resource="urn:other")
    assert wrong_resource.value.error == "invalid_target"
    with pytest.raises(TokenError) as wrong_secret:
        await idp.client_credentials(secret="wrong")
    assert (wrong_secret.value.status, wrong_secret.value.error) == (401, "invalid_client")
    # oidc-provider refuses to introspect JWT access tokens (the relay verifies them locally).
    with pytest.raises(TokenError) as structured:
        await idp.introspect(tokens["access_token"])
    assert structured.value.error == "unsupported_token_type"


async def test_device_login_and_refresh(idp: DevIdp, verifier: OidcVerifier) -> None:
    tokens = await idp.device_login(ALICE)
    identity = await verifier.verify(tokens["access_token"])
    assert identity.principal == f"user:{ALICE}"
    assert identity.groups == ("ops", "dev")
    assert {"group:ops", "group:dev", "domain:example.com"} <= identity.members
    _, claims = jwt_parts(tokens["access_token"])
    assert claims["client_id"] == CLI_CLIENT_ID
    assert claims["aud"] == AUDIENCE
    _, id_claims = jwt_parts(tokens["id_token"])
    assert id_claims["aud"] == CLI_CLIENT_ID
    assert (id_claims["email"], id_claims["email_verified"]) == (ALICE, True)
    assert id_claims["groups"] == ["ops", "dev"]

    introspected = await idp.introspect(tokens["refresh_token"])  # as the confidential client
    assert (introspected["active"], introspected["sub"]) == (True, "alice")
    refreshed = await idp.refresh(tokens["refresh_token"])
    assert refreshed["refresh_token"] != tokens["refresh_token"]  # rotation
    assert (await verifier.verify(refreshed["access_token"])).principal == f"user:{ALICE}"
    # Replaying a rotated-out refresh token fails (and revokes the grant: reuse detection).
    with pytest.raises(TokenError) as replay:
        await idp.refresh(tokens["refresh_token"])
    assert replay.value.error == "invalid_grant"
    with pytest.raises(TokenError):
        await idp.refresh(refreshed["refresh_token"])


async def test_other_users_and_wrong_password(idp: DevIdp, verifier: OidcVerifier) -> None:
    bob = await verifier.verify((await idp.device_login(BOB))["access_token"])
    assert (bob.principal, bob.groups) == (f"user:{BOB}", ("dev",))
    mallory = await verifier.verify((await idp.device_login(MALLORY))["access_token"])
    assert (mallory.principal, mallory.groups) == (f"user:{MALLORY}", ())
    with pytest.raises(IdpError, match="login refused"):
        await idp.device_login(ALICE, "wrong-password")
    with pytest.raises(IdpError, match="login refused"):
        await idp.device_login("nobody@example.com")


async def test_group_change_reaches_refreshed_tokens(idp: DevIdp, verifier: OidcVerifier) -> None:
    tokens = await idp.device_login(BOB)
    await idp.set_groups(BOB, ["ops"])
    refreshed = await idp.refresh(tokens["refresh_token"])
    assert (await verifier.verify(refreshed["access_token"])).groups == ("ops",)


async def test_custom_users_file() -> None:
    users: list[dict[str, Any]] = [
        {"sub": "eve", "email": "eve@example.com", "email_verified": False, "groups": ["ops"]},
        {"email": "carol@example.org", "password": "other", "groups": ["dba"]},
    ]
    async with DevIdp(users=users) as idp:
        checker = OidcVerifier(idp.issuer, [AUDIENCE])
        try:
            # An unverified email is never trusted as a user principal.
            eve = await checker.verify((await idp.device_login("eve@example.com"))["access_token"])
            assert (eve.principal, eve.email) == ("subject:eve", None)
            carol = await idp.device_login("carol@example.org", "other")
            assert (await checker.verify(carol["access_token"])).members >= {"group:dba"}
            with pytest.raises(IdpError):
                await idp.device_login(ALICE)
        finally:
            await checker.aclose()


async def test_key_rotation(idp: DevIdp, verifier: OidcVerifier) -> None:
    before = (await idp.client_credentials())["access_token"]
    old_kid = jwt_parts(before)[0]["kid"]
    await verifier.verify(before)  # JWKS now cached

    new_kid = await idp.rotate()
    assert new_kid != old_kid
    after = await idp.client_credentials()
    assert jwt_parts(after["access_token"])[0]["kid"] == new_kid
    user = await idp.device_login(ALICE)
    assert jwt_parts(user["access_token"])[0]["kid"] == new_kid
    assert jwt_parts(user["id_token"])[0]["kid"] == new_kid
    # The unknown kid makes the verifier refetch; the old key is still published.
    assert (await verifier.verify(after["access_token"])).principal.startswith("serviceAccount:")
    await verifier.verify(before)
    kids = [k["kid"] for k in (await idp.jwks())["keys"]]
    assert kids[0] == new_kid
    assert old_kid in kids

    retired = await idp.rotate(retire=True)
    kids = [k["kid"] for k in (await idp.jwks())["keys"] if k["alg"] == "RS256"]
    assert kids == [retired]
    fresh = OidcVerifier(idp.issuer, [AUDIENCE])
    try:
        await fresh.verify((await idp.client_credentials())["access_token"])
        with pytest.raises(Exception, match="unknown key"):
            await fresh.verify(before)
    finally:
        await fresh.aclose()


async def test_revocation(idp: DevIdp) -> None:
    tokens = await idp.device_login(ALICE)
    await idp.revoke(tokens["refresh_token"])
    with pytest.raises(TokenError) as revoked:
        await idp.refresh(tokens["refresh_token"])
    assert revoked.value.error == "invalid_grant"

    bob = await idp.device_login(BOB)
    assert await idp.revoke_user(BOB) >= 1
    with pytest.raises(TokenError) as revoked:
        await idp.refresh(bob["refresh_token"])
    assert revoked.value.error == "invalid_grant"


async def test_authorization_code_pkce(idp: DevIdp, verifier: OidcVerifier) -> None:
    # RFC 8252: any port on the loopback redirect of the native client.
    redirect_uri = f"http://127.0.0.1:{free_port()}/callback"
    code_verifier, challenge = pkce_pair()
    result = await idp.authorize(
        ALICE, redirect_uri=redirect_uri, code_challenge=challenge, state="s-1", nonce="n-1"
    )
    assert result["state"] == "s-1"
    assert result["iss"] == idp.issuer
    exchange = {"grant_type": "authorization_code", "code": result["code"]}
    exchange["redirect_uri"] = redirect_uri
    for wrong in ({"code_verifier": pkce_pair()[0]}, {}):
        with pytest.raises(TokenError) as refused:
            await idp.token({**exchange, **wrong})
        assert refused.value.error == "invalid_grant"
    tokens = await idp.token({**exchange, "code_verifier": code_verifier})
    assert (await verifier.verify(tokens["access_token"])).principal == f"user:{ALICE}"
    assert jwt_parts(tokens["id_token"])[1]["nonce"] == "n-1"
    with pytest.raises(TokenError) as reused:  # a code is redeemed once
        await idp.token({**exchange, "code_verifier": code_verifier})
    assert reused.value.error == "invalid_grant"

    # PKCE is required, and only S256.
    denied = await idp.authorize(ALICE, redirect_uri=redirect_uri, code_challenge=None)
    assert denied["error"] == "invalid_request"
    assert "code" not in denied
    plain = await idp.authorize(
        ALICE,
        redirect_uri=redirect_uri,
        code_challenge="x" * 43,
        extra={"code_challenge_method": "plain"},
    )
    assert plain["error"] == "invalid_request"
    # Only the registered loopback path; other hosts never get a redirect.
    for bad in ("http://127.0.0.1:9/elsewhere", "http://evil.example/callback"):
        with pytest.raises(IdpError, match="no redirect"):
            await idp.authorize(ALICE, redirect_uri=bad, code_challenge=challenge)


async def test_web_client(idp: DevIdp, verifier: OidcVerifier) -> None:
    tokens = await idp.code_login(
        BOB, redirect_uri=WEB_REDIRECT, client_id=WEB_CLIENT_ID, client_secret=WEB_CLIENT_SECRET
    )
    identity = await verifier.verify(tokens["access_token"])
    assert identity.principal == f"user:{BOB}"
    assert jwt_parts(tokens["id_token"])[1]["aud"] == WEB_CLIENT_ID
    assert jwt_parts(tokens["access_token"])[1]["aud"] == AUDIENCE
    assert "refresh_token" in tokens
