"""Authorization as a pure function: ``evaluate(AccessRequest, Policy, now) -> Decision``.

IAM-style bindings (members -> role on resources and ports) with CEL conditions and access
levels, deny rules that win, fail-closed errors; ``explain`` and ``next_change`` for the
troubleshooter and continuous authorization. Language reference: ``docs/policy.md``.

Errors::

    ConfigError (tunnel_server.schema)   policy file unreadable or invalid: file, key, reason
    ValueError                           a Policy built in code names unknown or cyclic levels
    CelError(ValueError)                 compile_condition: expression invalid (load time only)

``evaluate`` never raises: evaluation errors deny with a reason.
"""

from ._allow import AllowRule, PortRange, parse_ports
from ._cel import VARIABLES, CelError, Condition, compile_condition
from ._engine import NO_GRANT, access_levels_met, evaluate, next_change
from ._explain import Check, Explanation, LevelState, explain
from ._levels import AccessLevel, DevicePolicy, LevelCondition
from ._logins import render_logins
from ._model import Binding, Policy, ResourceSelector, SshPermissions, labels_from_inventory
from ._schema import load_policy, parse_policy
from ._timewindow import TimeWindow
from ._types import (
    ADMIN,
    ALL_AUTHENTICATED,
    DENIAL_CATEGORIES,
    ROLES,
    TUNNEL_USER,
    WEB_USER,
    AccessRequest,
    Decision,
)

__all__ = [
    "access_levels_met",
    "ADMIN",
    "ALL_AUTHENTICATED",
    "DENIAL_CATEGORIES",
    "NO_GRANT",
    "ROLES",
    "TUNNEL_USER",
    "VARIABLES",
    "WEB_USER",
    "AccessLevel",
    "AllowRule",
    "AccessRequest",
    "Binding",
    "CelError",
    "Check",
    "Condition",
    "Decision",
    "DevicePolicy",
    "Explanation",
    "LevelCondition",
    "LevelState",
    "Policy",
    "PortRange",
    "ResourceSelector",
    "SshPermissions",
    "TimeWindow",
    "compile_condition",
    "evaluate",
    "explain",
    "labels_from_inventory",
    "load_policy",
    "next_change",
    "parse_policy",
    "parse_ports",
    "render_logins",
]
