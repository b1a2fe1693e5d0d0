"""Who may use the console, and how they sign in: the same browser login as HTTP mode
(authorization code + PKCE S256 + state + nonce, a new random session id on every sign-in,
``__Host-`` cookies that are Secure, HttpOnly and SameSite=Lax), but only members with the admin
role get a session, and every request re-checks it (a policy change or a revocation takes the
console away at once). State-changing requests must come from the console's own origin
(``Origin`` and ``Sec-Fetch-Site``) and carry the session's CSRF token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import jwt
from aiohttp import web

from ..access.identity import AuthError, Identity, IssuerUnavailable, TokenVerifier
from ..audit import AuditLog
from ..config import ConsoleConfig
from ..web.paths import safe_return_path
from ..web.sessions import (
    PendingLogin,
    SessionStore,
    SessionStoreUnavailable,
    SessionTooLarge,
    WebSession,
)

SESSION_COOKIE = "__Host-tunnel_console"
LOGIN_COOKIE = "__Host-tunnel_console_login"
CSRF_HEADER = "X-Console-Csrf"
MAX_ID = 128  # longest session id or state accepted from a browser
PREFIX = "/console"


class Refusal(Exception):
    """The request may not go on: ``status`` and a short message for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Admin:
    """A signed-in admin: the session (its CSRF token) and the identity from the ID token."""

    session: WebSession

    @property
    def principal(self) -> str:
        return self.session.identity.principal

    @property
    def email(self) -> str:
        return self.session.identity.email or self.principal

    @property
    def csrf(self) -> str:
        return self.session.csrf


def redirect(location: str, status: int = 303) -> web.Response:
    return web.Response(status=status, headers={"Location": location, "Cache-Control": "no-store"})


def cookie_flags() -> dict[str, Any]:
    return {"secure": True, "httponly": True, "samesite": "Lax", "path": "/"}


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class ConsoleAuth:
    """Sign-in, callback, sign-out and the per-request checks. ``is_admin`` and
    ``is_revoked`` are the admin API's own checks; ``client`` returns the console's HTTP client
    (for discovery and the code exchange)."""

    def __init__(
        self,
        config: ConsoleConfig,
        *,
        store: SessionStore,
        verifier: TokenVerifier,
        is_admin: Callable[[Identity], bool],
        is_revoked: Callable[[Identity], bool],
        audit: AuditLog,
        client: Callable[[], aiohttp.ClientSession],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.origin = config.external_url
        self.store = store
        self._verifier = verifier
        self.is_admin = is_admin
        self.is_revoked = is_revoked
        self.audit = audit
        self._client = client
        self.clock = clock
        self._discovery: dict[str, Any] | None = None

    @property
    def redirect_uri(self) -> str:
        return self.origin + PREFIX + "/callback"

    # -- per request ----------------------------------------------------------------------------

    async def admin(self, request: web.Request) -> Admin | None:
        """The signed-in admin, or None (no session). Refusal(403) for a signed-in member who
        is no longer an admin or was revoked; Refusal(503) when the session store is down."""
        sid = request.cookies.get(SESSION_COOKIE, "")
        if not 0 < len(sid) <= MAX_ID:
            return None
        try:
            session = await self.store.get(sid)
        except SessionStoreUnavailable:
            raise Refusal(503, "The session store is unavailable; try again shortly.") from None
        if session is None or not hmac.compare_digest(session.origin, self.origin):
            return None
        identity = session.identity
        if self.is_revoked(identity) or not self.is_admin(identity):
            self.audit.record(
                "console", decision="deny", reason="not an admin", principal=identity.principal,
                path=request.path[:200], status=403,
            )  # fmt: skip
            raise Refusal(403, "The console is for relay admins only.")
        return Admin(session)

    def check_post(self, request: web.Request, admin: Admin, token: str | None) -> None:
        """A state-changing request: from the console's origin, with the session's CSRF token
        (audited and Refusal(403) otherwise)."""
        origin = request.headers.get("Origin")
        site = request.headers.get("Sec-Fetch-Site")
        reason = None
        if origin is not None and origin.lower() != self.origin:
            reason = "cross-origin request"
        elif site is not None and site not in ("same-origin", "none"):
            reason = "cross-site request"
        elif token is None or not hmac.compare_digest(token, admin.csrf):
            reason = "bad csrf token"
        if reason is not None:
            self.audit.record(
                "console", decision="deny", reason=reason, principal=admin.principal,
                path=request.path[:200], status=403,
            )  # fmt: skip
            raise Refusal(403, "Request refused: it did not come from this console.")

    # -- sign-in --------------------------------------------------------------------------------

    async def _discover(self) -> dict[str, Any]:
        if self._discovery is None:
            url = self.config.login.issuer.rstrip("/") + "/.well-known/openid-configuration"
            timeout = aiohttp.ClientTimeout(total=10)
            async with self._client().get(url, timeout=timeout) as resp:
                resp.raise_for_status()
                document = await resp.json()
            if not isinstance(document, dict) or document.get("issuer") != self.config.login.issuer:
                raise ValueError("discovery document names another issuer")
            self._discovery = document
        return self._discovery

    async def sign_in(self, request: web.Request) -> web.StreamResponse:
        """Redirect to the identity provider (``rd``: where to come back, on this origin)."""
        try:
            discovery = await self._discover()
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            raise Refusal(503, "The identity provider cannot be reached.") from None
        verifier, challenge = _pkce()
        rd = safe_return_path(request.query.get("rd"), self.origin)
        pending = PendingLogin(
            state=secrets.token_urlsafe(24),
            nonce=secrets.token_urlsafe(24),
            verifier=verifier,
            return_to=rd if rd.startswith(PREFIX + "/") else PREFIX + "/",
            host=self.origin,
            browser=secrets.token_urlsafe(24),
            expires=self.clock() + self.config.session.login_timeout,
        )
        try:
            await self.store.put_pending(pending)
        except SessionStoreUnavailable:
            raise Refusal(503, "The session store is unavailable; try again shortly.") from None
        login = self.config.login
        params = {
            "response_type": "code",
            "client_id": login.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": " ".join(login.scopes),
            "state": pending.state,
            "nonce": pending.nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        location = str(discovery["authorization_endpoint"]) + "?" + urlencode(params)
        response = redirect(location, 302)
        max_age = int(self.config.session.login_timeout)
        response.set_cookie(LOGIN_COOKIE, pending.browser, max_age=max_age, **cookie_flags())
        return response

    async def callback(self, request: web.Request) -> web.StreamResponse:
        """Redeem the code; a session only for an admin."""
        state = request.query.get("state", "")
        try:
            pending = await self.store.pop_pending(state) if 0 < len(state) <= MAX_ID else None
        except SessionStoreUnavailable:
            raise Refusal(503, "The session store is unavailable; try again shortly.") from None
        browser = request.cookies.get(LOGIN_COOKIE, "")
        if (
            pending is None
            or not hmac.compare_digest(pending.browser, browser)
            or pending.host != self.origin  # a pending HTTP-mode login (a shared store)
        ):
            self._deny("bad state", 400)
            raise Refusal(400, "This sign-in link is invalid or has expired.")
        if "error" in request.query or "code" not in request.query:
            self._deny("idp refused", 401)
            raise Refusal(401, "The identity provider did not sign you in.")
        try:
            identity, claims = await self._redeem(request.query["code"], pending)
        except IssuerUnavailable:
            raise Refusal(503, "The identity provider cannot be reached.") from None
        except (TimeoutError, AuthError, ValueError, aiohttp.ClientError, OSError) as exc:
            self._deny(exc.reason if isinstance(exc, AuthError) else type(exc).__name__, 401)
            raise Refusal(401, "Sign-in could not be completed.") from None
        if self.is_revoked(identity) or not self.is_admin(identity):
            self._deny("not an admin", 403, identity.principal)
            raise Refusal(403, "The console is for relay admins only.")
        return await self._new_session(request, identity, claims, pending)

    async def _new_session(
        self,
        request: web.Request,
        identity: Identity,
        claims: dict[str, Any],
        pending: PendingLogin,
    ) -> web.StreamResponse:
        now = self.clock()
        auth_time = claims.get("auth_time")
        session = WebSession(
            sid=secrets.token_urlsafe(32),  # always a new id on sign-in (session fixation)
            identity=identity,
            origin=self.origin,
            created=now,
            auth_time=float(auth_time) if isinstance(auth_time, int | float) else now,
            expires=now + self.config.session.max_age,
        )
        try:
            old = request.cookies.get(SESSION_COOKIE)
            if old and len(old) <= MAX_ID:
                await self.store.delete(old)
            await self.store.put(session)
        except SessionStoreUnavailable:
            raise Refusal(503, "The session store is unavailable; try again shortly.") from None
        except SessionTooLarge:
            self._deny("session too large", 401, identity.principal)
            raise Refusal(401, "Sign-in could not be completed.") from None
        self.audit.record(
            "console", action="sign_in", decision="allow", principal=identity.principal
        )
        response = redirect(pending.return_to)
        max_age = int(self.config.session.max_age)
        response.set_cookie(SESSION_COOKIE, session.sid, max_age=max_age, **cookie_flags())
        response.del_cookie(LOGIN_COOKIE, **cookie_flags())
        return response

    def _deny(self, reason: str, status: int, principal: str | None = None) -> None:
        self.audit.record(
            "console", action="sign_in", decision="deny", reason=reason, status=status,
            principal=principal,
        )  # fmt: skip

    async def _redeem(self, code: str, pending: PendingLogin) -> tuple[Identity, dict[str, Any]]:
        discovery = await self._discover()
        login = self.config.login
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": pending.verifier,
        }
        pair = f"{quote(login.client_id, safe='')}:{quote(login.client_secret, safe='')}"
        basic = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        async with self._client().post(
            str(discovery["token_endpoint"]),
            data=form,
            headers={"Authorization": basic},
            timeout=aiohttp.ClientTimeout(total=15),
        ) as resp:
            if resp.status != 200:
                raise AuthError("code exchange refused")
            tokens = await resp.json()
        id_token = tokens.get("id_token") if isinstance(tokens, dict) else None
        if not isinstance(id_token, str):
            raise AuthError("no id token")
        identity = await self._verifier.verify(id_token)
        # Verified above; read the claims the Identity does not carry (nonce, auth_time).
        claims: dict[str, Any] = jwt.decode(id_token, options={"verify_signature": False})
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or not hmac.compare_digest(nonce, pending.nonce):
            raise AuthError("bad nonce")
        return identity, claims

    async def sign_out(self, request: web.Request, admin: Admin) -> web.StreamResponse:
        """POST with the CSRF token: the session ends (on every node sharing the store)."""
        try:
            await self.store.delete(admin.session.sid)
        except SessionStoreUnavailable:
            raise Refusal(503, "The session store is unavailable; try again shortly.") from None
        self.audit.record("console", action="sign_out", decision="allow", principal=admin.principal)
        response = redirect(PREFIX + "/signed_out")
        response.del_cookie(SESSION_COOKIE, **cookie_flags())
        return response
