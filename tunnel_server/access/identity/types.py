"""What a verified caller is (``Identity``) and why a token is refused (``AuthError``).

AuthError (401: log in again)
└── IssuerUnavailable (503: retry; the identity provider cannot be reached)
"""

from __future__ import annotations

from dataclasses import dataclass


class AuthError(Exception):
    """Token refused: HTTP 401. `reason` is a short audit string, never token content.

    AuthError
     └── IssuerUnavailable   discovery or JWKS could not be fetched or was unusable
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class IssuerUnavailable(AuthError):
    """The issuer's discovery document or JWKS could not be fetched or was unusable."""


@dataclass(frozen=True)
class Identity:
    """A verified caller. `members` is what policy bindings match against."""

    principal: str
    subject: str
    issuer: str
    email: str | None
    groups: tuple[str, ...]
    expires_at: float
    members: frozenset[str]
    # exp plus the issuer's leeway: the last moment this credential is accepted anywhere.
    valid_until: float = 0.0
    issued_at: float | None = None  # iat: revocations refuse tokens issued before them
