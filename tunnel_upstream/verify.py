"""``verify_assertion(token, audience=..., issuer=..., jwks_url=...)``: one call that turns the
proxy's ``X-Tunnel-Jwt-Assertion`` header into trusted claims, or raises ``AssertionError_``.

ES256 only (the algorithm comes from this allow-list, never from the token), ``kid`` looked up
in the proxy's JWKS (fetched from ``jwks_url`` with the standard library, cached 5 minutes; an
unknown ``kid`` refetches at most once per 10 s), exact ``iss`` and ``aud``, ``exp``/``iat``
with 30 s leeway, lifetime at most 10 minutes."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Mapping
from typing import Any

import jwt

ASSERTION_HEADER = "X-Tunnel-Jwt-Assertion"
LEEWAY = 30.0
MAX_LIFETIME = 600.0
JWKS_TTL = 300.0
REFETCH_COOLDOWN = 10.0
MAX_TOKEN = 8192

_cache: dict[str, tuple[float, dict[str, Any]]] = {}
_last_refetch: dict[str, float] = {}
_lock = threading.Lock()


class AssertionError_(Exception):  # noqa: N801 - "AssertionError" is a builtin
    """The assertion is missing, malformed, expired, or not for this app (answer 401/403)."""


def _fetch(url: str) -> dict[str, Any]:
    if not url.startswith(("https://", "http://")):
        raise AssertionError_("jwks_url must be http(s)")
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - scheme checked
        data = json.loads(response.read(1 << 20))
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise AssertionError_("bad JWKS")
    return data


def _jwks(url: str, *, refresh: bool) -> dict[str, Any]:
    now = time.monotonic()
    with _lock:
        cached = _cache.get(url)
        if cached is not None and not refresh and now - cached[0] < JWKS_TTL:
            return cached[1]
        if refresh and cached is not None and now - _last_refetch.get(url, -1e9) < REFETCH_COOLDOWN:
            return cached[1]
        _last_refetch[url] = now
    data = _fetch(url)
    with _lock:
        _cache[url] = (now, data)
    return data


def _key(jwks: Mapping[str, Any], kid: str) -> Any:
    for jwk in jwks.get("keys", []):
        if isinstance(jwk, dict) and jwk.get("kid") == kid and jwk.get("kty") == "EC":
            return jwt.PyJWK(jwk, algorithm="ES256").key
    return None


def verify_assertion(
    token: str | None,
    *,
    audience: str,
    issuer: str,
    jwks_url: str | None = None,
    jwks: Mapping[str, Any] | None = None,
    leeway: float = LEEWAY,
) -> dict[str, Any]:
    """The verified claims (``sub``, ``email``, ``groups``, ``access_levels``, ``principal``,
    ``iss``, ``aud``, ``iat``, ``exp``). Give ``jwks_url`` (the proxy's
    ``/.well-known/tunnel/jwks.json``) or a ``jwks`` dict."""
    if (jwks_url is None) == (jwks is None):
        raise ValueError("give exactly one of jwks_url or jwks")
    if not token or len(token) > MAX_TOKEN or token.count(".") != 2:
        raise AssertionError_("missing or malformed assertion")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise AssertionError_("malformed assertion") from None
    kid = header.get("kid")
    if header.get("alg") != "ES256" or not isinstance(kid, str):
        raise AssertionError_("assertion must be ES256 with a kid")
    if set(header) - {"alg", "kid", "typ"}:
        raise AssertionError_("unexpected assertion header")
    key = _key(jwks, kid) if jwks is not None else None
    if jwks_url is not None:
        key = _key(_jwks(jwks_url, refresh=False), kid)
        if key is None:
            key = _key(_jwks(jwks_url, refresh=True), kid)
    if key is None:
        raise AssertionError_("unknown signing key")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=["ES256"],
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            options={"require": ["iss", "aud", "sub", "iat", "exp"]},
        )
    except jwt.PyJWTError as exc:
        raise AssertionError_(f"invalid assertion: {type(exc).__name__}") from None
    if float(claims["exp"]) - float(claims["iat"]) > MAX_LIFETIME:
        raise AssertionError_("assertion lifetime too long")
    if float(claims["iat"]) > time.time() + leeway:
        raise AssertionError_("assertion issued in the future")
    return claims
