"""Bearer-token verification: every refusal class of RFC 8725 / OIDC Core, with several vectors,
against a real issuer on loopback and an injected clock."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.oidc_fixture import (
    OMIT,
    TestIssuer,
    b64url,
    compact,
    forge_alg_none,
    forge_hmac,
    forge_jwe_like,
    forge_oversized,
    sign_compact,
    tamper_payload,
)
from tunnel_server.access.identity import (
    AuthError,
    Identity,
    IssuerUnavailable,
    OidcVerifier,
    jwt_verifier,
)
from tunnel_server.access.identity.jwt_verifier import TOKEN_CACHE_TTL, Segments

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


MakeVerifier = Callable[..., OidcVerifier]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def issuer(clock: FakeClock) -> AsyncIterator[TestIssuer]:
    async with TestIssuer(clock=clock) as started:
        yield started


@pytest.fixture
async def make_verifier(issuer: TestIssuer, clock: FakeClock) -> AsyncIterator[MakeVerifier]:
    created: list[OidcVerifier] = []

    def make(
        issuer_url: str | None = None, audiences: tuple[str, ...] = ("tunnel",), **kw: Any
    ) -> OidcVerifier:
        kw.setdefault("clock", clock)
        verifier = OidcVerifier(issuer_url or issuer.issuer, audiences, **kw)
        created.append(verifier)
        return verifier

    yield make
    for verifier in created:
        await verifier.aclose()


@pytest.fixture
def verifier(make_verifier: MakeVerifier) -> OidcVerifier:
    return make_verifier()


async def refused(verifier: OidcVerifier, token: str) -> str:
    with pytest.raises(AuthError) as info:
        await verifier.verify(token)
    # The reason is a fixed audit string; no part of the token ever leaks into it.
    assert str(info.value) == info.value.reason
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in repr(info.value)
    return info.value.reason


class StaticFetch:
    """An in-memory fetch_json: serves documents, records URLs, can be held on a gate."""

    def __init__(self, documents: dict[str, Any], gate: asyncio.Event | None = None) -> None:
        self.documents = documents
        self.gate = gate
        self.urls: list[str] = []
        self.called = asyncio.Event()

    async def __call__(self, url: str) -> Any:
        self.urls.append(url)
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        return self.documents[url]


# -- valid tokens -------------------------------------------------------------------------------


async def test_valid_rs256(issuer: TestIssuer, verifier: OidcVerifier, clock: FakeClock) -> None:
    identity = await verifier.verify(issuer.mint(groups=("eng", "ops")))
    assert identity == Identity(
        principal="user:alice@example.com",
        subject="alice",
        issuer=issuer.issuer,
        email="alice@example.com",
        groups=("eng", "ops"),
        expires_at=T0 + 300,
        members=frozenset(
            {"user:alice@example.com", "group:eng", "group:ops", "domain:example.com"}
        ),
        valid_until=T0 + 300 + 30,  # exp plus the default 30 s leeway
        issued_at=T0,
    )
    assert verifier.ready


async def test_valid_es256(issuer: TestIssuer, verifier: OidcVerifier) -> None:
    identity = await verifier.verify(issuer.mint(alg="ES256", sub="bob", email="bob@corp.test"))
    assert identity.principal == "user:bob@corp.test"
    assert identity.subject == "bob"


@pytest.mark.parametrize("alg", ["RS384", "RS512", "PS256", "PS512"])
async def test_rsa_family_when_jwk_has_no_alg(make_verifier: MakeVerifier, alg: str) -> None:
    async with TestIssuer(publish_alg=False, clock=FakeClock()) as bare:
        verifier = make_verifier(bare.issuer)
        assert (await verifier.verify(bare.mint(alg=alg))).principal == "user:alice@example.com"


async def test_eddsa_key(issuer: TestIssuer, verifier: OidcVerifier) -> None:
    issuer.add_key("OKP", publish_alg=False)
    assert (await verifier.verify(issuer.mint(alg="EdDSA"))).subject == "alice"


async def test_issuer_with_path_and_trailing_slash(make_verifier: MakeVerifier) -> None:
    clock = FakeClock()
    async with TestIssuer(path="/realms/dev", trailing_slash=True, clock=clock) as realm:
        assert realm.issuer.endswith("/realms/dev/")
        verifier = make_verifier(realm.issuer, clock=clock)
        assert (await verifier.verify(realm.mint())).issuer == realm.issuer
        assert realm.discovery_fetches == 1


# -- algorithm confusion and "none" -------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", ""])
async def test_alg_none_refused(issuer: TestIssuer, verifier: OidcVerifier, alg: str) -> None:
    token = forge_alg_none(issuer.claims(), alg=alg, kid=issuer.signing["RSA"].kid)
    assert await refused(verifier, token) == "algorithm not allowed"
    assert issuer.jwks_fetches == 0  # refused before any I/O


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
@pytest.mark.parametrize("material", ["pem", "jwk-json", "n-bytes"])
async def test_hmac_with_public_key_refused(
    issuer: TestIssuer, verifier: OidcVerifier, alg: str, material: str
) -> None:
    key = issuer.signing["RSA"]
    secret = {
        "pem": key.public_pem(),
        "jwk-json": json.dumps(key.public_jwk()).encode(),
        "n-bytes": key.public_jwk()["n"].encode(),
    }[material]
    token = forge_hmac(issuer.claims(), secret, alg=alg, kid=key.kid)
    assert await refused(verifier, token) == "algorithm not allowed"


async def test_header_alg_must_match_key_type(issuer: TestIssuer, verifier: OidcVerifier) -> None:
    rsa_kid, ec_kid = issuer.signing["RSA"].kid, issuer.signing["EC"].kid
    # ES256 header naming the RSA key, and RS256 naming the EC key.
    assert await refused(verifier, issuer.mint(alg="ES256", kid=rsa_kid)) == "algorithm mismatch"
    assert await refused(verifier, issuer.mint(alg="RS256", kid=ec_kid)) == "algorithm mismatch"


@pytest.mark.parametrize("alg", ["RS384", "RS512", "PS256"])
async def test_header_alg_must_equal_jwk_alg(
    issuer: TestIssuer, verifier: OidcVerifier, alg: str
) -> None:
    # The JWK says RS256: a token signed with the same RSA key under another algorithm is refused.
    assert issuer.signing["RSA"].public_jwk()["alg"] == "RS256"
    assert await refused(verifier, issuer.mint(alg=alg)) == "algorithm mismatch"


async def test_algorithm_outside_allow_list(
    issuer: TestIssuer, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(algorithms=("ES256",))
    assert await refused(verifier, issuer.mint(alg="RS256")) == "algorithm not allowed"
    assert (await verifier.verify(issuer.mint(alg="ES256"))).subject == "alice"


async def test_symmetric_and_mislabelled_jwks_entries_ignored(
    issuer: TestIssuer, verifier: OidcVerifier
) -> None:
    rsa_jwk = issuer.signing["RSA"].public_jwk()
    issuer.extra_jwks += [
        {"kty": "oct", "kid": "sym", "k": b64url(b"secret"), "alg": "HS256"},
        {**rsa_jwk, "kid": "rsa-as-hmac", "alg": "HS256"},
        {**rsa_jwk, "kid": "rsa-as-ec", "alg": "ES256"},
        {**rsa_jwk, "kid": "enc-only", "use": "enc"},
    ]
    for kid in ("sym", "rsa-as-hmac", "rsa-as-ec", "enc-only"):
        assert await refused(verifier, issuer.mint(kid=kid)) == "unknown key"


@pytest.mark.parametrize("alg", ["HS256", "none", "RS1", "ES256K"])
def test_unsafe_algorithm_configuration_rejected(alg: str) -> None:
    with pytest.raises(ValueError, match="unsupported algorithms"):
        OidcVerifier("https://idp.example.com", ["tunnel"], algorithms=("RS256", alg))


# -- issuer -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "iss",
    [
        "https://evil.example.com",
        "{issuer}/",
        "{issuer}x",
        "{ISSUER}",
        ["{issuer}"],
        None,
        OMIT,
    ],
)
async def test_bad_issuer(issuer: TestIssuer, verifier: OidcVerifier, iss: Any) -> None:
    if isinstance(iss, str):
        iss = iss.format(issuer=issuer.issuer, ISSUER=issuer.issuer.upper())
    elif isinstance(iss, list):
        iss = [issuer.issuer]
    assert await refused(verifier, issuer.mint(extra_claims={"iss": iss})) == "bad issuer"
    assert issuer.jwks_fetches == 0  # a foreign token never causes JWKS traffic


async def test_keys_are_bound_to_their_issuer(issuer: TestIssuer, verifier: OidcVerifier) -> None:
    async with TestIssuer(clock=issuer.clock) as other:
        # Another issuer's key, claiming our iss and our kid: the signature does not verify.
        foreign = other.mint(
            extra_claims={"iss": issuer.issuer},
            kid=issuer.signing["RSA"].kid,
        )
        assert await refused(verifier, foreign) == "bad signature"
        # Claiming our iss with its own kid: we do not know that key.
        assert await refused(verifier, other.mint(extra_claims={"iss": issuer.issuer})) == (
            "unknown key"
        )


async def test_tampered_or_resigned_token(issuer: TestIssuer, verifier: OidcVerifier) -> None:
    token = issuer.mint(sub="alice")
    assert await refused(verifier, tamper_payload(token, sub="root")) == "bad signature"
    stranger = TestIssuer().signing["RSA"].private_key
    assert await refused(verifier, issuer.mint(private_key=stranger)) == "bad signature"
    head, body, sig = token.split(".")
    assert await refused(verifier, f"{head}.{body}.{sig[:-4]}AAAA") == "bad signature"
    assert await refused(verifier, f"{head}.{body}.") == "bad signature"


# -- audience and azp ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("aud", "azp", "reason"),
    [
        ("other", OMIT, "bad audience"),
        ("tunnelx", OMIT, "bad audience"),
        ("tunne", OMIT, "bad audience"),
        (["other", "x"], "other", "bad audience"),
        ([], OMIT, "missing claim"),
        (OMIT, OMIT, "missing claim"),
        ([1], OMIT, "bad audience"),
        ({"tunnel": True}, OMIT, "bad audience"),
        (["tunnel", "other"], OMIT, "bad azp"),
        (["tunnel", "other"], "other", "bad azp"),
        (["tunnel", "other"], ["tunnel"], "bad azp"),
        (["tunnel", "tunnel"], OMIT, "bad azp"),
    ],
)
async def test_bad_audience(
    issuer: TestIssuer, verifier: OidcVerifier, aud: Any, azp: Any, reason: str
) -> None:
    token = issuer.mint(extra_claims={"aud": aud, "azp": azp})
    assert await refused(verifier, token) == reason


@pytest.mark.parametrize(
    ("aud", "azp"),
    [("tunnel", OMIT), (["tunnel"], OMIT), (["tunnel", "other"], "tunnel"), ("cli", "someone")],
)
async def test_good_audience(
    issuer: TestIssuer, make_verifier: MakeVerifier, aud: Any, azp: Any
) -> None:
    verifier = make_verifier(audiences=("tunnel", "cli"))
    token = issuer.mint(extra_claims={"aud": aud, "azp": azp})
    assert (await verifier.verify(token)).subject == "alice"


# -- time: exp, nbf, iat, lifetime --------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"iat": T0 - 400, "exp": T0 - 31}, "expired"),
        ({"iat": T0 - 400, "exp": T0 - 30}, "expired"),
        ({"exp": OMIT}, "missing claim"),
        ({"exp": "9999999999"}, "invalid claim"),
        ({"exp": True}, "invalid claim"),
        ({"exp": 1e400}, "invalid claim"),
        ({"exp": 10**400}, "invalid claim"),
        ({"nbf": T0 + 31}, "not yet valid"),
        ({"nbf": "0"}, "invalid claim"),
        ({"iat": T0 + 31, "exp": T0 + 300}, "issued in the future"),
        ({"iat": None}, "invalid claim"),
        ({"iat": T0, "exp": T0 + 24 * 3600 + 1}, "lifetime too long"),
        ({"iat": OMIT, "exp": T0 + 24 * 3600 + 1}, "lifetime too long"),
        ({"iat": T0 - 10 * 24 * 3600, "exp": T0 + 60}, "lifetime too long"),
    ],
)
async def test_time_claims_refused(
    issuer: TestIssuer, verifier: OidcVerifier, claims: dict[str, Any], reason: str
) -> None:
    assert await refused(verifier, issuer.mint(extra_claims=claims)) == reason


@pytest.mark.parametrize(
    "claims",
    [
        {"iat": T0 - 400, "exp": T0 - 29},  # expired, but within leeway
        {"nbf": T0 + 30},
        {"iat": T0 + 30, "exp": T0 + 600},
        {"iat": OMIT, "exp": T0 + 3600},
        {"iat": T0 + 0.5, "exp": T0 + 60.5, "nbf": T0 - 0.5},  # NumericDate may be fractional
    ],
)
async def test_time_claims_within_leeway(
    issuer: TestIssuer, verifier: OidcVerifier, claims: dict[str, Any]
) -> None:
    assert (await verifier.verify(issuer.mint(extra_claims=claims))).subject == "alice"


async def test_expiry_follows_injected_clock(
    issuer: TestIssuer, verifier: OidcVerifier, clock: FakeClock
) -> None:
    token = issuer.mint(lifetime=60)
    assert (await verifier.verify(token)).expires_at == T0 + 60
    clock.advance(60 + 29)
    await verifier.verify(token)
    clock.advance(1)
    assert await refused(verifier, token) == "expired"


async def test_custom_max_lifetime(issuer: TestIssuer, make_verifier: MakeVerifier) -> None:
    verifier = make_verifier(max_lifetime=3600)
    await verifier.verify(issuer.mint(lifetime=3600))
    assert await refused(verifier, issuer.mint(lifetime=3601)) == "lifetime too long"


@pytest.mark.parametrize("leeway", [61, 3600, -1, float("nan")])
def test_leeway_is_bounded(leeway: float) -> None:
    with pytest.raises(ValueError, match="leeway"):
        OidcVerifier("https://idp.example.com", ["tunnel"], leeway=leeway)


# -- key rotation and unknown kids ---------------------------------------------------------------


async def test_rotated_key_accepted_at_once(issuer: TestIssuer, verifier: OidcVerifier) -> None:
    await verifier.verify(issuer.mint())
    assert issuer.jwks_fetches == 1
    issuer.rotate("RSA")
    issuer.rotate("EC")
    # Same instant on the clock: the first unknown kid refetches, and the new keys verify.
    assert (await verifier.verify(issuer.mint())).subject == "alice"
    assert (await verifier.verify(issuer.mint(alg="ES256"))).subject == "alice"
    assert issuer.jwks_fetches == 2


async def test_kid_flood_is_not_amplified(
    issuer: TestIssuer, verifier: OidcVerifier, clock: FakeClock
) -> None:
    await verifier.verify(issuer.mint())
    for n in range(50):
        assert await refused(verifier, issuer.mint(kid=f"random-{n}")) == "unknown key"
    assert issuer.jwks_fetches == 2  # the initial fetch and one refetch for the whole window
    clock.advance(9)
    assert await refused(verifier, issuer.mint(kid="random-x")) == "unknown key"
    assert issuer.jwks_fetches == 2
    clock.advance(1)  # a new window allows one more refetch
    for n in range(20):
        assert await refused(verifier, issuer.mint(kid=f"again-{n}")) == "unknown key"
    assert issuer.jwks_fetches == 3


async def test_concurrent_kid_flood_is_not_amplified(
    issuer: TestIssuer, verifier: OidcVerifier
) -> None:
    await verifier.refresh()
    tokens = [issuer.mint(kid=f"random-{n}") for n in range(100)]
    results = await asyncio.gather(*(verifier.verify(t) for t in tokens), return_exceptions=True)
    assert all(isinstance(r, AuthError) and r.reason == "unknown key" for r in results)
    assert issuer.jwks_fetches == 2


async def test_rotation_during_cooldown_waits_for_next_window(
    issuer: TestIssuer, verifier: OidcVerifier, clock: FakeClock
) -> None:
    await verifier.verify(issuer.mint())
    assert await refused(verifier, issuer.mint(kid="junk")) == "unknown key"
    issuer.rotate()
    assert await refused(verifier, issuer.mint()) == "unknown key"
    clock.advance(10)
    assert (await verifier.verify(issuer.mint())).subject == "alice"


async def test_dropped_key_refused_after_ttl(
    issuer: TestIssuer, verifier: OidcVerifier, clock: FakeClock
) -> None:
    old = issuer.mint()
    await verifier.verify(old)
    issuer.rotate(drop_old=True)
    clock.advance(300)  # TTL over: keys are fetched again and the old kid is gone
    assert await refused(verifier, old) == "unknown key"
    assert (await verifier.verify(issuer.mint())).subject == "alice"


async def test_no_kid_uses_the_single_suitable_key(
    issuer: TestIssuer, verifier: OidcVerifier
) -> None:
    # One RSA and one EC key are published: each algorithm has exactly one candidate.
    assert (await verifier.verify(issuer.mint(kid=None))).subject == "alice"
    assert (await verifier.verify(issuer.mint(alg="ES256", kid=None))).subject == "alice"
    issuer.rotate("RSA")
    await verifier.refresh()
    assert await refused(verifier, issuer.mint(kid=None)) == "ambiguous key"
    assert (await verifier.verify(issuer.mint(alg="ES256", kid=None))).subject == "alice"


async def test_jwks_cached_for_ttl(
    issuer: TestIssuer, verifier: OidcVerifier, clock: FakeClock
) -> None:
    for _ in range(5):
        await verifier.verify(issuer.mint())
    assert (issuer.discovery_fetches, issuer.jwks_fetches) == (1, 1)
    clock.advance(299)
    await verifier.verify(issuer.mint())
    assert issuer.jwks_fetches == 1
    clock.advance(1)
    await verifier.verify(issuer.mint())
    assert (issuer.discovery_fetches, issuer.jwks_fetches) == (2, 2)


# -- malformed, oversized, JWE and refused headers ------------------------------------------------


def _header_token(header: dict[str, Any], payload: dict[str, Any] | None = None) -> str:
    return compact(header, payload or {"iss": "x"}, b"sig")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        forge_jwe_like(),
        "..",
        "eyJhbGciOiJSUzI1NiJ9..c2ln",
        "eyJhbGciOiJSUzI1NiJ9.e30=.c2ln",  # padding
        "eyJhbGciOiJSUzI1NiJ9.e30.c2l+",  # base64, not base64url
        "eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n",
        "eyJhbGciOiJSUzI1NiJ9.e30.c2lné",
        "bm90IGpzb24.e30.c2ln",  # header is not JSON
        b64url(b"[1]") + ".e30.c2ln",  # header is not an object
        "eyJhbGciOiJSUzI1NiJ9." + b64url(b'"str"') + ".c2ln",
        "eyJhbGciOiJSUzI1NiJ9.e30.a",  # impossible base64 length
        b64url(b'{"alg":"RS256","alg":"none"}') + ".e30.c2ln",  # duplicate members
        _header_token({"alg": "RS256", "kid": 7}),
        _header_token({"alg": "RS256", "kid": ""}),
        _header_token({"alg": "RS256", "kid": "k" * 257}),
        b64url(b"[" * 3000) + ".e30.c2ln",  # deep nesting
    ],
)
async def test_malformed(issuer: TestIssuer, verifier: OidcVerifier, token: str) -> None:
    assert await refused(verifier, token) == "malformed"
    assert issuer.jwks_fetches == 0


@pytest.mark.parametrize(
    "extra",
    [
        {"jku": "https://evil.example.com/jwks"},
        {"x5u": "https://evil.example.com/cert.pem"},
        {"jwk": {"kty": "oct", "k": "c2VjcmV0"}},
        {"crit": ["exp"]},
        {"crit": ["b64"], "b64": False},
        {"zip": "DEF"},
        {"enc": "A256GCM"},
    ],
)
async def test_refused_headers(
    issuer: TestIssuer, verifier: OidcVerifier, extra: dict[str, Any]
) -> None:
    assert await refused(verifier, issuer.mint(headers=extra)) == "unsupported header"
    assert issuer.jwks_fetches == 0


async def test_x5c_header_is_ignored_not_followed(
    issuer: TestIssuer, verifier: OidcVerifier
) -> None:
    token = issuer.mint(headers={"x5c": ["MIIBfake"]})
    assert (await verifier.verify(token)).subject == "alice"
    # ... and a foreign key offered inline never replaces the JWKS lookup.
    stranger = TestIssuer().signing["RSA"]
    token = issuer.mint(private_key=stranger.private_key, headers={"x5c": ["MIIBfake"]})
    assert await refused(verifier, token) == "bad signature"


async def test_oversized_refused_before_any_work(
    issuer: TestIssuer, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier()
    token = forge_oversized(issuer, 9000)
    assert await refused(verifier, token) == "too large"
    assert await refused(verifier, "a" * 100_000) == "too large"
    assert await refused(make_verifier(max_token_bytes=512), issuer.mint()) == "too large"
    assert issuer.jwks_fetches == 0
    big_but_allowed = forge_oversized(issuer, 5000)
    assert (await verifier.verify(big_but_allowed)).subject == "alice"


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=300), st.lists(st.binary(max_size=60), max_size=4)))
def test_fuzz_only_auth_errors(value: str | list[bytes]) -> None:
    token = value if isinstance(value, str) else ".".join(b64url(p) for p in value)

    async def fail(url: str) -> Any:
        raise OSError("no network in this test")

    async def run() -> None:
        verifier = OidcVerifier("https://idp.example.com", ["tunnel"], fetch_json=fail)
        with pytest.raises(AuthError):
            await verifier.verify(token)

    asyncio.run(run())


# -- email_verified, principals and members ------------------------------------------------------


@pytest.mark.parametrize("verified", [False, None, "false", "True", "yes", 1, [True], {}])
async def test_unverified_email_is_not_trusted(
    issuer: TestIssuer, verifier: OidcVerifier, verified: Any
) -> None:
    identity = await verifier.verify(issuer.mint(email_verified=verified, groups=("eng",)))
    assert identity.principal == "subject:alice"
    assert identity.email is None
    assert identity.members == {"subject:alice", "group:eng"}


async def test_string_true_email_verified(issuer: TestIssuer, verifier: OidcVerifier) -> None:
    identity = await verifier.verify(issuer.mint(email_verified="true"))
    assert identity.principal == "user:alice@example.com"


@pytest.mark.parametrize(
    "email", [None, 42, "", "alice", "@example.com", "alice@", "a@b@c", "al ice@x.com", "a\n@x.com"]
)
async def test_unusable_email_claim(issuer: TestIssuer, verifier: OidcVerifier, email: Any) -> None:
    identity = await verifier.verify(issuer.mint(extra_claims={"email": email}))
    assert identity.principal == "subject:alice"
    assert identity.email is None
    assert not any(m.startswith("domain:") for m in identity.members)


async def test_service_account_without_email(issuer: TestIssuer, verifier: OidcVerifier) -> None:
    token = issuer.mint(
        sub="1234567890", email=None, groups=("bots",), extra_claims={"client_id": "1234567890"}
    )
    identity = await verifier.verify(token)
    assert identity.principal == "serviceAccount:1234567890"
    assert identity.email is None
    assert identity.members == {"serviceAccount:1234567890", "group:bots"}


@pytest.mark.parametrize(
    "extra",
    [{}, {"client_id": "tunnel-cli"}, {"azp": "tunnel-cli"}],
)
async def test_user_token_without_email_is_not_a_service_account(
    issuer: TestIssuer, verifier: OidcVerifier, extra: dict[str, str]
) -> None:
    """A user token issued without the email scope must not pass for a service account whose
    id happens to equal the user's subject."""
    identity = await verifier.verify(issuer.mint(sub="svc-backup", email=None, extra_claims=extra))
    assert identity.principal == "subject:svc-backup"


async def test_members_and_normalisation(issuer: TestIssuer, verifier: OidcVerifier) -> None:
    token = issuer.mint(email="Alice.Smith@Example.COM", groups=("eng", "eng", "Ops"))
    identity = await verifier.verify(token)
    assert identity.principal == "user:alice.smith@example.com"
    assert identity.email == "alice.smith@example.com"
    assert identity.groups == ("eng", "Ops")
    assert identity.members == {
        "user:alice.smith@example.com",
        "group:eng",
        "group:Ops",
        "domain:example.com",
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        identity.principal = "user:root@example.com"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("value", "groups"),
    [
        (["a", 1, None, {"x": 1}, ["b"], "", "c"], ("a", "c")),
        ("solo", ("solo",)),
        ({"a": "b"}, ()),
        (7, ()),
        (None, ()),
    ],
)
async def test_groups_strings_only(
    issuer: TestIssuer, verifier: OidcVerifier, value: Any, groups: tuple[str, ...]
) -> None:
    identity = await verifier.verify(issuer.mint(extra_claims={"groups": value}))
    assert identity.groups == groups


async def test_groups_claim_is_configurable(
    issuer: TestIssuer, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(groups_claim="roles")
    token = issuer.mint(groups=("ignored",), extra_claims={"roles": ["admin"]})
    identity = await verifier.verify(token)
    assert identity.groups == ("admin",)
    assert "group:ignored" not in identity.members


@pytest.mark.parametrize("sub", [OMIT, "", 123, None, "a\x00b", "x" * 256])
async def test_bad_subject(issuer: TestIssuer, verifier: OidcVerifier, sub: Any) -> None:
    reason = await refused(verifier, issuer.mint(extra_claims={"sub": sub}))
    assert reason == ("missing claim" if sub in (OMIT, None) else "bad subject")


# -- discovery, transport and readiness ----------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"issuer": "https://evil.example.com"}, "issuer mismatch"),
        ({"issuer": "{issuer}/"}, "issuer mismatch"),
        ({"issuer": None}, "issuer mismatch"),
        ({"jwks_uri": "http://example.com/jwks"}, "bad jwks uri"),
        ({"jwks_uri": "http://10.0.0.1/jwks"}, "bad jwks uri"),
        ({"jwks_uri": "file:///etc/passwd"}, "bad jwks uri"),
        ({"jwks_uri": None}, "bad jwks uri"),
    ],
)
async def test_bad_discovery_document(
    issuer: TestIssuer, verifier: OidcVerifier, overrides: dict[str, Any], reason: str
) -> None:
    issuer.discovery_overrides = {
        k: v.format(issuer=issuer.issuer) if isinstance(v, str) else v for k, v in overrides.items()
    }
    with pytest.raises(IssuerUnavailable) as info:
        await verifier.refresh()
    assert info.value.reason == reason
    with pytest.raises(IssuerUnavailable):
        await verifier.verify(issuer.mint())
    assert issuer.jwks_fetches == 0
    assert not verifier.ready


async def test_insecure_jwks_uri_is_never_fetched(make_verifier: MakeVerifier) -> None:
    iss = "https://idp.example.com"
    fetch = StaticFetch(
        {f"{iss}/.well-known/openid-configuration": {"issuer": iss, "jwks_uri": "http://x/jwks"}}
    )
    verifier = make_verifier(iss, fetch_json=fetch)
    with pytest.raises(IssuerUnavailable, match="bad jwks uri"):
        await verifier.refresh()
    assert fetch.urls == [f"{iss}/.well-known/openid-configuration"]


@pytest.mark.parametrize(
    "jwks",
    [{"keys": []}, {"keys": "x"}, [], {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, "nope"],
)
async def test_unusable_jwks(make_verifier: MakeVerifier, jwks: Any) -> None:
    iss = "https://idp.example.com/"
    fetch = StaticFetch(
        {
            "https://idp.example.com/.well-known/openid-configuration": {
                "issuer": iss,
                "jwks_uri": "https://keys.example.com/jwks",
            },
            "https://keys.example.com/jwks": jwks,
        }
    )
    verifier = make_verifier(iss, fetch_json=fetch)
    with pytest.raises(IssuerUnavailable, match="bad jwks"):
        await verifier.refresh()


async def test_http_error_is_issuer_unavailable(issuer: TestIssuer, verifier: OidcVerifier) -> None:
    issuer.status = 503
    with pytest.raises(IssuerUnavailable, match="issuer unavailable"):
        await verifier.verify(issuer.mint())
    assert not verifier.ready


async def test_unreachable_issuer(make_verifier: MakeVerifier) -> None:
    async with TestIssuer() as gone:
        url = gone.issuer
    verifier = make_verifier(url)
    with pytest.raises(IssuerUnavailable, match="issuer unavailable"):
        await verifier.refresh()


async def test_outage_serves_cached_keys_then_fails(
    issuer: TestIssuer, verifier: OidcVerifier, clock: FakeClock
) -> None:
    await verifier.verify(issuer.mint())
    issuer.status = 500
    clock.advance(300)  # TTL over, issuer down: cached keys still serve (up to 2 * TTL)
    assert (await verifier.verify(issuer.mint())).subject == "alice"
    fetches = issuer.discovery_fetches
    for _ in range(20):  # a failed issuer is not retried on every request
        await verifier.verify(issuer.mint())
    assert issuer.discovery_fetches == fetches
    assert verifier.ready
    clock.advance(300)
    assert not verifier.ready
    with pytest.raises(IssuerUnavailable):
        await verifier.verify(issuer.mint())
    issuer.status = 200
    clock.advance(10)
    assert (await verifier.verify(issuer.mint())).subject == "alice"
    assert verifier.ready


async def test_ready_tracks_refresh(
    issuer: TestIssuer, verifier: OidcVerifier, clock: FakeClock
) -> None:
    assert not verifier.ready
    await verifier.refresh()
    assert verifier.ready
    clock.advance(599)
    assert verifier.ready
    clock.advance(1)
    assert not verifier.ready
    await verifier.refresh()
    assert verifier.ready


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com",
        "http://10.0.0.1",
        "http://192.168.1.1:8080/realms/x",
        "http://127.0.0.1.nip.io",
        "http://localhost.example.com",
        "http://[::ffff:127.0.0.1]",
        "http://127.1",
        "ftp://idp.example.com",
        "https://",
        "https://user:pw@idp.example.com",
        "https://idp.example.com/#x",
        "https://idp.example.com/?tenant=1",
        "https://idp.example.com:99999",
        "idp.example.com",
    ],
)
def test_insecure_issuer_rejected(url: str) -> None:
    with pytest.raises(ValueError, match="issuer"):
        OidcVerifier(url, ["tunnel"])


@pytest.mark.parametrize(
    "url",
    [
        "https://idp.example.com",
        "https://idp.example.com/realms/x/",
        "http://localhost:5556/dex",
        "http://127.0.0.1:8080",
        "http://127.2.3.4",
        "http://[::1]:9000",
    ],
)
def test_acceptable_issuers(url: str) -> None:
    assert OidcVerifier(url, ["tunnel"]).issuer == url


@pytest.mark.parametrize(
    "kwargs",
    [
        {"audiences": "tunnel"},
        {"audiences": []},
        {"audiences": [""]},
        {"jwks_ttl": 0},
        {"max_lifetime": -1},
        {"refetch_cooldown": -1},
        {"max_token_bytes": 0},
        {"algorithms": ()},
    ],
)
def test_bad_configuration(kwargs: dict[str, Any]) -> None:
    audiences = kwargs.pop("audiences", ["tunnel"])
    with pytest.raises(ValueError, match="must"):
        OidcVerifier("https://idp.example.com", audiences, **kwargs)


# -- concurrency ----------------------------------------------------------------------------------


async def test_concurrent_verifies_share_one_fetch(
    issuer: TestIssuer, verifier: OidcVerifier
) -> None:
    issuer.jwks_gate = asyncio.Event()
    tokens = [issuer.mint(sub=f"user{n}") for n in range(25)]
    tasks = [asyncio.create_task(verifier.verify(t)) for t in tokens]
    await issuer.jwks_requested.wait()  # every caller is now parked on the one in-flight fetch
    issuer.jwks_gate.set()
    identities = await asyncio.gather(*tasks)
    assert [i.subject for i in identities] == [f"user{n}" for n in range(25)]
    assert (issuer.discovery_fetches, issuer.jwks_fetches) == (1, 1)


async def test_cancelled_caller_does_not_cancel_shared_fetch(
    issuer: TestIssuer, make_verifier: MakeVerifier
) -> None:
    gate = asyncio.Event()
    fetch = StaticFetch(
        {
            issuer.issuer + "/.well-known/openid-configuration": {
                "issuer": issuer.issuer,
                "jwks_uri": issuer.jwks_uri,
            },
            issuer.jwks_uri: issuer.jwks(),
        },
        gate=gate,
    )
    verifier = make_verifier(fetch_json=fetch)
    first = asyncio.create_task(verifier.verify(issuer.mint()))
    second = asyncio.create_task(verifier.verify(issuer.mint(sub="bob")))
    await fetch.called.wait()
    first.cancel()
    gate.set()
    assert (await second).subject == "bob"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert len(fetch.urls) == 2  # discovery + JWKS, once


async def test_aclose_stops_fetching(issuer: TestIssuer, make_verifier: MakeVerifier) -> None:
    verifier = make_verifier()
    issuer.jwks_gate = asyncio.Event()
    pending = asyncio.create_task(verifier.verify(issuer.mint()))
    await issuer.jwks_requested.wait()
    await verifier.aclose()
    with pytest.raises(AuthError):
        await pending
    with pytest.raises(IssuerUnavailable):
        await verifier.refresh()
    issuer.jwks_gate.set()


async def test_es256_signature_of_other_curve_length_refused(
    issuer: TestIssuer, verifier: OidcVerifier
) -> None:
    # A DER-encoded or truncated ECDSA signature must not verify (raw r||s only).
    token = issuer.mint(alg="ES256")
    head, body, sig = token.split(".")
    assert await refused(verifier, f"{head}.{body}.{sig[:-3]}") in {"bad signature", "malformed"}
    key = issuer.signing["EC"]
    forged = sign_compact(
        {"alg": "ES256", "kid": key.kid},
        issuer.claims(),
        issuer.signing["RSA"].private_key,
        "RS256",
    )
    assert await refused(verifier, forged) == "bad signature"


# -- the verified-token cache -------------------------------------------------------------------


def count_checks(verifier: OidcVerifier, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every full verification (signature included) the verifier performs."""
    checks: list[str] = []
    full = verifier._verify

    async def counted(token: str, audiences: tuple[str, ...], segments: Segments) -> Identity:
        checks.append(token)
        return await full(token, audiences, segments)

    monkeypatch.setattr(verifier, "_verify", counted)
    return checks


async def test_a_verified_token_is_reused_within_the_cache_ttl(
    issuer: TestIssuer, verifier: OidcVerifier, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks = count_checks(verifier, monkeypatch)
    token = issuer.mint(lifetime=600)
    first = await verifier.verify(token)
    assert await verifier.verify(token) is first
    assert len(checks) == 1
    clock.advance(TOKEN_CACHE_TTL)  # trusted for TOKEN_CACHE_TTL at most: checked again
    assert (await verifier.verify(token)).principal == first.principal
    assert len(checks) == 2
    clock.advance(-10)  # a clock that went back: never trust an entry "from the future"
    await verifier.verify(token)
    assert len(checks) == 3


async def test_cached_tokens_still_expire_and_follow_key_changes(
    issuer: TestIssuer, verifier: OidcVerifier, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks = count_checks(verifier, monkeypatch)
    short = issuer.mint(lifetime=10)
    await verifier.verify(short)
    clock.advance(10 + 30)  # exp + leeway: refused, cache or not
    assert await refused(verifier, short) == "expired"
    old = issuer.mint(lifetime=600)
    await verifier.verify(old)
    issuer.rotate(drop_old=True)
    await verifier.verify(issuer.mint())  # unknown kid: the key set is fetched again
    assert await refused(verifier, old) == "unknown key"  # not served from the cache
    assert checks.count(old) == 2


async def test_the_cache_is_bounded(
    issuer: TestIssuer, verifier: OidcVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jwt_verifier, "TOKEN_CACHE_SIZE", 3)
    tokens = [issuer.mint(sub=f"user{n}", email=f"user{n}@example.com") for n in range(5)]
    for token in tokens:
        await verifier.verify(token)
    assert [token for token, _ in verifier._verified] == tokens[-3:]
