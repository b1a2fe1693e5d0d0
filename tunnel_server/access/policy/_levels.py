"""Access levels: IP subnetworks, device policy, time windows, CEL, required levels, negation,
AND/OR. Evaluated per request, three-valued: an unknown input (no source IP, a CEL error) makes
a level neither met nor unmet, and negation keeps it unknown (fail closed)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..addresses import IPAddress, IPNetwork, request_ip
from ._cel import Condition, TimeUse, run
from ._timewindow import TimeWindow
from ._types import Tri, Unknown, tri_and, tri_not, tri_or

Combine = Literal["AND", "OR"]


@dataclass(frozen=True)
class DevicePolicy:
    """Each attribute given must equal the device's; an absent device attribute is not met."""

    managed: bool | None = None
    encrypted: bool | None = None
    os: frozenset[str] | None = None

    def check(self, device: Mapping[str, object]) -> tuple[bool, str]:
        for name in ("managed", "encrypted"):
            wanted = getattr(self, name)
            if wanted is not None and device.get(name) is not wanted:
                return False, f"device.{name} is not {str(wanted).lower()}"
        if self.os is not None:
            os = device.get("os")
            if not isinstance(os, str) or os.lower() not in self.os:
                return False, f"device.os not in {sorted(self.os)}"
        return True, "device policy met"


@dataclass(frozen=True)
class LevelCondition:
    """Every attribute given must hold (AND); ``negate`` inverts the result."""

    ip_subnetworks: tuple[IPNetwork, ...] = ()
    device: DevicePolicy | None = None
    time: TimeWindow | None = None
    required_levels: tuple[str, ...] = ()
    expression: Condition | None = None
    negate: bool = False


@dataclass(frozen=True)
class AccessLevel:
    """``combine`` joins the conditions; ``negate`` inverts the whole level."""

    name: str
    conditions: tuple[LevelCondition, ...]
    combine: Combine = "AND"
    negate: bool = False
    description: str = ""


def check_graph(levels: Mapping[str, AccessLevel]) -> None:
    """Refuse references to unknown levels and cycles (ValueError naming them)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name) :] + [name]
            raise ValueError(f"access level cycle: {' -> '.join(cycle)}")
        state[name] = 1
        for condition in levels[name].conditions:
            for required in condition.required_levels:
                if required not in levels:
                    raise ValueError(f"access level {name!r} requires unknown level {required!r}")
                visit(required, [*path, name])
        state[name] = 2

    for name in levels:
        visit(name, [])


def time_dependent(levels: Mapping[str, AccessLevel]) -> frozenset[str]:
    """Levels whose value can change with time alone (windows, request.time, or a required one)."""
    out: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, level in levels.items():
            if name in out:
                continue
            for c in level.conditions:
                timed = c.expression is not None and c.expression.time_use is not TimeUse.NONE
                if c.time is not None or timed or out.intersection(c.required_levels):
                    out.add(name)
                    changed = True
                    break
    return frozenset(out)


def next_change(levels: Mapping[str, AccessLevel], names: set[str], now: float) -> float | None:
    """The earliest time-driven change among ``names`` and the levels they require."""
    seen: set[str] = set()
    todo = list(names)
    times: list[float] = []
    while todo:
        name = todo.pop()
        if name in seen or name not in levels:
            continue
        seen.add(name)
        for c in levels[name].conditions:
            todo.extend(c.required_levels)
            for value in (
                c.time.next_change(now) if c.time is not None else None,
                c.expression.next_change(now) if c.expression is not None else None,
            ):
                if value is not None:
                    times.append(value)
    return min(times, default=None)


class LevelEvaluator:
    """Evaluates levels for one request, memoized; ``activation`` is built on first CEL use."""

    def __init__(
        self,
        levels: Mapping[str, AccessLevel],
        *,
        source_ip: str | None,
        device: Mapping[str, object],
        now: float,
        activation: Callable[[], Any],
    ) -> None:
        self._levels = levels
        self._source_ip = source_ip
        self._device = device
        self._now = now
        self._activation = activation
        self._memo: dict[str, tuple[Tri, str]] = {}
        self._address: tuple[IPAddress, str] | Unknown | None = None

    def level(self, name: str) -> tuple[Tri, str]:
        """The level's value and a one-line detail of why."""
        cached = self._memo.get(name)
        if cached is not None:
            return cached
        level = self._levels.get(name)
        if level is None:
            result: tuple[Tri, str] = (Unknown(f"unknown access level {name!r}"), "undefined")
        else:
            parts = [self._condition(c) for c in level.conditions]
            value, detail = tri_and(parts) if level.combine == "AND" else tri_or(parts)
            if level.negate:
                value, detail = tri_not(value), f"not ({detail})"
            result = (value, detail)
        self._memo[name] = result
        return result

    def met(self) -> list[str]:
        """Names of every level that is met (``request.auth.access_levels``)."""
        return [name for name in self._levels if self.level(name)[0] is True]

    def _condition(self, c: LevelCondition) -> tuple[Tri, str]:
        parts: list[tuple[Tri, str]] = []
        if c.ip_subnetworks:
            parts.append(self._ip(c.ip_subnetworks))
        if c.device is not None:
            parts.append(c.device.check(self._device))
        if c.time is not None:
            inside = c.time.contains(self._now)
            parts.append((inside, ("inside " if inside else "outside ") + c.time.label))
        for name in c.required_levels:
            value, _ = self.level(name)
            word = "met" if value is True else "unmet" if value is False else "unknown"
            parts.append((value, f"level {name} {word}"))
        if c.expression is not None:
            parts.append(self._cel(c.expression))
        value, detail = tri_and(parts)
        if c.negate:
            return tri_not(value), f"not ({detail})"
        return value, detail

    def _source(self) -> tuple[IPAddress, str] | Unknown:
        """The canonical source address and its text, parsed once per request."""
        if self._address is None:
            address = None if self._source_ip is None else request_ip(self._source_ip)
            if address is not None:
                self._address = (address, str(address))
            else:
                missing = self._source_ip is None
                self._address = Unknown(f"source IP {'unknown' if missing else 'unparsable'}")
        return self._address

    def _ip(self, networks: tuple[IPNetwork, ...]) -> tuple[Tri, str]:
        source = self._source()
        if isinstance(source, Unknown):
            return source, source.reason
        address, text = source
        if any(address in network for network in networks):
            return True, f"source IP {text} in ip_subnetworks"
        return False, f"source IP {text} not in ip_subnetworks"

    def _cel(self, condition: Condition) -> tuple[Tri, str]:
        activation = self._activation()
        if isinstance(activation, Unknown):
            return activation, activation.reason
        value = run(condition, activation)
        if isinstance(value, Unknown):
            return value, f"expression error: {value.reason}"
        return value, f"expression {'true' if value else 'false'}"
