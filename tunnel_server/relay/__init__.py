"""The relay: the WebSocket endpoint that authenticates each tunnel at its handshake, authorizes
it, dials its target and carries its bytes, keeps it authorized while it runs, parks it for
resume when its WebSocket drops, and forwards a resume to the node of the cluster that holds it.

Parts, each given what it needs by the composition root (``tunnel_server.app``):

- ``Handshake`` (handshake.py): the HTTP side of each handshake;
- ``Tunnels`` (tunnels.py): a tunnel's life on its WebSocket after the upgrade;
- ``Admission`` (admission.py): authentication and the decisions on connects and resumes;
- ``Registry`` (registry.py): the tunnels, their caps and reservations, park, end, drain;
- ``Reauthorizer`` (continuous.py): continuous authorization and revocations;
- ``Cluster`` (cluster.py): the shared state and node-to-node forwarding;
- ``dialer.py``, ``limits.py``, ``connection.py``, ``session.py``, ``events.py``.

``Relay`` is what the rest of the server holds: the parts, and the few operations that span
them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..access.addresses import DestinationPolicy
from ..access.current import CurrentPolicy
from ..access.policy import Policy
from ..audit import AuditLog
from ..state import Revocation, StateStore
from .admission import Admission
from .certificates import CertificateIssuer
from .cluster import Cluster
from .connection import RelayConnection
from .continuous import Reauthorizer
from .denials import Denial
from .events import RelayEvents
from .handshake import Handshake
from .limits import TunnelCaps
from .registry import Registry
from .session import Session
from .tunnels import Tunnels

__all__ = ["Relay"]


@dataclass(eq=False)
class Relay:
    admission: Admission
    registry: Registry
    reauthorizer: Reauthorizer
    cluster: Cluster
    handshake: Handshake
    tunnels: Tunnels
    policies: CurrentPolicy
    events: RelayEvents
    audit: AuditLog

    # -- what ops and the composition root read ---------------------------------------------

    @property
    def sessions(self) -> dict[str, Session]:
        return self.registry.sessions

    @property
    def draining(self) -> bool:
        return self.registry.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.registry.draining = value

    @property
    def state(self) -> StateStore:
        return self.cluster.state

    @property
    def node(self) -> str:
        return self.cluster.node

    @property
    def policy(self) -> Policy:
        return self.policies.policy

    @property
    def destinations(self) -> DestinationPolicy:
        return self.admission.destinations

    @property
    def caps(self) -> TunnelCaps:
        return self.registry.caps

    @property
    def certificates(self) -> CertificateIssuer | None:
        """The SSH certificate issuer (None without ``ssh:`` in the config)."""
        return self.handshake.certificates

    # -- operations -------------------------------------------------------------------------

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        await self.registry.wait_until(predicate)

    def set_policy(self, policy: Policy) -> int:
        """Swap the policy atomically (every subscriber re-decides what it holds open) and
        re-decide every tunnel; returns how many tunnels were closed."""
        self.policies.replace(policy)
        return self.reauthorizer.policy_changed()

    def revoke_user(self, principal: str, *, by: str | None) -> int:
        return self.reauthorizer.revoke_user(principal, by=by)

    def revoke_session(self, sid: str, *, by: str | None) -> int:
        return self.reauthorizer.revoke_session(sid, by=by)

    def apply_revocation(self, revocation: Revocation) -> int:
        return self.reauthorizer.apply_revocation(revocation)

    def denial(self, reference: str) -> Denial | None:
        """A recent refusal of a tunnel on this node, by the reference its caller was given."""
        return self.admission.denials.get(reference)

    def require_reauth(self, sid: str) -> bool:
        return self.reauthorizer.require_reauth(sid)

    def close_all(self, code: int, reason: str) -> None:
        self.registry.close_all(code, reason)

    async def drain(self, grace: float | None = None) -> int:
        return await self.registry.drain(grace)

    def end_grace(self) -> None:
        self.registry.end_grace()

    def reply_backlog(self, connection: RelayConnection, buffered: int) -> None:
        """A peer left this many bytes of pongs unread: its connection stopped reading it."""
        address = connection.remote_address
        self.audit.record(
            "backpressure",
            reason="unread pongs: reading paused",
            source_ip=str(address[0]) if isinstance(address, tuple) and address else None,
            buffered=buffered,
        )
        self.registry.notify()
