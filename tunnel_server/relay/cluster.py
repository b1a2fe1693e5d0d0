"""This node's part in a cluster: claiming and releasing its tunnels in the shared state (the
cluster-wide caps and the resume registry), finding the owner of a tunnel it does not hold and
forwarding the resume there, and checking that a forwarded handshake comes from a node of the
cluster."""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.typing import Subprotocol

from tunnel_protocol import DIALECTS

from ..access.identity import Identity
from ..audit import AuditLog
from ..state import MemoryState, StateStore, StateUnavailable, TunnelRecord
from .forwarding import (
    Forwarded,
    OwnerUnreachable,
    bridge,
    forward_headers,
    open_forward,
    verify_forward,
)

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


class Cluster:
    def __init__(
        self, state: StateStore, link: ClusterLink, audit: AuditLog, max_per_principal: int
    ) -> None:
        self.state = state
        self.link = link
        self.audit = audit
        self._max_per_principal = max_per_principal

    @property
    def node(self) -> str:
        return self.state.node

    @property
    def admits_new_tunnels(self) -> bool:
        """New tunnels need the shared state (caps, resume registry) unless configured to fail
        open; open tunnels never need it."""
        return self.state.available or self.link.fail_open

    async def claim(self, sid: str, identity: Identity, subprotocol: str) -> str | None:
        """Register a new tunnel in the shared state under the cluster-wide per-principal cap.
        Returns the refusal (cap reached, or the state is down and we fail closed)."""
        record = TunnelRecord(sid, identity.principal, subprotocol, time.time())
        try:
            return await self.state.claim(record, self._max_per_principal)
        except StateUnavailable:
            return None if self.link.fail_open else STATE_DOWN

    def release(self, record: TunnelRecord) -> None:
        self.state.release_soon(record)

    def forwarded(self, headers: Headers, path: str) -> Forwarded | None:
        """A resume relayed by another node: the client's address it vouches for. Raises
        ForwardRefused for a forwarding claim without proof of the cluster secret."""
        return verify_forward(headers, path, self.link.secret, time.time())

    async def forward_target(
        self, path: str, headers: Headers, identity: Identity, sid: str, source_ip: str | None
    ) -> ClientConnection | None:
        """For a resume of a tunnel this node does not hold: the WebSocket to its owner, or
        None when no live node holds it for this principal (the handler answers 'sid unknown').
        Raises StateUnavailable, or OwnerUnreachable with the owner's HTTP status."""
        if isinstance(self.state, MemoryState):
            return None
        owner = await self.state.owner(sid)
        if owner is None or owner.node == self.node:
            return None
        if owner.record.principal != identity.principal or self.link.secret is None:
            return None  # someone else's tunnel: indistinguishable from an unknown one
        offered = [
            Subprotocol(p.strip())
            for value in headers.get_all("Sec-WebSocket-Protocol")
            for p in value.split(",")
            if p.strip() in DIALECTS
        ]
        try:
            return await open_forward(
                owner.url,
                path,
                authorization=headers["Authorization"],
                subprotocols=offered,
                extra=forward_headers(
                    self.link.secret, self.node, source_ip or "", path, time.time()
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

    async def bridge(
        self, ws: ServerConnection, upstream: ClientConnection, principal: str, sid: str
    ) -> None:
        """Relay a forwarded resume between the client and the owner until either closes."""
        if upstream.subprotocol != ws.subprotocol:  # pragma: no cover - same relay code both ends
            await upstream.close()
            await ws.close(1002, "subprotocol mismatch")
            return
        self.audit.record(
            "resume", decision="forward", principal=principal, tunnel_id=sid, node=self.node
        )
        await bridge(ws, upstream)
