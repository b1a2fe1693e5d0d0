"""Resource selectors, bindings, and the Policy object with its member index."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..inventory import InventoryConfig
from ._allow import AllowRule
from ._cel import Condition, TimeUse
from ._levels import AccessLevel, check_graph, time_dependent
from ._types import ALL_AUTHENTICATED, TUNNEL_USER

KINDS = {"instance": "instances", "group": "destination_groups", "app": "apps"}


@dataclass(frozen=True)
class _Matcher:
    every: bool
    exact: frozenset[str]
    pattern: re.Pattern[str] | None

    @classmethod
    def build(cls, patterns: Sequence[str]) -> _Matcher:
        exact = frozenset(p for p in patterns if "*" not in p)
        globs = [p for p in patterns if "*" in p and p != "*"]
        regex = "|".join(
            "/".join("[^/]*".join(re.escape(x) for x in seg.split("*")) for seg in g.split("/"))
            for g in globs
        )
        return cls("*" in patterns, exact, re.compile(f"(?:{regex})") if globs else None)

    def __call__(self, key: str) -> bool:
        if self.every or key in self.exact:
            return True
        return self.pattern is not None and self.pattern.fullmatch(key) is not None


@dataclass(frozen=True)
class ResourceSelector:
    """Which resources a binding covers.

    A kind's list (``*`` = all of that kind; ``*`` inside a ``/``-separated segment matches
    within that segment) selects resources of that kind; ``labels`` narrow every kind listed,
    or on their own select resources of any kind whose labels match (``None`` value: the key
    is present). ``relay`` selects the admin surface (``relay:*`` resources).
    """

    instances: tuple[str, ...] = ()
    destination_groups: tuple[str, ...] = ()
    apps: tuple[str, ...] = ()
    labels: tuple[tuple[str, frozenset[str] | None], ...] = ()
    relay: bool = False
    _matchers: dict[str, _Matcher] = field(init=False, repr=False, compare=False)
    _labels_only: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        matchers = {
            kind: _Matcher.build(getattr(self, attr))
            for kind, attr in KINDS.items()
            if getattr(self, attr)
        }
        object.__setattr__(self, "_matchers", matchers)
        object.__setattr__(
            self, "_labels_only", not matchers and not self.relay and bool(self.labels)
        )

    def matches(self, kind: str, key: str, labels: Mapping[str, str] | None) -> bool:
        matcher = self._matchers.get(kind)
        if matcher is None:
            if kind == "relay":
                return self.relay
            return self._labels_only and kind in KINDS and self._labels_match(labels or {})
        if not (
            matcher.every
            or key in matcher.exact
            or (matcher.pattern is not None and matcher.pattern.fullmatch(key) is not None)
        ):
            return False
        return not self.labels or self._labels_match(labels or {})

    def _labels_match(self, labels: Mapping[str, str]) -> bool:
        for name, values in self.labels:
            value = labels.get(name)
            if value is None or (values is not None and value not in values):
                return False
        return True

    def describe(self) -> str:
        parts = [f"{attr} {list(getattr(self, attr))}" for attr in KINDS.values()]
        parts = [p for p in parts if not p.endswith("[]")]
        if self.labels:
            shown = {k: "*" if v is None else sorted(v) for k, v in self.labels}
            parts.append(f"labels {shown}")
        if self.relay:
            parts.append("the relay admin surface")
        return ", ".join(parts) or "nothing"


@dataclass(frozen=True)
class SshPermissions:
    """What an SSH certificate issued under a binding permits (OpenSSH certificate extensions)."""

    pty: bool = True
    port_forwarding: bool = False
    agent_forwarding: bool = False
    x11_forwarding: bool = False


@dataclass(frozen=True, eq=False)
class Binding:
    """Members get ``roles`` on ``resources`` and ``ports`` (empty: every port), when all of
    ``access_levels`` are met and ``condition`` is true. As a deny rule, the same shape says who
    is refused; ``except_members`` are exempt."""

    name: str
    members: frozenset[str]
    roles: frozenset[str]
    resources: ResourceSelector
    ports: tuple[tuple[int, int], ...] = ()
    condition: Condition | None = None
    access_levels: tuple[str, ...] = ()
    except_members: frozenset[str] = frozenset()
    # SSH certificates issued under this binding (docs/ssh-certificates.md): the login names a
    # member may use (templates: {email_local}, {email}, {sub}), and what the certificate
    # permits beyond a shell.
    logins: tuple[str, ...] = ()
    ssh: SshPermissions = field(default_factory=lambda: SshPermissions())

    def port_matches(self, port: int) -> bool:
        if not self.ports:
            return True
        for first, last in self.ports:
            if first <= port <= last:
                return True
        return False


def normalize_member(member: str) -> str:
    """Emails and domains compare case-insensitively (identity lower-cases them too)."""
    kind, sep, value = member.partition(":")
    if sep and kind in ("user", "domain"):
        return f"{kind}:{value.lower()}"
    return member


def bindings_from_allow_rules(rules: Sequence[AllowRule]) -> list[Binding]:
    """The relay config's inline ``access:`` rules as tunnelUser bindings named ``access[N]``."""
    return [
        Binding(
            name=f"access[{n}]",
            members=frozenset(normalize_member(m) for m in rule.members),
            roles=frozenset({TUNNEL_USER}),
            resources=ResourceSelector(
                instances=tuple(rule.instances),
                destination_groups=tuple(rule.destination_groups),
            ),
            ports=tuple((r.first, r.last) for r in rule.ports),
            logins=tuple(rule.logins),
        )
        for n, rule in enumerate(rules)
    ]


def labels_from_inventory(inventory: InventoryConfig) -> dict[str, Mapping[str, str]]:
    """``instance:P/Z/N`` -> labels, for requests that do not carry their resource's labels."""
    return {f"instance:{i.key}": dict(i.labels) for i in inventory.instances}


def _index(bindings: Sequence[Binding]) -> tuple[dict[str, tuple[int, ...]], tuple[int, ...]]:
    by_member: dict[str, list[int]] = {}
    everyone: list[int] = []
    for n, binding in enumerate(bindings):
        for member in binding.members:
            if member == ALL_AUTHENTICATED:
                everyone.append(n)
            else:
                by_member.setdefault(member, []).append(n)
    return {m: tuple(v) for m, v in by_member.items()}, tuple(everyone)


def _candidates(
    index: dict[str, tuple[int, ...]], everyone: tuple[int, ...], members: frozenset[str]
) -> list[int]:
    found: set[int] = set(everyone)
    for member in members:
        hits = index.get(member)
        if hits is not None:
            found.update(hits)
    return sorted(found)


class Policy:
    """Allow bindings, deny rules and access levels, indexed by member for evaluation.

    ``Policy(rules)`` (a sequence of the config's ``AllowRule``) still builds the old allow-list;
    ``rules`` become the first bindings, named ``access[N]``. Raises ValueError when a binding
    names an unknown level or levels form a cycle (``parse_policy`` reports these with their
    file and key).
    """

    def __init__(
        self,
        rules: Sequence[AllowRule] = (),
        *,
        bindings: Iterable[Binding] = (),
        deny: Iterable[Binding] = (),
        access_levels: Iterable[AccessLevel] = (),
        resource_labels: Mapping[str, Mapping[str, str]] | None = None,
        source: str = "<policy>",
    ) -> None:
        self.rules = tuple(rules)
        self.bindings = (*bindings_from_allow_rules(self.rules), *bindings)
        self.deny = tuple(deny)
        self.access_levels = {level.name: level for level in access_levels}
        self.resource_labels = dict(resource_labels or {})
        self.source = source
        check_graph(self.access_levels)
        for binding in (*self.bindings, *self.deny):
            for name in binding.access_levels:
                if name not in self.access_levels:
                    raise ValueError(f"{binding.name}: unknown access level {name!r}")
        self._allow_index, self._allow_everyone = _index(self.bindings)
        self._deny_index, self._deny_everyone = _index(self.deny)
        self.timed_levels = time_dependent(self.access_levels)
        conditions = [b.condition for b in (*self.bindings, *self.deny) if b.condition]
        self.levels_in_conditions = any(c.uses_levels for c in conditions)

    @classmethod
    def from_allow_rules(
        cls, rules: Sequence[AllowRule], *, inventory: InventoryConfig | None = None
    ) -> Policy:
        labels = labels_from_inventory(inventory) if inventory is not None else None
        return cls(rules, resource_labels=labels, source="access")

    def allow_candidates(self, members: frozenset[str]) -> list[int]:
        """Positions of the bindings naming one of ``members`` (or everyone), in order."""
        return _candidates(self._allow_index, self._allow_everyone, members)

    def deny_candidates(self, members: frozenset[str]) -> list[int]:
        return _candidates(self._deny_index, self._deny_everyone, members)

    def time_dependent(self, binding: Binding) -> bool:
        """Whether the binding's outcome can change with time alone."""
        c = binding.condition
        if c is not None and c.time_use is not TimeUse.NONE:
            return True
        if c is not None and c.uses_levels and self.timed_levels:
            return True
        return not self.timed_levels.isdisjoint(binding.access_levels)

    def __repr__(self) -> str:
        return (
            f"Policy({self.source!r}, {len(self.bindings)} bindings, {len(self.deny)} deny, "
            f"{len(self.access_levels)} levels)"
        )
