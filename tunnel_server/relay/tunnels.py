"""A tunnel's life on its WebSocket, after the upgrade: a connect (reserve, authorize, dial,
register) or a resume (find the tunnel, re-decide it, take over its attachment), then one
attachment: the pump runs while continuous authorization watches, and the tunnel is parked for
a resume or ended when it stops."""

from __future__ import annotations

import asyncio

from websockets.asyncio.server import ServerConnection

from tunnel_protocol import DIALECTS, CloseCode, Side, Tunnel, TunnelError
from tunnel_protocol.aio.pump import ControlJob, End, Pump
from tunnel_protocol.tunnel import Event, ReauthReceived
from tunnel_protocol.urls import ConnectRequest, HostTarget, ReconnectRequest

from ..access.addresses import DestinationError, IPAddress
from ..audit import AuditLog
from ..config import TunnelSettings
from ..state import new_sid
from .admission import Admission
from .cluster import Cluster
from .connection import Admitted, RelayConnection
from .continuous import Reauthorizer
from .dialer import Preamble, resolve_and_dial
from .refused import Refused
from .registry import Registry
from .session import Session
from .upstream_identity import IdentitySigner, proxy_header

# Closes we send that expect the client to come back on /v4/reconnect: the tunnel is parked.
_PARK_AFTER = frozenset({CloseCode.SID_IN_USE, CloseCode.REAUTHENTICATION_REQUIRED})


class Tunnels:
    def __init__(
        self,
        *,
        admission: Admission,
        registry: Registry,
        reauthorizer: Reauthorizer,
        cluster: Cluster,
        settings: TunnelSettings,
        audit: AuditLog,
        sign_identity: IdentitySigner | None = None,
    ) -> None:
        self.admission = admission
        self.registry = registry
        self.reauthorizer = reauthorizer
        self.cluster = cluster
        self.settings = settings
        self.audit = audit
        # HTTP mode's signer, for destinations with proxy_protocol; the composition root sets
        # it once HTTP mode runs (its keys and JWKS are the ones upstreams trust).
        self.sign_identity = sign_identity

    async def handler(self, ws: ServerConnection) -> None:
        """websockets' connection handler, for connections the handshake admitted."""
        admitted = ws.admitted if isinstance(ws, RelayConnection) else None
        dialect = DIALECTS.get(ws.subprotocol or "")
        if admitted is None or dialect is None:  # pragma: no cover - the handshake ensures it
            await ws.close(CloseCode.UNKNOWN_ERROR, "bad handshake")
            return
        request = admitted.request
        if admitted.owner is not None and isinstance(request, ReconnectRequest):
            # Only a resume is ever forwarded to the node that holds its tunnel.
            principal = admitted.identity.principal
            await self.cluster.bridge(ws, admitted.owner, principal, request.sid)
            return
        try:
            if isinstance(request, ConnectRequest):
                session = await self._connect(ws, admitted, request, dialect.name)
            else:
                session = await self._resume(ws, admitted, request)
        except Refused as refused:
            await ws.close(refused.code, refused.message)
            return
        await self._attach(ws, session)

    # -- connect --------------------------------------------------------------------------------

    async def _connect(
        self, ws: ServerConnection, admitted: Admitted, request: ConnectRequest, dialect: str
    ) -> Session:
        identity, subprotocol = admitted.identity, ws.subprotocol or ""
        sid = new_sid(self.cluster.state.tag)
        try:
            # The handshake checked the caps; concurrent connects may have filled them since.
            # The reservation covers the dial too, so the caps are never exceeded.
            await self.registry.reserve(sid, identity, subprotocol)
        except Refused as refused:
            self.audit.record(
                "decision", decision="deny", reason=refused.reason, principal=identity.principal,
                source_ip=admitted.source_ip, dialect=dialect,
            )  # fmt: skip
            raise
        try:
            session = await self._open(admitted, request, dialect, sid, subprotocol)
        except BaseException:
            self.registry.unreserve(sid, identity, subprotocol)
            raise
        self.registry.add(session)
        return session

    async def _open(
        self, admitted: Admitted, request: ConnectRequest, dialect: str, sid: str, subprotocol: str
    ) -> Session:
        grant = self.admission.authorize_connect(
            admitted.identity, request, admitted.source_ip, admitted.device, dialect
        )
        destination = grant.destination
        target = request.target
        preamble: Preamble | None = None
        if destination.proxy_header is not None:
            audience = destination.proxy_header.audience
            levels = self.admission.access_levels(grant) if audience is not None else []
            name = target.host if isinstance(target, HostTarget) else target.name

            def preamble(dialed: IPAddress, port: int) -> bytes:
                return proxy_header(
                    self.sign_identity, identity=admitted.identity, audience=audience,
                    access_levels=levels, tunnel_id=sid, target=name,
                    source_ip=admitted.source_ip, dialed=dialed, port=port,
                )  # fmt: skip

        try:
            # Resolve once, check every answer, connect to exactly the address checked.
            stream, dialed = await resolve_and_dial(
                destination.host,
                destination.port,
                policy=self.admission.destinations.scoped(destination.networks),
                allowed=self.admission.dial_filter(grant),
                timeout=self.settings.dial_timeout,
                preamble=preamble,
            )
        except DestinationError as exc:
            raise self.admission.dial_refused(grant, exc, dialect) from None
        tunnel = Tunnel(
            Side.SERVER, DIALECTS[subprotocol], buffer_limit=self.settings.resume_buffer
        )
        tunnel.attach_server(sid.encode())
        session = Session(
            sid,
            admitted.identity,
            tunnel,
            stream,
            destination.resource,
            str(dialed),
            destination.port,
            admitted.source_ip,
            device=admitted.device,
            host=target.host if isinstance(target, HostTarget) else None,
            last_activity=asyncio.get_running_loop().time(),
        )
        self.admission.opened(grant, sid, dialed)
        return session

    # -- resume ---------------------------------------------------------------------------------

    async def _resume(
        self, ws: ServerConnection, admitted: Admitted, request: ReconnectRequest
    ) -> Session:
        identity = admitted.identity
        session = self.registry.sessions.get(request.sid)
        fields = {"principal": identity.principal, "source_ip": admitted.source_ip}
        if session is None:
            self.audit.record("resume", decision="deny", reason="sid unknown", **fields)
            raise Refused(CloseCode.SID_UNKNOWN, "sid unknown")
        if session.identity.principal != identity.principal:
            self.audit.record(
                "resume", decision="deny", reason="principal mismatch", tunnel_id=session.sid,
                **fields,
            )  # fmt: skip
            raise Refused(CloseCode.SID_UNKNOWN, "sid unknown")
        if session.tunnel.dialect.subprotocol != ws.subprotocol:
            raise Refused(CloseCode.PROTOCOL_ERROR, "subprotocol differs from the tunnel's")
        decision = self.admission.decide(identity, session)
        if not decision.allowed:
            # The fresh token's groups (or the policy) no longer grant this tunnel: end it.
            refused = self.admission.refuse_resume(session, decision, fields)
            # An attachment still running hears "not authorized"; the record keeps the reason.
            reason = "not authorized" if session.pump is not None else decision.reason
            self.registry.close(session, CloseCode.NOT_AUTHORIZED, reason)
            raise refused
        if not await self.registry.take_over(session):
            raise Refused(CloseCode.SID_UNKNOWN, "sid unknown")
        try:
            session.tunnel.attach_server(session.sid.encode(), resume_from=request.ack)
        except TunnelError as exc:
            self.audit.record(
                "resume", decision="deny", reason=str(exc), tunnel_id=session.sid, **fields
            )
            self.registry.end(session, exc.code, str(exc))
            raise Refused(exc.code, str(exc)) from None
        session.renew(identity)
        session.resumes += 1
        self.audit.record(
            "resume", decision="allow", tunnel_id=session.sid, ack=request.ack, **fields
        )
        return session

    # -- one attachment -------------------------------------------------------------------------

    async def _attach(self, ws: ServerConnection, session: Session) -> None:
        def on_control(event: Event) -> ControlJob | None:
            # The token check may fetch JWKS: it runs beside the data, not in the reader.
            if isinstance(event, ReauthReceived):
                return self.reauthorizer.reauth(session, pump, event.token)
            return None

        settings = self.settings
        pump = Pump(
            session.tunnel,
            ws,
            session.stream,
            on_control=on_control,
            keepalive=(settings.keepalive_interval, settings.keepalive_timeout),
            last_activity=session.last_activity,
        )
        session.pump = pump
        self.registry.attached(session)
        try:
            async with asyncio.TaskGroup() as tg:
                watcher = tg.create_task(self.reauthorizer.watch(session, pump))
                outcome = await pump.run()
                watcher.cancel()
        except asyncio.CancelledError:
            # Shutdown cancelled the handler: the target connection must not outlive it.
            self.registry.end(session, CloseCode.GOING_AWAY, "relay shutting down")
            raise
        finally:
            self.registry.detached(session, pump.last_activity)
        if outcome.end is End.LOST or (outcome.end is End.CLOSED and outcome.code in _PARK_AFTER):
            self.registry.park(session)
        else:
            self.registry.finish(session, outcome)
