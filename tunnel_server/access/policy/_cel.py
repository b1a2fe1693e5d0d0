"""CEL conditions on cel-expr-python (the CEL C++ runtime): declarations, compile once, evaluate.

Every other module sees only :class:`Condition`, :func:`compile_condition`,
:func:`make_activation` and :func:`run`, so the runtime can be swapped here alone.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from cel_expr_python import cel as _cel
from cel_expr_python.ext import ext_strings as _ext_strings

from ..addresses import request_ip
from ._types import Tri, Unknown

LEVELS_VARIABLE = "request.auth.access_levels"
MAX_REASON = 200  # error texts end up in audit records: keep them short


class CelError(ValueError):
    """An expression does not parse, does not type-check, or is not a bool."""


class TimeUse(Enum):
    """How a condition depends on ``request.time``, for ``next_change``."""

    NONE = 0  # never reads request.time
    LITERALS = 1  # only compares it with timestamp('...') literals: changes at those instants
    QUARTER = 2  # calendar getters down to getHours: local hours start on a UTC quarter-hour
    MINUTE = 3  # getMinutes too: changes at most on whole minutes
    SECOND = 4  # anything else (durations, conversions): assume any second


@dataclass(frozen=True, eq=False)
class Condition:
    """A compiled CEL condition. ``program`` is the runtime's compiled expression."""

    expression: str
    title: str | None
    program: Any
    time_use: TimeUse
    instants: tuple[float, ...]  # timestamp('...') literals, epoch seconds
    uses_levels: bool

    def next_change(self, now: float) -> float | None:
        """The earliest instant after ``now`` at which the value could change with time alone."""
        times = [t for t in self.instants if t > now]
        step = _STEPS.get(self.time_use)
        if step is not None:
            times.append((math.floor(now / step) + 1) * step)
        return min(times, default=None)


# Every UTC offset in use today is a multiple of 15 minutes, so local hours, days, months and
# years all begin on a UTC quarter-hour.
_STEPS = {TimeUse.QUARTER: 900.0, TimeUse.MINUTE: 60.0, TimeUse.SECOND: 1.0}


@functools.lru_cache(maxsize=1024)
def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(cidr, strict=False)


def in_ip_range(ip: str, cidr: str) -> bool:
    """CEL ``inIpRange(ip, cidr)``: canonical comparison (IPv4-mapped IPv6 counts as IPv4)."""
    address = request_ip(ip)
    if address is None:
        raise ValueError(f"inIpRange: {ip[:64]!r} is not an IP address")
    return address in _network(cidr)


# The condition variables and their CEL types (dotted names are declared as such).
VARIABLES: dict[str, str] = {
    "request.time": "timestamp",
    "request.host": "string",
    "request.path": "string",
    LEVELS_VARIABLE: "list(string)",
    "source.ip": "string",
    "destination.ip": "string",
    "destination.port": "int",
    "destination.host": "string",
    "device": "map(string, dyn)",
    "auth.claims": "map(string, dyn)",
    "auth.principal": "string",
    "resource.name": "string",
    "resource.type": "string",
    "resource.labels": "map(string, string)",
}


@functools.cache
def _env() -> Any:
    t = _cel.Type
    types = {
        "timestamp": t.TIMESTAMP,
        "string": t.STRING,
        "int": t.INT,
        "list(string)": t.List(t.STRING),
        "map(string, dyn)": t.Map(t.STRING, t.DYN),
        "map(string, string)": t.Map(t.STRING, t.STRING),
    }
    in_range = _cel.Overload(
        "inIpRange_string_string",
        return_type=t.BOOL,
        parameters=[t.STRING, t.STRING],
        impl=in_ip_range,
    )
    return _cel.NewEnv(
        variables={name: types[kind] for name, kind in VARIABLES.items()},
        extensions=[_ext_strings.ExtStrings()],
        functions=[_cel.FunctionDecl("inIpRange", [in_range])],
    )


_TIME = re.compile(r"\brequest\s*\.\s*time\b")
_GETTER = re.compile(
    r"\s*\.\s*get(FullYear|Month|Date|DayOfMonth|DayOfWeek|DayOfYear|Hours|Minutes)\s*\("
)
_TIMESTAMP_CALL = re.compile(r"\btimestamp\s*\(")
_TIMESTAMP_LITERAL = re.compile(r"""\btimestamp\s*\(\s*(?:'([^'\\]*)'|"([^"\\]*)")\s*\)""")
_FINE = re.compile(r"\bduration\s*\(|\b(int|string|double|uint)\s*\(|getSeconds|getMilliseconds")
_LEVELS = re.compile(r"\brequest\s*\.\s*auth\s*\.\s*access_levels\b")


def _time_use(text: str) -> tuple[TimeUse, tuple[float, ...]]:
    literals = _TIMESTAMP_LITERAL.findall(text)
    instants: list[float] = []
    for single, double in literals:
        try:
            instants.append(dt.datetime.fromisoformat(single or double).timestamp())
        except ValueError:
            pass  # the runtime rejects it at compile time or evaluation (fails closed)
    occurrences = list(_TIME.finditer(text))
    if not occurrences:
        return TimeUse.NONE, ()
    if _FINE.search(text) or len(_TIMESTAMP_CALL.findall(text)) != len(literals):
        return TimeUse.SECOND, tuple(instants)
    getters = {g.group(1) for m in occurrences if (g := _GETTER.match(text, m.end()))}
    if "Minutes" in getters:
        return TimeUse.MINUTE, tuple(instants)
    if getters:
        return TimeUse.QUARTER, tuple(instants)
    return TimeUse.LITERALS, tuple(instants)


def _clean(message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else "error"
    first = re.sub(r"^[A-Z_]+: ", "", first)
    first = re.sub(r"^ERROR: <input>:", "at ", first)
    first = first.replace(" (in container '')", "")
    return first[:MAX_REASON]


def compile_condition(
    expression: str, *, title: str | None = None, allow_levels: bool = True
) -> Condition:
    """Parse and type-check once. Raises :class:`CelError` with a one-line reason."""
    if not allow_levels and _LEVELS.search(expression):
        raise CelError(f"{LEVELS_VARIABLE} cannot be used inside an access level")
    try:
        program = _env().compile(expression)
    except Exception as exc:  # the runtime raises RuntimeError with the checker's report
        lines = [line for line in str(exc).splitlines() if line.strip()]
        detail = " ".join(_clean(line) for line in lines[:1]) or "invalid expression"
        raise CelError(detail) from None
    result_type = program.return_type()
    if result_type != _cel.Type.BOOL and result_type != _cel.Type.DYN:
        raise CelError(f"a condition must be a bool, this one is {result_type.name().lower()}")
    time_use, instants = _time_use(expression)
    return Condition(
        expression, title, program, time_use, instants, bool(_LEVELS.search(expression))
    )


def make_activation(values: Mapping[str, object]) -> Any:
    """Bind variables once per request; names absent from ``values`` are missing attributes."""
    return _env().Activation(dict(values))


_MISSING = re.compile(r'No value with name "([^"]+)" found')


def run(condition: Condition, activation: Any) -> Tri:
    """True or False, or Unknown with a reason (runtime error, missing attribute, not a bool)."""
    value = condition.program.eval(activation)
    result = value.value()
    if type(result) is bool:  # an error value never holds a bool
        return result
    if value.type() == _cel.Type.ERROR:
        message = str(result)
        missing = _MISSING.search(message)
        if missing:
            return Unknown(f"missing attribute {missing.group(1)}")
        return Unknown(_clean(message))
    return Unknown(f"condition returned {type(result).__name__}, not a bool")
