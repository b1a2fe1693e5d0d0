"""The relay's tunnels and their lifecycle: a reservation under the caps and in the shared state
before the dial, then attached, parked for resume, or ended (with its ``tunnel_closed`` audit
record and the release of what it held); closing one, all, or draining. Anything waiting on a
change of the tunnels is woken by ``notify``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from tunnel_protocol import CloseCode
from tunnel_protocol.aio.pump import CLOSE_TIMEOUT, End, Outcome

from ..access.identity import Identity
from ..audit import AuditLog
from ..config import TunnelSettings
from ..state import TunnelRecord
from .cluster import STATE_DOWN, Cluster
from .events import RelayEvents
from .limits import Limits, TunnelCaps
from .refused import Refused
from .session import Session

log = logging.getLogger("tunnel.relay")

DRAIN_REASON = "relay draining, reconnect"


class Registry:
    def __init__(
        self,
        *,
        settings: TunnelSettings,
        caps: TunnelCaps,
        cluster: Cluster,
        audit: AuditLog,
        events: RelayEvents,
    ) -> None:
        self.settings = settings
        self.caps = caps
        self.cluster = cluster
        self.audit = audit
        self.events = events
        self.sessions: dict[str, Session] = {}
        self.draining = False
        self._grace_over = False
        self._changed = asyncio.Event()
        self.limits = Limits(settings, audit, on_warning=self.notify)

    # -- waiting for changes --------------------------------------------------------------------

    def notify(self) -> None:
        """Wake everything waiting in ``wait_until`` (a tunnel attached, parked or ended)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait, without polling, until ``predicate`` holds after a change of the tunnels."""
        while not predicate():
            await self._changed.wait()

    # -- a new tunnel ---------------------------------------------------------------------------

    async def reserve(self, sid: str, identity: Identity, subprotocol: str) -> None:
        """Count a tunnel being opened under the caps (this node's, and the cluster's per
        principal), before its dial. Refused (after auditing why) when a cap is reached or the
        shared state is down; ``unreserve`` undoes it if the tunnel does not open."""
        principal = identity.principal
        refusal = self.caps.acquire(principal)
        if refusal is not None:
            raise Refused(CloseCode.TOO_MANY_TUNNELS, "too many tunnels", refusal)
        try:
            refusal = await self.cluster.claim(sid, identity, subprotocol)
        except BaseException:
            self.caps.release(principal)
            raise
        if refusal is not None:
            self.caps.release(principal)
            if refusal == STATE_DOWN:
                raise Refused(CloseCode.TRY_AGAIN_LATER, STATE_DOWN)
            raise Refused(CloseCode.TOO_MANY_TUNNELS, "too many tunnels", refusal)

    def unreserve(self, sid: str, identity: Identity, subprotocol: str) -> None:
        self.caps.release(identity.principal)
        self.cluster.release(TunnelRecord(sid, identity.principal, subprotocol, 0.0))
        self.notify()

    def add(self, session: Session) -> None:
        """A reserved tunnel whose target connection is open: registered, and its limits
        started (they keep running while it is parked)."""
        self.sessions[session.sid] = session
        session.limits = self.limits.start(
            session.sid,
            session.identity.principal,
            activity=lambda: session.activity,
            close=lambda code, reason: self.close(session, code, reason),
        )

    # -- attachments ----------------------------------------------------------------------------

    def held(self, sid: str) -> bool:
        return sid in self.sessions

    async def take_over(self, session: Session) -> bool:
        """Before a resume: end the tunnel's current attachment if it still has one (the client
        saw it die before we did: the newest attachment wins; the old path is presumed dead, so
        it is dropped at once rather than closed politely) and cancel the resume window. False
        when the tunnel ended meanwhile."""
        if session.pump is not None:
            session.pump.ws.transport.abort()
            await session.detached.wait()
            if self.sessions.get(session.sid) is not session:
                return False
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        return True

    def attached(self, session: Session) -> None:
        session.detached.clear()
        self.notify()

    def detached(self, session: Session, last_activity: float) -> None:
        session.pump = None
        session.last_activity = last_activity
        session.detached.set()
        self.notify()

    # -- ends -----------------------------------------------------------------------------------

    def park(self, session: Session) -> None:
        """Keep a tunnel whose WebSocket dropped for ``resume_window`` seconds."""
        if self.sessions.get(session.sid) is not session:
            return
        if session.limits is not None and session.limits.expired is not None:
            self.end(session, *session.limits.expired)  # a limit was reached as it dropped
            return
        loop = asyncio.get_running_loop()
        session.expiry = loop.call_later(
            self.settings.resume_window,
            self.end,
            session,
            CloseCode.RESUME_EXPIRED,
            "resume window expired",
        )
        self.notify()

    def finish(self, session: Session, outcome: Outcome) -> None:
        """End a tunnel whose attachment ended for good (not resumable)."""
        if outcome.end is not End.FINISHED:
            self.end(session, outcome.code or CloseCode.UNKNOWN_ERROR, outcome.reason)
            return
        short = session.tunnel.received_total - session.stream.bytes_written
        if short:
            # Never a clean finish for a stream the target did not get whole.
            reason = f"{short} bytes received from the client were not delivered"
            self.end(session, CloseCode.DESTINATION_WRITE_FAILED, reason)
            return
        # Everything the client sent was written; let the target read it, then close.
        session.stream.close()
        self.end(session, CloseCode.NORMAL, "finished", close_stream=False)

    def end(self, session: Session, code: int, reason: str, *, close_stream: bool = True) -> None:
        """End a tunnel now: its target connection closes (normally, or aborted for any other
        code), its reservations are released and its audit record written."""
        if self.sessions.pop(session.sid, None) is None:
            return
        self.caps.release(session.identity.principal)
        self.cluster.release(
            TunnelRecord(
                session.sid, session.identity.principal, session.tunnel.dialect.subprotocol, 0.0
            )
        )
        duration = time.monotonic() - session.created
        self.events.ended(session, duration)
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
            duration=round(duration, 3),
            close_code=code,
            close_reason=reason,
        )
        self.notify()

    def close(self, session: Session, code: int, reason: str) -> None:
        """End a tunnel: an attached one with a typed close (its handler then ends or parks
        it), a parked one at once."""
        if session.pump is not None:
            session.pump.close(code, reason)
        else:
            self.end(session, code, reason)

    def close_all(self, code: int, reason: str) -> None:
        """End every tunnel (shutdown): attached ones with a typed close, parked ones at once."""
        for session in list(self.sessions.values()):
            self.close(session, code, reason)

    def local_tunnels(self) -> list[TunnelRecord]:
        """This node's tunnels, for re-registration after the shared state lost them."""
        return [
            TunnelRecord(s.sid, s.identity.principal, s.tunnel.dialect.subprotocol, time.time())
            for s in self.sessions.values()
        ]

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
        self.notify()
