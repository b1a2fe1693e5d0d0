"""Browser sign-in, callback and sign-out (docs/http-mode.md, "Browser sign-in and sessions"):
authorization code + PKCE S256 + state + nonce against the login issuer, a new random session
id on every login, sign-out with the session's CSRF token. Sessions and pending logins live in
the ``SessionStore``; when it is unavailable every step answers 503 (nothing half done)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import jwt
from aiohttp import web

from ..access.identity import AuthError, Identity, IssuerUnavailable, TokenVerifier
from ..audit import AuditLog
from ..config import HttpModeConfig
from . import pages
from .paths import safe_return_path
from .responses import html_response, json_response, redirect, store_unavailable
from .sessions import (
    PendingLogin,
    SessionStore,
    SessionStoreUnavailable,
    SessionTooLarge,
    WebSession,
    session_key,
)

SESSION_COOKIE = "__Host-tunnel_session"
LOGIN_COOKIE = "__Host-tunnel_login"
CSRF_HEADER = "X-Tunnel-Csrf"
MAX_ID = 128  # longest session id or state accepted from a browser


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def cookie_flags() -> dict[str, Any]:
    return {"secure": True, "httponly": True, "samesite": "Lax", "path": "/"}


class BrowserLogin:
    """The ``/_tunnel/sign_in``, ``callback`` and ``sign_out`` handlers. ``client`` returns the
    proxy's HTTP client (made at start); ``end_sessions`` closes this node's WebSockets and
    streams bound to the given session keys (other nodes learn it from the store)."""

    def __init__(
        self,
        config: HttpModeConfig,
        *,
        store: SessionStore,
        audit: AuditLog,
        verifier: TokenVerifier | None,
        client: Callable[[], aiohttp.ClientSession | None],
        end_sessions: Callable[[set[str]], object],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.audit = audit
        self._verifier = verifier
        self._client = client
        self._end_sessions = end_sessions
        self.clock = clock
        self._discovery: dict[str, Any] | None = None

    def _http(self) -> aiohttp.ClientSession:
        client = self._client()
        if client is None:
            raise RuntimeError("HTTP mode is not started")
        return client

    def _store_down(self, request: web.Request, event: str, exc: Exception) -> web.Response:
        self.audit.record(event, decision="deny", reason=str(exc), status=503)
        return store_unavailable(request)

    async def _discover(self) -> dict[str, Any]:
        login = self.config.login
        if login is None:
            raise RuntimeError("HTTP mode has no browser login")
        if self._discovery is None:
            url = login.issuer.rstrip("/") + "/.well-known/openid-configuration"
            async with self._http().get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                resp.raise_for_status()
                document = await resp.json()
            if not isinstance(document, dict) or document.get("issuer") != login.issuer:
                raise ValueError("discovery document names another issuer")
            self._discovery = document
        return self._discovery

    async def sign_in(self, request: web.Request, origin: str) -> web.StreamResponse:
        login = self.config.login
        if login is None:
            return html_response(
                pages.page("Sign-in unavailable", "<p>Use a bearer token.</p>"), 404
            )
        try:
            discovery = await self._discover()
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return html_response(
                pages.login_failed("The identity provider cannot be reached."), 503
            )
        verifier, challenge = _pkce()
        browser = secrets.token_urlsafe(24)
        pending = PendingLogin(
            state=secrets.token_urlsafe(24),
            nonce=secrets.token_urlsafe(24),
            verifier=verifier,
            return_to=safe_return_path(request.query.get("rd"), origin),
            host=origin,
            browser=browser,
            expires=self.clock() + self.config.session.login_timeout,
        )
        try:
            await self.store.put_pending(pending)
        except SessionStoreUnavailable as exc:
            return self._store_down(request, "http_login", exc)
        params = {
            "response_type": "code",
            "client_id": login.client_id,
            "redirect_uri": origin + "/_tunnel/callback",
            "scope": " ".join(login.scopes),
            "state": pending.state,
            "nonce": pending.nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        if self.config.session.reauth_max_age is not None:
            params["max_age"] = str(int(self.config.session.reauth_max_age))
        response = redirect(str(discovery["authorization_endpoint"]) + "?" + urlencode(params))
        response.set_cookie(
            LOGIN_COOKIE,
            browser,
            max_age=int(self.config.session.login_timeout),
            **cookie_flags(),
        )
        return response

    async def callback(self, request: web.Request, origin: str) -> web.StreamResponse:
        login = self.config.login
        if login is None or self._verifier is None:
            return web.Response(status=404, text="Not found\n")
        state = request.query.get("state", "")
        try:
            pending = await self.store.pop_pending(state) if 0 < len(state) <= MAX_ID else None
        except SessionStoreUnavailable as exc:
            return self._store_down(request, "http_login", exc)
        browser = request.cookies.get(LOGIN_COOKIE, "")
        if (
            pending is None
            or not hmac.compare_digest(pending.browser, browser)
            or pending.host != origin
        ):
            self.audit.record("http_login", decision="deny", reason="bad state", status=400)
            return html_response(
                pages.login_failed("This sign-in link is invalid or has expired."), 400
            )
        if "error" in request.query or "code" not in request.query:
            self.audit.record("http_login", decision="deny", reason="idp refused", status=401)
            return html_response(
                pages.login_failed("The identity provider did not sign you in."), 401
            )
        try:
            discovery = await self._discover()
            identity, claims = await self._redeem(discovery, request.query["code"], pending, origin)
        except IssuerUnavailable:
            return html_response(
                pages.login_failed("The identity provider cannot be reached."), 503
            )
        except (TimeoutError, AuthError, ValueError, aiohttp.ClientError, OSError) as exc:
            reason = exc.reason if isinstance(exc, AuthError) else type(exc).__name__
            self.audit.record("http_login", decision="deny", reason=reason, status=401)
            return html_response(pages.login_failed("Sign-in could not be completed."), 401)
        now = self.clock()
        auth_time = claims.get("auth_time")
        session = WebSession(
            sid=secrets.token_urlsafe(32),  # always a new id on login (session fixation)
            identity=identity,
            origin=origin,
            created=now,
            auth_time=float(auth_time) if isinstance(auth_time, int | float) else now,
            expires=now + self.config.session.max_age,
        )
        try:
            old = request.cookies.get(SESSION_COOKIE)
            if old and len(old) <= MAX_ID:
                await self.store.delete(old)
            await self.store.put(session)
        except SessionStoreUnavailable as exc:
            return self._store_down(request, "http_login", exc)
        except SessionTooLarge:
            self.audit.record(
                "http_login", decision="deny", reason="session too large",
                principal=identity.principal, status=401,
            )  # fmt: skip
            return html_response(pages.login_failed("Sign-in could not be completed."), 401)
        self.audit.record("http_login", decision="allow", principal=identity.principal)
        response = redirect(pending.return_to)
        response.set_cookie(
            SESSION_COOKIE, session.sid, max_age=int(self.config.session.max_age), **cookie_flags()
        )
        response.del_cookie(LOGIN_COOKIE, **cookie_flags())
        return response

    async def _redeem(
        self, discovery: dict[str, Any], code: str, pending: PendingLogin, origin: str
    ) -> tuple[Identity, dict[str, Any]]:
        login, verifier = self.config.login, self._verifier
        if login is None or verifier is None:
            raise RuntimeError("HTTP mode has no browser login")
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": origin + "/_tunnel/callback",
            "code_verifier": pending.verifier,
        }
        pair = f"{quote(login.client_id, safe='')}:{quote(login.client_secret, safe='')}"
        basic = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        async with self._http().post(
            str(discovery["token_endpoint"]),
            data=form,
            headers={"Authorization": basic, "Content-Type": "application/x-www-form-urlencoded"},
            timeout=aiohttp.ClientTimeout(total=15),
        ) as resp:
            if resp.status != 200:
                raise AuthError("code exchange refused")
            tokens = await resp.json()
        id_token = tokens.get("id_token") if isinstance(tokens, dict) else None
        if not isinstance(id_token, str):
            raise AuthError("no id token")
        identity = await verifier.verify(id_token)
        # Verified above; read the claims the Identity does not carry (nonce, auth_time).
        claims: dict[str, Any] = jwt.decode(id_token, options={"verify_signature": False})
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or not hmac.compare_digest(nonce, pending.nonce):
            raise AuthError("bad nonce")
        return identity, claims

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
