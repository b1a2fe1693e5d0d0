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


# What a refused caller is told about their token (RFC 6750 ``error_description``): a few
# words naming the problem and whether a new token would help, never token content.
_DESCRIPTIONS = {
    "missing credentials": "no bearer token",
    "several credentials": "several Authorization headers",
    "not a bearer token": "not a bearer token",
    "expired": "token expired",
    "not yet valid": "token not yet valid (check the clock)",
    "issued in the future": "token issued in the future (check the clock)",
    "bad audience": "wrong audience",
    "bad azp": "wrong audience",
    "bad issuer": "unknown issuer",
    "revoked": "revoked",
    "inactive token": "token inactive",
    "too large": "malformed token",
    "malformed": "malformed token",
    "unsupported header": "malformed token",
    "missing claim": "malformed token",
    "invalid claim": "malformed token",
    "bad subject": "malformed token",
    "lifetime too long": "token lifetime too long",
}


def describe_refusal(reason: str) -> str:
    """The ``error_description`` for an AuthError reason (signature problems stay vague)."""
    return _DESCRIPTIONS.get(reason, "invalid token")
