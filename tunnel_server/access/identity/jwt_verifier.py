"""Bearer-token verification, one issuer per ``OidcVerifier``: OIDC discovery, an async JWKS
cache, signature and claim checks, and the mapping from a verified token to an ``Identity``
(principal, groups, policy members)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import jwt
from jwt.exceptions import InvalidSubjectError
from jwt.types import Options

from .jose import (
    DEFAULT_ALGORITHMS,
    MAX_KEYS,
    KeySet,
    Segments,
    parse_jwk,
    parse_jws,
    select_key,
)
from .types import AuthError, Identity, IssuerUnavailable

__all__ = [
    "DEFAULT_ALGORITHMS",
    "Segments",
    "parse_jws",
    "AuthError",
    "FetchJson",
    "Identity",
    "IssuerUnavailable",
    "OidcVerifier",
]

FetchJson = Callable[[str], Awaitable[Any]]

_MAX_KID_CHARS: Final = 256
_MAX_LEEWAY: Final = 60.0
_MAX_DOCUMENT_BYTES: Final = 512 * 1024
_FETCH_TIMEOUT: Final = 10.0
# Headers that point at key material supplied by the token itself (RFC 8725 §3.10), or that
# change how the bytes must be processed: refused, never followed.
_REFUSED_HEADERS: Final = ("jku", "x5u", "jwk", "crit", "zip", "enc", "b64")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_LOOPBACK_V4: Final = ipaddress.ip_network("127.0.0.0/8")
_LOOPBACK_V6: Final = ipaddress.ip_address("::1")

# Signature, issuer, audience and claim presence are PyJWT's job; the time checks are ours
# because PyJWT reads the wall clock and the relay injects its clock.
_DECODE_OPTIONS: Final[Options] = {
    "require": ["iss", "sub", "aud", "exp"],
    "verify_signature": True,
    "verify_iss": True,
    "verify_aud": True,
    "verify_sub": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "strict_aud": False,
    "enforce_minimum_key_length": True,
}
# Most specific first; the last entry catches everything else PyJWT raises.
_PYJWT_REASONS: Final[tuple[tuple[type[jwt.PyJWTError], str], ...]] = (
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm mismatch"),
    (jwt.InvalidIssuerError, "bad issuer"),
    (jwt.InvalidAudienceError, "bad audience"),
    (InvalidSubjectError, "bad subject"),
    (jwt.MissingRequiredClaimError, "missing claim"),
    (jwt.InvalidKeyError, "bad key"),
    (jwt.PyJWTError, "malformed"),
)


# Verified tokens kept for reuse (OidcVerifier.verify): entries, and seconds each is trusted
# without a new signature check (also bounded by the token's expiry and the key set).
TOKEN_CACHE_SIZE = 4096
TOKEN_CACHE_TTL = 60.0


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    if "%" in host:  # zone ids: never treat a scoped address as loopback
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv4Address):
        return ip in _LOOPBACK_V4
    return ip == _LOOPBACK_V6


def _url_allowed(url: str) -> bool:
    """https anywhere; plain http only to this machine (dev IdPs); no credentials or fragments."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        return False
    host = parts.hostname
    if not host or parts.username is not None or parts.password is not None or parts.fragment:
        return False
    if parts.scheme == "https":
        return True
    return parts.scheme == "http" and _is_loopback(host)


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    if name not in claims:
        return None
    value = claims[name]
    # bool is an int subclass: `"exp": true` must not read as 1970-01-01T00:00:01.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError("invalid claim")
    try:
        number = float(value)
    except OverflowError:  # an int too big for a float
        raise AuthError("invalid claim") from None
    if not math.isfinite(number):
        raise AuthError("invalid claim")
    return number


def _verified_email(claims: Mapping[str, Any]) -> str | None:
    email, verified = claims.get("email"), claims.get("email_verified")
    if not isinstance(email, str) or not (verified is True or verified == "true"):
        return None
    local, at, domain = email.rpartition("@")
    if not at or not local or not domain or "@" in local or len(email) > 320:
        return None
    if _CONTROL.search(email) or any(c.isspace() for c in email):
        return None
    # Policies compare strings exactly; IdPs treat addresses case-insensitively, so a deny rule
    # must not be dodged by "Alice@Example.com".
    return email.lower()


def _groups(value: Any) -> tuple[str, ...]:
    # Some IdPs (AD FS) send a lone group as a plain string; anything not a string is dropped.
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return ()
    return tuple(dict.fromkeys(g for g in value if isinstance(g, str) and g))


_CacheKey = tuple[str, tuple[str, ...]]


class OidcVerifier:
    """Verifies bearer tokens from one OIDC issuer for a set of audiences.

    leeway (seconds, at most 60) applies to exp, nbf and iat. JWKS are cached for jwks_ttl;
    concurrent callers share one in-flight fetch; an unknown kid refetches at most once per
    refetch_cooldown. When the issuer is down, cached keys keep working until 2 * jwks_ttl.
    """

    def __init__(
        self,
        issuer: str,
        audiences: Sequence[str],
        *,
        algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
        leeway: float = 30.0,
        max_lifetime: float = 24 * 3600,
        jwks_ttl: float = 300.0,
        refetch_cooldown: float = 10.0,
        groups_claim: str = "groups",
        max_token_bytes: int = 8192,
        fetch_json: FetchJson | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not _url_allowed(issuer) or urlsplit(issuer).query:
            raise ValueError("issuer must be an https URL (http only for loopback hosts)")
        if isinstance(audiences, str) or not audiences:
            raise ValueError("audiences must be a non-empty sequence of strings")
        if not all(isinstance(a, str) and a for a in audiences):
            raise ValueError("audiences must be non-empty strings")
        if isinstance(algorithms, str) or not algorithms:
            raise ValueError("algorithms must be a non-empty sequence")
        unsupported = [a for a in algorithms if a not in DEFAULT_ALGORITHMS]
        if unsupported:
            # "none" and HS* are never accepted: a relay has no business sharing secrets.
            raise ValueError(f"unsupported algorithms: {unsupported}")
        if not (0.0 <= leeway <= _MAX_LEEWAY):
            raise ValueError(f"leeway must be between 0 and {_MAX_LEEWAY:g} seconds")
        for name, value in (("max_lifetime", max_lifetime), ("jwks_ttl", jwks_ttl)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number")
        if not (math.isfinite(refetch_cooldown) and refetch_cooldown >= 0):
            raise ValueError("refetch_cooldown must be >= 0")
        if max_token_bytes <= 0:
            raise ValueError("max_token_bytes must be positive")
        self.issuer: Final = issuer
        self.audiences: Final = tuple(audiences)
        self._algorithms = frozenset(algorithms)
        self._leeway = float(leeway)
        self._max_lifetime = float(max_lifetime)
        self._ttl = float(jwks_ttl)
        self._cooldown = float(refetch_cooldown)
        self._groups_claim = groups_claim
        self._max_token_bytes = max_token_bytes
        self._fetch_json: FetchJson = fetch_json or self._aiohttp_fetch
        self._clock = clock
        # OIDC Discovery §4: drop a terminating "/" before appending the well-known path.
        self._discovery_url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        self._keys: KeySet | None = None
        # (token, audiences) -> (identity, verified at, the key set it was verified against)
        self._verified: OrderedDict[tuple[str, tuple[str, ...]], tuple[Identity, float, KeySet]] = (
            OrderedDict()
        )
        self._inflight: asyncio.Task[KeySet] | None = None
        self._kid_refetch_at: float | None = None
        self._failed_at: float | None = None
        self._failure = "issuer unavailable"
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.discovery: dict[str, Any] | None = None

    @property
    def ready(self) -> bool:
        keys = self._keys
        return keys is not None and self._clock() - keys.fetched_at < 2 * self._ttl

    async def refresh(self) -> None:
        await self._shared_fetch()

    async def aclose(self) -> None:
        self._closed = True
        task = self._inflight
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def verify(
        self,
        token: str,
        audiences: Sequence[str] | None = None,
        segments: Segments | None = None,
    ) -> Identity:
        """The identity a token proves; AuthError (IssuerUnavailable) when it proves none.
        ``audiences``: the ones this use accepts (an HTTP-mode app's, a login client's);
        default, the verifier's own.

        A token verified before is answered from a small cache (its signature check is most of
        a tunnel's handshake CPU, and clients present the same token for every tunnel until
        they refresh it): for at most TOKEN_CACHE_TTL seconds, never past its expiry plus
        leeway, and only while the key set it was verified against is current. Revocations are
        checked by the caller on every use, cached or not. ``segments``: the token already
        decoded by the caller (the ``Authenticator`` routing it), so it is decoded once."""
        accepted = tuple(audiences) if audiences else self.audiences
        key = (token, accepted)
        hit = self._verified.get(key)
        if hit is not None:
            identity, verified_at, keys = hit
            now = self._clock()
            if (
                keys is self._keys
                and verified_at <= now < identity.valid_until
                and now - verified_at < TOKEN_CACHE_TTL
            ):
                return identity
            del self._verified[key]
        if not isinstance(token, str):
            raise AuthError("malformed")
        if segments is None:
            segments = parse_jws(token, self._max_token_bytes)
        identity = await self._verify(token, accepted, segments)
        if self._keys is not None:
            self._verified[key] = (identity, self._clock(), self._keys)
            if len(self._verified) > TOKEN_CACHE_SIZE:
                self._verified.popitem(last=False)  # the oldest
        return identity

    async def _verify(self, token: str, audiences: tuple[str, ...], segments: Segments) -> Identity:
        header = segments.header
        self._check_header(header)
        # Foreign tokens are refused before they can cause any JWKS traffic.
        if segments.payload.get("iss") != self.issuer:
            raise AuthError("bad issuer")
        alg: str = header["alg"]
        key = await self._key_for(header.get("kid"), alg)
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[key.algorithm_name],
                audience=list(audiences),
                issuer=self.issuer,
                options=_DECODE_OPTIONS,
            )
        except jwt.PyJWTError as exc:
            raise AuthError(next(r for t, r in _PYJWT_REASONS if isinstance(exc, t))) from None
        return self.identity_from_claims(claims, audiences)

    def _check_header(self, header: dict[str, Any]) -> None:
        """The header checks that cost no crypto and no I/O."""
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise AuthError("algorithm not allowed")
        if any(name in header for name in _REFUSED_HEADERS):
            raise AuthError("unsupported header")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= _MAX_KID_CHARS):
            raise AuthError("malformed")

    async def _key_for(self, kid: str | None, alg: str) -> jwt.PyJWK:
        keys = await self._current_keys()
        key = select_key(keys, kid, alg)
        if key is not None:
            return key
        # Unknown kid: the issuer may just have rotated. Refetch once per cool-down window so a
        # flood of made-up kids costs the issuer at most one request per window.
        now = self._clock()
        if self._kid_refetch_at is None or now - self._kid_refetch_at >= self._cooldown:
            self._kid_refetch_at = now
            keys = await self._shared_fetch()
        elif self._inflight is not None:
            keys = await self._join(self._inflight)
        else:
            raise AuthError("unknown key")
        key = select_key(keys, kid, alg)
        if key is None:
            raise AuthError("unknown key")
        return key

    async def _current_keys(self) -> KeySet:
        keys, now = self._keys, self._clock()
        if keys is not None and now - keys.fetched_at < self._ttl:
            return keys
        usable = keys is not None and now - keys.fetched_at < 2 * self._ttl
        recently_failed = self._failed_at is not None and now - self._failed_at < self._cooldown
        if recently_failed and self._inflight is None:
            # Don't hammer an issuer that just failed; serve what we have, if still usable.
            if keys is not None and usable:
                return keys
            raise IssuerUnavailable(self._failure)
        try:
            return await self._shared_fetch()
        except IssuerUnavailable:
            if keys is not None and usable:
                return keys
            raise

    async def _shared_fetch(self) -> KeySet:
        if self._closed:
            raise IssuerUnavailable("issuer unavailable")
        task = self._inflight
        if task is None:
            task = asyncio.create_task(self._fetch_and_store())
            task.add_done_callback(self._fetch_done)
            self._inflight = task
        return await self._join(task)

    @staticmethod
    async def _join(task: asyncio.Task[KeySet]) -> KeySet:
        # shield: a caller that gives up (client disconnect) must not cancel everyone's fetch.
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                raise IssuerUnavailable("issuer unavailable") from None  # aclose() stopped it
            raise

    def _fetch_done(self, task: asyncio.Task[KeySet]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here so an unawaited failure is not logged as lost

    async def _fetch_and_store(self) -> KeySet:
        try:
            keys = await self._fetch_keys()
        except IssuerUnavailable as exc:
            self._failed_at, self._failure = self._clock(), exc.reason
            raise
        self._keys, self._failed_at = keys, None
        return keys

    async def _fetch_keys(self) -> KeySet:
        discovery = await self._get(self._discovery_url)
        if not isinstance(discovery, dict) or discovery.get("issuer") != self.issuer:
            raise IssuerUnavailable("issuer mismatch")
        self.discovery = discovery  # kept for the introspection endpoint
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not _url_allowed(jwks_uri):
            raise IssuerUnavailable("bad jwks uri")
        jwks = await self._get(jwks_uri)
        raw_keys = jwks.get("keys") if isinstance(jwks, dict) else None
        if not isinstance(raw_keys, list):
            raise IssuerUnavailable("bad jwks")
        parsed = (parse_jwk(raw, self._algorithms) for raw in raw_keys[:MAX_KEYS])
        keys = tuple(k for k in parsed if k is not None)
        if not keys:
            # Keep serving the previous keys rather than replacing them with nothing.
            raise IssuerUnavailable("bad jwks")
        return KeySet(keys=keys, fetched_at=self._clock())

    async def _get(self, url: str) -> Any:
        try:
            return await self._fetch_json(url)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The cause may quote the response body; the audit reason stays fixed.
            raise IssuerUnavailable("issuer unavailable") from None

    async def _aiohttp_fetch(self, url: str) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=_FETCH_TIMEOUT),
                headers={"Accept": "application/json"},
            )
        # No redirects: a 302 could lead to plain http or somewhere we did not vet.
        async with self._session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise OSError(f"HTTP {response.status}")
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > _MAX_DOCUMENT_BYTES:
                    raise OSError("document too large")
        return json.loads(body)

    def identity_from_claims(
        self, claims: dict[str, Any], audiences: Sequence[str] | None = None
    ) -> Identity:
        """Time, audience and subject checks, then the principal and members; shared with
        token introspection so both kinds of token map to identities by the same rules."""
        accepted = tuple(audiences) if audiences else self.audiences
        now, leeway = self._clock(), self._leeway
        exp = _number(claims, "exp")
        nbf = _number(claims, "nbf")
        iat = _number(claims, "iat")
        if exp is None:
            raise AuthError("missing claim")
        if exp <= now - leeway:
            raise AuthError("expired")
        if nbf is not None and nbf > now + leeway:
            raise AuthError("not yet valid")
        if iat is not None and iat > now + leeway:
            raise AuthError("issued in the future")
        if exp - (iat if iat is not None else now) > self._max_lifetime:
            raise AuthError("lifetime too long")
        aud = claims["aud"]
        if isinstance(aud, list) and len(aud) > 1:
            # OIDC Core §3.1.3.7: with several audiences, azp names the party it was issued to.
            azp = claims.get("azp")
            if not isinstance(azp, str) or azp not in accepted:
                raise AuthError("bad azp")
        sub = claims["sub"]
        if not isinstance(sub, str) or not 0 < len(sub) <= 255 or _CONTROL.search(sub):
            raise AuthError("bad subject")
        email = _verified_email(claims)
        if email is not None:
            principal = f"user:{email}"
        elif "email" not in claims and sub in (claims.get("client_id"), claims.get("azp")):
            # A client acting as itself (client credentials): RFC 9068 puts its id in both
            # `sub` and `client_id`. A user token without an email is not a service account.
            principal = f"serviceAccount:{sub}"
        else:
            principal = f"subject:{sub}"  # an unverified email is never trusted as a user
        groups = _groups(claims.get(self._groups_claim))
        members = {principal, *(f"group:{g}" for g in groups)}
        if email is not None:
            members.add("domain:" + email.rpartition("@")[2])
        return Identity(
            principal=principal,
            subject=sub,
            issuer=self.issuer,
            email=email,
            groups=groups,
            expires_at=exp,
            valid_until=exp + leeway,
            issued_at=iat,
            members=frozenset(members),
        )
