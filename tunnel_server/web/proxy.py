"""HTTP mode: an identity-aware reverse proxy on its own listener (aiohttp server and client).

Every request: normalize host and path (400 when ambiguous), pick the route, authenticate
(bearer token for the app's audience, or the browser session), decide ``app:NAME`` with role
``webUser`` on the normalized host and path, then forward exactly one request with the client's
identity headers replaced by a signed assertion. Bodies stream both ways; WebSockets pass
through after an Origin check; open WebSockets and streams are re-decided on policy change,
revocation and every ``recheck_interval``; those bound to a browser session also end when the
session ends on any node (the store's notifications, and a store check every interval).

Browser sign-in, callback and sign-out: ``login.py``; sessions: ``sessions.py``."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from yarl import URL

from tunnel_runtime.wsbridge import forward_messages

from ..access.identity import (
    DEFAULT_ALGORITHMS,
    Authenticator,
    AuthError,
    Identity,
    IssuerUnavailable,
    OidcVerifier,
)
from ..access.policy import WEB_USER, AccessRequest, Policy, access_levels_met, evaluate
from ..access.source import client_address
from ..audit import AuditLog
from ..config import HttpModeConfig, OidcConfig, RouteConfig
from . import pages
from .assertion import AssertionSigner
from .headers import (
    ASSERTION_HEADER,
    EMAIL_HEADER,
    ID_HEADER,
    response_headers,
    upstream_headers,
)
from .keyshare import SharedKeys
from .login import MAX_ID, SESSION_COOKIE, BrowserLogin
from .paths import BadRequest, normalize_host, normalize_path
from .responses import (
    RETRY_AFTER,
    html_response,
    json_response,
    redirect,
    store_unavailable,
    wants_html,
)
from .sessions import (
    MemorySessionStore,
    SessionStore,
    SessionStoreUnavailable,
    WebSession,
    session_key,
)

log = logging.getLogger("tunnel.http")

RESERVED = "/_tunnel/"
JWKS_PATH = "/.well-known/tunnel/jwks.json"
CHUNK = 64 * 1024
WS_MAX_MESSAGE = 4 * 1024 * 1024
CLOSE_WAIT = 5.0  # seconds aclose() lets background store calls (revocations) finish


@dataclass(eq=False)
class _Active:
    """An open WebSocket or streaming response, re-decided while it lasts."""

    route: RouteConfig
    identity: Identity
    request: AccessRequest
    close: Callable[[], None]
    session_id: str | None = None  # the browser session it runs on, if any
    session_key: str | None = None  # session_key(session_id): what announcements carry
    session_expires: float = math.inf


@dataclass
class _Caller:
    identity: Identity
    session: WebSession | None = None
    consumed_authorization: bool = False


class _Reply(Exception):
    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class HttpProxy:
    """The HTTP-mode server. ``policy`` returns the policy in force (the relay's); ``is_revoked``
    is the relay's revocation check; ``store`` holds browser sessions (``build_session_store``;
    in memory by default). Call ``redecide_all()`` after a policy change and
    ``revoke_user(principal)`` when an admin revokes someone. ``start()`` also subscribes to the
    store's ended-session notifications; ``aclose()`` ends that and closes the store."""

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
        self._recheck: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # background store calls, kept until done
        self.keys = SharedKeys(self.signer, self.store, spawn=self._spawn, clock=clock)
        # Set once the store's ended-session notifications reach this node.
        self.listening = asyncio.Event()
        self.login = BrowserLogin(
            config,
            store=self.store,
            audit=audit,
            verifier=self._login_verifier,
            client=lambda: self._client,
            end_sessions=self.end_sessions,
            clock=clock,
        )
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
        await self.keys.publish_now()
        self._recheck = asyncio.create_task(self._recheck_loop())
        self._listener = asyncio.create_task(self.store.listen(self.end_sessions, self._missed))
        self._listener.add_done_callback(self._log_failure)

    async def aclose(self) -> None:
        for task in (self._recheck, self._listener):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._tasks:  # revocations under way: let them reach the store if they can
            _, late = await asyncio.wait(set(self._tasks), timeout=CLOSE_WAIT)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for active in list(self._active):
            active.close()
        if self._client is not None:
            await self._client.close()
        for authenticator in self._authenticators.values():
            await authenticator.aclose()
        if self._login_verifier is not None:
            await self._login_verifier.aclose()
        await self.store.aclose()

    async def _recheck_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.recheck_interval)
            try:
                self.signer.maybe_rotate()
                self.keys.ensure_published()
                self.redecide_all()
                await self.recheck_sessions()
            except Exception:  # the next round must still come
                log.exception("re-deciding open HTTP-mode streams failed")

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        """Run ``coro`` in the background, keeping a reference until it is done."""
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no event loop: nothing could run it
            coro.close()
            log.error("no event loop: a background session-store call was dropped")
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._log_failure)

    @staticmethod
    def _log_failure(task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("HTTP-mode background task failed", exc_info=task.exception())

    async def idle(self) -> None:
        """Wait until the background store calls started so far (revocations, session
        re-checks) are done."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    # -- continuous authorization -------------------------------------------------------------

    def _close(self, active: _Active, reason: str) -> bool:
        if active not in self._active:
            return False
        self._active.discard(active)
        self.audit.record(
            "http_close", principal=active.identity.principal, app=active.route.name, reason=reason
        )
        active.close()
        return True

    def redecide_all(self) -> int:
        """Re-decide every open WebSocket and streaming response against the policy in force,
        revocations, session and credential expiry; close those no longer allowed. Synchronous
        (policy reload calls it); whether sessions still exist in the store is
        ``recheck_sessions()``, and sessions ended elsewhere are announced (``end_sessions``)."""
        closed = 0
        now = self.clock()
        policy = self.policy()
        for active in list(self._active):
            reason: str | None = None
            if self.is_revoked(active.identity):
                reason = "revoked"
            elif active.session_expires <= now:
                reason = "session ended"
            elif active.session_key is None and active.identity.valid_until < now:
                reason = "credential expired"
            else:
                decision = evaluate(active.request, policy, now)
                if not decision.allowed:
                    reason = decision.reason
            if reason is not None and self._close(active, reason):
                closed += 1
        return closed

    async def recheck_sessions(self) -> int:
        """Close the open WebSockets and streams whose browser session is gone from the store
        (an announcement this node missed). While the store is unavailable they stay open (no
        one can sign out meanwhile) and are checked again on the next round."""
        ended: set[str] = set()
        for sid in {a.session_id for a in self._active if a.session_id is not None}:
            try:
                if await self.store.get(sid) is None:
                    ended.add(session_key(sid))
            except SessionStoreUnavailable as exc:
                log.warning("open streams' sessions not re-checked: %s", exc)
                break
        return self.end_sessions(ended) if ended else 0

    def _missed(self) -> None:
        self.listening.set()
        if any(a.session_id is not None for a in self._active):
            self._spawn(self.recheck_sessions())

    def end_sessions(self, keys: Collection[str]) -> int:
        """Close this node's WebSockets and streams running on the sessions with these keys
        (``session_key(sid)``): signed out here, or announced by the store from any node."""
        wanted = set(keys)
        closed = 0
        for active in list(self._active):
            if active.session_key in wanted and self._close(active, "session ended"):
                closed += 1
        return closed

    def revoke_user(self, principal: str) -> int:
        """Close the principal's open streams here (returns how many) and end their browser
        sessions on every node: the store call runs in the background (``idle()`` waits for
        it), as this is called from synchronous code."""
        closed = 0
        for active in list(self._active):
            if active.identity.principal == principal and self._close(active, "revoked"):
                closed += 1
        self._spawn(self._end_principal(principal))
        return closed

    async def _end_principal(self, principal: str) -> None:
        try:
            await self.store.delete_principal(principal)
        except SessionStoreUnavailable as exc:
            # The sessions stay in the store, but every node that knows the revocation refuses
            # them (is_revoked); their streams here are closed already.
            log.error("sessions of a revoked principal not deleted: %s", exc)

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
            return json_response(
                await self.keys.jwks(), headers={"Cache-Control": "public, max-age=300"}
            )
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
        self.keys.ensure_published()  # signing may have rotated the key
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
                    json_response(
                        {"error": "identity provider unavailable"},
                        503,
                        {"Retry-After": RETRY_AFTER},
                    )
                ) from None
            except AuthError as exc:
                self._refuse(route, exc.reason)
            if self.is_revoked(identity):
                self._refuse(route, "revoked")
            return _Caller(identity, consumed_authorization=auth_token is not None)
        sid = request.cookies.get(SESSION_COOKIE)
        if not sid or len(sid) > MAX_ID:
            return None
        try:
            session = await self.store.get(sid)
        except SessionStoreUnavailable as exc:
            # Fail closed, and not with a sign-in redirect (that needs the store too).
            self.audit.record("http", decision="deny", reason=str(exc), app=route.name, status=503)
            raise _Reply(store_unavailable(request)) from None
        if session is None or not hmac.compare_digest(session.origin, origin):
            return None
        reauth = self.config.session.reauth_max_age
        if (reauth is not None and self.clock() - session.auth_time > reauth) or self.is_revoked(
            session.identity
        ):
            with contextlib.suppress(SessionStoreUnavailable):  # refused here either way
                await self.store.delete(sid)
            return None
        return _Caller(session.identity, session=session)

    def _refuse(self, route: RouteConfig, reason: str) -> None:
        self.audit.record("http", decision="deny", reason=reason, app=route.name, status=401)
        raise _Reply(
            json_response(
                {"error": "authentication required"},
                401,
                {"WWW-Authenticate": 'Bearer realm="tunnel", error="invalid_token"'},
            )
        )

    def _unauthenticated(self, request: web.Request, target: str) -> web.StreamResponse:
        if self.config.login is not None and wants_html(request):
            return redirect("/_tunnel/sign_in?" + urlencode({"rd": target}))
        return json_response(
            {"error": "authentication required"}, 401, {"WWW-Authenticate": 'Bearer realm="tunnel"'}
        )

    def _denied(self, request: web.Request, caller: _Caller, request_id: str) -> web.Response:
        if wants_html(request):
            csrf = caller.session.csrf if caller.session else None
            who = caller.identity.email or caller.identity.principal
            return html_response(pages.denied(who, request_id, csrf), 403)
        return json_response({"error": "access denied", "request_id": request_id}, 403)

    # -- forwarding ----------------------------------------------------------------------------

    def _track(
        self, route: RouteConfig, caller: _Caller, access: AccessRequest, close: Callable[[], None]
    ) -> _Active:
        active = _Active(route, caller.identity, access, close)
        if caller.session is not None:
            active.session_id = caller.session.sid
            active.session_key = session_key(caller.session.sid)
            active.session_expires = caller.session.expires
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
            return json_response({"error": "WebSockets are not enabled for this app"}, 403)
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
            return json_response({"error": "origin not allowed"}, 403)
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
            return await self.login.sign_in(request, origin)
        if name == "callback" and request.method == "GET":
            return await self.login.callback(request, origin)
        if name == "sign_out":
            return await self.login.sign_out(request, origin)
        if name == "identity" and request.method == "GET":
            caller = await self._authenticate(request, route, origin)
            if caller is None:
                return json_response({"error": "authentication required"}, 401)
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
            return json_response(body)
        return web.Response(status=404, text="Not found\n")


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
