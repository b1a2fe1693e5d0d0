"""Composition root: build the relay from a config, serve it, shut down cleanly on signals."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from websockets.asyncio.server import Server, serve
from websockets.typing import Subprotocol

from tunnel_protocol import IAP, NATIVE, CloseCode

from .audit import AuditLog
from .config import ServerConfig
from .identity import DEFAULT_ALGORITHMS, Authenticator, Introspector, OidcVerifier
from .inventory import Inventory
from .policy import Policy
from .relay import Relay
from .tls import server_context

log = logging.getLogger("tunnel.server")

# One frame per message: the largest native DATA frame plus its header, with room for control.
MAX_MESSAGE = NATIVE.max_data + 1024


@dataclass
class RunningServer:
    relay: Relay
    server: Server
    verifier: Authenticator
    secure: bool

    @property
    def port(self) -> int:
        sockets = list(self.server.sockets)
        return int(sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "wss" if self.secure else "ws"
        return f"{scheme}://127.0.0.1:{self.port}"


def build_authenticator(config: ServerConfig) -> Authenticator:
    verifiers: list[OidcVerifier] = []
    introspectors: list[Introspector] = []
    for oidc in config.issuers:
        verifier = OidcVerifier(
            oidc.issuer,
            oidc.audiences,
            algorithms=tuple(oidc.algorithms) if oidc.algorithms else DEFAULT_ALGORITHMS,
            leeway=oidc.leeway,
            max_lifetime=oidc.max_token_lifetime,
            jwks_ttl=oidc.jwks_ttl,
            groups_claim=oidc.groups_claim,
        )
        verifiers.append(verifier)
        if oidc.introspection is not None:
            introspectors.append(
                Introspector(
                    verifier,
                    client_id=oidc.introspection.client_id,
                    client_secret=oidc.introspection.client_secret,
                    endpoint=oidc.introspection.endpoint,
                    cache_ttl=oidc.introspection.cache_ttl,
                )
            )
    return Authenticator(verifiers, introspectors)


def build_relay(config: ServerConfig, *, node: str | None = None) -> tuple[Relay, Authenticator]:
    authenticator = build_authenticator(config)
    relay = Relay(
        verifier=authenticator,
        inventory=Inventory(config.inventory),
        policy=Policy(tuple(config.access)),
        settings=config.tunnel,
        audit=AuditLog(node or socket.gethostname()),
        login=config.login,
    )
    return relay, authenticator


@asynccontextmanager
async def running(config: ServerConfig, *, node: str | None = None) -> AsyncIterator[RunningServer]:
    """Serve ``config`` until the context exits; tunnels are closed with 1001 on the way out."""
    relay, verifier = build_relay(config, node=node)
    ssl_context = server_context(config.tls) if config.tls is not None else None
    try:
        async with serve(
            relay.handler,
            config.listen.host,
            config.listen.port,
            ssl=ssl_context,
            process_request=relay.process_request,
            subprotocols=[Subprotocol(NATIVE.subprotocol), Subprotocol(IAP.subprotocol)],
            compression=None,  # 35x slower with deflate, and it invites decompression bombs
            ping_interval=None,  # never ping on IAP (gcloud drops the tunnel); native pumps ping
            max_size=MAX_MESSAGE,
            open_timeout=config.tunnel.handshake_timeout,
            close_timeout=5,
            server_header="identity-tunnel",
        ) as server:
            yield RunningServer(relay, server, verifier, ssl_context is not None)
            relay.draining = True
            relay.close_all(CloseCode.GOING_AWAY, "relay shutting down")
        # Handlers have returned; anything left (parked tunnels) ends now.
        relay.close_all(CloseCode.GOING_AWAY, "relay shutting down")
    finally:
        await verifier.aclose()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == "tunnel.audit":
            return record.getMessage()  # already a JSON record
        entry = {
            "time": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(fmt: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("websockets").setLevel(logging.WARNING)


async def serve_forever(config: ServerConfig) -> None:
    """Run until SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
            pass
    async with running(config) as srv:
        try:
            await srv.verifier.refresh()
        except Exception as exc:  # the relay still starts; /readyz reports it
            log.warning("issuer not reachable at start: %s", exc)
        log.info("listening on %s", srv.url)
        print(f"Listening on {srv.url}", file=sys.stderr, flush=True)
        await stop.wait()
        log.info("shutting down")
