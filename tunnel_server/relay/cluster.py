"""The relay's side of the shared state (mixed into the Relay): claiming cap slots and registry
entries for new tunnels, releasing them, routing a resume that belongs to another node, and
applying revocations decided anywhere in the cluster."""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request
from websockets.typing import Subprotocol

from tunnel_protocol import DIALECTS

from ..access.identity import Identity
from ..audit import AuditLog
from ..config import TunnelSettings
from ..ops.metrics import Metrics
from ..state import MemoryState, Revocation, StateStore, StateUnavailable, TunnelRecord
from .forwarding import OwnerUnreachable, bridge, forward_headers, open_forward
from .session import Session

log = logging.getLogger("tunnel.cluster")

STATE_DOWN = "shared state unavailable"


@dataclass
class ClusterLink:
    """How this node reaches the others: the cluster secret that authenticates forwards and the
    TLS context for wss advertise URLs. ``fail_open``: take new tunnels while the shared state
    is unreachable (node-local caps only)."""

    secret: bytes | None = None
    ssl_context: ssl.SSLContext | None = None
    server_name: str | None = None  # checked against other nodes' certificates
    fail_open: bool = False
    open_timeout: float = 5.0
    max_size: int = 1 << 20


class ClusterMixin:
    """Needs ``state``, ``link``, ``sessions``, ``settings``, ``audit`` on the relay."""

    state: StateStore
    link: ClusterLink
    sessions: dict[str, Session]
    settings: TunnelSettings
    audit: AuditLog
    metrics: Metrics | None

    if TYPE_CHECKING:

        def revoke_user(self, principal: str, *, by: str | None) -> int: ...
        def revoke_session(self, sid: str, *, by: str | None) -> int: ...

    @property
    def node(self) -> str:
        return self.state.node

    async def _claim(self, sid: str, identity: Identity, subprotocol: str) -> str | None:
        """Register a new tunnel in the shared state under the cluster-wide per-principal cap.
        Returns the refusal (cap reached, or the state is down and we fail closed)."""
        record = TunnelRecord(sid, identity.principal, subprotocol, time.time())
        try:
            return await self.state.claim(record, self.settings.max_tunnels_per_principal)
        except StateUnavailable:
            # Open tunnels never need the store; a new one does (caps, resume registry).
            return None if self.link.fail_open else STATE_DOWN

    def _release(self, session: Session) -> None:
        self._release_sid(session.sid, session.identity, session.tunnel.dialect.subprotocol)

    def _release_sid(self, sid: str, identity: Identity, subprotocol: str) -> None:
        self.state.release_soon(TunnelRecord(sid, identity.principal, subprotocol, 0.0))

    def local_tunnels(self) -> list[TunnelRecord]:
        """This node's tunnels, for re-registration after the store lost them."""
        return [
            TunnelRecord(s.sid, s.identity.principal, s.tunnel.dialect.subprotocol, time.time())
            for s in self.sessions.values()
        ]

    async def _forward_target(
        self, request: Request, identity: Identity, sid: str, source_ip: str | None
    ) -> ClientConnection | None:
        """For a resume of a tunnel this node does not hold: the WebSocket to its owner, or
        None when no live node holds it for this principal (the handler answers 'sid unknown').
        Raises StateUnavailable, or OwnerUnreachable with the owner's HTTP status."""
        if isinstance(self.state, MemoryState) or sid in self.sessions:
            return None
        owner = await self.state.owner(sid)
        if owner is None or owner.node == self.node:
            return None
        if owner.record.principal != identity.principal or self.link.secret is None:
            return None  # someone else's tunnel: indistinguishable from an unknown one
        offered = [
            Subprotocol(p.strip())
            for value in request.headers.get_all("Sec-WebSocket-Protocol")
            for p in value.split(",")
            if p.strip() in DIALECTS
        ]
        try:
            return await open_forward(
                owner.url,
                request.path,
                authorization=request.headers["Authorization"],
                subprotocols=offered,
                extra=forward_headers(
                    self.link.secret, self.node, source_ip or "", request.path, time.time()
                ),
                ssl_context=self.link.ssl_context,
                server_name=self.link.server_name,
                open_timeout=self.link.open_timeout,
                max_size=self.link.max_size,
            )
        except OwnerUnreachable as exc:
            if exc.status is not None:
                raise
            log.warning("owner %s of a resumed tunnel unreachable: %s", owner.node, exc)
            return None

    async def _bridge(
        self, ws: ServerConnection, upstream: ClientConnection, principal: str, sid: str
    ) -> None:
        if upstream.subprotocol != ws.subprotocol:  # pragma: no cover - same relay code both ends
            await upstream.close()
            await ws.close(1002, "subprotocol mismatch")
            return
        self.audit.record(
            "resume", decision="forward", principal=principal, tunnel_id=sid, node=self.node
        )
        await bridge(ws, upstream)

    def apply_revocation(self, revocation: Revocation) -> int:
        """Apply a revocation decided on another node (or missed while disconnected)."""
        self.audit.record(
            "revocation_received",
            kind=revocation.kind,
            subject=revocation.subject,
            by=revocation.by,
            origin=revocation.node or None,
        )
        if self.metrics is not None:
            self.metrics.revocation_applied("remote")
        if revocation.kind == "user":
            return self.revoke_user(revocation.subject, by=revocation.by)
        return self.revoke_session(revocation.subject, by=revocation.by)
