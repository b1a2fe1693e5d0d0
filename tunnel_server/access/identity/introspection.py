"""RFC 7662 token introspection for issuers whose access tokens are opaque; answers are cached
briefly (positive until min(ttl, exp), negative for a few seconds to blunt floods)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp

from .jwt_verifier import OidcVerifier
from .types import AuthError, Identity, IssuerUnavailable

# POST form to the endpoint with HTTP Basic client auth; returns (status, JSON object).
PostForm = Callable[[str, dict[str, str], str], Awaitable[tuple[int, Any]]]

_MAX_CACHE = 10_000
_NEGATIVE_TTL = 5.0
_TIMEOUT = 10.0


class Introspector:
    """Introspects opaque tokens at one issuer; identities follow the issuer's JWT rules."""

    def __init__(
        self,
        verifier: OidcVerifier,
        *,
        client_id: str,
        client_secret: str,
        endpoint: str | None = None,
        cache_ttl: float = 30.0,
        post_form: PostForm | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.verifier = verifier
        self._endpoint = endpoint
        pair = f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}"
        self._authorization = "Basic " + base64.b64encode(pair.encode()).decode()
        self._ttl = cache_ttl
        self._post: PostForm = post_form or self._aiohttp_post
        self._clock = clock
        self._cache: OrderedDict[bytes, tuple[float, Identity | str]] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None

    async def endpoint(self) -> str:
        if self._endpoint is None:
            if self.verifier.discovery is None:
                await self.verifier.refresh()
            url = (self.verifier.discovery or {}).get("introspection_endpoint")
            if not isinstance(url, str):
                raise IssuerUnavailable("no introspection endpoint")
            self._endpoint = url
        return self._endpoint

    async def verify(self, token: str, audiences: Sequence[str] | None = None) -> Identity:
        """The identity an opaque token proves for ``audiences`` (default: the verifier's)."""
        accepted = tuple(audiences) if audiences else self.verifier.audiences
        # The cache is keyed by a hash: tokens are never kept in memory longer than a request.
        key = hashlib.sha256("\0".join((token, *accepted)).encode()).digest()
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            if isinstance(hit[1], str):
                raise AuthError(hit[1])
            return hit[1]
        try:
            identity = await self._introspect(token, accepted)
        except IssuerUnavailable:
            raise
        except AuthError as exc:
            self._store(key, now + _NEGATIVE_TTL, exc.reason)
            raise
        self._store(key, min(now + self._ttl, identity.expires_at), identity)
        return identity

    def _store(self, key: bytes, until: float, value: Identity | str) -> None:
        self._cache[key] = (until, value)
        self._cache.move_to_end(key)
        while len(self._cache) > _MAX_CACHE:
            self._cache.popitem(last=False)

    async def _introspect(self, token: str, audiences: tuple[str, ...]) -> Identity:
        url = await self.endpoint()
        try:
            status, data = await self._post(
                url, {"token": token, "token_type_hint": "access_token"}, self._authorization
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            raise IssuerUnavailable("introspection unavailable") from None
        if status != 200 or not isinstance(data, dict):
            raise IssuerUnavailable("introspection unavailable")
        if data.get("active") is not True:
            raise AuthError("inactive token")
        iss = data.get("iss", self.verifier.issuer)
        if iss != self.verifier.issuer:
            raise AuthError("bad issuer")
        if "aud" not in data:
            raise AuthError("bad audience")
        aud = data["aud"]
        claimed = aud if isinstance(aud, list) else [aud]
        accepted = audiences
        if not any(a in accepted for a in claimed):
            raise AuthError("bad audience")
        if not isinstance(data.get("sub"), str):
            raise AuthError("missing claim")
        return self.verifier.identity_from_claims(dict(data), accepted)

    async def _aiohttp_post(
        self, url: str, form: dict[str, str], authorization: str
    ) -> tuple[int, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_TIMEOUT))
        headers = {"Authorization": authorization, "Accept": "application/json"}
        async with self._session.post(
            url, data=form, headers=headers, allow_redirects=False
        ) as response:
            if response.status != 200:
                return response.status, None
            return response.status, await response.json(content_type=None)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
