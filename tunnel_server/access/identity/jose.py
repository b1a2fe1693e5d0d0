"""The structure of tokens and keys, without I/O: a compact JWS's segments decoded once, the
keys of a JWKS parsed into verification keys (public members only, sizes bounded), and the key
a token's ``kid`` and ``alg`` select."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from .types import AuthError

DEFAULT_ALGORITHMS: Final = (
    *("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    *("ES256", "ES384", "ES512", "EdDSA"),
)
_RSA_ALGORITHMS: Final = frozenset(a for a in DEFAULT_ALGORITHMS if a[:2] in ("RS", "PS"))
_EC_CURVES: Final = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_OKP_CURVES: Final = frozenset({"Ed25519", "Ed448"})
_PUBLIC_MEMBERS: Final = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "OKP": ("crv", "x")}
_MIN_RSA_BITS: Final = 2048
_MAX_RSA_BITS: Final = 16384  # a huge modulus from a hostile JWKS would make every verify slow
# Only the public members are ever handed to PyJWT: a JWKS that (wrongly) publishes "d" must not
# turn into a private key object on our side.
MAX_KEYS: Final = 64
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Key:
    kid: str | None
    by_alg: Mapping[str, jwt.PyJWK]  # every algorithm this key may verify, already constructed


@dataclass(frozen=True)
class KeySet:
    keys: tuple[Key, ...]
    fetched_at: float


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # Two parsers may pick different duplicates; refuse rather than guess (RFC 7515 §4).
        raise ValueError("duplicate member")
    return obj


def _json_segment(segment: str) -> dict[str, Any]:
    if len(segment) % 4 == 1:
        raise AuthError("malformed")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (binascii.Error, ValueError, RecursionError):
        raise AuthError("malformed") from None
    if not isinstance(value, dict):
        raise AuthError("malformed")
    return value


@dataclass(frozen=True, slots=True)
class Segments:
    """A compact JWS's header and payload, decoded once per request and unverified: the
    payload's ``iss`` routes the token to its issuer's verifier, which checks the header and
    then the signature and claims."""

    header: dict[str, Any]
    payload: dict[str, Any]

    @property
    def issuer(self) -> str | None:
        iss = self.payload.get("iss")
        return iss if isinstance(iss, str) else None


def parse_jws(token: str, max_bytes: int) -> Segments:
    """Structure checks that cost no crypto and no I/O, and the decoded segments. AuthError
    names the problem ("too large", "malformed"); a JWE (five parts) is malformed."""
    if len(token) > max_bytes:
        raise AuthError("too large")
    if not token.isascii():
        raise AuthError("malformed")
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("malformed")  # JWE compact serialization has five parts
    # An empty signature is left for the algorithm check to name ("none" tokens have one).
    head, body, signature = parts
    if not (_B64URL.fullmatch(head) and _B64URL.fullmatch(body)):
        raise AuthError("malformed")
    if signature and (not _B64URL.fullmatch(signature) or len(signature) % 4 == 1):
        raise AuthError("malformed")
    return Segments(_json_segment(head), _json_segment(body))


def parse_jwk(raw: Any, allowed: frozenset[str]) -> Key | None:
    """The key, with the algorithms it may verify; None for anything we will not use."""
    if not isinstance(raw, dict):
        return None
    kty, crv, declared = raw.get("kty"), raw.get("crv"), raw.get("alg")
    kid = raw.get("kid")
    if kid is not None and (not isinstance(kid, str) or not kid):
        return None
    if raw.get("use", "sig") != "sig":
        return None
    ops = raw.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    # The algorithm family follows from the key type; symmetric ("oct") keys are never used, so
    # an HMAC over a public key can never verify.
    family: frozenset[str]
    if kty == "RSA":
        family = _RSA_ALGORITHMS
    elif kty == "EC" and isinstance(crv, str) and crv in _EC_CURVES:
        family = frozenset({_EC_CURVES[crv]})
    elif kty == "OKP" and crv in _OKP_CURVES:
        family = frozenset({"EdDSA"})
    else:
        return None
    if declared is not None:
        if declared not in family:
            return None
        family = frozenset({declared})
    public = {"kty": kty, **{m: raw[m] for m in _PUBLIC_MEMBERS[kty] if m in raw}}
    by_alg: dict[str, jwt.PyJWK] = {}
    for alg in sorted(family & allowed):
        try:
            key = jwt.PyJWK(public, algorithm=alg)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            return None
        if isinstance(key.key, RSAPublicKey) and not (
            _MIN_RSA_BITS <= key.key.key_size <= _MAX_RSA_BITS
        ):
            return None
        by_alg[alg] = key
    return Key(kid=kid, by_alg=by_alg) if by_alg else None


def select_key(keys: KeySet, kid: str | None, alg: str) -> jwt.PyJWK | None:
    """The one key for (kid, alg); None when the kid is unknown (a refetch may help)."""
    if kid is None:
        # Without a kid we only guess when the guess is unique.
        candidates = [k.by_alg[alg] for k in keys.keys if alg in k.by_alg]
        if len(candidates) > 1:
            raise AuthError("ambiguous key")
        return candidates[0] if candidates else None
    named = [k for k in keys.keys if k.kid == kid]
    if not named:
        return None
    usable = [k.by_alg[alg] for k in named if alg in k.by_alg]
    if not usable:
        raise AuthError("algorithm mismatch")
    if len(usable) > 1:
        raise AuthError("ambiguous key")
    return usable[0]
