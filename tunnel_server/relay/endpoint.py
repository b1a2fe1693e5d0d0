"""The relay's WebSocket endpoint: authenticate at the handshake, authorize, dial the target,
pump bytes, and park dropped tunnels for resume (bound to the same principal)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from ipaddress import IPv4Network, IPv6Network

from websockets.asyncio.server import ServerConnection

from tunnel_protocol import DIALECTS, CloseCode, Side, Tunnel, TunnelError
from tunnel_protocol.aio.pump import CLOSE_TIMEOUT, End, Outcome, Pump
from tunnel_protocol.tunnel import Event, ReauthReceived
from tunnel_protocol.urls import (
    ConnectRequest,
    HostTarget,
    ReconnectRequest,
)

from ..access.addresses import (
    DestinationDenied,
    DestinationPolicy,
    DialFailed,
    IPAddress,
    within,
)
from ..access.identity import Authenticator, Identity
from ..access.inventory import Inventory, LookupFailed
from ..access.policy import Policy, evaluate
from ..audit import AuditLog
from ..config import LoginConfig, TunnelSettings
from ..ops.metrics import Metrics
from ..state import MemoryState, StateStore, new_sid
from .cluster import STATE_DOWN, ClusterLink, ClusterMixin
from .continuous import ContinuousAuthorization, access_request
from .dialer import resolve_and_dial
from .handshake import Handshake, HandshakeMixin
from .limits import LimitsMixin, TunnelCaps
from .session import Session

log = logging.getLogger("tunnel.relay")

# Closes we send that expect the client to come back on /v4/reconnect: the tunnel is parked.
_PARK_AFTER = frozenset({CloseCode.SID_IN_USE, CloseCode.REAUTHENTICATION_REQUIRED})
DRAIN_REASON = "relay draining, reconnect"


class Relay(HandshakeMixin, ContinuousAuthorization, LimitsMixin, ClusterMixin):
    def __init__(
        self,
        *,
        verifier: Authenticator,
        inventory: Inventory,
        policy: Policy,
        settings: TunnelSettings,
        audit: AuditLog,
        login: LoginConfig | None = None,
        revoked: Callable[[Identity], bool] = lambda identity: False,
        destinations: DestinationPolicy | None = None,
        state: StateStore | None = None,
        link: ClusterLink | None = None,
        trusted_proxies: Sequence[IPv4Network | IPv6Network] = (),
    ) -> None:
        self.destinations = destinations or DestinationPolicy()
        self.state = state or MemoryState(audit.node)
        self.metrics: Metrics | None = None  # set by the composition root when configured
        self.link = link or ClusterLink()
        self.trusted_proxies = tuple(trusted_proxies)
        self.verifier = verifier
        self.login = login
        self._revoked = revoked
        self.inventory = inventory
        self.policy = policy
        self.settings = settings
        self.audit = audit
        self.sessions: dict[str, Session] = {}
        self._handshakes: weakref.WeakKeyDictionary[ServerConnection, Handshake] = (
            weakref.WeakKeyDictionary()
        )
        self.draining = False
        self._grace_over = False
        self.caps = TunnelCaps(settings.max_tunnels_per_principal, settings.max_tunnels)
        self._changed = asyncio.Event()
        self._policy_changed = asyncio.Event()

    def _notify(self) -> None:
        """Wake everything waiting in ``wait_until`` (session attached, parked or ended)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait, without polling, until ``predicate`` holds after a session state change."""
        while not predicate():
            await self._changed.wait()

    # -- connection handler ---------------------------------------------------------------------

    async def handler(self, ws: ServerConnection) -> None:
        handshake = self._handshakes.pop(ws, None)
        dialect = DIALECTS.get(ws.subprotocol or "")
        if handshake is None or dialect is None:  # pragma: no cover - process_request ensures it
            await ws.close(CloseCode.UNKNOWN_ERROR, "bad handshake")
            return
        if handshake.owner is not None:
            assert isinstance(handshake.request, ReconnectRequest)
            principal = handshake.identity.principal
            await self._bridge(ws, handshake.owner, principal, handshake.request.sid)
            return
        if isinstance(handshake.request, ConnectRequest):
            session = await self._connect(ws, handshake, handshake.request, dialect.name)
        else:
            session = await self._reconnect(ws, handshake, handshake.request)
        if session is not None:
            await self._attach(ws, session)

    async def _connect(
        self, ws: ServerConnection, handshake: Handshake, request: ConnectRequest, dialect: str
    ) -> Session | None:
        # The handshake checked the caps; concurrent connects may have filled them since.
        # The reservation covers the dial too, so the caps are never exceeded.
        principal = handshake.identity.principal
        refusal = self.caps.acquire(principal)
        if refusal is not None:
            self.audit.record(
                "decision", decision="deny", reason=refusal, principal=principal,
                source_ip=handshake.source_ip, dialect=dialect,
            )  # fmt: skip
            await ws.close(CloseCode.TOO_MANY_TUNNELS, "too many tunnels")
            return None
        sid = new_sid(self.state.tag)
        session = None
        claimed = False
        try:
            refusal = await self._claim(sid, handshake.identity, ws.subprotocol or "")
            if refusal is not None:
                self.audit.record(
                    "decision", decision="deny", reason=refusal, principal=principal,
                    source_ip=handshake.source_ip, dialect=dialect,
                )  # fmt: skip
                if refusal == STATE_DOWN:
                    await ws.close(CloseCode.TRY_AGAIN_LATER, STATE_DOWN)
                else:
                    await ws.close(CloseCode.TOO_MANY_TUNNELS, "too many tunnels")
                return None
            claimed = True
            session = await self._open(ws, handshake, request, dialect, sid)
        finally:
            if session is None:
                self.caps.release(principal)
                if claimed:
                    self._release_sid(sid, handshake.identity, ws.subprotocol or "")
                self._notify()
        return session

    async def _open(
        self,
        ws: ServerConnection,
        handshake: Handshake,
        request: ConnectRequest,
        dialect: str,
        sid: str,
    ) -> Session | None:
        identity, device = handshake.identity, handshake.device
        target = request.target
        source_ip = handshake.source_ip
        resource = self.inventory.resource_for(target)
        host = target.host if isinstance(target, HostTarget) else None
        access = access_request(identity, resource, target.port, source_ip, device, host)
        started = time.perf_counter()
        decision = evaluate(access, self.policy, time.time())
        if self.metrics is not None:
            self.metrics.observe_decision(time.perf_counter() - started)
        base = {
            "principal": identity.principal,
            "source_ip": source_ip,
            "resource": resource,
            "port": target.port,
            "dialect": dialect,
            "device": device.id if device is not None else None,
            "binding": decision.binding,
        }
        if not decision.allowed:
            self.audit.record("decision", decision="deny", reason=decision.reason, **base)
            await ws.close(CloseCode.NOT_AUTHORIZED, "not authorized")
            return None
        try:
            destination = self.inventory.resolve(target)
        except LookupFailed as exc:
            self.audit.record(
                "decision", decision="deny", reason=str(exc), rule=decision.rule, **base
            )
            await ws.close(CloseCode.LOOKUP_FAILED, "lookup failed")
            return None
        named = (lambda ip: True) if destination.any_address else within(destination.networks)

        def allowed(ip: IPAddress) -> bool:
            # destination.ip conditions judge the address that will actually be dialed.
            checked = replace(access, destination_ip=str(ip))
            return named(ip) and evaluate(checked, self.policy, time.time()).allowed

        try:
            # Resolve once, check every answer, connect to exactly the address checked.
            stream, dialed = await resolve_and_dial(
                destination.host,
                destination.port,
                policy=self.destinations.scoped(destination.networks),
                allowed=allowed,
                timeout=self.settings.dial_timeout,
            )
        except DestinationDenied as exc:
            self.audit.record(
                "decision",
                decision="deny",
                reason=exc.reason,
                rule=decision.rule,
                host=destination.host,
                address=str(exc.address) if exc.address else None,
                **base,
            )
            await ws.close(CloseCode.NOT_AUTHORIZED, "not authorized")
            return None
        except DialFailed as exc:
            self.audit.record(
                "decision",
                decision="allow",
                reason=exc.reason,
                rule=decision.rule,
                host=destination.host,
                address=str(exc.address) if exc.address else None,
                result="backend_unreachable",
                **base,
            )
            await ws.close(CloseCode.FAILED_TO_CONNECT_TO_BACKEND, "failed to connect to backend")
            return None
        tunnel = Tunnel(
            Side.SERVER, DIALECTS[ws.subprotocol or ""], buffer_limit=self.settings.resume_buffer
        )
        tunnel.attach_server(sid.encode())
        session = Session(
            sid,
            identity,
            tunnel,
            stream,
            destination.resource,
            str(dialed),
            destination.port,
            source_ip,
            device=device,
            host=host,
            last_activity=asyncio.get_running_loop().time(),
        )
        self.sessions[sid] = session
        self._start_limits(session)
        self.audit.record(
            "decision",
            decision="allow",
            reason=decision.reason,
            rule=decision.rule,
            host=destination.host,
            address=str(dialed),
            tunnel_id=sid,
            **base,
        )
        return session

    async def _reconnect(
        self, ws: ServerConnection, handshake: Handshake, request: ReconnectRequest
    ) -> Session | None:
        identity = handshake.identity
        session = self.sessions.get(request.sid)
        base = {"principal": identity.principal, "source_ip": handshake.source_ip}
        if session is None:
            self.audit.record("resume", decision="deny", reason="sid unknown", **base)
            await ws.close(CloseCode.SID_UNKNOWN, "sid unknown")
            return None
        if session.identity.principal != identity.principal:
            self.audit.record(
                "resume",
                decision="deny",
                reason="principal mismatch",
                tunnel_id=session.sid,
                **base,
            )
            await ws.close(CloseCode.SID_UNKNOWN, "sid unknown")
            return None
        if session.tunnel.dialect.subprotocol != ws.subprotocol:
            await ws.close(CloseCode.PROTOCOL_ERROR, "subprotocol differs from the tunnel's")
            return None
        decision = self._decide(identity, session)
        if not decision.allowed:
            # The fresh token's groups (or the policy) no longer grant this tunnel: end it.
            self.audit.record(
                "resume", decision="deny", reason=decision.reason, tunnel_id=session.sid, **base
            )
            await ws.close(CloseCode.NOT_AUTHORIZED, "not authorized")
            if session.pump is not None:
                session.pump.close(CloseCode.NOT_AUTHORIZED, "not authorized")
            else:
                self._end(session, CloseCode.NOT_AUTHORIZED, decision.reason)
            return None
        if session.pump is not None:
            # The client saw the old WebSocket die before we did: the newest attachment wins.
            # The old path is presumed dead, so drop it at once: a polite close would wait for
            # a peer that never answers (up to the close timeout) before the resume could start.
            session.pump.ws.transport.abort()
            await session.detached.wait()
            if self.sessions.get(session.sid) is not session:
                await ws.close(CloseCode.SID_UNKNOWN, "sid unknown")
                return None
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        try:
            session.tunnel.attach_server(session.sid.encode(), resume_from=request.ack)
        except TunnelError as exc:
            self.audit.record(
                "resume", decision="deny", reason=str(exc), tunnel_id=session.sid, **base
            )
            await ws.close(exc.code, str(exc))
            self._end(session, exc.code, str(exc))
            return None
        session.identity = identity
        session.renewed.set()
        session.renewed = asyncio.Event()
        session.resumes += 1
        self.audit.record(
            "resume", decision="allow", tunnel_id=session.sid, ack=request.ack, **base
        )
        return session

    async def _attach(self, ws: ServerConnection, session: Session) -> None:
        async def on_control(event: Event) -> None:
            if isinstance(event, ReauthReceived):
                await self._reauth(session, pump, event.token)

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
        session.detached.clear()
        self._notify()
        try:
            async with asyncio.TaskGroup() as tg:
                watchers = (
                    tg.create_task(self._watch_expiry(session, pump)),
                    tg.create_task(self._watch_time(session)),
                )
                outcome = await pump.run()
                for watcher in watchers:
                    watcher.cancel()
        except asyncio.CancelledError:
            # Shutdown cancelled the handler: the target connection must not outlive it.
            self._end(session, CloseCode.GOING_AWAY, "relay shutting down")
            raise
        finally:
            session.pump = None
            session.last_activity = pump.last_activity
            session.detached.set()
            self._notify()
        if outcome.end is End.LOST or (outcome.end is End.CLOSED and outcome.code in _PARK_AFTER):
            self._park(session)
        else:
            self._finish(session, outcome)

    def _park(self, session: Session) -> None:
        if self.sessions.get(session.sid) is not session:
            return
        if session.limits is not None and session.limits.expired is not None:
            self._end(session, *session.limits.expired)  # a limit was reached as it dropped
            return
        loop = asyncio.get_running_loop()
        session.expiry = loop.call_later(
            self.settings.resume_window,
            self._end,
            session,
            CloseCode.RESUME_EXPIRED,
            "resume window expired",
        )
        self._notify()

    def _finish(self, session: Session, outcome: Outcome) -> None:
        if outcome.end is End.FINISHED:
            short = session.tunnel.received_total - session.stream.bytes_written
            if short:
                # Never a clean finish for a stream the target did not get whole.
                reason = f"{short} bytes received from the client were not delivered"
                self._end(session, CloseCode.DESTINATION_WRITE_FAILED, reason)
                return
            # Everything the client sent was written; let the target read it, then close.
            session.stream.close()
            self._end(session, CloseCode.NORMAL, "finished", close_stream=False)
        else:
            self._end(session, outcome.code or CloseCode.UNKNOWN_ERROR, outcome.reason)

    def _end(self, session: Session, code: int, reason: str, *, close_stream: bool = True) -> None:
        if self.sessions.pop(session.sid, None) is None:
            return
        self.caps.release(session.identity.principal)
        self._release(session)
        if self.metrics is not None:
            self.metrics.session_ended(session, time.monotonic() - session.created)
        if session.expiry is not None:
            session.expiry.cancel()
        if session.limits is not None:
            session.limits.cancel()
        # Bytes delivered to the target: written to its socket, less what an abort discards.
        delivered = session.stream.bytes_written
        if close_stream and code != CloseCode.NORMAL:
            delivered -= session.stream.unsent
        if close_stream and code == CloseCode.NORMAL:
            session.stream.close()
        elif close_stream:
            session.stream.abort()
        self.audit.record(
            "tunnel_closed",
            tunnel_id=session.sid,
            principal=session.identity.principal,
            resource=session.resource,
            address=session.address,
            port=session.port,
            source_ip=session.source_ip,
            bytes_from_client=delivered,
            bytes_to_client=session.tunnel.sent_total,
            bytes_acked_by_client=session.tunnel.peer_acked,
            resumes=session.resumes,
            duration=round(time.monotonic() - session.created, 3),
            close_code=code,
            close_reason=reason,
        )
        self._notify()

    def close_all(self, code: int, reason: str) -> None:
        """End every tunnel (shutdown): attached ones with a typed close, parked ones at once."""
        for session in list(self.sessions.values()):
            self._close_session(session, code, reason)

    def _close_session(self, session: Session, code: int, reason: str) -> None:
        """End a tunnel: an attached one with a typed close (its handler ends it), a parked one
        at once."""
        if session.pump is not None:
            session.pump.close(code, reason)
        else:
            self._end(session, code, reason)

    # -- drain ------------------------------------------------------------------------------------

    def _drained(self) -> bool:
        return self._grace_over or (not self.sessions and self.caps.open == 0)

    async def drain(self, grace: float | None = None) -> int:
        """Stop taking new tunnels (``/readyz`` and connects answer 503 from now on), let open
        tunnels run, resumes included, for ``grace`` seconds (default ``tunnel.drain_grace``)
        or until they are all done or ``end_grace`` is called; then close the attached ones
        with 4100 and end the parked ones. Returns how many tunnels the drain closed."""
        grace = self.settings.drain_grace if grace is None else grace
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.draining = True
        self.audit.record("drain", phase="start", grace=grace, tunnels=len(self.sessions))
        log.info("draining: %d tunnel(s) open, grace %g s", len(self.sessions), grace)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.wait_until(self._drained)
        closed = len(self.sessions)
        self.close_all(CloseCode.DRAINING, DRAIN_REASON)
        # Each close (CLOSE frame and handshake) is bounded by the pump's CLOSE_TIMEOUT.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT + 1):
                await self.wait_until(lambda: not self.sessions)
        self.audit.record(
            "drain", phase="end", closed=closed, seconds=round(loop.time() - started, 3)
        )
        log.info("drained: %d tunnel(s) closed with 4100", closed)
        return closed

    def end_grace(self) -> None:
        """Cut a running drain's grace period short (a second signal)."""
        self._grace_over = True
        self._notify()
