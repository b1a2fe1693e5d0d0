"""The admin listener (its own address): list and revoke tunnels under ``/admin/``, authenticated
by a bearer token whose identity holds the admin role. JSON over HTTP, served with aiohttp. The
console (``tunnel_server.console``), when configured, is mounted beside it under ``/console/``
and revokes through the same ``AdminApi.revoke_subject``."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

from aiohttp import web

from ..access.identity import Authenticator, AuthError, Identity, IssuerUnavailable, bearer_token
from ..access.policy import explain
from ..access.revocations import Revocations
from ..relay import Relay
from ..relay.denials import KEEP
from ..state import Revocation
from .listeners import serve_app

IsAdmin = Callable[[Identity], bool]

_PRINCIPAL = web.RequestKey("principal", str)


def session_view(relay: Relay) -> list[dict[str, Any]]:
    now = time.monotonic()
    return [
        {
            "tunnel_id": s.sid,
            "principal": s.identity.principal,
            "resource": s.resource,
            "address": s.address,
            "port": s.port,
            "source_ip": s.source_ip,
            "dialect": s.tunnel.dialect.name,
            "state": "attached" if s.pump is not None else "parked",
            "age": round(now - s.created, 3),
            "bytes_from_client": s.tunnel.received_total,
            "bytes_to_client": s.tunnel.sent_total,
            "resumes": s.resumes,
        }
        for s in relay.sessions.values()
    ]


class AdminApi:
    """The admin endpoints. ``on_revoke_user``: also end the user's HTTP-mode sessions and
    WebSockets. ``publish``: persist a revocation in the shared state and push it to the other
    nodes."""

    def __init__(
        self,
        relay: Relay,
        authenticator: Authenticator,
        is_admin: IsAdmin,
        revocations: Revocations,
        *,
        on_revoke_user: Callable[[str], int] | None = None,
        publish: Callable[[Revocation], Awaitable[None]] | None = None,
    ) -> None:
        self.relay = relay
        self.authenticator = authenticator
        self.is_admin = is_admin
        self.revocations = revocations
        self.on_revoke_user = on_revoke_user
        self.publish = publish

    def app(self) -> web.Application:
        """The listener's root application: the JSON API under ``/admin/`` (bearer tokens);
        other parts (the console) may be mounted beside it with ``add_subapp``."""
        api = web.Application(middlewares=[self.authenticate], client_max_size=64 * 1024)
        api.router.add_get("/sessions", self.list_sessions)
        api.router.add_post("/revoke", self.revoke)
        api.router.add_get("/explain", self.explain_refusal)
        root = web.Application(client_max_size=64 * 1024)
        root.add_subapp("/admin/", api)
        return root

    @web.middleware
    async def authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        token = bearer_token(request.headers.get("Authorization"))
        challenge = {"WWW-Authenticate": 'Bearer realm="tunnel-admin"'}
        if token is None:
            return _json({"error": "authentication required"}, 401, challenge)
        try:
            identity = await self.authenticator.verify(token)
        except IssuerUnavailable:
            return _json({"error": "identity provider unavailable"}, 503, {"Retry-After": "5"})
        except AuthError as exc:
            self.relay.audit.record("admin", decision="deny", reason=exc.reason, status=401)
            return _json({"error": "authentication required"}, 401, challenge)
        if not self.is_admin(identity):
            self.relay.audit.record(
                "admin", decision="deny", reason="not an admin", principal=identity.principal
            )
            return _json({"error": "admin role required"}, 403)
        request[_PRINCIPAL] = identity.principal
        response: web.StreamResponse = await handler(request)
        return response

    async def list_sessions(self, request: web.Request) -> web.Response:
        return _json({"sessions": session_view(self.relay)})

    async def explain_refusal(self, request: web.Request) -> web.Response:
        """Why a refusal happened, by the reference its caller was given: the policy in force
        now, explained at the moment of the refusal."""
        reference = request.query.get("reference", "")
        denial = self.relay.denial(reference)
        if denial is None:
            return _json(
                {
                    "error": f"no refusal {reference!r} on this node (the last {KEEP} are kept; "
                    "older ones are in the audit log)"
                },
                404,
            )
        body: dict[str, Any] = {
            "reference": denial.reference,
            "category": denial.category,
            "reason": denial.reason,
            "time": denial.at,
        }
        if denial.request is not None:
            result = explain(denial.request, self.relay.policy, denial.at)
            body["explanation"] = result.as_dict()
            body["lines"] = result.lines()
        return _json(body, dumps=lambda data: json.dumps(data, default=str))

    async def revoke(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _json({"error": "JSON body required"}, 400)
        if not isinstance(body, dict) or len(body.keys() & {"user", "session"}) != 1:
            return _json({"error": 'give exactly one of "user" or "session"'}, 400)
        admin = request[_PRINCIPAL]
        if "user" in body:
            closed = await self.revoke_subject("user", str(body["user"]), admin)
        else:
            closed = await self.revoke_subject("session", str(body["session"]), admin)
        return _json({"closed": closed})

    async def revoke_subject(
        self, kind: Literal["user", "session"], subject: str, admin: str
    ) -> int:
        """Revoke a user (their tunnels close and their current tokens are refused) or one
        tunnel, here and, through the shared state, on every node; how many closed here."""
        relay = self.relay
        if kind == "user":
            at = self.revocations.revoke_user(subject)
            relay.audit.record("user_revoked", principal=subject, at=at, by=admin)
            closed = relay.revoke_user(subject, by=admin)
            if self.on_revoke_user is not None:
                closed += self.on_revoke_user(subject)
            revocation = Revocation("user", subject, at, admin, relay.node)
        else:
            closed = relay.revoke_session(subject, by=admin)
            revocation = Revocation("session", subject, time.time(), admin, relay.node)
        relay.events.revocation("local")
        if self.publish is not None:
            # Never fails: kept and pushed again when the shared state is back.
            await self.publish(revocation)
        return closed


def admin_app(
    relay: Relay,
    authenticator: Authenticator,
    is_admin: IsAdmin,
    revocations: Revocations,
    *,
    on_revoke_user: Callable[[str], int] | None = None,
    publish: Callable[[Revocation], Awaitable[None]] | None = None,
) -> web.Application:
    """The admin API as an aiohttp application (see ``AdminApi``)."""
    api = AdminApi(
        relay, authenticator, is_admin, revocations, on_revoke_user=on_revoke_user, publish=publish
    )
    return api.app()


def _json(
    data: Any,
    status: int = 200,
    headers: dict[str, str] | None = None,
    *,
    dumps: Callable[[Any], str] = json.dumps,
) -> web.Response:
    return web.Response(
        text=dumps(data),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


@asynccontextmanager
async def serving(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    """Run the admin app on host:port (HTTPS with ``ssl_context``); yields the bound port."""
    async with serve_app(app, host, port, ssl_context=ssl_context) as bound:
        yield bound
