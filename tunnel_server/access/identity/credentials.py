"""Reading a bearer credential from a request header, the same way on every listener (the relay,
HTTP mode, the admin API), and the one bound on a token's size."""

from __future__ import annotations

# Tokens longer than this are refused before any parsing ("too large"); websockets refuses
# header lines over 8 KiB anyway.
MAX_TOKEN_BYTES = 8192


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization`` (or ``Proxy-Authorization``) value in the Bearer scheme
    (RFC 6750; the scheme is case-insensitive), or None for a missing value, another scheme or an
    empty token. Its size is checked where it is verified (``Authenticator.verify``)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
