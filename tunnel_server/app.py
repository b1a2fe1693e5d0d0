"""Composition root: the relay (built in ``build``), HTTP mode, the admin API, the console and
the metrics from a config, served, and everything closed on the way out (``running``)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import logging
import socket
import ssl
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, serve
from websockets.typing import Subprotocol

from tunnel_protocol import IAP, NATIVE, CloseCode
from tunnel_protocol.aio.proxied import ProxiedListener, listening_socket

from .access.identity import (
    Audience,
    Authenticator,
    Identity,
    TokenVerifier,
)
from .access.policy import ADMIN, AccessRequest, evaluate
from .access.revocations import Revocations
from .audit_store import AuditStoreError, AuditWriter
from .build import MAX_MESSAGE, build_relay, build_verifier
from .config import (
    ConfigError,
    HttpModeConfig,
    ListenConfig,
    OidcConfig,
    ServerConfig,
)
from .console import Console, running_console
from .console import mount as mount_console
from .ops.admin import AdminApi
from .ops.admin import serving as admin_serving
from .ops.auditdb import build_audit_store
from .ops.listeners import websockets_factory
from .ops.metrics import Metrics
from .ops.metrics import serving as metrics_serving
from .ops.tls import server_context
from .relay import Relay
from .relay.connection import connection_class
from .state import Revocation
from .web import HttpProxy, build_session_store
from .web import serving as http_serving
from .web.workers import HttpWorkers

log = logging.getLogger("tunnel.server")


@dataclass
class RunningServer:
    relay: Relay
    server: Server
    verifier: Authenticator
    secure: bool
    revocations: Revocations
    admin_port: int | None = None
    policy_file: Path | None = None
    http: HttpProxy | None = None
    http_port: int | None = None
    http_workers: HttpWorkers | None = None
    metrics_port: int | None = None
    audit_store: AuditWriter | None = None
    console: Console | None = None

    def revoke_web_user(self, principal: str, at: float | None = None) -> int:
        """End the principal's HTTP-mode streams and sessions here and in every worker;
        returns how many streams closed in this process."""
        closed = self.http.revoke_user(principal) if self.http is not None else 0
        if self.http_workers is not None:
            self.http_workers.revoke_user(principal, at)
        return closed

    @property
    def port(self) -> int:
        sockets = list(self.server.sockets)
        return int(sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "wss" if self.secure else "ws"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def drain(self, grace: float | None = None) -> int:
        """Graceful drain (what SIGTERM does): see ``Relay.drain``."""
        return await self.relay.drain(grace)


@asynccontextmanager
async def running(config: ServerConfig, *, node: str | None = None) -> AsyncIterator[RunningServer]:
    """Serve ``config`` until the context exits; tunnels are closed with 1001 on the way out."""
    revocations = Revocations()
    relay, verifier = build_relay(config, node=node, revocations=revocations)
    ssl_context = server_context(config.tls) if config.tls is not None else None
    store = build_audit_store(config.audit_store) if config.audit_store is not None else None
    try:
        if store is not None:  # first in, last out: it gets the records of the last closes
            await _start_audit_store(store, relay)
        async with contextlib.AsyncExitStack() as stack:
            with _listening("listen", config.listen):
                server = await stack.enter_async_context(_serve_relay(config, relay, ssl_context))
            # The relay never tunnels to its own listeners (SSRF), whatever the policy says.
            for sock in server.sockets:
                relay.destinations.add_own_endpoint(*sock.getsockname()[:2])
            running_server = RunningServer(
                relay, server, verifier, ssl_context is not None, revocations,
                policy_file=config.policy_file, audit_store=store,
            )  # fmt: skip
            if config.http is not None:
                await _serve_http(stack, config, config.http, running_server)
            if config.metrics is not None:
                await _serve_metrics(stack, config.metrics.listen, running_server)
            if config.state.backend == "redis" and config.state.redis_url:
                # Never a tunnel to the shared state, whatever the policy says (SSRF).
                for address in await _addresses(config.state.redis_url, 6379):
                    relay.destinations.add_own_endpoint(*address)
            await relay.state.start(
                on_revocation=_applier(relay, revocations, running_server),
                local_tunnels=relay.registry.local_tunnels,
            )
            stack.push_async_callback(relay.state.aclose)
            if config.admin is not None:
                await _serve_admin(stack, config, config.admin.listen, running_server)
            yield running_server
            relay.draining = True
            relay.close_all(CloseCode.GOING_AWAY, "relay shutting down")
        # Handlers have returned; anything left (parked tunnels) ends now.
        relay.close_all(CloseCode.GOING_AWAY, "relay shutting down")
    finally:
        if store is not None:
            await store.aclose()
        await verifier.aclose()


@contextlib.contextmanager
def _listening(key: str, listen: ListenConfig) -> Iterator[None]:
    """A listener that cannot bind (port in use, a privileged port, an address not on this
    host) is the operator's to fix: one line naming the config key, not a traceback."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason = "the port is already in use"
        elif exc.errno == errno.EACCES:
            reason = "permission denied (ports below 1024 need privileges)"
        raise ConfigError(
            f"{key}: cannot listen on {listen.host}:{listen.port}: {reason}"
        ) from None


async def _start_audit_store(store: AuditWriter, relay: Relay) -> None:
    """Open the audit store (migrations; one that is down is retried in the background) and
    give it every audit record from now on."""
    try:
        await store.start()
    except AuditStoreError as exc:
        raise ConfigError(f"audit_store: {exc}") from None
    relay.audit.listeners.append(store.offer)


async def _serve_http(
    stack: contextlib.AsyncExitStack,
    config: ServerConfig,
    http: HttpModeConfig,
    running: RunningServer,
) -> None:
    """HTTP mode on its own listener, deciding with the relay's policy, identities and
    revocations, and re-deciding its open streams when the policy is replaced."""
    relay = running.relay
    policies = relay.policies
    proxy = HttpProxy(
        http,
        authenticator=running.verifier,
        login_verifier=await stack.enter_async_context(http_login_verifier(http, running.verifier)),
        policy=lambda: policies.policy,
        audit=relay.audit,
        is_revoked=running.revocations.is_revoked,
        store=build_session_store(config.state),
    )
    running.http = proxy
    # Destinations with proxy_protocol get the caller's identity signed with these keys.
    relay.tunnels.sign_identity = proxy.signer.sign
    policies.subscribe(lambda _policy: proxy.redecide_all())
    http_ssl = server_context(http.tls, "http.tls") if http.tls else None
    with _listening("http.listen", http.listen):
        running.http_port = await stack.enter_async_context(
            http_serving(
                proxy, http.listen.host, http.listen.port, ssl_context=http_ssl,
                reuse_port=http.workers > 1,
            )
        )  # fmt: skip
    relay.destinations.add_own_endpoint(http.listen.host, running.http_port)
    if http.workers > 1:
        workers = await HttpWorkers.start(
            config, running.http_port, http.workers - 1, relay.audit.node
        )
        stack.push_async_callback(workers.aclose)
        running.http_workers = workers
        policies.subscribe(workers.policy_changed)


async def _serve_metrics(
    stack: contextlib.AsyncExitStack, listen: ListenConfig, running: RunningServer
) -> None:
    relay = running.relay
    store = running.audit_store
    metrics = Metrics(
        relay,
        state_available=lambda: relay.state.available,
        audit_store=store.stats if store is not None else None,
    )
    relay.audit.observers.append(metrics.observe_audit)
    relay.events.subscribe(metrics)
    with _listening("metrics.listen", listen):
        running.metrics_port = await stack.enter_async_context(
            metrics_serving(metrics, listen.host, listen.port)
        )
    relay.destinations.add_own_endpoint(listen.host, running.metrics_port)


async def _serve_admin(
    stack: contextlib.AsyncExitStack,
    config: ServerConfig,
    listen: ListenConfig,
    running: RunningServer,
) -> None:
    """The admin API, and the console beside it when ``admin.console`` is configured."""
    relay = running.relay
    api = AdminApi(
        relay,
        running.verifier,
        _admin_check(config, relay),
        running.revocations,
        on_revoke_user=running.revoke_web_user if running.http else None,
        publish=relay.state.revoke,
    )
    app = api.app()
    admin = config.admin
    if admin is not None and admin.console is not None:
        login = admin.console.login
        verifier = await stack.enter_async_context(
            _login_verifier(running.verifier, login.issuer, login.client_id)
        )
        console = await stack.enter_async_context(
            running_console(
                admin.console, api=api, verifier=verifier, state=config.state,
                inventory=config.inventory, store=running.audit_store,
                advertise_url=config.cluster.advertise_url if config.cluster else "",
            )
        )  # fmt: skip
        mount_console(app, console)
        running.console = console
    ssl_context = (
        server_context(admin.tls, "admin.tls") if admin is not None and admin.tls else None
    )
    with _listening("admin.listen", listen):
        running.admin_port = await stack.enter_async_context(
            admin_serving(app, listen.host, listen.port, ssl_context)
        )
    relay.destinations.add_own_endpoint(listen.host, running.admin_port)


@asynccontextmanager
async def _login_verifier(
    authenticator: Authenticator, issuer: str, client_id: str
) -> AsyncIterator[TokenVerifier]:
    """What checks a browser login's ID tokens (audience: the login client): the relay's
    verifier of that issuer when it is one of the relay's issuers, or one of its own."""
    shared = authenticator.verifiers.get(issuer)
    if shared is not None:
        yield Audience(shared, [client_id])
        return
    own = build_verifier(OidcConfig(issuer=issuer, audiences=[client_id]))
    try:
        yield own
    finally:
        await own.aclose()


@asynccontextmanager
async def http_login_verifier(
    http: HttpModeConfig, authenticator: Authenticator
) -> AsyncIterator[TokenVerifier | None]:
    if http.login is None:
        yield None
        return
    async with _login_verifier(authenticator, http.login.issuer, http.login.client_id) as found:
        yield found


async def _addresses(url: str, default_port: int) -> list[tuple[str, int]]:
    """The numeric addresses a service URL's host resolves to now (none if it does not)."""
    parts = urlsplit(url)
    port = parts.port or default_port
    if not parts.hostname:
        return []
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            parts.hostname, port, type=socket.SOCK_STREAM
        )
    except OSError:
        return []
    return [(str(info[4][0]), port) for info in infos]


def _applier(
    relay: Relay, revocations: Revocations, running: RunningServer
) -> Callable[[Revocation], None]:
    """Apply a revocation decided on another node: refuse the user's older tokens here too,
    close their tunnels (or the one tunnel) and web sessions on this node (and its HTTP-mode
    workers)."""

    def apply(revocation: Revocation) -> None:
        if revocation.kind == "user":
            at = revocations.revoke_user(revocation.subject, revocation.at)
            relay.audit.record(
                "user_revoked", principal=revocation.subject, at=at, by=revocation.by,
                origin=revocation.node or None,
            )  # fmt: skip
            running.revoke_web_user(revocation.subject, revocation.at)
        relay.apply_revocation(revocation)

    return apply


def _admin_check(config: ServerConfig, relay: Relay) -> Callable[[Identity], bool]:
    """Admins: the config's admin members, or whom the policy grants the admin role on this
    relay (resource ``relay:NODE``)."""
    members = frozenset(config.admin.members if config.admin else ())
    resource = f"relay:{relay.audit.node}"

    def is_admin(identity: Identity) -> bool:
        if not identity.members.isdisjoint(members):
            return True
        request = AccessRequest(
            identity.members, resource, 0, principal=identity.principal, role=ADMIN
        )
        return evaluate(request, relay.policy, time.time()).allowed

    return is_admin


def _serve_relay(config: ServerConfig, relay: Relay, ssl_context: ssl.SSLContext | None) -> Server:
    server = serve(
        relay.tunnels.handler,
        config.listen.host,
        config.listen.port,
        ssl=ssl_context,
        process_request=relay.handshake.process_request,
        create_connection=connection_class(relay.reply_backlog),  # ping floods
        subprotocols=[Subprotocol(NATIVE.subprotocol), Subprotocol(IAP.subprotocol)],
        compression=None,  # 35x slower with deflate, and it invites decompression bombs
        ping_interval=None,  # never ping on IAP (gcloud drops the tunnel); native pumps ping
        max_size=MAX_MESSAGE,
        open_timeout=config.tunnel.handshake_timeout,
        close_timeout=5,
        server_header="identity-tunnel",
    )
    if config.proxy_protocol:
        factory = websockets_factory(server)

        def refused(peer: str, why: str) -> None:
            relay.audit.record("proxy_header", decision="deny", reason=why, source_ip=peer)

        async def create_server() -> ProxiedListener:
            listener = ProxiedListener(
                listening_socket(config.listen.host, config.listen.port), factory,
                trusted=config.trusted_proxies, ssl_context=ssl_context,
                header_timeout=config.tunnel.handshake_timeout, on_refused=refused,
            )  # fmt: skip
            await listener.start_serving()
            return listener

        server.create_server = create_server  # type: ignore[assignment]
    return server


# Names that lived here before the process runtime and the logs left the composition root: kept
# for one release (looked up by name, so that this module does not depend on them).
_MOVED_NAMES = {
    "serve_forever": "tunnel_server.serve",
    "Reloader": "tunnel_server.serve",
    "setup_logging": "tunnel_server.ops.logs",
    "RedactSecrets": "tunnel_server.ops.logs",
}


def __getattr__(name: str) -> object:
    home = _MOVED_NAMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"tunnel_server.app.{name} moved to {home}; the old path goes in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(home), name)
