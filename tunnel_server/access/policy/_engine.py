"""``evaluate`` and ``next_change``: deny rules first, then allow bindings; errors fail closed.

A binding is checked in a fixed order (member, role, resource, port, access levels, condition)
by :func:`check`, which ``explain`` shares so the troubleshooter can never disagree with the
decision.
"""

from __future__ import annotations

import datetime as dt
from enum import Enum
from typing import Any, NamedTuple

from ..addresses import request_ip
from . import _levels
from ._cel import LEVELS_VARIABLE, make_activation, run
from ._levels import LevelEvaluator
from ._model import Binding, Policy
from ._types import ALL_AUTHENTICATED, AccessRequest, Decision, Unknown

NO_GRANT = "no binding grants this member access to this resource and port"
MAX_REASONS = 6


class Outcome(Enum):
    """Why a binding did or did not apply, in check order."""

    MATCH = "match"
    MEMBER = "member mismatch"
    EXCEPTED = "excepted member"
    ROLE = "role mismatch"
    RESOURCE = "resource mismatch"
    PORT = "port mismatch"
    LEVEL = "level unmet"
    CONDITION_FALSE = "condition false"
    CONDITION_ERROR = "condition error"


STATIC = frozenset({Outcome.MEMBER, Outcome.EXCEPTED, Outcome.ROLE, Outcome.RESOURCE, Outcome.PORT})


class Result(NamedTuple):
    outcome: Outcome
    detail: str
    level: str | None = None


class Context:
    """One request at one instant: resource parts, labels, and lazily levels and CEL bindings."""

    def __init__(
        self, request: AccessRequest, policy: Policy, now: float, *, verbose: bool = False
    ) -> None:
        self.request = request
        self.policy = policy
        self.now = now
        self.verbose = verbose  # explain: describe static mismatches too
        self.kind, _, self.key = request.resource.partition(":")
        labels = request.labels
        self.labels = labels if labels is not None else policy.resource_labels.get(request.resource)
        self._levels: LevelEvaluator | None = None
        self._values: dict[str, object] | None = None
        self._base: Any = None
        self._full: Any = None

    @property
    def levels(self) -> LevelEvaluator:
        if self._levels is None:
            self._levels = LevelEvaluator(
                self.policy.access_levels,
                source_ip=self.request.source_ip,
                device=self.request.device,
                now=self.now,
                activation=self.base_activation,
            )
        return self._levels

    def values(self) -> dict[str, object]:
        if self._values is not None:
            return self._values
        r = self.request
        values: dict[str, object] = {
            "request.time": dt.datetime.fromtimestamp(self.now, dt.UTC),
            "destination.port": r.port,
            "device": dict(r.device),
            "auth.claims": dict(r.claims),
            "resource.name": self.key,
            "resource.type": self.kind,
            "resource.labels": dict(self.labels or {}),
        }
        for name, value in (
            ("request.host", r.request_host),
            ("request.path", r.request_path),
            ("source.ip", _canonical(r.source_ip)),
            ("destination.ip", _canonical(r.destination_ip)),
            ("destination.host", r.destination_host),
            ("auth.principal", r.principal),
        ):
            if value is not None:
                values[name] = value
        self._values = values
        return values

    def base_activation(self) -> Any:
        """Variables without ``request.auth.access_levels`` (what level expressions see)."""
        if self._base is None:
            self._base = _activation(self.values())
        return self._base

    def activation(self) -> Any:
        """Every variable, ``request.auth.access_levels`` computed only when conditions use it."""
        if self._full is None:
            if not self.policy.levels_in_conditions:
                self._full = self.base_activation()
            else:
                values = {**self.values(), LEVELS_VARIABLE: self.levels.met()}
                self._full = _activation(values)
        return self._full


def _canonical(ip: str | None) -> str | None:
    if ip is None:
        return None
    address = request_ip(ip)
    return ip if address is None else str(address)


def _activation(values: dict[str, object]) -> Any:
    try:
        return make_activation(values)
    except Exception as exc:  # an attribute CEL cannot represent: every condition fails closed
        return Unknown(f"request attributes not usable in CEL: {type(exc).__name__}")


def static_check(ctx: Context, binding: Binding, *, deny: bool) -> Result | None:
    """Member, role, resource and port: the checks that do not depend on time."""
    r = ctx.request
    if ALL_AUTHENTICATED not in binding.members and r.members.isdisjoint(binding.members):
        outcome = Outcome.MEMBER
    elif deny and not r.members.isdisjoint(binding.except_members):
        outcome = Outcome.EXCEPTED
    elif r.role not in binding.roles:
        outcome = Outcome.ROLE
    elif not binding.resources.matches(ctx.kind, ctx.key, ctx.labels):
        outcome = Outcome.RESOURCE
    elif not binding.port_matches(r.port):
        outcome = Outcome.PORT
    else:
        return None
    return Result(outcome, _describe(ctx, binding, outcome) if ctx.verbose else outcome.value)


def _describe(ctx: Context, binding: Binding, outcome: Outcome) -> str:
    r = ctx.request
    if outcome is Outcome.MEMBER:
        return "names none of the caller's members"
    if outcome is Outcome.EXCEPTED:
        return "the caller is one of its except_members"
    if outcome is Outcome.ROLE:
        return f"grants {'/'.join(sorted(binding.roles))}, not {r.role}"
    if outcome is Outcome.RESOURCE:
        return f"{r.resource} is not in {binding.resources.describe()}"
    ports = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in binding.ports)
    return f"port {r.port} is not in {ports}"


def check(ctx: Context, binding: Binding, *, deny: bool) -> Result:
    """The outcome of one binding (allow) or deny rule for this request.

    For a deny rule an unknown level or a condition error counts as a match: fail closed.
    """
    static = static_check(ctx, binding, deny=deny)
    if static is not None:
        return static
    for name in binding.access_levels:
        value, detail = ctx.levels.level(name)
        if value is True:
            continue
        if isinstance(value, Unknown):
            if deny:
                return Result(Outcome.MATCH, f"access level {name} unknown ({detail})", name)
            return Result(Outcome.LEVEL, f"access level {name} unknown: {detail}", name)
        return Result(Outcome.LEVEL, f"access level {name} unmet: {detail}", name)
    condition = binding.condition
    if condition is not None:
        activation = ctx.activation()
        value = activation if isinstance(activation, Unknown) else run(condition, activation)
        label = condition.title or condition.expression
        if isinstance(value, Unknown):
            if deny:
                return Result(Outcome.MATCH, f"condition {label!r} failed: {value.reason}")
            return Result(Outcome.CONDITION_ERROR, f"condition {label!r} failed: {value.reason}")
        if not value:
            return Result(Outcome.CONDITION_FALSE, f"condition {label!r} is false")
    return Result(Outcome.MATCH, "applies")


def _decide(ctx: Context) -> Decision:
    policy = ctx.policy
    for n in policy.deny_candidates(ctx.request.members):
        rule = policy.deny[n]
        result = check(ctx, rule, deny=True)
        if result.outcome is Outcome.MATCH:
            reason = f"denied by {rule.name}"
            if result.detail != "applies":
                reason += f": {result.detail} (fail closed)"
            return Decision(False, (reason,), rule.name)
    failures: list[str] = []
    outcomes: set[Outcome] = set()
    for n in policy.allow_candidates(ctx.request.members):
        binding = policy.bindings[n]
        result = check(ctx, binding, deny=False)
        if result.outcome is Outcome.MATCH:
            return Decision(True, (f"allowed by {binding.name}",), binding.name, n, "allowed")
        outcomes.add(result.outcome)
        if result.outcome not in STATIC and len(failures) < MAX_REASONS:
            failures.append(f"{binding.name}: {result.detail}")
    return Decision(False, (NO_GRANT, *failures), category=_category(outcomes))


def _category(outcomes: set[Outcome]) -> str:
    """The most actionable refusal: an unmet access level (the caller may meet it), then a port
    outside what a grant covers, else the policy."""
    if Outcome.LEVEL in outcomes:
        return "access-level"
    if Outcome.PORT in outcomes:
        return "port"
    return "policy"


def evaluate(request: AccessRequest, policy: Policy, now: float) -> Decision:
    """Decide ``request`` at ``now`` (epoch seconds). Pure: no I/O, no clock, no randomness.

    A matching deny rule wins; otherwise the first binding (in policy order) that applies
    grants. Any unexpected error denies with a reason.
    """
    try:
        return _decide(Context(request, policy, now))
    except Exception as exc:  # fail closed whatever happens
        return Decision(False, (f"policy evaluation failed: {type(exc).__name__}",))


def _binding_change(ctx: Context, binding: Binding) -> float | None:
    times: list[float] = []
    names = set(binding.access_levels)
    if binding.condition is not None:
        change = binding.condition.next_change(ctx.now)
        if change is not None:
            times.append(change)
        if binding.condition.uses_levels:
            names.update(ctx.policy.access_levels)
    change = _levels.next_change(ctx.policy.access_levels, names, ctx.now)
    if change is not None:
        times.append(change)
    return min(times, default=None)


def access_levels_met(request: AccessRequest, policy: Policy, now: float) -> list[str]:
    """Names of the access levels this request meets (``request.auth.access_levels``), for the
    HTTP mode's signed assertion."""
    return Context(request, policy, now).levels.met()


def next_change(request: AccessRequest, policy: Policy, now: float) -> float | None:
    """The earliest instant after ``now`` at which the decision could change with time alone.

    Exact for time windows; for CEL conditions on ``request.time``: at ``timestamp('...')``
    literals, at the next whole minute for calendar getters, else at the next second. None
    when no relevant binding, deny rule or level depends on time. A decision that does not
    change at the returned instant is possible (ask again then).
    """
    ctx = Context(request, policy, now)
    decision = evaluate(request, policy, now)
    deny = [
        policy.deny[n]
        for n in policy.deny_candidates(request.members)
        if static_check(ctx, policy.deny[n], deny=True) is None
    ]
    allow = [
        policy.bindings[n]
        for n in policy.allow_candidates(request.members)
        if static_check(ctx, policy.bindings[n], deny=False) is None
    ]
    timed_deny = [b for b in deny if policy.time_dependent(b)]
    if decision.binding is not None and not decision.allowed:
        decider = next((b for b in deny if b.name == decision.binding), None)
        if decider is not None and not policy.time_dependent(decider):
            return None
    if decision.rule is not None:
        granter = policy.bindings[decision.rule]
        if not policy.time_dependent(granter) and not timed_deny:
            return None
    relevant = timed_deny + [b for b in allow if policy.time_dependent(b)]
    times = [t for b in relevant if (t := _binding_change(ctx, b)) is not None]
    return min(times, default=None)
