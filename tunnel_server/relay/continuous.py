"""Continuous authorization of open tunnels: each one is re-decided when the policy changes, when
a time condition of the policy may flip, when its token expires (in-band re-authentication for
native clients, 4004 for everyone), and when it or its user is revoked, here or on another node
of the cluster."""

from __future__ import annotations

import asyncio
import time

from tunnel_protocol import CloseCode
from tunnel_protocol.aio.pump import Pump

from ..access.current import CurrentPolicy
from ..access.identity import Authenticator, AuthError
from ..access.policy import next_change
from ..audit import AuditLog
from ..state import Revocation
from .admission import Admission
from .events import RelayEvents
from .registry import Registry
from .session import Session, wait_event

# Native tunnels are asked for a fresh token this long before theirs expires (or halfway
# through a shorter remaining lifetime); clients refresh when less than 60 s remain, so the
# token they send is new.
REAUTH_ADVANCE = 30.0


class Reauthorizer:
    def __init__(
        self,
        *,
        registry: Registry,
        admission: Admission,
        authenticator: Authenticator,
        policies: CurrentPolicy,
        audit: AuditLog,
        events: RelayEvents,
    ) -> None:
        self.registry = registry
        self.admission = admission
        self.authenticator = authenticator
        self.policies = policies
        self.audit = audit
        self.events = events
        self._policy_changed = asyncio.Event()

    # -- one attachment -------------------------------------------------------------------------

    async def watch(self, session: Session, pump: Pump) -> None:
        """Keep an attached tunnel authorized until cancelled (when the attachment ends)."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch_expiry(session, pump))
            tg.create_task(self._watch_time(session))

    async def _watch_expiry(self, session: Session, pump: Pump) -> None:
        """Keep the tunnel's credential current: ask native clients for a fresh token before it
        expires (REAUTH_REQUIRED), and close with 4004 when it does expire. The tunnel is parked,
        so the client (gcloud included) reconnects with a fresh token and loses no byte."""
        native = session.tunnel.dialect.native
        while True:
            expires = session.identity.expires_at
            renewed = session.renewed
            if native:
                remaining = expires - time.time()
                ask_at = expires - min(REAUTH_ADVANCE, max(0.0, remaining / 2))
                if await wait_event(renewed, ask_at - time.time()):
                    continue
                session.tunnel.send_reauth_required(int(expires))
                await pump.flush()
            # Closing before the leeway ends would loop: the same token is still accepted.
            deadline = max(expires, session.identity.valid_until)
            if await wait_event(renewed, deadline - time.time()):
                continue
            self._reauth_denied(session, "token expired")
            pump.close(CloseCode.REAUTHENTICATION_REQUIRED, "reauthentication required")
            return

    async def _watch_time(self, session: Session) -> None:
        """Re-decide the tunnel when a time condition of the policy may flip (a window ends)."""
        while True:
            changed = self._policy_changed
            request = self.admission.request_for(session.identity, session)
            when = next_change(request, self.policies.policy, time.time())
            if when is None:
                await changed.wait()
                continue
            if await wait_event(changed, when - time.time()):
                continue
            decision = self.admission.decide(session.identity, session)
            if not decision.allowed:
                self._revoke(session, f"access ended: {decision.reason}", by=None)
                return

    async def reauth(self, session: Session, pump: Pump, token: str) -> None:
        """A native client's in-band REAUTH: a fresh token for the same principal, still
        allowed, renews the tunnel's credential; anything else closes the attachment."""
        try:
            identity = await self.authenticator.verify(token)
        except AuthError as exc:
            self._reauth_denied(session, exc.reason)
            pump.close(CloseCode.UNAUTHENTICATED, "re-authentication failed: log in again")
            return
        if identity.principal != session.identity.principal:
            self._reauth_denied(session, "principal changed")
            pump.close(CloseCode.NOT_AUTHORIZED, "re-authentication as another principal")
            return
        decision = self.admission.decide(identity, session)
        if not decision.allowed:
            self._reauth_denied(session, decision.reason, principal=identity.principal)
            pump.close(CloseCode.NOT_AUTHORIZED, "not authorized")
            return
        session.renew(identity)
        session.tunnel.send_reauth_ok(int(identity.expires_at))
        self.audit.record(
            "reauth", decision="allow", principal=identity.principal, tunnel_id=session.sid
        )
        self.registry.notify()

    def _reauth_denied(self, session: Session, reason: str, principal: str | None = None) -> None:
        self.audit.record(
            "reauth",
            decision="deny",
            reason=reason,
            principal=principal or session.identity.principal,
            tunnel_id=session.sid,
        )

    # -- every tunnel ---------------------------------------------------------------------------

    def policy_changed(self) -> int:
        """The policy in force was replaced: time watchers recompute their next deadline, and
        every tunnel is re-decided. Returns how many were closed."""
        changed, self._policy_changed = self._policy_changed, asyncio.Event()
        changed.set()
        return self.redecide_all("policy changed")

    def redecide_all(self, why: str) -> int:
        closed = 0
        for session in list(self.registry.sessions.values()):
            decision = self.admission.decide(session.identity, session)
            if not decision.allowed:
                self._revoke(session, f"{why}: {decision.reason}", by=None)
                closed += 1
        return closed

    def revoke_session(self, sid: str, *, by: str | None) -> int:
        session = self.registry.sessions.get(sid)
        if session is None:
            return 0
        self._revoke(session, "session revoked", by=by)
        return 1

    def revoke_user(self, principal: str, *, by: str | None) -> int:
        """Close every tunnel of ``principal``; the caller also records the user revocation so
        that tokens issued before now are refused."""
        sessions = [s for s in self.registry.sessions.values() if s.identity.principal == principal]
        for session in sessions:
            self._revoke(session, "user revoked", by=by)
        return len(sessions)

    def apply_revocation(self, revocation: Revocation) -> int:
        """Apply a revocation decided on another node (or missed while disconnected)."""
        self.audit.record(
            "revocation_received",
            kind=revocation.kind,
            subject=revocation.subject,
            by=revocation.by,
            origin=revocation.node or None,
        )
        self.events.revocation("remote")
        if revocation.kind == "user":
            return self.revoke_user(revocation.subject, by=revocation.by)
        return self.revoke_session(revocation.subject, by=revocation.by)

    def _revoke(self, session: Session, reason: str, *, by: str | None) -> None:
        self.audit.record(
            "revoke",
            tunnel_id=session.sid,
            principal=session.identity.principal,
            reason=reason,
            by=by,
        )
        # Native clients get the reason in a CLOSE frame; IAP clients see 4033.
        if session.pump is not None:
            session.pump.close(CloseCode.NOT_AUTHORIZED, f"access revoked: {reason}")
        else:
            self.registry.end(session, CloseCode.NOT_AUTHORIZED, reason)

    def require_reauth(self, sid: str) -> bool:
        """Close a tunnel's WebSocket with 4004 and keep the tunnel for resume: gcloud then
        reconnects with a fresh token and no byte is lost. False if the tunnel is not attached."""
        session = self.registry.sessions.get(sid)
        if session is None or session.pump is None:
            return False
        session.pump.close(CloseCode.REAUTHENTICATION_REQUIRED, "reauthentication required")
        return True
