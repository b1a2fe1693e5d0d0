"""A tiny OIDC issuer for tests (discovery + JWKS on loopback, token minting) and forgers for the
malicious tokens a relay must refuse."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

KeyKind = Literal["RSA", "EC", "OKP"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

# Every token minted in this test session: the log scan (tests/conftest.py) proves none of them
# appears in any log or audit record.
MINTED: list[str] = []
OMIT: Final[Any] = object()
"""Value for `extra_claims` that removes a claim `mint` would otherwise set."""
_DEFAULT: Final[Any] = object()
_KIND_ALG: Final[dict[KeyKind, str]] = {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def compact(header: Mapping[str, Any], payload: Mapping[str, Any], signature: bytes = b"") -> str:
    """A compact JWS from parts, signature as given (empty for `alg: none`)."""
    return f"{b64url(_json(header))}.{b64url(_json(payload))}.{b64url(signature)}"


def kind_for(alg: str) -> KeyKind:
    if alg[:2] in ("RS", "PS"):
        return "RSA"
    if alg.startswith("ES"):
        return "EC"
    if alg == "EdDSA":
        return "OKP"
    raise ValueError(f"no key kind for {alg}")


def sign_compact(header: Mapping[str, Any], payload: Mapping[str, Any], key: Any, alg: str) -> str:
    """Sign exactly the given header and payload (no defaults added), with PyJWT's primitives."""
    signing_input = f"{b64url(_json(header))}.{b64url(_json(payload))}"
    algorithm = get_default_algorithms()[alg]
    signature = algorithm.sign(signing_input.encode(), algorithm.prepare_key(key))
    return f"{signing_input}.{b64url(signature)}"


def generate_key(kind: KeyKind) -> PrivateKey:
    if kind == "RSA":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "EC":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


@dataclass
class IssuerKey:
    kid: str
    kind: KeyKind
    private_key: PrivateKey
    publish_alg: bool = True  # put "alg" in the JWK (Google does; some IdPs don't)
    published: bool = True

    @property
    def alg(self) -> str:
        return _KIND_ALG[self.kind]

    def public_jwk(self) -> dict[str, Any]:
        private = self.private_key
        if isinstance(private, rsa.RSAPrivateKey):
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
        elif isinstance(private, ec.EllipticCurvePrivateKey):
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
        else:
            jwk = jwt.algorithms.OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
        jwk.update(kid=self.kid, use="sig")
        if self.publish_alg:
            jwk["alg"] = self.alg
        return dict(jwk)

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@dataclass
class TestIssuer:
    """Discovery and JWKS on http://127.0.0.1:<port><path>; mints tokens with its keys.

    Knobs for failure tests: `discovery_overrides` (e.g. a different "issuer"), `extra_jwks`
    (raw JWK dicts appended), `status` (HTTP status for both endpoints), `jwks_gate` (an Event the
    JWKS handler waits on; `jwks_requested` is set when a JWKS request arrives).
    """

    __test__ = False  # not a pytest test class despite the name

    clock: Callable[[], float] = time.time
    path: str = ""
    trailing_slash: bool = False
    publish_alg: bool = True
    discovery_overrides: dict[str, Any] = field(default_factory=dict)
    extra_jwks: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    jwks_gate: asyncio.Event | None = None
    jwks_requested: asyncio.Event = field(default_factory=asyncio.Event)
    jwks_fetches: int = 0
    # RFC 7662: opaque token -> introspection answer; clients allowed as (id, secret).
    opaque: dict[str, dict[str, Any]] = field(default_factory=dict)
    introspection_clients: dict[str, str] = field(default_factory=lambda: {"relay": "s3cret"})
    introspections: int = 0
    discovery_fetches: int = 0
    keys: list[IssuerKey] = field(default_factory=list)
    signing: dict[KeyKind, IssuerKey] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    _port: int | None = None

    def __post_init__(self) -> None:
        if not self.keys:
            self.add_key("RSA", make_signing=True)
            self.add_key("EC", make_signing=True)

    # -- server -------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        base = self.path.rstrip("/")
        app.router.add_get(base + "/.well-known/openid-configuration", self._discovery)
        app.router.add_get(base + "/jwks", self._jwks)
        app.router.add_post(base + "/introspect", self._introspect)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> TestIssuer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise RuntimeError("TestIssuer not started")
        return f"http://127.0.0.1:{self._port}{self.path.rstrip('/')}"

    @property
    def issuer(self) -> str:
        return self.base_url + ("/" if self.trailing_slash else "")

    @property
    def jwks_uri(self) -> str:
        return self.base_url + "/jwks"

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in self.keys if k.published] + self.extra_jwks}

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_fetches += 1
        if self.status != 200:
            return web.Response(status=self.status)
        doc = {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "authorization_endpoint": self.base_url + "/auth",
            "token_endpoint": self.base_url + "/token",
            "introspection_endpoint": self.base_url + "/introspect",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            **self.discovery_overrides,
        }
        return web.json_response(doc)

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        self.jwks_requested.set()
        if self.jwks_gate is not None:
            await self.jwks_gate.wait()
        if self.status != 200:
            return web.Response(status=self.status)
        return web.json_response(self.jwks())

    async def _introspect(self, request: web.Request) -> web.Response:
        self.introspections += 1
        auth = request.headers.get("Authorization", "")
        try:
            client_id, _, secret = (
                base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")
            )
        except ValueError:
            return web.Response(status=401)
        if self.introspection_clients.get(client_id) != secret:
            return web.Response(status=401)
        form = await request.post()
        answer = self.opaque.get(str(form.get("token", "")))
        return web.json_response(answer if answer is not None else {"active": False})

    def mint_opaque(self, **claims: Any) -> str:
        """An opaque access token whose introspection answers these claims (active)."""
        token = "opaque-" + uuid.uuid4().hex
        self.opaque[token] = {"active": True, **self.claims(**claims)}
        MINTED.append(token)
        return token

    # -- keys ---------------------------------------------------------------------------------

    def add_key(
        self,
        kind: KeyKind,
        *,
        make_signing: bool = False,
        publish_alg: bool | None = None,
        published: bool = True,
    ) -> IssuerKey:
        key = IssuerKey(
            kid=f"{kind.lower()}-{uuid.uuid4().hex[:12]}",
            kind=kind,
            private_key=generate_key(kind),
            publish_alg=self.publish_alg if publish_alg is None else publish_alg,
            published=published,
        )
        self.keys.append(key)
        if make_signing or kind not in self.signing:
            self.signing[kind] = key
        return key

    def rotate(self, kind: KeyKind = "RSA", *, drop_old: bool = False) -> IssuerKey:
        """Publish a new key with a new kid and sign with it from now on."""
        old = self.signing.get(kind)
        new = self.add_key(kind, make_signing=True)
        if drop_old and old is not None:
            self.keys.remove(old)
        return new

    # -- tokens -------------------------------------------------------------------------------

    def claims(
        self,
        *,
        sub: str = "alice",
        email: str | None = "alice@example.com",
        email_verified: Any = True,
        aud: str | Sequence[str] = "tunnel",
        groups: Sequence[str] = (),
        lifetime: float = 300,
        now: float | None = None,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        issued = int(self.clock() if now is None else now)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            "aud": aud if isinstance(aud, str) else list(aud),
            "iat": issued,
            "exp": int(issued + lifetime),
        }
        if email is not None:
            claims["email"] = email
            if email_verified is not None:
                claims["email_verified"] = email_verified
        if groups:
            claims["groups"] = list(groups)
        for name, value in (extra_claims or {}).items():
            if value is OMIT:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def mint(
        self,
        sub: str = "alice",
        email: str | None = "alice@example.com",
        email_verified: Any = True,
        aud: str | Sequence[str] = "tunnel",
        groups: Sequence[str] = (),
        lifetime: float = 300,
        alg: str = "RS256",
        extra_claims: Mapping[str, Any] | None = None,
        headers: Mapping[str, Any] | None = None,
        kid: str | None = _DEFAULT,
        *,
        now: float | None = None,
        key: IssuerKey | None = None,
        private_key: Any = None,
    ) -> str:
        """A signed token. `kid=None` omits the kid; `key` signs with a specific (e.g. old) key;
        `private_key` signs with foreign key material while keeping the kid (bad signature)."""
        signer = key or self.signing[kind_for(alg)]
        header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
        chosen_kid = signer.kid if kid is _DEFAULT else kid
        if chosen_kid is not None:
            header["kid"] = chosen_kid
        header.update(headers or {})
        payload = self.claims(
            sub=sub,
            email=email,
            email_verified=email_verified,
            aud=aud,
            groups=groups,
            lifetime=lifetime,
            now=now,
            extra_claims=extra_claims,
        )
        token = sign_compact(header, payload, private_key or signer.private_key, alg)
        MINTED.append(token)
        return token


# -- forgers ----------------------------------------------------------------------------------


def forge_alg_none(claims: Mapping[str, Any], alg: str = "none", kid: str | None = None) -> str:
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    return compact(header, claims)


def forge_hmac(
    claims: Mapping[str, Any], secret: bytes, alg: str = "HS256", kid: str | None = None
) -> str:
    """HMAC-sign with an arbitrary secret: with a public key's PEM or JWK bytes this is the
    classic algorithm-confusion token."""
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = f"{b64url(_json(header))}.{b64url(_json(claims))}"
    mac = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(mac)}"


def forge_jwe_like() -> str:
    """Five base64url parts, as JWE compact serialization has."""
    header = {"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": "x"}
    parts = [_json(header), b"k" * 32, b"iv" * 6, b"ciphertext", b"t" * 16]
    return ".".join(b64url(p) for p in parts)


def forge_oversized(issuer: TestIssuer, size: int) -> str:
    """A properly signed token of at least `size` characters."""
    return issuer.mint(extra_claims={"pad": "x" * size})


def tamper_payload(token: str, **changes: Any) -> str:
    """Change claims and keep the original header and signature."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{header}.{b64url(_json(claims))}.{signature}"
