"""Opaque access tokens through RFC 7662 introspection, and routing among several issuers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tunnel_server.access.identity import (
    Authenticator,
    AuthError,
    Introspector,
    IssuerUnavailable,
    OidcVerifier,
)

from ..oidc_fixture import TestIssuer


@pytest.fixture
async def second_issuer() -> AsyncIterator[TestIssuer]:
    async with TestIssuer() as other:
        yield other


def authenticator(issuer: TestIssuer, *extra: TestIssuer, secret: str = "s3cret") -> Authenticator:
    verifier = OidcVerifier(issuer.issuer, ["tunnel"])
    others = [OidcVerifier(i.issuer, ["tunnel"]) for i in extra]
    introspector = Introspector(verifier, client_id="relay", client_secret=secret, cache_ttl=30)
    return Authenticator([verifier, *others], [introspector])


async def test_opaque_token_is_introspected_and_cached(issuer: TestIssuer) -> None:
    auth = authenticator(issuer)
    token = issuer.mint_opaque(groups=("ops",))
    identity = await auth.verify(token)
    assert identity.principal == "user:alice@example.com"
    assert "group:ops" in identity.members
    assert (await auth.verify(token)).principal == identity.principal
    assert issuer.introspections == 1  # the second answer came from the cache
    await auth.aclose()


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({"active": False}, "inactive token"),
        ({"active": "true"}, "inactive token"),  # only the JSON boolean counts
        (
            {
                "active": True,
                "iss": "https://evil.example",
                "aud": "tunnel",
                "sub": "a",
                "exp": 9999999999,
            },
            "bad issuer",
        ),
        ({"active": True, "aud": "other", "sub": "a", "exp": 9999999999}, "bad audience"),
        ({"active": True, "sub": "a", "exp": 9999999999}, "bad audience"),
        ({"active": True, "aud": "tunnel", "sub": "a", "exp": 1000}, "expired"),
        ({"active": True, "aud": "tunnel", "exp": 9999999999}, "missing claim"),
    ],
)
async def test_introspection_answers_are_checked(
    issuer: TestIssuer, answer: dict[str, object], reason: str
) -> None:
    auth = authenticator(issuer)
    issuer.opaque["tok"] = answer
    with pytest.raises(AuthError) as info:
        await auth.verify("tok")
    assert info.value.reason == reason
    assert not isinstance(info.value, IssuerUnavailable)
    await auth.aclose()


async def test_negative_answers_are_cached_briefly(issuer: TestIssuer) -> None:
    auth = authenticator(issuer)
    for _ in range(5):
        with pytest.raises(AuthError):
            await auth.verify("unknown-opaque-token")
    assert issuer.introspections == 1  # a flood of one bad token costs one request
    await auth.aclose()


async def test_wrong_relay_credentials_mean_issuer_unavailable(issuer: TestIssuer) -> None:
    auth = authenticator(issuer, secret="wrong")
    with pytest.raises(IssuerUnavailable):
        await auth.verify(issuer.mint_opaque())
    await auth.aclose()


async def test_jwts_are_routed_by_issuer(issuer: TestIssuer, second_issuer: TestIssuer) -> None:
    auth = authenticator(issuer, second_issuer)
    first = await auth.verify(issuer.mint())
    second = await auth.verify(second_issuer.mint(sub="bob", email="bob@example.com"))
    assert (first.issuer, second.issuer) == (issuer.issuer, second_issuer.issuer)
    assert second.principal == "user:bob@example.com"
    # A token naming an issuer we do not trust costs no fetch anywhere.
    fetches = issuer.jwks_fetches + second_issuer.jwks_fetches
    async with TestIssuer() as stranger:
        with pytest.raises(AuthError, match="bad issuer"):
            await auth.verify(stranger.mint())
        assert stranger.jwks_fetches == 0
    assert issuer.jwks_fetches + second_issuer.jwks_fetches == fetches
    await auth.aclose()


async def test_key_from_one_issuer_cannot_sign_for_another(
    issuer: TestIssuer, second_issuer: TestIssuer
) -> None:
    auth = authenticator(issuer, second_issuer)
    forged = second_issuer.mint(extra_claims={"iss": issuer.issuer})
    with pytest.raises(AuthError):
        await auth.verify(forged)
    await auth.aclose()
