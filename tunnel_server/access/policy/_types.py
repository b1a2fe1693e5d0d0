"""The request and decision types shared by every policy module, and the tri-state result."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

ALL_AUTHENTICATED = "allAuthenticatedUsers"
TUNNEL_USER = "tunnelUser"
WEB_USER = "webUser"
ADMIN = "admin"
ROLES = frozenset({TUNNEL_USER, WEB_USER, ADMIN})

# What a refused caller may be told: "policy" (no binding grants it, or a deny rule), "access-level"
# (a binding would grant it, but an access level it requires is not met), "port" (a binding
# grants the target, not this port).
DENIAL_CATEGORIES = ("policy", "access-level", "port")


@dataclass(frozen=True, slots=True)
class AccessRequest:
    """Who asks for what, built by a transport adapter (TCP relay, HTTP proxy, CLI).

    ``resource`` is ``instance:P/Z/N``, ``group:P/R/N/G`` (destination group), ``app:NAME`` (HTTP
    mode) or ``relay:NAME`` (the admin surface). ``labels`` are the resource's labels; ``None``
    means "look them up in the policy's inventory labels". Attributes left ``None`` are unknown:
    a condition that reads one fails closed.
    """

    members: frozenset[str]
    resource: str
    port: int
    source_ip: str | None = None
    principal: str | None = None
    role: str = TUNNEL_USER
    labels: Mapping[str, str] | None = None
    destination_ip: str | None = None
    destination_host: str | None = None
    request_host: str | None = None
    request_path: str | None = None
    device: Mapping[str, object] = field(default_factory=dict)
    claims: Mapping[str, object] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.resource.partition(":")[0]

    @property
    def key(self) -> str:
        return self.resource.partition(":")[2]


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict. ``binding`` names the binding (or deny rule) that decided it; ``rule`` is the
    granting binding's position in ``Policy.bindings`` (kept for the audit log's ``rule`` field).
    ``category`` says, for a refusal, what kind of refusal it is in words a caller may be told
    (``DENIAL_CATEGORIES``), without naming any binding."""

    allowed: bool
    reasons: tuple[str, ...]
    binding: str | None = None
    rule: int | None = None
    category: str = "policy"

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


@dataclass(frozen=True, slots=True)
class Unknown:
    """A value that could not be computed (CEL error, missing attribute): it fails closed."""

    reason: str


Tri = bool | Unknown


def tri_and(parts: list[tuple[Tri, str]]) -> tuple[Tri, str]:
    """False wins, then Unknown, then True (CEL's commutative ``&&``)."""
    unknown: tuple[Tri, str] | None = None
    for value, detail in parts:
        if value is False:
            return False, detail
        if isinstance(value, Unknown) and unknown is None:
            unknown = (value, detail)
    if unknown is not None:
        return unknown
    return True, "; ".join(detail for _, detail in parts)


def tri_or(parts: list[tuple[Tri, str]]) -> tuple[Tri, str]:
    """True wins, then Unknown, then False (CEL's commutative ``||``)."""
    unknown: tuple[Tri, str] | None = None
    for value, detail in parts:
        if value is True:
            return True, detail
        if isinstance(value, Unknown) and unknown is None:
            unknown = (value, detail)
    if unknown is not None:
        return unknown
    return False, "; ".join(detail for _, detail in parts)


def tri_not(value: Tri) -> Tri:
    return value if isinstance(value, Unknown) else not value
