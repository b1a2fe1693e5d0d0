"""The troubleshooter: every binding and deny rule checked for one request, with the reason each
did or did not apply, every access level's value, and the decision (``policy explain``)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from ._engine import Context, Outcome, check, evaluate, next_change
from ._model import Policy
from ._types import AccessRequest, Decision, Unknown


@dataclass(frozen=True)
class Check:
    """One binding or deny rule: ``outcome`` is ``granted`` / ``deny matched`` when it applies,
    else the first failed check (member, role, resource, port, level, condition)."""

    binding: str
    effect: Literal["allow", "deny"]
    outcome: str
    detail: str
    level: str | None = None


@dataclass(frozen=True)
class LevelState:
    name: str
    state: Literal["met", "unmet", "unknown"]
    detail: str


@dataclass(frozen=True)
class Explanation:
    """``decided_by`` is the deciding binding or deny rule; ``level`` the access level that
    decided (a deny rule's level, or for a default deny the level that failed the closest
    candidate binding)."""

    request: AccessRequest
    now: float
    decision: Decision
    decided_by: str | None
    level: str | None
    checks: tuple[Check, ...]
    levels: tuple[LevelState, ...]
    next_change: float | None

    def lines(self) -> list[str]:
        """Human-readable report; untrusted strings have control characters escaped."""
        r = self.request
        verdict = "ALLOW" if self.decision.allowed else "DENY"
        out = [
            f"decision: {verdict} ({_safe(self.decision.reason)})",
            f"request: {_safe(r.principal or ', '.join(sorted(r.members)) or '-')} -> "
            f"{_safe(r.resource)} port {r.port} as {_safe(r.role)} at {_iso(self.now)}"
            + (f" from {_safe(r.source_ip)}" if r.source_ip else ""),
        ]
        if self.decided_by or self.level:
            by = self.decided_by or "no binding"
            out.append(
                f"decided by: {by}" + (f" (access level {self.level})" if self.level else "")
            )
        width = max(
            [len(c.binding) for c in self.checks] + [len(s.name) for s in self.levels] + [8]
        )
        for effect, title in (("deny", "deny rules:"), ("allow", "bindings:")):
            rows = [c for c in self.checks if c.effect == effect]
            out.append(title + ("" if rows else " (none)"))
            out.extend(f"  {c.binding:<{width}}  {c.outcome:<17}  {_safe(c.detail)}" for c in rows)
        out.append("access levels:" + ("" if self.levels else " (none)"))
        out.extend(f"  {s.name:<{width}}  {s.state:<17}  {_safe(s.detail)}" for s in self.levels)
        if self.next_change is not None:
            out.append(f"next change: {_iso(self.next_change)}")
        return out

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (``policy explain --json``)."""
        return {
            "allowed": self.decision.allowed,
            "reasons": list(self.decision.reasons),
            "decided_by": self.decided_by,
            "level": self.level,
            "checks": [c.__dict__ for c in self.checks],
            "levels": [s.__dict__ for s in self.levels],
            "next_change": self.next_change,
        }


def _iso(instant: float) -> str:
    return dt.datetime.fromtimestamp(instant, dt.UTC).isoformat().replace("+00:00", "Z")


def _safe(text: str) -> str:
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _outcome(result_outcome: Outcome, deny: bool) -> str:
    if result_outcome is Outcome.MATCH:
        return "deny matched" if deny else "granted"
    return str(result_outcome.value)


def explain(request: AccessRequest, policy: Policy, now: float) -> Explanation:
    """Check every deny rule and binding (not only the indexed candidates) and every level."""
    decision = evaluate(request, policy, now)
    ctx = Context(request, policy, now, verbose=True)
    checks: list[Check] = []
    decided_level: str | None = None
    closest_level: str | None = None
    for rules, deny in ((policy.deny, True), (policy.bindings, False)):
        for binding in rules:
            result = check(ctx, binding, deny=deny)
            outcome = _outcome(result.outcome, deny)
            if binding.name == decision.binding:
                decided_level = result.level
            elif result.outcome is Outcome.MATCH and not deny and not decision.allowed:
                outcome = "granted, overridden by deny"
            if result.outcome is Outcome.LEVEL and closest_level is None and not deny:
                closest_level = result.level
            effect: Literal["allow", "deny"] = "deny" if deny else "allow"
            checks.append(Check(binding.name, effect, outcome, result.detail, result.level))
    levels = []
    for name in policy.access_levels:
        value, detail = ctx.levels.level(name)
        state: Literal["met", "unmet", "unknown"] = (
            "unknown" if isinstance(value, Unknown) else "met" if value else "unmet"
        )
        levels.append(LevelState(name, state, detail))
    if decision.binding is None and not decision.allowed:
        decided_level = closest_level
    return Explanation(
        request=request,
        now=now,
        decision=decision,
        decided_by=decision.binding,
        level=decided_level,
        checks=tuple(checks),
        levels=tuple(levels),
        next_change=next_change(request, policy, now),
    )
