"""Authorization as a pure function: ``evaluate(AccessRequest, Policy, now) -> Decision``.

For now the policy is an allow-list of members per instance / destination group and ports; the
transport adapters (relay, later the HTTP proxy) only build the AccessRequest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import AllowRule

ALL_AUTHENTICATED = "allAuthenticatedUsers"


@dataclass(frozen=True, slots=True)
class AccessRequest:
    """Who asks for what. ``resource`` is ``instance:P/Z/N`` or ``group:P/R/N/G``."""

    members: frozenset[str]
    resource: str
    port: int
    source_ip: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    rule: int | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    rules: Sequence[AllowRule]


def _resource_matches(rule: AllowRule, resource: str) -> bool:
    kind, _, key = resource.partition(":")
    keys = rule.instances if kind == "instance" else rule.destination_groups
    return "*" in keys or key in keys


def evaluate(request: AccessRequest, policy: Policy, now: float) -> Decision:
    """Allow when one rule names a member of the caller, the resource and the port."""
    del now  # conditions on time arrive with the policy engine; the signature is stable
    for n, rule in enumerate(policy.rules):
        if not _resource_matches(rule, request.resource):
            continue
        if not any(request.port in ports for ports in rule.ports):
            continue
        if ALL_AUTHENTICATED in rule.members or not request.members.isdisjoint(rule.members):
            return Decision(True, "allowed by rule", n)
    return Decision(False, "no rule grants this member access to this resource and port")
