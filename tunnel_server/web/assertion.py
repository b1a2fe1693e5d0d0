"""The signed identity assertion for upstreams (ES256 with ``kid``), and the key set published
at ``/.well-known/tunnel/jwks.json``. Keys rotate with overlap: the current key signs, the
previous one stays published until every assertion it signed has expired.

``AssertionCache`` signs once per identity and audience and hands the same assertion out until
it nears its expiry (an ES256 signature was a tenth of HTTP mode's CPU per request)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm


@dataclass(frozen=True)
class SigningKey:
    kid: str
    key: ec.EllipticCurvePrivateKey
    created: float

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": "ES256", "use": "sig"}


class AssertionSigner:
    """Mints ``X-Tunnel-Jwt-Assertion`` values. ``rotate()`` makes a new current key and keeps
    the previous one published; ``maybe_rotate()`` does so every ``rotation`` seconds."""

    def __init__(
        self,
        issuer: str,
        *,
        lifetime: float = 300.0,
        rotation: float = 24 * 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < lifetime <= 600:
            raise ValueError("assertion lifetime must be at most 10 minutes")
        self.issuer = issuer
        self.lifetime = lifetime
        self.rotation = max(rotation, 2 * lifetime)
        self._clock = clock
        self._keys: list[SigningKey] = []
        self.rotate()

    @property
    def current(self) -> SigningKey:
        return self._keys[-1]

    def rotate(self) -> SigningKey:
        key = SigningKey(
            kid=f"es256-{secrets.token_hex(8)}",
            key=ec.generate_private_key(ec.SECP256R1()),
            created=self._clock(),
        )
        self._keys = [*self._keys[-1:], key]  # current + previous
        return key

    def maybe_rotate(self) -> None:
        if self._clock() - self.current.created >= self.rotation:
            self.rotate()

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in reversed(self._keys)]}

    def sign(
        self,
        *,
        audience: str,
        subject: str,
        email: str | None,
        groups: Sequence[str],
        access_levels: Sequence[str] = (),
        principal: str,
        extra: dict[str, Any] | None = None,
    ) -> str:
        self.maybe_rotate()
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": audience,
            "sub": subject,
            "email": email,
            "groups": list(groups),
            "access_levels": list(access_levels),
            "principal": principal,
            "iat": now,
            "nbf": now - 5,
            "exp": now + int(self.lifetime),
            "jti": secrets.token_urlsafe(12),
            **(extra or {}),
        }
        key = self.current
        return jwt.encode(claims, key.key, algorithm="ES256", headers={"kid": key.kid})


AssertionKey = tuple[str, str, str | None, tuple[str, ...], tuple[str, ...], str]
CACHE_SIZE = 10_000  # identities x audiences kept per process


class AssertionCache:
    """``sign`` as ``AssertionSigner.sign``, reusing an assertion for the same audience,
    identity and access levels, signed by the current key, while more than ``margin`` seconds
    (at most 60, at most half the lifetime) of it remain. Bounded: when full, the expired
    entries go, then all."""

    def __init__(self, signer: AssertionSigner) -> None:
        self.signer = signer
        self._clock = signer._clock  # the signer's time: exp is computed from it
        self.margin = min(60.0, signer.lifetime / 2)
        self._cache: dict[AssertionKey, tuple[str, str, float]] = {}  # token, kid, exp

    def sign(
        self,
        *,
        audience: str,
        subject: str,
        email: str | None,
        groups: Sequence[str],
        access_levels: Sequence[str] = (),
        principal: str,
    ) -> str:
        key = (audience, subject, email, tuple(groups), tuple(access_levels), principal)
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and hit[1] == self.signer.current.kid and hit[2] - now > self.margin:
            return hit[0]
        token = self.signer.sign(
            audience=audience, subject=subject, email=email, groups=groups,
            access_levels=access_levels, principal=principal,
        )  # fmt: skip
        if len(self._cache) >= CACHE_SIZE:
            self._cache = {k: v for k, v in self._cache.items() if v[2] - now > self.margin}
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
        self._cache[key] = (token, self.signer.current.kid, int(now) + int(self.signer.lifetime))
        return token
