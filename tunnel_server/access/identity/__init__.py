"""Who is calling: bearer tokens from several OIDC issuers (JWTs verified against each issuer's
JWKS, opaque tokens through RFC 7662 introspection) become an ``Identity``.

    AuthError (401: log in again)
    └── IssuerUnavailable (503: retry; the identity provider cannot be reached)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .credentials import MAX_TOKEN_BYTES, bearer_token
from .introspection import Introspector
from .jwt_verifier import (
    DEFAULT_ALGORITHMS,
    AuthError,
    FetchJson,
    Identity,
    IssuerUnavailable,
    OidcVerifier,
    Segments,
    parse_jws,
)
from .types import describe_refusal

__all__ = [
    "DEFAULT_ALGORITHMS",
    "Audience",
    "AuthError",
    "Authenticator",
    "FetchJson",
    "Identity",
    "Introspector",
    "IssuerUnavailable",
    "MAX_TOKEN_BYTES",
    "OidcVerifier",
    "TokenVerifier",
    "bearer_token",
    "describe_refusal",
]


class TokenVerifier(Protocol):
    """Anything that turns a bearer token into an identity (AuthError otherwise)."""

    async def verify(self, token: str) -> Identity: ...


class Authenticator:
    """Routes a token to the verifier of the issuer it names (JWT), or to the introspection
    endpoints of the issuers that issue opaque tokens. Unknown issuers cost no I/O."""

    def __init__(
        self, verifiers: Sequence[OidcVerifier], introspectors: Sequence[Introspector] = ()
    ) -> None:
        if not verifiers:
            raise ValueError("at least one issuer is required")
        self.verifiers = {v.issuer: v for v in verifiers}
        if len(self.verifiers) != len(verifiers):
            raise ValueError("an issuer is configured twice")
        self.introspectors = tuple(introspectors)

    async def verify(self, token: str, audiences: Sequence[str] | None = None) -> Identity:
        """The identity ``token`` proves, for ``audiences`` (default: each issuer's configured
        audiences); AuthError (IssuerUnavailable) otherwise."""
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("too large")
        segments = _segments(token)
        issuer = segments.issuer if segments is not None else None
        if issuer is not None:
            verifier = self.verifiers.get(issuer)
            if verifier is None:
                raise AuthError("bad issuer")
            return await verifier.verify(token, audiences, segments)
        if not self.introspectors or token.count(".") >= 2:
            # A JWS without a usable iss, a JWE, or garbage: the JWT checks name the problem.
            first = next(iter(self.verifiers.values()))
            return await first.verify(token, audiences, segments)
        if not token.isascii() or not token.isprintable():
            raise AuthError("malformed")
        failure: AuthError | None = None
        for introspector in self.introspectors:
            try:
                return await introspector.verify(token, audiences)
            except AuthError as exc:
                failure = (
                    exc if failure is None or isinstance(failure, IssuerUnavailable) else failure
                )
        raise failure or AuthError("malformed")

    def for_audiences(self, audiences: Sequence[str]) -> Audience:
        """This authenticator (same issuers, same key caches) accepting ``audiences`` instead."""
        return Audience(self, tuple(audiences))

    @property
    def ready(self) -> bool:
        return all(v.ready for v in self.verifiers.values())

    async def refresh(self) -> None:
        for verifier in self.verifiers.values():
            if not verifier.ready:
                await verifier.refresh()

    async def aclose(self) -> None:
        for verifier in self.verifiers.values():
            await verifier.aclose()
        for introspector in self.introspectors:
            await introspector.aclose()


def _segments(token: str) -> Segments | None:
    """The token decoded once, or None when it is not a JWS (an opaque token, garbage)."""
    try:
        return parse_jws(token, MAX_TOKEN_BYTES)
    except AuthError:
        return None


class Audience:
    """An ``Authenticator`` or ``OidcVerifier`` bound to other audiences: an HTTP-mode app's,
    or the browser-login client's. Closing stays with the owner of what it wraps."""

    def __init__(self, verifier: Authenticator | OidcVerifier, audiences: Sequence[str]) -> None:
        if isinstance(audiences, str) or not audiences:
            raise ValueError("audiences must be a non-empty sequence of strings")
        self._verifier = verifier
        self.audiences = tuple(audiences)

    async def verify(self, token: str) -> Identity:
        return await self._verifier.verify(token, self.audiences)
