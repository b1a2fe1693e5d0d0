"""Who may open or resume a tunnel. ``authenticate``: the one bearer token of the handshake,
verified, and not revoked. ``authorize_connect``: the policy decision on the request, then the
inventory lookup; the dial later checks every address the name resolves to against the same
policy (``dial_filter``). ``decide``: an open tunnel re-decided for a (renewed) identity, on a
resume or while it runs. Admission decides and writes the ``decision`` audit records; it never
touches a connection."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tunnel_protocol import CloseCode
from tunnel_protocol.urls import ConnectRequest, HostTarget, Target

from ..access.addresses import (
    DestinationDenied,
    DestinationError,
    DestinationPolicy,
    IPAddress,
    within,
)
from ..access.current import CurrentPolicy
from ..access.device import Device, device_attributes
from ..access.identity import Authenticator, AuthError, Identity, bearer_token
from ..access.inventory import Destination, Inventory, LookupFailed
from ..access.policy import (
    TUNNEL_USER,
    AccessRequest,
    Binding,
    Decision,
    access_levels_met,
    evaluate,
    render_logins,
)
from ..audit import AuditLog
from .denials import Denials
from .events import RelayEvents
from .refused import Refused
from .session import Session


@dataclass(frozen=True)
class Grant:
    """An allowed connect: the request as decided, where to dial, and the fields every audit
    record about it carries."""

    access: AccessRequest
    decision: Decision
    destination: Destination
    fields: dict[str, Any] = field(default_factory=dict)


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


class Admission:
    def __init__(
        self,
        *,
        authenticator: Authenticator,
        revoked: Callable[[Identity], bool],
        policies: CurrentPolicy,
        inventory: Inventory,
        destinations: DestinationPolicy,
        audit: AuditLog,
        events: RelayEvents,
        denials: Denials | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.authenticator = authenticator
        self.revoked = revoked
        self.policies = policies
        self.inventory = inventory
        self.destinations = destinations
        self.audit = audit
        self.events = events
        self.denials = denials or Denials()
        self.clock = clock

    async def authenticate(self, authorization: Sequence[str]) -> Identity:
        """The identity of the handshake's one ``Authorization: Bearer`` header. AuthError
        (IssuerUnavailable when the issuer cannot be reached) names the problem."""
        if len(authorization) != 1:
            raise AuthError("missing credentials" if not authorization else "several credentials")
        token = bearer_token(authorization[0])
        if token is None:
            raise AuthError("not a bearer token")
        identity = await self.authenticator.verify(token)
        if self.revoked(identity):
            raise AuthError("revoked")
        return identity

    # -- connects -------------------------------------------------------------------------------

    def authorize_connect(
        self,
        identity: Identity,
        request: ConnectRequest,
        source_ip: str | None,
        device: Device | None,
        dialect: str,
    ) -> Grant:
        """The decision on a new tunnel and where it goes; Refused (4033, 4047) otherwise."""
        target = request.target
        resource = self.inventory.resource_for(target)
        host = target.host if isinstance(target, HostTarget) else None
        access = access_request(identity, resource, target.port, source_ip, device, host)
        started = time.perf_counter()
        decision = evaluate(access, self.policies.policy, self.clock())
        self.events.decision(time.perf_counter() - started)
        fields = {
            "principal": identity.principal,
            "source_ip": source_ip,
            "resource": resource,
            "port": target.port,
            "dialect": dialect,
            "device": device.id if device is not None else None,
            "binding": decision.binding,
        }
        if not decision.allowed:
            raise self._refuse(decision.category, decision.reason, access, fields, dialect)
        try:
            destination = self.inventory.resolve(target)
        except LookupFailed as exc:
            fields["rule"] = decision.rule
            raise self._refuse(
                "unknown-target", str(exc), access, fields, dialect,
                iap=(exc.code, "lookup failed"),
            ) from None  # fmt: skip
        return Grant(access, decision, destination, fields)

    def _refuse(
        self,
        category: str,
        reason: str,
        access: AccessRequest | None,
        fields: dict[str, Any],
        dialect: str,
        *,
        iap: tuple[int, str] = (CloseCode.NOT_AUTHORIZED, "not authorized"),
        event: str = "decision",
    ) -> Refused:
        """Audit a refusal with its reference; the close to send."""
        denial = self.denials.record(category, reason, access, self.clock())
        self.audit.record(
            event, decision="deny", reason=reason, category=category,
            reference=denial.reference, **fields,
        )  # fmt: skip
        close = self.denials.close(denial, native=dialect == "native", iap_code=iap[0],
                                   iap_message=iap[1])  # fmt: skip
        return Refused(close.code, close.message, reason)

    def refuse_resume(
        self, session: Session, decision: Decision, fields: dict[str, Any]
    ) -> Refused:
        """A resume the fresh token (or the policy) no longer grants: audited, and the close."""
        fields = {**fields, "tunnel_id": session.sid}
        access = self.request_for(session.identity, session)
        return self._refuse(
            decision.category, decision.reason, access, fields,
            session.tunnel.dialect.name, event="resume",
        )  # fmt: skip

    def access_levels(self, grant: Grant) -> list[str]:
        """The access levels the granted request meets now (for a signed identity)."""
        return access_levels_met(grant.access, self.policies.policy, self.clock())

    def dial_filter(self, grant: Grant) -> Callable[[IPAddress], bool]:
        """Which resolved addresses the tunnel may dial: inside what the operator named for
        the destination, and allowed by the policy for that ``destination.ip``."""
        destination = grant.destination
        named = (lambda ip: True) if destination.any_address else within(destination.networks)

        def allowed(ip: IPAddress) -> bool:
            checked = replace(grant.access, destination_ip=str(ip))
            return named(ip) and evaluate(checked, self.policies.policy, self.clock()).allowed

        return allowed

    def dial_refused(self, grant: Grant, exc: DestinationError, dialect: str) -> Refused:
        """Audit a dial that did not happen (denied address) or failed; the close to send."""
        fields = {
            "rule": grant.decision.rule,
            "host": grant.destination.host,
            "address": str(exc.address) if exc.address else None,
            **grant.fields,
        }
        if isinstance(exc, DestinationDenied):
            return self._refuse("policy", exc.reason, grant.access, fields, dialect)
        self.audit.record(
            "decision", decision="allow", reason=exc.reason, result="backend_unreachable",
            **fields,
        )  # fmt: skip
        return Refused(exc.code, "failed to connect to backend", exc.reason)

    def opened(self, grant: Grant, sid: str, dialed: IPAddress) -> None:
        self.audit.record(
            "decision",
            decision="allow",
            reason=grant.decision.reason,
            rule=grant.decision.rule,
            host=grant.destination.host,
            address=str(dialed),
            tunnel_id=sid,
            **grant.fields,
        )

    # -- SSH certificates ------------------------------------------------------------------------

    def authorize_logins(
        self, identity: Identity, target: Target, source_ip: str | None, device: Device | None
    ) -> tuple[Binding, tuple[str, ...]]:
        """The login names ``identity`` may use on ``target`` (a certificate's principals): the
        logins of the binding that grants the target and port. Refused (audited, with a
        reference) when none does, or it grants no login."""
        resource = self.inventory.resource_for(target)
        host = target.host if isinstance(target, HostTarget) else None
        access = access_request(identity, resource, target.port, source_ip, device, host)
        decision = evaluate(access, self.policies.policy, self.clock())
        fields = {
            "principal": identity.principal,
            "source_ip": source_ip,
            "resource": resource,
            "port": target.port,
            "binding": decision.binding,
        }
        if not decision.allowed or decision.rule is None:
            raise self._refuse(
                decision.category, decision.reason, access, fields, "native",
                event="ssh_certificate",
            )  # fmt: skip
        binding = self.policies.policy.bindings[decision.rule]
        logins = render_logins(binding.logins, email=identity.email, subject=identity.subject)
        if not logins:
            reason = f"{binding.name} grants no login names to {identity.principal}"
            raise self._refuse("policy", reason, access, fields, "native", event="ssh_certificate")
        return binding, logins

    # -- open tunnels ---------------------------------------------------------------------------

    def request_for(self, identity: Identity, session: Session) -> AccessRequest:
        """An open tunnel as a policy request, with the address it actually dialed."""
        request = access_request(
            identity, session.resource, session.port, session.source_ip, session.device,
            session.host,
        )  # fmt: skip
        return replace(request, destination_ip=session.address)

    def decide(self, identity: Identity, session: Session) -> Decision:
        """Re-decide an open tunnel for a (renewed) identity under the policy in force."""
        return evaluate(self.request_for(identity, session), self.policies.policy, self.clock())
