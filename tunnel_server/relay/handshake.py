"""The relay's HTTP side of each WebSocket handshake (mixed into the Relay): health and login
endpoints, node-forwarding proof, URL parsing, authentication, admission (drain, caps, shared
state) and routing a resume to the node that holds its tunnel. Every refusal is an HTTP status
with an audit record."""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from ipaddress import IPv4Network, IPv6Network
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from tunnel_protocol.urls import (
    CONNECT_PATH,
    RECONNECT_PATH,
    ConnectRequest,
    ReconnectRequest,
    UrlError,
    parse_request_path,
)

from ..access.device import Device, peer_device
from ..access.identity import Authenticator, AuthError, Identity, IssuerUnavailable
from ..access.source import client_address
from ..audit import AuditLog
from ..config import LoginConfig
from ..state import StateStore, StateUnavailable
from .cluster import STATE_DOWN, ClusterLink
from .forwarding import Forwarded, ForwardRefused, OwnerUnreachable, verify_forward
from .limits import TunnelCaps

# websockets refuses header lines over 8 KiB (431) before we see them; same bound here.
MAX_AUTHORIZATION = 8 * 1024
WELL_KNOWN_LOGIN = "/.well-known/tunnel-client"
# Seconds a client refused at a cap (429) is told to wait before trying again.
CAP_RETRY_AFTER = 5


@dataclass(frozen=True, slots=True)
class Handshake:
    """What an accepted handshake hands to the connection handler."""

    identity: Identity
    request: ConnectRequest | ReconnectRequest
    device: Device | None
    source_ip: str | None
    owner: ClientConnection | None = None  # a resume forwarded to the node holding the tunnel


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def respond(
    connection: ServerConnection,
    status: HTTPStatus,
    text: str,
    headers: dict[str, str] | None = None,
) -> Response:
    response = connection.respond(status, text)
    for key, value in (headers or {}).items():
        response.headers[key] = value
    response.headers["Cache-Control"] = "no-store"
    return response


def peer_ip(connection: ServerConnection) -> str | None:
    address = connection.remote_address
    if isinstance(address, tuple) and address:
        return str(address[0])
    return None


class HandshakeMixin:
    audit: AuditLog
    link: ClusterLink
    state: StateStore
    draining: bool
    caps: TunnelCaps
    verifier: Authenticator
    login: LoginConfig | None
    _revoked: Callable[[Identity], bool]
    _handshakes: weakref.WeakKeyDictionary[ServerConnection, Handshake]
    trusted_proxies: Sequence[IPv4Network | IPv6Network]

    if TYPE_CHECKING:

        async def _forward_target(
            self, request: Request, identity: Identity, sid: str, source_ip: str | None
        ) -> ClientConnection | None: ...

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/healthz":
            return respond(connection, HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            return await self._readyz(connection)
        if path == WELL_KNOWN_LOGIN:
            return self._login_document(connection)
        if path not in (CONNECT_PATH, RECONNECT_PATH):
            return respond(connection, HTTPStatus.NOT_FOUND, "not found\n")
        try:
            self._handshakes[connection] = await self._admit(connection, request, path)
        except _Refused as refused:
            return refused.response
        return None

    async def _admit(self, connection: ServerConnection, request: Request, path: str) -> Handshake:
        forwarded = self._forwarded(connection, request, path)
        if forwarded is not None:
            source_ip = forwarded.client_ip or None
        else:
            source_ip, _ = client_address(
                peer_ip(connection),
                request.headers.get_all("X-Forwarded-For"),
                self.trusted_proxies,
            )
        try:
            parsed = parse_request_path(request.path)
        except UrlError as exc:
            self._deny(connection, 400, f"{exc}\n", f"bad request: {exc}", source_ip)
        identity = await self._authenticate_handshake(connection, request.headers, source_ip)
        owner = None
        if isinstance(parsed, ConnectRequest):
            self._admit_connect(connection, identity, source_ip)
        elif forwarded is None:
            try:
                owner = await self._forward_target(request, identity, parsed.sid, source_ip)
            except StateUnavailable:
                self._state_down(connection, identity, source_ip)
            except OwnerUnreachable as exc:
                status = HTTPStatus(exc.status or 502)
                raise _Refused(respond(connection, status, f"{status.phrase.lower()}\n")) from None
        device = peer_device(connection.transport.get_extra_info("ssl_object"))
        return Handshake(identity, parsed, device, source_ip, owner)

    def _deny(
        self,
        connection: ServerConnection,
        status: int,
        text: str,
        reason: str,
        source_ip: str | None,
        headers: dict[str, str] | None = None,
        **fields: object,
    ) -> NoReturn:
        self.audit.record(
            "handshake", decision="deny", reason=reason, source_ip=source_ip, status=status,
            **fields,
        )  # fmt: skip
        raise _Refused(respond(connection, HTTPStatus(status), text, headers))

    def _forwarded(
        self, connection: ServerConnection, request: Request, path: str
    ) -> Forwarded | None:
        """A resume relayed by another node of the cluster: the client's address it vouches
        for. A forwarding claim without proof of the cluster secret is refused (403)."""
        try:
            forwarded = verify_forward(request.headers, request.path, self.link.secret, time.time())
        except ForwardRefused as exc:
            self._deny(connection, 403, "forbidden\n", str(exc), peer_ip(connection))
        if forwarded is not None and path != RECONNECT_PATH:
            self._deny(connection, 403, "forbidden\n", "forwarded connect", peer_ip(connection))
        return forwarded

    async def _authenticate_handshake(
        self, connection: ServerConnection, headers: Headers, source_ip: str | None
    ) -> Identity:
        try:
            return await self._authenticate(headers)
        except IssuerUnavailable as exc:
            # Not the caller's fault: 503 tells clients to retry instead of logging in again.
            self._deny(
                connection, 503, "identity provider unavailable, retry later\n", exc.reason,
                source_ip, {"Retry-After": "5"},
            )  # fmt: skip
        except AuthError as exc:
            # RFC 6750 3.1: no error attribute when the request carried no credentials.
            challenge = 'Bearer realm="tunnel"'
            if exc.reason != "missing credentials":
                challenge += ', error="invalid_token"'
            self._deny(
                connection, 401, "authentication required: log in again\n", exc.reason,
                source_ip, {"WWW-Authenticate": challenge},
            )  # fmt: skip

    def _admit_connect(
        self, connection: ServerConnection, identity: Identity, source_ip: str | None
    ) -> None:
        """Refuse a new tunnel while draining, at a cap, or without the shared state.
        Reconnects are never refused here: they resume tunnels already counted, and they are
        how tunnels survive a drain's grace period."""
        if self.draining:
            raise _Refused(
                respond(
                    connection, HTTPStatus.SERVICE_UNAVAILABLE, "draining\n", {"Retry-After": "1"}
                )
            )
        refusal = self.caps.refusal(identity.principal)
        if refusal is not None:
            self._deny(
                connection, 429, f"{refusal}: close a tunnel or retry later\n", refusal,
                source_ip, {"Retry-After": str(CAP_RETRY_AFTER)}, principal=identity.principal,
            )  # fmt: skip
        if not self.state.available and not self.link.fail_open:
            self._state_down(connection, identity, source_ip)

    def _state_down(
        self, connection: ServerConnection, identity: Identity, source_ip: str | None
    ) -> NoReturn:
        self._deny(
            connection, 503, f"{STATE_DOWN}, retry later\n", STATE_DOWN, source_ip,
            {"Retry-After": "5"}, principal=identity.principal,
        )  # fmt: skip

    async def _authenticate(self, headers: Headers) -> Identity:
        values = headers.get_all("Authorization")
        if len(values) != 1:
            raise AuthError("missing credentials" if not values else "several credentials")
        value = values[0]
        if len(value) > MAX_AUTHORIZATION:
            raise AuthError("too large")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("not a bearer token")
        identity = await self.verifier.verify(token.strip())
        if self._revoked(identity):
            raise AuthError("revoked")
        return identity

    def _login_document(self, connection: ServerConnection) -> Response:
        if self.login is None:
            return respond(connection, HTTPStatus.NOT_FOUND, "no login configuration\n")
        body = json.dumps(self.login.model_dump(), separators=(",", ":"))
        response = respond(connection, HTTPStatus.OK, body)
        del response.headers["Content-Type"]  # Headers is a multi-dict: replace, not append
        response.headers["Content-Type"] = "application/json"
        return response

    async def _readyz(self, connection: ServerConnection) -> Response:
        if self.draining:
            return respond(connection, HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
        if not self.state.available:
            return respond(connection, HTTPStatus.SERVICE_UNAVAILABLE, f"{STATE_DOWN}\n")
        if not self.verifier.ready:
            try:
                await self.verifier.refresh()
            except AuthError:
                return respond(connection, HTTPStatus.SERVICE_UNAVAILABLE, "issuer unavailable\n")
        return respond(connection, HTTPStatus.OK, "ready\n")
