"""``verify_assertion(token, audience=..., issuer=..., jwks_url=...)``: one call that turns the
proxy's ``X-Tunnel-Jwt-Assertion`` header into trusted claims, or raises ``AssertionError_``.

ES256 only (the algorithm comes from this allow-list, never from the token), ``kid`` looked up
in the proxy's JWKS (fetched from ``jwks_url`` with the standard library, cached 5 minutes; an
unknown ``kid`` refetches at most once per 10 s), exact ``iss`` and ``aud``, ``exp``/``iat``
with 30 s leeway, lifetime at most 10 minutes."""

from __future__ import annotations

import base64
import json
import re
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
# Assertions already verified (HTTP mode reuses one for minutes): (token, audience, issuer, the
# key object) -> (verified at, claims), answered while unexpired and the key still listed.
_verified: dict[tuple[str, str, str, tuple[str, ...]], tuple[float, dict[str, Any]]] = {}
VERIFIED_MAX = 4096
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
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


_keys: dict[tuple[str, ...], Any] = {}  # (kid, crv, x, y) -> public key: built once
_KEYS_MAX = 256


def _key(jwks: Mapping[str, Any], kid: str) -> tuple[tuple[str, ...], Any] | None:
    """(the key's identity, the public key) of ``kid`` in ``jwks``."""
    for jwk in jwks.get("keys", []):
        if isinstance(jwk, dict) and jwk.get("kid") == kid and jwk.get("kty") == "EC":
            ident = tuple(str(jwk.get(f)) for f in ("kid", "crv", "x", "y"))
            key = _keys.get(ident)
            if key is None:
                key = jwt.PyJWK(jwk, algorithm="ES256").key
                with _lock:
                    if len(_keys) >= _KEYS_MAX:
                        _keys.clear()
                    _keys[ident] = key
            return ident, key
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
    header = _header(token)
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
    cache_key = (token, audience, issuer, key[0])
    hit = _verified.get(cache_key)
    now = time.time()
    if hit is not None and now <= min(float(hit[1]["exp"]) + leeway, hit[0] + JWKS_TTL):
        return dict(hit[1])
    claims = _decode(token, key[1], audience=audience, issuer=issuer, leeway=leeway)
    with _lock:
        if len(_verified) >= VERIFIED_MAX:
            _verified.clear()
        _verified[cache_key] = (now, claims)
    return dict(claims)


def _header(token: str) -> dict[str, Any]:
    """The token's JOSE header (strict base64url, a JSON object), before any key is chosen."""
    segment = token.split(".", 1)[0]
    if not _B64URL.fullmatch(segment):
        raise AssertionError_("malformed assertion")
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except ValueError:
        raise AssertionError_("malformed assertion") from None
    if not isinstance(header, dict):
        raise AssertionError_("malformed assertion")
    return header


def _decode(token: str, key: Any, *, audience: str, issuer: str, leeway: float) -> dict[str, Any]:
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
