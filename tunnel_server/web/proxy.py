"""HTTP mode: an identity-aware reverse proxy on its own listener (aiohttp server and client).

Every request: normalize host and path (400 when ambiguous), pick the route, identify the caller
(``callers.py``: a bearer token for the app's audience, or the browser session), decide
``app:NAME`` with role ``webUser`` on the normalized host and path (``decide.py``), then forward
exactly one request with the client's identity headers replaced by a signed assertion
(``forward.py``). Open WebSockets and streams are re-decided when their decision can next
change; those bound to a browser session also end when the session ends on any node (the
store's notifications, and a check of the store every ``recheck_interval``).

Browser sign-in, callback and sign-out: ``login.py``; sessions: ``sessions.py``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
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

from tunnel_protocol.aio.proxied import ProxiedListener, listening_socket

from ..access.identity import Authenticator, Identity, TokenVerifier
from ..access.policy import AccessRequest, Policy, access_levels_met, evaluate
from ..access.source import client_address
from ..audit import AuditLog
from ..config import HttpModeConfig, RouteConfig
from . import pages
from .assertion import AssertionCache, AssertionSigner
from .callers import Caller, Callers
from .decide import OpenStreams, access_request
from .foreign import HeaderFilter
from .forward import Forwarder
from .guard import GuardSettings, SourceLimits, guard_of, guarded
from .headers import ASSERTION_HEADER, EMAIL_HEADER, ID_HEADER, upstream_headers
from .keyshare import SharedKeys
from .login import BrowserLogin
from .paths import BadRequest, NormalizedPath, normalize_host, normalize_path
from .responses import Reply, html_response, json_response, redirect, wants_html
from .sessions import MemorySessionStore, SessionStore, SessionStoreUnavailable, session_key

log = logging.getLogger("tunnel.http")

RESERVED = "/_tunnel/"


@dataclass(frozen=True)
class Decided:
    """A request's decision as forwarding needs it: allowed, and the access levels it met."""

    allowed: bool
    levels: Sequence[str]


JWKS_PATH = "/.well-known/tunnel/jwks.json"
CLOSE_WAIT = 5.0  # seconds aclose() lets background store calls (revocations) finish


class HttpProxy:
    """The HTTP-mode server. ``authenticator``: the relay's, shared (each app accepts bearer
    tokens for its own audiences through it); ``login_verifier``: checks the browser login's ID
    tokens (None without ``login``); ``policy`` returns the policy in force; ``is_revoked`` is the
    relay's revocation check; ``store`` holds browser sessions (``stores.build_session_store``;
    in memory by default). Call ``redecide_all()`` after a policy change and
    ``revoke_user(principal)`` when an admin revokes someone. ``start()`` also subscribes to the
    store's ended-session notifications; ``aclose()`` ends that and closes the store."""

    def __init__(
        self,
        config: HttpModeConfig,
        *,
        authenticator: Authenticator,
        login_verifier: TokenVerifier | None,
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
        self.assertions = AssertionCache(self.signer)
        self.callers = Callers(
            verifiers={
                route.name: authenticator.for_audiences(route.audiences)
                for route in config.routes
                if route.audiences
            },
            store=self.store,
            audit=audit,
            is_revoked=is_revoked,
            reauth_max_age=config.session.reauth_max_age,
            clock=clock,
        )
        self.streams = OpenStreams(
            policy=lambda: self.policy(), audit=audit, is_revoked=is_revoked, clock=clock
        )
        self._client: aiohttp.ClientSession | None = None
        self.forwarder = Forwarder(client=lambda: self._client, streams=self.streams, audit=audit)
        # Longest path prefix first, per host.
        self._routes = sorted(config.routes, key=lambda r: (r.host, -len(r.path_prefix)))
        # Per app: the stripped header families, the operator's additions, its pass_headers.
        self._filters = {
            route.name: HeaderFilter(config.strip_headers, route.pass_headers)
            for route in config.routes
        }
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
            verifier=login_verifier,
            end_sessions=self.end_sessions,
            clock=clock,
        )
        self.app = web.Application(client_max_size=0)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

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
        self._recheck = asyncio.create_task(self._housekeeping())
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
        self.streams.close_all()
        if self._client is not None:
            await self._client.close()
        await self.store.aclose()

    async def _housekeeping(self) -> None:
        """Every ``recheck_interval``: rotate the signing key when due and make sure it is
        published, and check open streams' sessions against the store (an announcement this
        node missed). Decisions do not wait for this: each stream has its own deadline."""
        while True:
            await asyncio.sleep(self.config.recheck_interval)
            try:
                self.signer.maybe_rotate()
                self.keys.ensure_published()
                await self.recheck_sessions()
            except Exception:  # the next round must still come
                log.exception("HTTP-mode housekeeping failed")

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

    def redecide_all(self) -> int:
        """Re-decide every open WebSocket and streaming response against the policy in force,
        revocations, session and credential expiry; close those no longer allowed (returns how
        many). Whether sessions still exist in the store is ``recheck_sessions()``, and
        sessions ended elsewhere are announced (``end_sessions``)."""
        return self.streams.redecide_all()

    async def recheck_sessions(self) -> int:
        """Close the open WebSockets and streams whose browser session is gone from the store
        (an announcement this node missed). While the store is unavailable they stay open (no
        one can sign out meanwhile) and are checked again on the next round."""
        ended: set[str] = set()
        for sid in self.streams.session_ids():
            try:
                if await self.store.get(sid) is None:
                    ended.add(session_key(sid))
            except SessionStoreUnavailable as exc:
                log.warning("open streams' sessions not re-checked: %s", exc)
                break
        return self.end_sessions(ended) if ended else 0

    def _missed(self) -> None:
        self.listening.set()
        if self.streams.session_ids():
            self._spawn(self.recheck_sessions())

    def end_sessions(self, keys: Collection[str]) -> int:
        """Close this node's WebSockets and streams running on the sessions with these keys
        (``session_key(sid)``): signed out here, or announced by the store from any node."""
        return self.streams.end_sessions(keys)

    def revoke_user(self, principal: str) -> int:
        """Close the principal's open streams here (returns how many) and end their browser
        sessions on every node: the store call runs in the background (``idle()`` waits for
        it), as this is called from synchronous code."""
        closed = self.streams.revoke_user(principal)
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

    def _not_served(
        self, request: web.Request, host: str, port: int | None, path: str
    ) -> web.Response:
        """404 naming what the request asked for: no route for this host (or not for this path
        on it), so a mistyped address or a missing route is told apart from the app's own 404."""
        served = any(route.host == host for route in self._routes)
        where = (f"{host}:{port}" if port else host) + (path if served else "")
        if wants_html(request):
            return html_response(pages.unknown_host(where), 404)
        return web.Response(status=404, text=f"Not found: no application at {where}\n")

    def _origin(self, host: str, port: int | None) -> str:
        scheme = self.config.external_scheme
        default = 443 if scheme == "https" else 80
        return f"{scheme}://{host}" + (f":{port}" if port and port != default else "")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        guard = guard_of(request)
        if guard is not None:
            guard.request_started(request)
        try:
            return await self._handle(request)
        except Reply as reply:
            return reply.response
        finally:
            if guard is not None:
                guard.request_finished()

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
            return self._not_served(request, host, port, path.decoded)
        if path.parameters and route.path_parameters == "refuse":
            reason = "bad request: path parameter (;) in path"
            self.audit.record("http", decision="deny", reason=reason, app=route.name, status=400)
            return web.Response(status=400, text="Bad request: path parameter (;) in path\n")
        origin = self._origin(host, port)
        if path.decoded.startswith(RESERVED) or path.decoded == RESERVED.rstrip("/"):
            return await self._reserved(request, route, origin, path.decoded)
        caller = await self.callers.identify(request, route, origin)
        if caller is None:
            return self._unauthenticated(request, raw_path + (f"?{query}" if query else ""))
        guard = guard_of(request)
        if guard is not None:
            guard.authenticated()
        xff, access, decision, request_id = self._decide(request, route, caller, host, path)
        if not decision.allowed:
            return self._denied(request, caller, request_id)
        headers = upstream_headers(
            request.headers,
            consumed_authorization=caller.consumed_authorization,
            identity=self._identity_headers(route, caller, decision.levels),
            forwarded_for=xff,
            proto=self.config.external_scheme,
            host=request.headers.get("Host", host),
            strip=self._filters[route.name],
        )
        headers.popall("Expect", None)
        target = URL(route.upstream + path.raw + (f"?{query}" if query else ""), encoded=True)
        if self._is_websocket(request):
            return await self.forwarder.websocket(
                request, route, origin, caller, access, target, headers
            )
        return await self.forwarder.http(request, route, caller, access, target, headers)

    def _decide(
        self,
        request: web.Request,
        route: RouteConfig,
        caller: Caller,
        host: str,
        path: NormalizedPath,
    ) -> tuple[str, AccessRequest, Decided, str]:
        """(X-Forwarded-For to send, the policy request, the decision, its request id), with
        the decision's audit record."""
        source_ip, xff = client_address(
            request.remote,
            request.headers.getall("X-Forwarded-For", []),
            self.config.trusted_proxies,
        )
        upstream = URL(route.upstream)
        access = access_request(caller, route, upstream.port or 80, source_ip, host, path.decoded)
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
        levels = access_levels_met(access, policy, now) if decision.allowed else ()
        return xff, access, Decided(decision.allowed, levels), request_id

    def proxy_header_refused(self, source_ip: str, reason: str) -> None:
        """A PROXY header from a peer outside trusted_proxies, or a broken one: audited."""
        self.audit.record("proxy_header", decision="deny", reason=reason, source_ip=source_ip)

    def connection_refused(self, reason: str, source_ip: str, status: int) -> None:
        """A connection the guard refused or cut (``guard.py``): one audit record."""
        self.audit.record(
            "http", decision="deny", reason=reason, source_ip=source_ip, status=status
        )

    def _identity_headers(
        self, route: RouteConfig, caller: Caller, levels: Sequence[str]
    ) -> dict[str, str]:
        """The signed assertion (signing is separate from deciding) and the convenience
        headers, for the upstream."""
        identity = caller.identity
        headers = {
            ASSERTION_HEADER: self.assertions.sign(
                audience=route.audience,
                subject=identity.subject,
                email=identity.email,
                groups=identity.groups,
                principal=identity.principal,
                access_levels=levels,
            ),
            EMAIL_HEADER: identity.email or "",
            ID_HEADER: f"{identity.issuer}#{identity.subject}",
        }
        self.keys.ensure_published()  # signing may have rotated the key
        return headers

    @staticmethod
    def _is_websocket(request: web.Request) -> bool:
        return (
            request.method == "GET"
            and request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in request.headers.get("Connection", "").lower()
        )

    def _unauthenticated(self, request: web.Request, target: str) -> web.StreamResponse:
        if self.config.login is not None and wants_html(request):
            return redirect("/_tunnel/sign_in?" + urlencode({"rd": target}))
        return json_response(
            {"error": "authentication required"}, 401, {"WWW-Authenticate": 'Bearer realm="tunnel"'}
        )

    def _denied(self, request: web.Request, caller: Caller, request_id: str) -> web.Response:
        if wants_html(request):
            csrf = caller.session.csrf if caller.session else None
            who = caller.identity.email or caller.identity.principal
            return html_response(pages.denied(who, request_id, csrf), 403)
        return json_response({"error": "access denied", "request_id": request_id}, 403)

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
            caller = await self.callers.identify(request, route, origin)
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
    reuse_port: bool = False,
) -> AsyncIterator[int]:
    """Serve ``proxy`` on host:port (or an already bound ``sock``; ``reuse_port``: SO_REUSEPORT,
    for several worker processes on one port), every connection guarded (``guard.py``);
    yields the bound port."""
    config = proxy.config
    await proxy.start()
    runner = web.AppRunner(
        proxy.app,
        access_log=None,
        handler_cancellation=True,
        keepalive_timeout=config.keepalive_timeout,
    )
    await runner.setup()
    assert runner.server is not None
    settings = GuardSettings(
        config.header_timeout, config.request_timeout, config.max_unauthenticated_per_source
    )
    limits = SourceLimits(config.max_unauthenticated_per_source, config.trusted_proxies)
    factory = guarded(runner.server, settings, limits, proxy.connection_refused)
    loop = asyncio.get_running_loop()
    server: asyncio.Server | ProxiedListener
    try:
        if config.proxy_protocol:
            listening = sock or listening_socket(host, port, reuse_port=reuse_port)
            server = ProxiedListener(
                listening, factory, trusted=config.trusted_proxies, ssl_context=ssl_context,
                header_timeout=config.header_timeout, on_refused=proxy.proxy_header_refused,
            )  # fmt: skip
            await server.start_serving()
        elif sock is not None:
            server = await loop.create_server(factory, sock=sock, ssl=ssl_context, backlog=1024)
        else:
            server = await loop.create_server(
                factory, host, port, ssl=ssl_context, backlog=1024, reuse_port=reuse_port or None
            )
    except BaseException:
        await runner.cleanup()
        await proxy.aclose()
        raise
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await runner.cleanup()
        await server.wait_closed()
        await proxy.aclose()


__all__ = ["HttpProxy", "serving", "wants_html"]
