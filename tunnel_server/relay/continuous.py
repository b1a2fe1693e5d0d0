"""Continuous authorization of open tunnels: re-decide them when the policy changes, when a time
condition may flip, when their token expires (in-band re-authentication, or 4004), and on
revocation. Mixed into the Relay, which owns the sessions."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from tunnel_protocol import CloseCode
from tunnel_protocol.aio.pump import Pump

from ..access.device import Device, device_attributes
from ..access.identity import Authenticator, AuthError, Identity
from ..access.policy import TUNNEL_USER, AccessRequest, Decision, Policy, evaluate, next_change
from ..audit import AuditLog
from .session import Session, wait_event

# Native tunnels are asked for a fresh token this long before theirs expires (or halfway
# through a shorter remaining lifetime); clients refresh when less than 60 s remain, so the
# token they send is new.
REAUTH_ADVANCE = 30.0


class ContinuousAuthorization:
    sessions: dict[str, Session]
    policy: Policy
    audit: AuditLog
    verifier: Authenticator
    _policy_changed: asyncio.Event

    if TYPE_CHECKING:

        def _end(
            self, session: Session, code: int, reason: str, *, close_stream: bool = True
        ) -> None: ...

        def _notify(self) -> None: ...

    def _decide(self, identity: Identity, session: Session) -> Decision:
        """Re-decide an existing tunnel for a (renewed) identity."""
        return evaluate(self._session_request(identity, session), self.policy, time.time())

    def _session_request(self, identity: Identity, session: Session) -> AccessRequest:
        request = access_request(
            identity, session.resource, session.port, session.source_ip, session.device,
            session.host,
        )  # fmt: skip
        return replace(request, destination_ip=session.address)

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
            self.audit.record(
                "reauth",
                decision="deny",
                reason="token expired",
                principal=session.identity.principal,
                tunnel_id=session.sid,
            )
            pump.close(CloseCode.REAUTHENTICATION_REQUIRED, "reauthentication required")
            return

    async def _reauth(self, session: Session, pump: Pump, token: str) -> None:
        try:
            identity = await self.verifier.verify(token)
        except AuthError as exc:
            self.audit.record(
                "reauth",
                decision="deny",
                reason=exc.reason,
                principal=session.identity.principal,
                tunnel_id=session.sid,
            )
            pump.close(CloseCode.UNAUTHENTICATED, "re-authentication failed: log in again")
            return
        if identity.principal != session.identity.principal:
            self.audit.record(
                "reauth",
                decision="deny",
                reason="principal changed",
                principal=session.identity.principal,
                tunnel_id=session.sid,
            )
            pump.close(CloseCode.NOT_AUTHORIZED, "re-authentication as another principal")
            return
        decision = self._decide(identity, session)
        if not decision.allowed:
            self.audit.record(
                "reauth",
                decision="deny",
                reason=decision.reason,
                principal=identity.principal,
                tunnel_id=session.sid,
            )
            pump.close(CloseCode.NOT_AUTHORIZED, "not authorized")
            return
        session.identity = identity
        session.renewed.set()
        session.renewed = asyncio.Event()
        session.tunnel.send_reauth_ok(int(identity.expires_at))
        self.audit.record(
            "reauth", decision="allow", principal=identity.principal, tunnel_id=session.sid
        )
        self._notify()

    def set_policy(self, policy: Policy) -> int:
        """Swap the policy atomically and re-decide every tunnel; returns how many were closed."""
        self.policy = policy
        changed, self._policy_changed = self._policy_changed, asyncio.Event()
        changed.set()  # time watchers recompute their next deadline under the new policy
        return self.redecide_all("policy changed")

    async def _watch_time(self, session: Session) -> None:
        """Re-decide the tunnel when a time condition of the policy may flip (a window ends)."""
        while True:
            changed = self._policy_changed
            request = self._session_request(session.identity, session)
            when = next_change(request, self.policy, time.time())
            if when is None:
                await changed.wait()
                continue
            if await wait_event(changed, when - time.time()):
                continue
            decision = self._decide(session.identity, session)
            if not decision.allowed:
                self._revoke(session, f"access ended: {decision.reason}", by=None)
                return

    def redecide_all(self, why: str) -> int:
        closed = 0
        for session in list(self.sessions.values()):
            decision = self._decide(session.identity, session)
            if not decision.allowed:
                self._revoke(session, f"{why}: {decision.reason}", by=None)
                closed += 1
        return closed

    def revoke_session(self, sid: str, *, by: str | None) -> int:
        session = self.sessions.get(sid)
        if session is None:
            return 0
        self._revoke(session, "session revoked", by=by)
        return 1

    def revoke_user(self, principal: str, *, by: str | None) -> int:
        """Close every tunnel of ``principal``; the caller also records the user revocation so
        that tokens issued before now are refused."""
        sessions = [s for s in self.sessions.values() if s.identity.principal == principal]
        for session in sessions:
            self._revoke(session, "user revoked", by=by)
        return len(sessions)

    def _revoke(self, session: Session, reason: str, *, by: str | None) -> None:
        self.audit.record(
            "revoke",
            tunnel_id=session.sid,
            principal=session.identity.principal,
            reason=reason,
            by=by,
        )
        if session.pump is not None:
            # Native clients get the reason in a CLOSE frame; IAP clients see 4033.
            session.pump.close(CloseCode.NOT_AUTHORIZED, f"access revoked: {reason}")
        else:
            self._end(session, CloseCode.NOT_AUTHORIZED, reason)

    def require_reauth(self, sid: str) -> bool:
        """Close a tunnel's WebSocket with 4004 and keep the tunnel for resume: gcloud then
        reconnects with a fresh token and no byte is lost. False if the tunnel is not attached."""
        session = self.sessions.get(sid)
        if session is None or session.pump is None:
            return False
        session.pump.close(CloseCode.REAUTHENTICATION_REQUIRED, "reauthentication required")
        return True


def access_request(
    identity: Identity,
    resource: str,
    port: int,
    source_ip: str | None,
    device: Device | None,
    host: str | None,
) -> AccessRequest:
    """The relay's adapter from a tunnel to the transport-agnostic policy request."""
    return AccessRequest(
        identity.members,
        resource,
        port,
        source_ip,
        principal=identity.principal,
        role=TUNNEL_USER,
        destination_host=host,
        device=device_attributes(device) if device is not None else {},
    )
