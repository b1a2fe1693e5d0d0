"""Who is calling HTTP mode: a bearer token for the app's audiences (``Proxy-Authorization``
first, then ``Authorization``), or else the browser session of the cookie. A bad token is a 401
with an audit record; no credential at all is for the caller to answer (a sign-in redirect for
a browser navigation, 401 otherwise)."""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn

from aiohttp import web

from ..access.identity import (
    AuthError,
    Identity,
    IssuerUnavailable,
    TokenVerifier,
    bearer_token,
    describe_refusal,
)
from ..audit import AuditLog
from ..config import RouteConfig
from .login import MAX_ID, SESSION_COOKIE
from .responses import RETRY_AFTER, Reply, json_response, store_unavailable
from .sessions import SessionStore, SessionStoreUnavailable, WebSession

# Bearer tokens already verified for an app are answered from here (no parsing at all) for at
# most this long, never past their validity; revocations are checked on every request.
TOKEN_REUSE = 10.0
TOKEN_CACHE_SIZE = 4096


@dataclass
class Caller:
    identity: Identity
    session: WebSession | None = None
    # The request's own Authorization header carried our token: not passed to the upstream.
    consumed_authorization: bool = False


class Callers:
    """``verifiers``: an app's name -> its bearer-token verifier (apps without one take browser
    sessions only)."""

    def __init__(
        self,
        *,
        verifiers: Mapping[str, TokenVerifier],
        store: SessionStore,
        audit: AuditLog,
        is_revoked: Callable[[Identity], bool],
        reauth_max_age: float | None,
        clock: Callable[[], float],
    ) -> None:
        self._verifiers = verifiers
        self._store = store
        self._audit = audit
        self._is_revoked = is_revoked
        self._reauth_max_age = reauth_max_age
        self._clock = clock
        self._verified: dict[tuple[str, str], tuple[Identity, float]] = {}  # -> verified at

    async def identify(
        self, request: web.Request, route: RouteConfig, origin: str
    ) -> Caller | None:
        """The caller, or None when the request carries no usable credential. Raises Reply
        with 401 for a bad token, 503 when the identity provider or the session store is
        down."""
        proxy_token = bearer_token(request.headers.get("Proxy-Authorization"))
        auth_token = None if proxy_token else bearer_token(request.headers.get("Authorization"))
        token = proxy_token or auth_token
        if token is not None:
            identity = await self._bearer(route, token)
            return Caller(identity, consumed_authorization=auth_token is not None)
        return await self._session(request, route, origin)

    async def _bearer(self, route: RouteConfig, token: str) -> Identity:
        key = (route.name, token)
        hit = self._verified.get(key)
        now = self._clock()
        if hit is not None and hit[1] <= now < min(hit[0].valid_until, hit[1] + TOKEN_REUSE):
            identity = hit[0]
            if self._is_revoked(identity):
                self.refuse(route, "revoked")
            return identity
        identity = await self._verify(route, token)
        if len(self._verified) >= TOKEN_CACHE_SIZE:
            self._verified = {k: v for k, v in self._verified.items() if now - v[1] < TOKEN_REUSE}
            if len(self._verified) >= TOKEN_CACHE_SIZE:
                self._verified.clear()
        self._verified[key] = (identity, now)
        return identity

    async def _verify(self, route: RouteConfig, token: str) -> Identity:
        verifier = self._verifiers.get(route.name)
        if verifier is None:
            self.refuse(route, "bearer tokens not accepted for this app")
        try:
            identity = await verifier.verify(token)
        except IssuerUnavailable:
            raise Reply(
                json_response(
                    {"error": "identity provider unavailable"}, 503, {"Retry-After": RETRY_AFTER}
                )
            ) from None
        except AuthError as exc:
            self.refuse(route, exc.reason)
        if self._is_revoked(identity):
            self.refuse(route, "revoked")
        return identity

    async def _session(
        self, request: web.Request, route: RouteConfig, origin: str
    ) -> Caller | None:
        sid = request.cookies.get(SESSION_COOKIE)
        if not sid or len(sid) > MAX_ID:
            return None
        try:
            session = await self._store.get(sid)
        except SessionStoreUnavailable as exc:
            # Fail closed, and not with a sign-in redirect (that needs the store too).
            self._audit.record("http", decision="deny", reason=str(exc), app=route.name, status=503)
            raise Reply(store_unavailable(request)) from None
        if session is None or not hmac.compare_digest(session.origin, origin):
            return None
        reauth = self._reauth_max_age
        too_old = reauth is not None and self._clock() - session.auth_time > reauth
        if too_old or self._is_revoked(session.identity):
            with contextlib.suppress(SessionStoreUnavailable):  # refused here either way
                await self._store.delete(sid)
            return None
        return Caller(session.identity, session=session)

    def refuse(self, route: RouteConfig, reason: str) -> NoReturn:
        self._audit.record("http", decision="deny", reason=reason, app=route.name, status=401)
        description = describe_refusal(reason)
        challenge = (
            f'Bearer realm="tunnel", error="invalid_token", error_description="{description}"'
        )
        raise Reply(
            json_response(
                {"error": "authentication required", "error_description": description},
                401,
                {"WWW-Authenticate": challenge},
            )
        )
