"""The HTTP side of the relay's WebSocket handshakes: health, readiness and the client's login
document, then for ``/v4/connect`` and ``/v4/reconnect``: the forwarding proof of another node,
the URL, authentication, admission of a new tunnel (drain, caps, shared state) and the route of a
resume to the node that holds its tunnel. Every refusal is an HTTP status with an audit record;
what was admitted rides on the connection into the tunnel handler."""

from __future__ import annotations

import json
from collections.abc import Sequence
from http import HTTPStatus
from typing import NoReturn
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from tunnel_protocol.urls import (
    CONNECT_PATH,
    RECONNECT_PATH,
    SSH_CA_PATH,
    SSH_CERTIFICATE_PATH,
    SSH_KRL_PATH,
    SSH_PUBLIC_KEY_HEADER,
    ConnectRequest,
    ReconnectRequest,
    UrlError,
    parse_request_path,
    parse_target_query,
)

from ..access.addresses import IPNetwork
from ..access.device import peer_device
from ..access.identity import (
    Authenticator,
    AuthError,
    Identity,
    IssuerUnavailable,
    describe_refusal,
)
from ..access.source import client_address
from ..access.ssh_ca import KeyRefused
from ..audit import AuditLog
from ..config import LoginConfig
from ..state import StateUnavailable
from .admission import Admission
from .certificates import CertificateIssuer
from .cluster import STATE_DOWN, Cluster
from .connection import Admitted, RelayConnection
from .forwarding import Forwarded, ForwardRefused, OwnerUnreachable
from .refused import Refused
from .registry import Registry

WELL_KNOWN_LOGIN = "/.well-known/tunnel-client"
# Seconds a client refused at a cap (429) is told to wait before trying again.
CAP_RETRY_AFTER = 5


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


def _binary(body: bytes) -> Response:
    headers = Headers(
        [
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
    )
    return Response(HTTPStatus.OK, "OK", headers, body)


def peer_ip(connection: ServerConnection) -> str | None:
    address = connection.remote_address
    if isinstance(address, tuple) and address:
        return str(address[0])
    return None


class Handshake:
    def __init__(
        self,
        *,
        admission: Admission,
        registry: Registry,
        cluster: Cluster,
        authenticator: Authenticator,
        audit: AuditLog,
        login: LoginConfig | None,
        trusted_proxies: Sequence[IPNetwork],
        certificates: CertificateIssuer | None = None,
    ) -> None:
        self.admission = admission
        self.registry = registry
        self.cluster = cluster
        self.authenticator = authenticator
        self.audit = audit
        self.login = login
        self.trusted_proxies = tuple(trusted_proxies)
        self.certificates = certificates

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """websockets' ``process_request``: a response refuses (or answers) the request; None
        upgrades it, with ``connection.admitted`` set."""
        path = urlsplit(request.path).path
        if path == "/healthz":
            return respond(connection, HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            return await self._readyz(connection)
        if path == WELL_KNOWN_LOGIN:
            return self._login_document(connection)
        if path in (SSH_CERTIFICATE_PATH, SSH_CA_PATH, SSH_KRL_PATH):
            try:
                return await self._ssh(connection, request, path)
            except _Refused as refused:
                return refused.response
        if path not in (CONNECT_PATH, RECONNECT_PATH):
            return respond(connection, HTTPStatus.NOT_FOUND, "not found\n")
        try:
            admitted = await self._admit(connection, request, path)
        except _Refused as refused:
            return refused.response
        if not isinstance(connection, RelayConnection):  # pragma: no cover - the app's class
            raise TypeError("the relay's connections must be RelayConnection")
        connection.admitted = admitted
        return None

    async def _admit(self, connection: ServerConnection, request: Request, path: str) -> Admitted:
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
        identity = await self._authenticate(connection, request, source_ip)
        owner = None
        if isinstance(parsed, ConnectRequest):
            self._admit_connect(connection, identity, source_ip)
        elif forwarded is None:
            owner = await self._route_resume(connection, request, identity, parsed, source_ip)
        device = peer_device(connection.transport.get_extra_info("ssl_object"))
        return Admitted(identity, parsed, device, source_ip, owner)

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
            forwarded = self.cluster.forwarded(request.headers, request.path)
        except ForwardRefused as exc:
            self._deny(connection, 403, "forbidden\n", str(exc), peer_ip(connection))
        if forwarded is not None and path != RECONNECT_PATH:
            self._deny(connection, 403, "forbidden\n", "forwarded connect", peer_ip(connection))
        return forwarded

    async def _authenticate(
        self, connection: ServerConnection, request: Request, source_ip: str | None
    ) -> Identity:
        try:
            return await self.admission.authenticate(request.headers.get_all("Authorization"))
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
                description = describe_refusal(exc.reason)
                challenge += f', error="invalid_token", error_description="{description}"'
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
        if self.registry.draining:
            raise _Refused(
                respond(
                    connection, HTTPStatus.SERVICE_UNAVAILABLE, "draining\n", {"Retry-After": "1"}
                )
            )
        refusal = self.registry.caps.refusal(identity.principal)
        if refusal is not None:
            self._deny(
                connection, 429, f"{refusal}: close a tunnel or retry later\n", refusal,
                source_ip, {"Retry-After": str(CAP_RETRY_AFTER)}, principal=identity.principal,
            )  # fmt: skip
        if not self.cluster.admits_new_tunnels:
            self._state_down(connection, identity, source_ip)

    async def _route_resume(
        self,
        connection: ServerConnection,
        request: Request,
        identity: Identity,
        parsed: ReconnectRequest,
        source_ip: str | None,
    ) -> ClientConnection | None:
        """The owner's WebSocket for a resume of a tunnel another node holds (None: this node
        holds it, or nobody does and the handler answers 'sid unknown')."""
        if self.registry.held(parsed.sid):
            return None
        try:
            return await self.cluster.forward_target(
                request.path, request.headers, identity, parsed.sid, source_ip
            )
        except StateUnavailable:
            self._state_down(connection, identity, source_ip)
        except OwnerUnreachable as exc:
            status = HTTPStatus(exc.status or 502)
            raise _Refused(respond(connection, status, f"{status.phrase.lower()}\n")) from None

    def _state_down(
        self, connection: ServerConnection, identity: Identity, source_ip: str | None
    ) -> NoReturn:
        self._deny(
            connection, 503, f"{STATE_DOWN}, retry later\n", STATE_DOWN, source_ip,
            {"Retry-After": "5"}, principal=identity.principal,
        )  # fmt: skip

    async def _ssh(self, connection: ServerConnection, request: Request, path: str) -> Response:
        """SSH certificates: the CA keys to trust and the revocation list (public), or a user
        certificate for an authenticated member (docs/ssh-certificates.md)."""
        issuer = self.certificates
        if issuer is None:
            return respond(connection, HTTPStatus.NOT_FOUND, "no SSH certificates here\n")
        if path == SSH_CA_PATH:
            return respond(connection, HTTPStatus.OK, issuer.ca_document())
        if path == SSH_KRL_PATH:
            return _binary(issuer.krl())
        source_ip, _ = client_address(
            peer_ip(connection), request.headers.get_all("X-Forwarded-For"), self.trusted_proxies
        )
        try:
            target = parse_target_query(urlsplit(request.path).query)
        except UrlError as exc:
            self._deny(connection, 400, f"{exc}\n", f"bad request: {exc}", source_ip)
        public_key = request.headers.get(SSH_PUBLIC_KEY_HEADER)
        if not public_key:
            self._deny(connection, 400, f"{SSH_PUBLIC_KEY_HEADER} missing\n",
                       "no public key", source_ip)  # fmt: skip
        identity = await self._authenticate(connection, request, source_ip)
        device = peer_device(connection.transport.get_extra_info("ssl_object"))
        try:
            certificate = issuer.issue(identity, target, public_key, source_ip, device)
        except KeyRefused as exc:
            self._deny(connection, 400, f"{exc}\n", f"bad public key: {exc}", source_ip)
        except Refused as refused:
            return respond(connection, HTTPStatus.FORBIDDEN, refused.message + "\n")
        return respond(connection, HTTPStatus.OK, certificate.certificate + "\n")

    def _login_document(self, connection: ServerConnection) -> Response:
        if self.login is None:
            return respond(connection, HTTPStatus.NOT_FOUND, "no login configuration\n")
        body = json.dumps(self.login.model_dump(), separators=(",", ":"))
        response = respond(connection, HTTPStatus.OK, body)
        del response.headers["Content-Type"]  # Headers is a multi-dict: replace, not append
        response.headers["Content-Type"] = "application/json"
        return response

    async def _readyz(self, connection: ServerConnection) -> Response:
        if self.registry.draining:
            return respond(connection, HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
        if not self.cluster.state.available:
            return respond(connection, HTTPStatus.SERVICE_UNAVAILABLE, f"{STATE_DOWN}\n")
        if not self.authenticator.ready:
            try:
                await self.authenticator.refresh()
            except AuthError:
                return respond(connection, HTTPStatus.SERVICE_UNAVAILABLE, "issuer unavailable\n")
        return respond(connection, HTTPStatus.OK, "ready\n")
