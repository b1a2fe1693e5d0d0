"""The policy file: YAML checked by pydantic, CEL compiled once; errors name file, key, reason."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationError, field_validator, model_validator

from ...schema import ConfigError, StrictModel, check_members, read_yaml, validation_errors
from ..inventory import InventoryConfig
from ._allow import AllowRule, PortRange, parse_ports
from ._cel import CelError, Condition, compile_condition
from ._levels import AccessLevel, DevicePolicy, LevelCondition, check_graph
from ._logins import LOGIN_TEMPLATE
from ._model import (
    Binding,
    Policy,
    ResourceSelector,
    SshPermissions,
    labels_from_inventory,
    normalize_member,
)
from ._timewindow import DAY_NAMES, TimeWindow, parse_clock
from ._types import ADMIN, ROLES

LevelName = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")]
Role = Literal["tunnelUser", "webUser", "admin"]
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_SEGMENT = r"[A-Za-z0-9*][A-Za-z0-9._*-]{0,252}"
_SHAPES = {
    "instances": (re.compile(rf"\*|{_SEGMENT}(/{_SEGMENT}){{2}}"), "PROJECT/ZONE/NAME"),
    "destination_groups": (
        re.compile(rf"\*|{_SEGMENT}(/{_SEGMENT}){{3}}"),
        "PROJECT/REGION/NETWORK/NAME",
    ),
    "apps": (re.compile(_SEGMENT), "NAME"),
}


_Model = StrictModel


def _members(members: list[str]) -> list[str]:
    check_members(
        members,
        hint="user:EMAIL, group:NAME, serviceAccount:ID, domain:NAME or allAuthenticatedUsers",
    )
    return [normalize_member(m) for m in members]


_ALL_DAYS: list[Day] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class _Time(_Model):
    days: list[Day] = Field(default_factory=lambda: list(_ALL_DAYS), min_length=1)
    start: str = "00:00"
    end: str = "24:00"
    tz: str = "UTC"

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str) -> str:
        parse_clock(value)
        return value

    @field_validator("tz")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _window(self) -> _Time:
        if parse_clock(self.start) == 86400:
            raise ValueError("a window cannot start at 24:00")
        if parse_clock(self.start) == parse_clock(self.end):
            raise ValueError(f"empty window {self.start}-{self.end}")
        return self

    def build(self) -> TimeWindow:
        days = frozenset(DAY_NAMES.index(d) for d in self.days)
        return TimeWindow(days, parse_clock(self.start), parse_clock(self.end), ZoneInfo(self.tz))


class _Device(_Model):
    managed: bool | None = None
    encrypted: bool | None = None
    os: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _something(self) -> _Device:
        if self.managed is None and self.encrypted is None and self.os is None:
            raise ValueError("a device policy needs managed, encrypted or os")
        return self

    def build(self) -> DevicePolicy:
        os = frozenset(o.lower() for o in self.os) if self.os is not None else None
        return DevicePolicy(self.managed, self.encrypted, os)


IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
_ATTRIBUTES = ("ip_subnetworks", "device", "time", "required_levels", "expression")


class _Condition(_Model):
    ip_subnetworks: list[IPNet] = Field(default_factory=list)
    device: _Device | None = None
    time: _Time | None = None
    required_levels: list[LevelName] = Field(default_factory=list)
    expression: str | None = None
    negate: bool = False

    @model_validator(mode="after")
    def _something(self) -> _Condition:
        if not any(getattr(self, name) for name in _ATTRIBUTES):
            raise ValueError(f"a condition needs one of {', '.join(_ATTRIBUTES)}")
        return self


class _Level(_Model):
    """A list of ``conditions``, or one condition's attributes given directly (shorthand: each
    attribute, and each required level, becomes its own condition joined by ``combine``)."""

    description: str = ""
    combine: Literal["AND", "OR"] = "AND"
    negate: bool = False
    conditions: list[_Condition] | None = Field(default=None, min_length=1)
    ip_subnetworks: list[IPNet] = Field(default_factory=list)
    device: _Device | None = None
    time: _Time | None = None
    required_levels: list[LevelName] = Field(default_factory=list)
    expression: str | None = None

    @model_validator(mode="after")
    def _shape(self) -> _Level:
        shorthand = [name for name in _ATTRIBUTES if getattr(self, name)]
        if self.conditions is not None and shorthand:
            raise ValueError(f"give 'conditions' or {', '.join(shorthand)}, not both")
        if self.conditions is None and not shorthand:
            raise ValueError(
                f"an access level needs 'conditions' or one of {', '.join(_ATTRIBUTES)}"
            )
        return self

    def parts(self) -> list[_Condition]:
        if self.conditions is not None:
            return self.conditions
        out = [_Condition(required_levels=[name]) for name in self.required_levels]
        if self.ip_subnetworks:
            out.append(_Condition(ip_subnetworks=self.ip_subnetworks))
        if self.device is not None:
            out.append(_Condition(device=self.device))
        if self.time is not None:
            out.append(_Condition(time=self.time))
        if self.expression is not None:
            out.append(_Condition(expression=self.expression))
        return out


class _Cel(_Model):
    title: str | None = None
    description: str | None = None
    expression: str = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _plain(cls, data: Any) -> Any:
        return {"expression": data} if isinstance(data, str) else data


class _Resources(_Model):
    instances: list[str] = Field(default_factory=list)
    destination_groups: list[str] = Field(default_factory=list)
    apps: list[str] = Field(default_factory=list)
    labels: dict[Annotated[str, Field(min_length=1, max_length=63)], str | list[str]] = Field(
        default_factory=dict
    )

    @field_validator("instances", "destination_groups", "apps")
    @classmethod
    def _patterns(cls, values: list[str], info: Any) -> list[str]:
        shape, what = _SHAPES[info.field_name]
        for value in values:
            if not shape.fullmatch(value):
                raise ValueError(f"{value!r} must be * or {what} (segments may use *)")
        return values

    @model_validator(mode="after")
    def _something(self) -> _Resources:
        if not (self.instances or self.destination_groups or self.apps or self.labels):
            raise ValueError("resources needs instances, destination_groups, apps or labels")
        return self

    def build(self) -> ResourceSelector:
        labels = tuple(
            (k, None if v == "*" else frozenset([v] if isinstance(v, str) else v))
            for k, v in sorted(self.labels.items())
        )
        return ResourceSelector(
            tuple(self.instances), tuple(self.destination_groups), tuple(self.apps), labels
        )


_EVERYTHING = ResourceSelector(("*",), ("*",), ("*",), relay=True)


class _Ssh(_Model):
    pty: bool = True
    port_forwarding: bool = False
    agent_forwarding: bool = False
    x11_forwarding: bool = False


class _Rule(_Model):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")] | None = None
    members: list[str] = Field(min_length=1)
    logins: list[Annotated[str, Field(pattern=LOGIN_TEMPLATE)]] = Field(default_factory=list)
    ssh: _Ssh = Field(default_factory=_Ssh)
    resources: _Resources | None = None
    ports: list[PortRange] = Field(default_factory=list)
    condition: _Cel | None = None
    access_levels: list[LevelName] = Field(default_factory=list)

    _check_members = field_validator("members")(_members)
    _check_ports = field_validator("ports", mode="before")(parse_ports)


class _Binding(_Rule):
    role: Role

    @model_validator(mode="after")
    def _resources(self) -> _Binding:
        if self.resources is None and self.role != ADMIN:
            raise ValueError(f"a {self.role} binding needs 'resources'")
        return self


class _Deny(_Rule):
    """``resources`` omitted: every resource; ``roles`` omitted: every role."""

    except_members: list[str] = Field(default_factory=list)
    roles: list[Role] | None = Field(default=None, min_length=1)

    _check_except = field_validator("except_members")(_members)


class _PolicyFile(_Model):
    access_levels: dict[LevelName, _Level] = Field(default_factory=dict)
    bindings: list[_Binding] = Field(default_factory=list)
    deny: list[_Deny] = Field(default_factory=list)


def _where(kind: str, n: int, rule: _Rule) -> str:
    return f"{kind}[{n}]" + (f" ({rule.name})" if rule.name else "")


class _Builder:
    """Turns a validated file into a Policy, collecting every reference and CEL error."""

    def __init__(self, source: str, inventory: InventoryConfig | None) -> None:
        self.source = source
        self.inventory = inventory
        self.errors: list[str] = []

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{self.source}: {where}: {message}")

    def cel(self, where: str, text: str, title: str | None, *, level: bool) -> Condition | None:
        try:
            return compile_condition(text, title=title, allow_levels=not level)
        except CelError as exc:
            self.error(where, f"invalid CEL: {exc}")
            return None

    def levels(self, file: _PolicyFile) -> list[AccessLevel]:
        out = []
        for name, level in file.access_levels.items():
            conditions = []
            for n, part in enumerate(level.parts()):
                where = f"access_levels.{name}" + (f".conditions[{n}]" if level.conditions else "")
                for required in part.required_levels:
                    if required not in file.access_levels:
                        self.error(f"{where}.required_levels", f"unknown access level {required!r}")
                expression = None
                if part.expression is not None:
                    expression = self.cel(f"{where}.expression", part.expression, None, level=True)
                conditions.append(
                    LevelCondition(
                        ip_subnetworks=tuple(part.ip_subnetworks),
                        device=part.device.build() if part.device else None,
                        time=part.time.build() if part.time else None,
                        required_levels=tuple(part.required_levels),
                        expression=expression,
                        negate=part.negate,
                    )
                )
            out.append(
                AccessLevel(name, tuple(conditions), level.combine, level.negate, level.description)
            )
        return out

    def rule(self, kind: str, n: int, rule: _Rule, levels: set[str]) -> Binding:
        where = _where(kind, n, rule)
        for name in rule.access_levels:
            if name not in levels:
                self.error(f"{where}.access_levels", f"unknown access level {name!r}")
        self._inventory(where, rule.resources)
        condition = None
        if rule.condition is not None:
            text, title = rule.condition.expression, rule.condition.title
            condition = self.cel(f"{where}.condition", text, title, level=False)
        if isinstance(rule, _Binding):
            roles: frozenset[str] = frozenset({rule.role})
            selector = rule.resources.build() if rule.resources else ResourceSelector(relay=True)
            excepted: frozenset[str] = frozenset()
        elif isinstance(rule, _Deny):
            roles = frozenset(rule.roles) if rule.roles is not None else ROLES
            selector = rule.resources.build() if rule.resources else _EVERYTHING
            excepted = frozenset(rule.except_members)
        return Binding(
            name=rule.name or f"{kind}[{n}]",
            members=frozenset(rule.members),
            roles=roles,
            resources=selector,
            ports=tuple((p.first, p.last) for p in rule.ports),
            condition=condition,
            access_levels=tuple(rule.access_levels),
            except_members=excepted,
            logins=tuple(rule.logins),
            ssh=SshPermissions(**rule.ssh.model_dump()),
        )

    def _inventory(self, where: str, resources: _Resources | None) -> None:
        if self.inventory is None or resources is None:
            return
        known = {
            "instances": {i.key for i in self.inventory.instances},
            "destination_groups": {g.key for g in self.inventory.destination_groups},
        }
        for attr, keys in known.items():
            for m, key in enumerate(getattr(resources, attr)):
                if "*" not in key and key not in keys:
                    what = "instance" if attr == "instances" else "destination group"
                    self.error(f"{where}.resources.{attr}[{m}]", f"unknown {what} {key!r}")


def parse_policy(
    data: Any,
    source: str = "<policy>",
    *,
    inventory: InventoryConfig | None = None,
    allow_rules: Sequence[AllowRule] = (),
) -> Policy:
    """Validate parsed YAML and compile its conditions. Raises ConfigError listing every problem.

    ``inventory`` (optional) checks exact instance / destination-group keys and supplies
    instance labels; ``allow_rules`` (the relay config's ``access:``) become the first bindings.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        file = _PolicyFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_errors(exc, source, _PolicyFile)) from None
    builder = _Builder(source, inventory)
    levels = builder.levels(file)
    names = set(file.access_levels)
    bindings = [builder.rule("bindings", n, b, names) for n, b in enumerate(file.bindings)]
    deny = [builder.rule("deny", n, d, names) for n, d in enumerate(file.deny)]
    seen: set[str] = {f"access[{n}]" for n in range(len(allow_rules))}
    for rule in (*bindings, *deny):
        if rule.name in seen:
            builder.error(rule.name, "duplicate binding name")
        seen.add(rule.name)
    if not builder.errors:
        try:
            check_graph({level.name: level for level in levels})
        except ValueError as exc:
            builder.error("access_levels", str(exc))
    if builder.errors:
        raise ConfigError("\n".join(builder.errors))
    return Policy(
        allow_rules,
        bindings=bindings,
        deny=deny,
        access_levels=levels,
        resource_labels=labels_from_inventory(inventory) if inventory is not None else None,
        source=source,
    )


def load_policy(
    path: Path,
    *,
    inventory: InventoryConfig | None = None,
    allow_rules: Sequence[AllowRule] = (),
) -> Policy:
    """Read a YAML policy file; see :func:`parse_policy`."""
    return parse_policy(read_yaml(path), str(path), inventory=inventory, allow_rules=allow_rules)
