"""Who may use the console, and how they sign in: the same browser login as HTTP mode
(web.oidc_code on authlib: authorization code + PKCE S256 + state + nonce, the same failure
pages with a reference; a new random session id on every sign-in,
``__Host-`` cookies that are Secure, HttpOnly and SameSite=Lax), but only members with the admin
role get a session, and every request re-checks it (a policy change or a revocation takes the
console away at once). State-changing requests must come from the console's own origin
(``Origin`` and ``Sec-Fetch-Site``) and carry the session's CSRF token."""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..access.identity import Identity, TokenVerifier
from ..audit import AuditLog
from ..config import ConsoleConfig
from ..web.oidc_code import CodeFlow, SignInFailed
from ..web.pages import sign_in_failure
from ..web.paths import safe_return_path
from ..web.sessions import (
    PendingLogin,
    SessionStore,
    SessionStoreUnavailable,
    SessionTooLarge,
    WebSession,
    signed_in_session,
)

SESSION_COOKIE = "__Host-tunnel_console"
LOGIN_COOKIE = "__Host-tunnel_console_login"
CSRF_HEADER = "X-Console-Csrf"
MAX_ID = 128  # longest session id or state accepted from a browser
PREFIX = "/console"


class Refusal(Exception):
    """The request may not go on: ``status`` and a short message for the page; a failed
    sign-in adds what to do and the reference its audit record carries."""

    def __init__(
        self, status: int, message: str, *, hint: str | None = None, reference: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.hint = hint
        self.reference = reference


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


class ConsoleAuth:
    """Sign-in, callback, sign-out and the per-request checks. ``is_admin`` and
    ``is_revoked`` are the admin API's own checks; ``verifier`` checks ID tokens for the login
    client's audience."""

    def __init__(
        self,
        config: ConsoleConfig,
        *,
        store: SessionStore,
        verifier: TokenVerifier,
        is_admin: Callable[[Identity], bool],
        is_revoked: Callable[[Identity], bool],
        audit: AuditLog,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.origin = config.external_url
        self.store = store
        self.flow = CodeFlow(config.login, verifier, clock=clock)
        self.is_admin = is_admin
        self.is_revoked = is_revoked
        self.audit = audit
        self.clock = clock

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

    async def sign_in(self, request: web.Request) -> web.StreamResponse:
        """Redirect to the identity provider (``rd``: where to come back, on this origin)."""
        rd = safe_return_path(request.query.get("rd"), self.origin)
        pending = self.flow.pending(
            return_to=rd if rd.startswith(PREFIX + "/") else PREFIX + "/",
            host=self.origin,
            lifetime=self.config.session.login_timeout,
        )
        try:
            location = await self.flow.authorization_url(pending, self.redirect_uri)
            await self.store.put_pending(pending)
        except SignInFailed as failure:
            raise self._failed(failure) from None
        except SessionStoreUnavailable:
            raise Refusal(503, "The session store is unavailable; try again shortly.") from None
        response = redirect(location, 302)
        max_age = int(self.config.session.login_timeout)
        response.set_cookie(LOGIN_COOKIE, pending.browser, max_age=max_age, **cookie_flags())
        return response

    async def callback(self, request: web.Request) -> web.StreamResponse:
        """Redeem the code; a session only for an admin."""
        browser = request.cookies.get(LOGIN_COOKIE, "")
        try:
            pending = await self.flow.take_pending(self.store, request.query, browser, self.origin)
            identity, claims = await self.flow.redeem(request.query, pending, self.redirect_uri)
        except SessionStoreUnavailable:
            raise Refusal(503, "The session store is unavailable; try again shortly.") from None
        except SignInFailed as failure:
            raise self._failed(failure) from None
        if self.is_revoked(identity) or not self.is_admin(identity):
            refused = SignInFailed("not_allowed", "not an admin")
            raise self._failed(refused, identity.principal, "The console is for relay admins only.")
        return await self._new_session(request, identity, claims, pending)

    def _failed(
        self, failure: SignInFailed, principal: str | None = None, message: str | None = None
    ) -> Refusal:
        """The Refusal for a failed sign-in (HTTP mode's texts), audited with its reference."""
        reference = secrets.token_hex(8)
        status, what, todo = sign_in_failure(failure)
        self.audit.record(
            "console", action="sign_in", decision="deny", reason=failure.detail,
            failure=failure.kind, reference=reference, status=status, principal=principal,
        )  # fmt: skip
        return Refusal(status, message or what, hint=todo, reference=reference)

    async def _new_session(
        self,
        request: web.Request,
        identity: Identity,
        claims: dict[str, Any],
        pending: PendingLogin,
    ) -> web.StreamResponse:
        now = self.clock()
        session = signed_in_session(identity, self.origin, claims, now, self.config.session.max_age)
        try:
            old = request.cookies.get(SESSION_COOKIE)
            if old and len(old) <= MAX_ID:
                await self.store.delete(old)
            await self.store.put(session)
        except SessionStoreUnavailable:
            raise Refusal(503, "The session store is unavailable; try again shortly.") from None
        except SessionTooLarge:
            too_large = SignInFailed("id_token", "session too large")
            raise self._failed(too_large, identity.principal) from None
        self.audit.record(
            "console", action="sign_in", decision="allow", principal=identity.principal
        )
        response = redirect(pending.return_to)
        max_age = int(self.config.session.max_age)
        response.set_cookie(SESSION_COOKIE, session.sid, max_age=max_age, **cookie_flags())
        response.del_cookie(LOGIN_COOKIE, **cookie_flags())
        return response

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
