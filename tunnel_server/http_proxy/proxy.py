"""HTTP mode: an identity-aware reverse proxy on its own listener (aiohttp server and client).

Every request: normalize host and path (400 when ambiguous), pick the route, authenticate
(bearer token for the app's audience, or the browser session), decide ``app:NAME`` with role
``webUser`` on the normalized host and path, then forward exactly one request with the client's
identity headers replaced by a signed assertion. Bodies stream both ways; WebSockets pass
through after an Origin check; open WebSockets and streams are re-decided on policy change,
revocation and every ``recheck_interval``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import jwt
from aiohttp import web
from yarl import URL

from tunnel_protocol.aio.wsbridge import forward_messages

from ..audit import AuditLog
from ..config import OidcConfig
from ..identity import (
    DEFAULT_ALGORITHMS,
    Authenticator,
    AuthError,
    Identity,
    IssuerUnavailable,
    OidcVerifier,
)
from ..policy import WEB_USER, AccessRequest, Policy, access_levels_met, evaluate
from . import pages
from .assertion import AssertionSigner
from .config import HttpModeConfig, RouteConfig
from .headers import (
    ASSERTION_HEADER,
    EMAIL_HEADER,
    ID_HEADER,
    client_address,
    response_headers,
    upstream_headers,
)
from .paths import BadRequest, normalize_host, normalize_path, safe_return_path
from .sessions import MemorySessionStore, PendingLogin, SessionStore, WebSession

log = logging.getLogger("tunnel.http")

SESSION_COOKIE = "__Host-tunnel_session"
LOGIN_COOKIE = "__Host-tunnel_login"
CSRF_HEADER = "X-Tunnel-Csrf"
RESERVED = "/_tunnel/"
JWKS_PATH = "/.well-known/tunnel/jwks.json"
CHUNK = 64 * 1024
WS_MAX_MESSAGE = 4 * 1024 * 1024


@dataclass(eq=False)
class _Active:
    """An open WebSocket or streaming response, re-decided while it lasts."""

    route: RouteConfig
    identity: Identity
    session_id: str | None
    request: AccessRequest
    close: Callable[[], None]


@dataclass
class _Caller:
    identity: Identity
    session: WebSession | None = None
    consumed_authorization: bool = False


class _Reply(Exception):
    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(data),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(
        text=body,
        status=status,
        content_type="text/html",
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
            "form-action 'self'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
        },
    )


def wants_html(request: web.Request) -> bool:
    """A top-level browser navigation (may be redirected to sign-in); XHR, fetch() and
    non-HTML clients get 401 instead."""
    if request.method not in ("GET", "HEAD"):
        return False
    if request.headers.get("X-Requested-With", "").lower() == "xmlhttprequest":
        return False
    mode = request.headers.get("Sec-Fetch-Mode")
    if mode is not None and mode.lower() != "navigate":
        return False
    return "text/html" in request.headers.get("Accept", "").lower()


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class HttpProxy:
    """The HTTP-mode server. ``policy`` returns the policy in force (the relay's); ``is_revoked``
    is the relay's revocation check. Call ``redecide_all()`` after a policy change and
    ``revoke_user(principal)`` when an admin revokes someone."""

    def __init__(
        self,
        config: HttpModeConfig,
        *,
        issuers: Sequence[OidcConfig],
        policy: Callable[[], Policy],
        audit: AuditLog,
        is_revoked: Callable[[Identity], bool] = lambda identity: False,
        store: SessionStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.policy = policy
        self.audit = audit
        self.is_revoked = is_revoked
        self.store: SessionStore = store or MemorySessionStore(clock)
        self.clock = clock
        self.signer = AssertionSigner(
            config.issuer_url, lifetime=config.assertion_lifetime, rotation=config.key_rotation
        )
        self._issuers = {o.issuer: o for o in issuers}
        self._authenticators: dict[str, Authenticator] = {}
        for route in config.routes:
            if route.audiences:
                self._authenticators[route.name] = Authenticator(
                    [self._verifier(o, route.audiences) for o in issuers]
                )
        self._login_verifier: OidcVerifier | None = None
        if config.login is not None:
            base = self._issuers.get(config.login.issuer) or OidcConfig(
                issuer=config.login.issuer, audiences=[config.login.client_id]
            )
            self._login_verifier = self._verifier(base, [config.login.client_id])
        # Longest path prefix first, per host.
        self._routes = sorted(config.routes, key=lambda r: (r.host, -len(r.path_prefix)))
        self._active: set[_Active] = set()
        self._client: aiohttp.ClientSession | None = None
        self._discovery: dict[str, Any] | None = None
        self._recheck: asyncio.Task[None] | None = None
        self.app = web.Application(client_max_size=0)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    @staticmethod
    def _verifier(oidc: OidcConfig, audiences: Sequence[str]) -> OidcVerifier:
        return OidcVerifier(
            oidc.issuer,
            audiences,
            algorithms=tuple(oidc.algorithms) if oidc.algorithms else DEFAULT_ALGORITHMS,
            leeway=oidc.leeway,
            max_lifetime=oidc.max_token_lifetime,
            jwks_ttl=oidc.jwks_ttl,
            groups_claim=oidc.groups_claim,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._client = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),  # never share upstream cookies across users
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.config.upstream_timeout, sock_read=None
            ),
            connector=aiohttp.TCPConnector(limit=0, use_dns_cache=True),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        self._recheck = asyncio.create_task(self._recheck_loop())

    async def aclose(self) -> None:
        if self._recheck is not None:
            self._recheck.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recheck
        for active in list(self._active):
            active.close()
        if self._client is not None:
            await self._client.close()
        for authenticator in self._authenticators.values():
            await authenticator.aclose()
        if self._login_verifier is not None:
            await self._login_verifier.aclose()

    async def _recheck_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.recheck_interval)
            self.signer.maybe_rotate()
            self.redecide_all()

    # -- continuous authorization -------------------------------------------------------------

    def redecide_all(self) -> int:
        """Re-decide every open WebSocket and streaming response against the policy in force,
        revocations, session state and credential expiry; close those no longer allowed."""
        closed = 0
        now = self.clock()
        policy = self.policy()
        for active in list(self._active):
            reason: str | None = None
            if self.is_revoked(active.identity):
                reason = "revoked"
            elif active.session_id is not None and self.store.get(active.session_id) is None:
                reason = "session ended"
            elif active.session_id is None and active.identity.valid_until < now:
                reason = "credential expired"
            else:
                decision = evaluate(active.request, policy, now)
                if not decision.allowed:
                    reason = decision.reason
            if reason is not None:
                self._active.discard(active)
                self.audit.record(
                    "http_close",
                    principal=active.identity.principal,
                    app=active.route.name,
                    reason=reason,
                )
                active.close()
                closed += 1
        return closed

    def revoke_user(self, principal: str) -> int:
        """End the principal's browser sessions and close their open streams."""
        self.store.delete_principal(principal)
        closed = 0
        for active in list(self._active):
            if active.identity.principal == principal:
                self._active.discard(active)
                active.close()
                closed += 1
        return closed

    # -- request handling ------------------------------------------------------------------------

    def _route(self, host: str, path: str) -> RouteConfig | None:
        for route in self._routes:
            if route.host != host:
                continue
            prefix = route.path_prefix.rstrip("/")
            if not prefix or path == prefix or path.startswith(prefix + "/"):
                return route
        return None

    def _origin(self, host: str, port: int | None) -> str:
        scheme = self.config.external_scheme
        default = 443 if scheme == "https" else 80
        return f"{scheme}://{host}" + (f":{port}" if port and port != default else "")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._handle(request)
        except _Reply as reply:
            return reply.response

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            host, port = normalize_host(request.headers.get("Host"))
            raw_path, _, query = request.raw_path.partition("?")
            path = normalize_path(raw_path)
        except BadRequest as exc:
            self.audit.record("http", decision="deny", reason=f"bad request: {exc}", status=400)
            return web.Response(status=400, text=f"Bad request: {exc}\n")
        if path.decoded == JWKS_PATH:
            return _json(self.signer.jwks(), headers={"Cache-Control": "public, max-age=300"})
        route = self._route(host, path.decoded)
        if route is None:
            return web.Response(status=404, text="Not found\n")
        origin = self._origin(host, port)
        if path.decoded.startswith(RESERVED) or path.decoded == RESERVED.rstrip("/"):
            return await self._reserved(request, route, origin, path.decoded)
        caller = await self._authenticate(request, route, origin)
        if caller is None:
            return self._unauthenticated(request, raw_path + (f"?{query}" if query else ""))
        peer = request.remote
        source_ip, xff = client_address(
            peer, request.headers.getall("X-Forwarded-For", []), self.config.trusted_proxies
        )
        upstream = URL(route.upstream)
        access = AccessRequest(
            caller.identity.members,
            f"app:{route.name}",
            upstream.port or 80,
            source_ip=source_ip,
            principal=caller.identity.principal,
            role=WEB_USER,
            request_host=host,
            request_path=path.decoded.lower() if route.path_case == "insensitive" else path.decoded,
            claims={
                "sub": caller.identity.subject,
                "iss": caller.identity.issuer,
                "email": caller.identity.email or "",
                "groups": list(caller.identity.groups),
            },
        )
        policy, now = self.policy(), self.clock()
        decision = evaluate(access, policy, now)
        request_id = secrets.token_hex(8)
        self.audit.record(
            "http",
            decision="allow" if decision.allowed else "deny",
            reason=decision.reason,
            binding=decision.binding,
            principal=caller.identity.principal,
            app=route.name,
            host=host,
            path=path.decoded,
            method=request.method,
            source_ip=source_ip,
            request_id=request_id,
            via="session" if caller.session else "bearer",
        )
        if not decision.allowed:
            return self._denied(request, caller, request_id)
        identity_headers = {
            ASSERTION_HEADER: self.signer.sign(
                audience=route.audience,
                subject=caller.identity.subject,
                email=caller.identity.email,
                groups=caller.identity.groups,
                principal=caller.identity.principal,
                access_levels=access_levels_met(access, policy, now),
            ),
            EMAIL_HEADER: caller.identity.email or "",
            ID_HEADER: f"{caller.identity.issuer}#{caller.identity.subject}",
        }
        headers = upstream_headers(
            request.headers,
            consumed_authorization=caller.consumed_authorization,
            identity=identity_headers,
            forwarded_for=xff,
            proto=self.config.external_scheme,
            host=request.headers.get("Host", host),
        )
        headers.popall("Expect", None)
        target = URL(route.upstream + path.raw + (f"?{query}" if query else ""), encoded=True)
        if self._is_websocket(request):
            return await self._websocket(request, route, origin, caller, access, target, headers)
        return await self._forward(request, route, caller, access, target, headers)

    @staticmethod
    def _is_websocket(request: web.Request) -> bool:
        return (
            request.method == "GET"
            and request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in request.headers.get("Connection", "").lower()
        )

    async def _authenticate(
        self, request: web.Request, route: RouteConfig, origin: str
    ) -> _Caller | None:
        proxy_token = _bearer(request.headers.get("Proxy-Authorization"))
        auth_token = None if proxy_token else _bearer(request.headers.get("Authorization"))
        token = proxy_token or auth_token
        if token is not None:
            authenticator = self._authenticators.get(route.name)
            if authenticator is None:
                self._refuse(route, "bearer tokens not accepted for this app")
            assert authenticator is not None
            try:
                identity = await authenticator.verify(token)
            except IssuerUnavailable:
                raise _Reply(
                    _json({"error": "identity provider unavailable"}, 503, {"Retry-After": "5"})
                ) from None
            except AuthError as exc:
                self._refuse(route, exc.reason)
            if self.is_revoked(identity):
                self._refuse(route, "revoked")
            return _Caller(identity, consumed_authorization=auth_token is not None)
        sid = request.cookies.get(SESSION_COOKIE)
        if not sid or len(sid) > 128:
            return None
        session = self.store.get(sid)
        if session is None or not hmac.compare_digest(session.origin, origin):
            return None
        reauth = self.config.session.reauth_max_age
        if reauth is not None and self.clock() - session.auth_time > reauth:
            self.store.delete(sid)
            return None
        if self.is_revoked(session.identity):
            self.store.delete(sid)
            return None
        return _Caller(session.identity, session=session)

    def _refuse(self, route: RouteConfig, reason: str) -> None:
        self.audit.record("http", decision="deny", reason=reason, app=route.name, status=401)
        raise _Reply(
            _json(
                {"error": "authentication required"},
                401,
                {"WWW-Authenticate": 'Bearer realm="tunnel", error="invalid_token"'},
            )
        )

    def _unauthenticated(self, request: web.Request, target: str) -> web.StreamResponse:
        if self.config.login is not None and wants_html(request):
            return _redirect("/_tunnel/sign_in?" + urlencode({"rd": target}))
        return _json(
            {"error": "authentication required"}, 401, {"WWW-Authenticate": 'Bearer realm="tunnel"'}
        )

    def _denied(self, request: web.Request, caller: _Caller, request_id: str) -> web.Response:
        if wants_html(request):
            csrf = caller.session.csrf if caller.session else None
            who = caller.identity.email or caller.identity.principal
            return _html(pages.denied(who, request_id, csrf), 403)
        return _json({"error": "access denied", "request_id": request_id}, 403)

    # -- forwarding ----------------------------------------------------------------------------

    def _track(
        self, route: RouteConfig, caller: _Caller, access: AccessRequest, close: Callable[[], None]
    ) -> _Active:
        active = _Active(
            route, caller.identity, caller.session.sid if caller.session else None, access, close
        )
        self._active.add(active)
        return active

    async def _forward(
        self,
        request: web.Request,
        route: RouteConfig,
        caller: _Caller,
        access: AccessRequest,
        target: URL,
        headers: Any,
    ) -> web.StreamResponse:
        assert self._client is not None
        body = request.content if request.body_exists else None
        try:
            upstream = await self._client.request(
                request.method,
                target,
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=None,
            )
        except (TimeoutError, aiohttp.ClientError, OSError):
            return web.Response(status=502, text="Bad gateway: the application did not answer\n")
        response: web.StreamResponse | None = None
        transport = request.transport

        def close() -> None:
            upstream.close()
            if transport is not None:
                transport.close()

        active = self._track(route, caller, access, close)
        try:
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=response_headers(upstream.headers, authenticated=True),
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await response.write(chunk)
            await response.write_eof()
            return response
        except (TimeoutError, aiohttp.ClientError, ConnectionError):
            if response is None or not response.prepared:
                return web.Response(status=502, text="Bad gateway\n")
            if transport is not None:
                transport.close()
            return response
        finally:
            self._active.discard(active)
            upstream.release()

    async def _websocket(
        self,
        request: web.Request,
        route: RouteConfig,
        origin: str,
        caller: _Caller,
        access: AccessRequest,
        target: URL,
        headers: Any,
    ) -> web.StreamResponse:
        assert self._client is not None
        if not route.websockets:
            return _json({"error": "WebSockets are not enabled for this app"}, 403)
        sent_origin = request.headers.get("Origin")
        # Cross-site WebSocket hijacking: a browser (cookie) upgrade must come from the app's own
        # origin; bearer clients may omit Origin but not send a foreign one.
        if (sent_origin is not None and sent_origin.lower() != origin) or (
            sent_origin is None and caller.session is not None
        ):
            self.audit.record(
                "http", decision="deny", reason="websocket origin not allowed", app=route.name,
                principal=caller.identity.principal, status=403,
            )  # fmt: skip
            return _json({"error": "origin not allowed"}, 403)
        protocols = [
            p.strip()
            for v in request.headers.getall("Sec-WebSocket-Protocol", [])
            for p in v.split(",")
            if p.strip()
        ]
        for name in list(headers.keys()):
            if name.lower().startswith("sec-websocket-"):
                headers.popall(name, None)
        ws_target = target.with_scheme("wss" if target.scheme == "https" else "ws")
        try:
            upstream = await self._client.ws_connect(
                ws_target,
                headers=headers,
                protocols=protocols,
                autoping=True,
                max_msg_size=WS_MAX_MESSAGE,
                compress=0,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5),
            )
        except (TimeoutError, aiohttp.ClientError, OSError):
            return web.Response(status=502, text="Bad gateway: the application refused\n")
        server = web.WebSocketResponse(
            protocols=[upstream.protocol] if upstream.protocol else (),
            max_msg_size=WS_MAX_MESSAGE,
            compress=False,
            heartbeat=30,
        )
        await server.prepare(request)
        tasks: list[asyncio.Task[None]] = []

        def close() -> None:
            for task in tasks:
                task.cancel()

        active = self._track(route, caller, access, close)

        try:
            tasks += [
                asyncio.create_task(forward_messages(server, upstream)),
                asyncio.create_task(forward_messages(upstream, server)),
            ]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            revoked = active not in self._active
        finally:
            self._active.discard(active)
            for task in tasks:
                task.cancel()
        code = aiohttp.WSCloseCode.POLICY_VIOLATION if revoked else aiohttp.WSCloseCode.OK
        await upstream.close()
        await server.close(code=code, message=b"access revoked" if revoked else b"")
        return server

    # -- reserved paths: sign-in, callback, sign-out, identity -----------------------------------

    async def _reserved(
        self, request: web.Request, route: RouteConfig, origin: str, path: str
    ) -> web.StreamResponse:
        name = path[len(RESERVED) :]
        if name == "sign_in" and request.method == "GET":
            return await self._sign_in(request, origin, request.query.get("rd"))
        if name == "callback" and request.method == "GET":
            return await self._callback(request, origin)
        if name == "sign_out":
            return await self._sign_out(request, route, origin)
        if name == "identity" and request.method == "GET":
            caller = await self._authenticate(request, route, origin)
            if caller is None:
                return _json({"error": "authentication required"}, 401)
            identity = caller.identity
            body: dict[str, Any] = {
                "principal": identity.principal,
                "email": identity.email,
                "sub": identity.subject,
                "issuer": identity.issuer,
                "groups": list(identity.groups),
            }
            if caller.session is not None:
                body["csrf_token"] = caller.session.csrf
                body["expires"] = caller.session.expires
            return _json(body)
        return web.Response(status=404, text="Not found\n")

    async def _discover(self) -> dict[str, Any]:
        assert self.config.login is not None
        assert self._client is not None
        if self._discovery is None:
            url = self.config.login.issuer.rstrip("/") + "/.well-known/openid-configuration"
            async with self._client.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                resp.raise_for_status()
                document = await resp.json()
            if not isinstance(document, dict) or document.get("issuer") != self.config.login.issuer:
                raise ValueError("discovery document names another issuer")
            self._discovery = document
        return self._discovery

    def _cookie_flags(self) -> dict[str, Any]:
        return {"secure": True, "httponly": True, "samesite": "Lax", "path": "/"}

    async def _sign_in(
        self, request: web.Request, origin: str, rd: str | None
    ) -> web.StreamResponse:
        login = self.config.login
        if login is None:
            return _html(pages.page("Sign-in unavailable", "<p>Use a bearer token.</p>"), 404)
        try:
            discovery = await self._discover()
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return _html(pages.login_failed("The identity provider cannot be reached."), 503)
        verifier, challenge = _pkce()
        browser = secrets.token_urlsafe(24)
        pending = PendingLogin(
            state=secrets.token_urlsafe(24),
            nonce=secrets.token_urlsafe(24),
            verifier=verifier,
            return_to=safe_return_path(rd, origin),
            host=origin,
            browser=browser,
            expires=self.clock() + self.config.session.login_timeout,
        )
        self.store.put_pending(pending)
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
        response = _redirect(str(discovery["authorization_endpoint"]) + "?" + urlencode(params))
        response.set_cookie(
            LOGIN_COOKIE,
            browser,
            max_age=int(self.config.session.login_timeout),
            **self._cookie_flags(),
        )
        return response

    async def _callback(self, request: web.Request, origin: str) -> web.StreamResponse:
        login = self.config.login
        if login is None or self._login_verifier is None:
            return web.Response(status=404, text="Not found\n")
        state = request.query.get("state", "")
        pending = self.store.pop_pending(state) if 0 < len(state) <= 128 else None
        browser = request.cookies.get(LOGIN_COOKIE, "")
        if (
            pending is None
            or not hmac.compare_digest(pending.browser, browser)
            or pending.host != origin
        ):
            self.audit.record("http_login", decision="deny", reason="bad state", status=400)
            return _html(pages.login_failed("This sign-in link is invalid or has expired."), 400)
        if "error" in request.query or "code" not in request.query:
            self.audit.record("http_login", decision="deny", reason="idp refused", status=401)
            return _html(pages.login_failed("The identity provider did not sign you in."), 401)
        try:
            discovery = await self._discover()
            identity, claims = await self._redeem(discovery, request.query["code"], pending, origin)
        except IssuerUnavailable:
            return _html(pages.login_failed("The identity provider cannot be reached."), 503)
        except (TimeoutError, AuthError, ValueError, aiohttp.ClientError, OSError) as exc:
            reason = exc.reason if isinstance(exc, AuthError) else type(exc).__name__
            self.audit.record("http_login", decision="deny", reason=reason, status=401)
            return _html(pages.login_failed("Sign-in could not be completed."), 401)
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
        old = request.cookies.get(SESSION_COOKIE)
        if old:
            self.store.delete(old)
        self.store.put(session)
        self.audit.record("http_login", decision="allow", principal=identity.principal)
        response = _redirect(pending.return_to)
        response.set_cookie(
            SESSION_COOKIE, session.sid, max_age=int(self.config.session.max_age),
            **self._cookie_flags(),
        )  # fmt: skip
        response.del_cookie(LOGIN_COOKIE, **self._cookie_flags())
        return response

    async def _redeem(
        self, discovery: dict[str, Any], code: str, pending: PendingLogin, origin: str
    ) -> tuple[Identity, dict[str, Any]]:
        login = self.config.login
        assert login is not None
        assert self._client is not None
        assert self._login_verifier
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": origin + "/_tunnel/callback",
            "code_verifier": pending.verifier,
        }
        pair = f"{quote(login.client_id, safe='')}:{quote(login.client_secret, safe='')}"
        basic = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        async with self._client.post(
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
        identity = await self._login_verifier.verify(id_token)
        # Verified above; read the claims the Identity does not carry (nonce, auth_time).
        claims: dict[str, Any] = jwt.decode(id_token, options={"verify_signature": False})
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or not hmac.compare_digest(nonce, pending.nonce):
            raise AuthError("bad nonce")
        return identity, claims

    async def _sign_out(
        self, request: web.Request, route: RouteConfig, origin: str
    ) -> web.StreamResponse:
        sid = request.cookies.get(SESSION_COOKIE, "")
        session = self.store.get(sid) if 0 < len(sid) <= 128 else None
        if request.method == "GET":
            if session is None:
                return _html(pages.signed_out())
            return _html(pages.sign_out_confirm(session.csrf))
        if request.method != "POST":
            return web.Response(status=405, headers={"Allow": "GET, POST"})
        sent_origin = request.headers.get("Origin")
        if sent_origin is not None and sent_origin.lower() != origin:
            return _json({"error": "cross-origin sign-out refused"}, 403)
        token = request.headers.get(CSRF_HEADER)
        if token is None and request.content_type == "application/x-www-form-urlencoded":
            if (request.content_length or 0) > 4096:
                return _json({"error": "form too large"}, 413)
            form = await request.post()
            value = form.get("csrf")
            token = value if isinstance(value, str) else None
        if session is None:
            response = _html(pages.signed_out())
        elif token is None or not hmac.compare_digest(token, session.csrf):
            self.audit.record(
                "http_logout", decision="deny", reason="bad csrf token",
                principal=session.identity.principal, status=403,
            )  # fmt: skip
            return _json({"error": "invalid CSRF token"}, 403)
        else:
            self.store.delete(session.sid)
            for active in list(self._active):
                if active.session_id == session.sid:
                    self._active.discard(active)
                    active.close()
            self.audit.record("http_logout", principal=session.identity.principal)
            response = _html(pages.signed_out())
        response.del_cookie(SESSION_COOKIE, **self._cookie_flags())
        return response


@asynccontextmanager
async def serving(
    proxy: HttpProxy,
    host: str,
    port: int,
    *,
    ssl_context: Any = None,
    sock: Any = None,
) -> AsyncIterator[int]:
    """Serve ``proxy`` on host:port (or an already bound ``sock``); yields the bound port."""
    await proxy.start()
    runner = web.AppRunner(proxy.app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site: web.BaseSite
    if sock is not None:
        site = web.SockSite(runner, sock, ssl_context=ssl_context)
    else:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()
        await proxy.aclose()


__all__ = ["HttpProxy", "serving", "wants_html"]
