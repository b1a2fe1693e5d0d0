"""Who is calling: bearer tokens from several OIDC issuers (JWTs verified against each issuer's
JWKS, opaque tokens through RFC 7662 introspection) become an ``Identity``.

    AuthError (401: log in again)
    └── IssuerUnavailable (503: retry; the identity provider cannot be reached)
"""

from __future__ import annotations

from collections.abc import Sequence

from .credentials import MAX_TOKEN_BYTES, bearer_token
from .introspection import Introspector
from .jwt_verifier import (
    DEFAULT_ALGORITHMS,
    AuthError,
    FetchJson,
    Identity,
    IssuerUnavailable,
    OidcVerifier,
    unverified_issuer,
)

__all__ = [
    "DEFAULT_ALGORITHMS",
    "AuthError",
    "Authenticator",
    "FetchJson",
    "Identity",
    "Introspector",
    "IssuerUnavailable",
    "MAX_TOKEN_BYTES",
    "OidcVerifier",
    "bearer_token",
]


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

    async def verify(self, token: str) -> Identity:
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("too large")
        issuer = unverified_issuer(token, MAX_TOKEN_BYTES)
        if issuer is not None:
            verifier = self.verifiers.get(issuer)
            if verifier is None:
                raise AuthError("bad issuer")
            return await verifier.verify(token)
        if not self.introspectors or token.count(".") >= 2:
            # A JWS without a usable iss, a JWE, or garbage: the JWT checks name the problem.
            return await next(iter(self.verifiers.values())).verify(token)
        if not token.isascii() or not token.isprintable():
            raise AuthError("malformed")
        failure: AuthError | None = None
        for introspector in self.introspectors:
            try:
                return await introspector.verify(token)
            except AuthError as exc:
                failure = (
                    exc if failure is None or isinstance(failure, IssuerUnavailable) else failure
                )
        assert failure is not None
        raise failure

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
