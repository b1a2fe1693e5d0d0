"""Browser sign-in, callback and sign-out (docs/http-mode.md, "Browser sign-in and sessions"):
the authorization code flow of web.oidc_code (authlib: PKCE S256, state, nonce, the code
exchange and the ID token's claims) against the login issuer, a new random session id on every
login, sign-out with the session's CSRF token. Sessions and pending logins live in the
``SessionStore``; when it is unavailable every step answers 503 (nothing half done). A failed
sign-in answers a page naming what happened and what to do, with a reference its audit record
carries."""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..access.identity import Identity, TokenVerifier
from ..audit import AuditLog
from ..config import HttpModeConfig
from . import pages
from .oidc_code import MAX_ID, CodeFlow, SignInFailed
from .paths import safe_return_path
from .responses import html_response, json_response, redirect, store_unavailable
from .sessions import (
    PendingLogin,
    SessionStore,
    SessionStoreUnavailable,
    SessionTooLarge,
    session_key,
    signed_in_session,
)

__all__ = ["CSRF_HEADER", "LOGIN_COOKIE", "MAX_ID", "SESSION_COOKIE", "BrowserLogin"]

SESSION_COOKIE = "__Host-tunnel_session"
LOGIN_COOKIE = "__Host-tunnel_login"
CSRF_HEADER = "X-Tunnel-Csrf"


def cookie_flags() -> dict[str, Any]:
    return {"secure": True, "httponly": True, "samesite": "Lax", "path": "/"}


class BrowserLogin:
    """The ``/_tunnel/sign_in``, ``callback`` and ``sign_out`` handlers. ``verifier`` checks ID
    tokens for the login client's audience; ``end_sessions`` closes this node's WebSockets and
    streams bound to the given session keys (other nodes learn it from the store)."""

    def __init__(
        self,
        config: HttpModeConfig,
        *,
        store: SessionStore,
        audit: AuditLog,
        verifier: TokenVerifier | None,
        end_sessions: Callable[[set[str]], object],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.audit = audit
        self._end_sessions = end_sessions
        self.clock = clock
        self.flow: CodeFlow | None = None
        if config.login is not None and verifier is not None:
            max_age = config.session.reauth_max_age
            self.flow = CodeFlow(config.login, verifier, max_age=max_age, clock=clock)

    def _store_down(self, request: web.Request, event: str, exc: Exception) -> web.Response:
        self.audit.record(event, decision="deny", reason=str(exc), status=503)
        return store_unavailable(request)

    def _failed(self, failure: SignInFailed, principal: str | None = None) -> web.Response:
        """The failure's page; its reference goes to the audit record with the detail."""
        reference = secrets.token_hex(8)
        status, text = pages.sign_in_failed(failure, reference)
        self.audit.record(
            "http_login", decision="deny", reason=failure.detail, failure=failure.kind,
            reference=reference, principal=principal, status=status,
        )  # fmt: skip
        return html_response(text, status)

    async def sign_in(self, request: web.Request, origin: str) -> web.StreamResponse:
        if self.flow is None:
            return html_response(
                pages.page("Sign-in unavailable", "<p>Use a bearer token.</p>"), 404
            )
        pending = self.flow.pending(
            return_to=safe_return_path(request.query.get("rd"), origin),
            host=origin,
            lifetime=self.config.session.login_timeout,
        )
        try:
            location = await self.flow.authorization_url(pending, origin + "/_tunnel/callback")
            await self.store.put_pending(pending)
        except SignInFailed as failure:
            return self._failed(failure)
        except SessionStoreUnavailable as exc:
            return self._store_down(request, "http_login", exc)
        response = redirect(location)
        response.set_cookie(
            LOGIN_COOKIE,
            pending.browser,
            max_age=int(self.config.session.login_timeout),
            **cookie_flags(),
        )
        return response

    async def callback(self, request: web.Request, origin: str) -> web.StreamResponse:
        if self.flow is None:
            return web.Response(status=404, text="Not found\n")
        browser = request.cookies.get(LOGIN_COOKIE, "")
        try:
            pending = await self.flow.take_pending(self.store, request.query, browser, origin)
            identity, claims = await self.flow.redeem(
                request.query, pending, origin + "/_tunnel/callback"
            )
        except SessionStoreUnavailable as exc:
            return self._store_down(request, "http_login", exc)
        except SignInFailed as failure:
            return self._failed(failure)
        return await self._new_session(request, origin, identity, claims, pending)

    async def _new_session(
        self,
        request: web.Request,
        origin: str,
        identity: Identity,
        claims: dict[str, Any],
        pending: PendingLogin,
    ) -> web.StreamResponse:
        now = self.clock()
        session = signed_in_session(identity, origin, claims, now, self.config.session.max_age)
        try:
            old = request.cookies.get(SESSION_COOKIE)
            if old and len(old) <= MAX_ID:
                await self.store.delete(old)
            await self.store.put(session)
        except SessionStoreUnavailable as exc:
            return self._store_down(request, "http_login", exc)
        except SessionTooLarge:
            failure = SignInFailed("id_token", "session too large")
            return self._failed(failure, identity.principal)
        self.audit.record("http_login", decision="allow", principal=identity.principal)
        response = redirect(pending.return_to)
        response.set_cookie(
            SESSION_COOKIE, session.sid, max_age=int(self.config.session.max_age), **cookie_flags()
        )
        response.del_cookie(LOGIN_COOKIE, **cookie_flags())
        return response

    async def sign_out(self, request: web.Request, origin: str) -> web.StreamResponse:
        sid = request.cookies.get(SESSION_COOKIE, "")
        try:
            session = await self.store.get(sid) if 0 < len(sid) <= MAX_ID else None
        except SessionStoreUnavailable as exc:
            return self._store_down(request, "http_logout", exc)
        if request.method == "GET":
            if session is None:
                return html_response(pages.signed_out())
            return html_response(pages.sign_out_confirm(session.csrf))
        if request.method != "POST":
            return web.Response(status=405, headers={"Allow": "GET, POST"})
        sent_origin = request.headers.get("Origin")
        if sent_origin is not None and sent_origin.lower() != origin:
            return json_response({"error": "cross-origin sign-out refused"}, 403)
        token = request.headers.get(CSRF_HEADER)
        if token is None and request.content_type == "application/x-www-form-urlencoded":
            if (request.content_length or 0) > 4096:
                return json_response({"error": "form too large"}, 413)
            form = await request.post()
            value = form.get("csrf")
            token = value if isinstance(value, str) else None
        if session is None:
            response = html_response(pages.signed_out())
        elif token is None or not hmac.compare_digest(token, session.csrf):
            self.audit.record(
                "http_logout", decision="deny", reason="bad csrf token",
                principal=session.identity.principal, status=403,
            )  # fmt: skip
            return json_response({"error": "invalid CSRF token"}, 403)
        else:
            try:
                await self.store.delete(session.sid)  # announced to every node
            except SessionStoreUnavailable as exc:
                # The session lives on: keep the cookie so that the user can retry.
                return self._store_down(request, "http_logout", exc)
            self._end_sessions({session_key(session.sid)})
            self.audit.record("http_logout", principal=session.identity.principal)
            response = html_response(pages.signed_out())
        response.del_cookie(SESSION_COOKIE, **cookie_flags())
        return response
