"""CEL conditions: every variable, custom functions, errors that fail closed, load-time errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tunnel_server.access.policy import VARIABLES, WEB_USER, CelError, compile_condition, evaluate
from tunnel_server.config import ConfigError

from .util import FRIDAY, policy, req


def guarded(expression: str, *, levels: str = "") -> str:
    return f"""
access_levels:
  corp: {{ip_subnetworks: [10.0.0.0/8]}}
  {levels}
bindings:
  - members: [group:ops]
    role: tunnelUser
    resources: {{instances: ["*"], apps: ["*"]}}
    condition: {{title: guard, expression: {json.dumps(expression)}}}
  - members: [group:ops]
    role: webUser
    resources: {{apps: ["*"]}}
    condition: {{title: guard, expression: {json.dumps(expression)}}}
"""


FULL: dict[str, Any] = {
    "source_ip": "10.1.2.3",
    "principal": "user:alice@example.com",
    "destination_ip": "10.9.0.7",
    "destination_host": "db.internal",
    "request_host": "wiki.example.com",
    "request_path": "/admin/users",
    "device": {"id": "dev-42", "owner": "alice", "os": "linux", "managed": True},
    "claims": {"groups": ["ops", "sre-eu"], "amr": ["pwd", "mfa"], "acr": "2"},
    "labels": {"env": "prod"},
}


@pytest.mark.parametrize(
    ("expression", "allowed"),
    [
        ("request.time.getHours('Europe/Paris') == 18", True),
        ("request.time.getDayOfWeek('Europe/Paris') == 5", True),  # Friday
        ("request.time < timestamp('2024-03-29T17:30:00Z')", False),
        ("request.time >= timestamp('2024-03-29T17:30:00Z')", True),
        ("request.host == 'wiki.example.com'", True),
        ("request.path.startsWith('/admin/')", True),
        ("request.path.matches('^/public/')", False),
        ("'corp' in request.auth.access_levels", True),
        ("source.ip == '10.1.2.3'", True),
        ("inIpRange(source.ip, '10.0.0.0/8')", True),
        ("inIpRange(source.ip, '192.168.0.0/16')", False),
        ("destination.ip == '10.9.0.7'", True),
        ("destination.port in [22, 3389]", True),
        ("destination.port == 443", False),
        ("destination.host.endsWith('.internal')", True),
        ("device.id == 'dev-42' && device.owner == 'alice'", True),
        ("device.managed && device.os in ['linux', 'macos']", True),
        ("has(device.encrypted)", False),
        ("'ops' in auth.claims.groups", True),
        ("auth.claims.amr.exists(m, m == 'mfa') && auth.claims.acr == '2'", True),
        ("auth.principal.endsWith('@example.com')", True),
        ("resource.type == 'instance' && resource.name.startsWith('prod/')", True),
        ("resource.labels.env == 'prod'", True),
        ("destination.host.upperAscii() == 'DB.INTERNAL'", True),
    ],
)
def test_each_variable(expression: str, allowed: bool) -> None:
    decision = evaluate(req("group:ops", **FULL), policy(guarded(expression)), FRIDAY)
    assert decision.allowed is allowed, decision.reasons
    if not allowed:
        assert "condition 'guard' is false" in decision.reason


def test_ipv4_mapped_source_is_canonical() -> None:
    p = policy(guarded("source.ip == '10.1.2.3' && inIpRange(source.ip, '10.0.0.0/8')"))
    assert evaluate(req("group:ops", source_ip="::ffff:10.1.2.3"), p, FRIDAY).allowed
    v6 = policy(guarded("inIpRange(source.ip, '2001:db8::/32')"))
    assert evaluate(req("group:ops", source_ip="2001:db8::1"), v6, FRIDAY).allowed
    assert not evaluate(req("group:ops", source_ip="2001:db9::1"), v6, FRIDAY).allowed


@pytest.mark.parametrize(
    ("expression", "kw", "reason"),
    [
        ("source.ip == '10.1.2.3'", {}, "missing attribute source.ip"),
        ("request.path.startsWith('/a')", {}, "missing attribute request.path"),
        ("destination.host == 'x'", {}, "missing attribute destination.host"),
        ("device.managed == true", {}, 'Key not found in map : "managed"'),
        ("auth.claims.groups.size() > 0", {}, 'Key not found in map : "groups"'),
        ("destination.port / 0 == 1", {}, "divide by zero"),
        ("inIpRange(source.ip, '10.0.0.0/8')", {"source_ip": "10.1"}, "not an IP address"),
        ("inIpRange(source.ip, 'nonsense')", {"source_ip": "10.0.0.1"}, "nonsense"),
        ("request.time.getHours('Mars/Olympus') == 1", {}, "Invalid timezone"),
        ("device.managed", {"device": {"managed": "yes"}}, "condition returned str, not a bool"),
        ("auth.claims.x == 1", {"claims": {"x": {1, 2}}}, "Non-CEL value type"),
    ],
)
def test_errors_fail_closed(expression: str, kw: dict[str, Any], reason: str) -> None:
    decision = evaluate(req("group:ops", **kw), policy(guarded(expression)), FRIDAY)
    assert not decision.allowed
    assert "condition 'guard' failed" in decision.reason
    assert reason in decision.reason


def test_error_in_one_binding_does_not_block_another() -> None:
    p = policy(
        """
bindings:
  - {name: broken, members: [group:ops], role: tunnelUser, resources: {instances: ["*"]},
     condition: "device.serial == 'x'"}
  - {name: plain, members: [group:ops], role: tunnelUser, resources: {instances: ["*"]}}
"""
    )
    assert evaluate(req("group:ops"), p, FRIDAY).binding == "plain"


def test_error_in_deny_rule_denies() -> None:
    p = policy(
        """
bindings:
  - {members: [group:ops], role: tunnelUser, resources: {instances: ["*"]}}
deny:
  - {name: unmanaged, members: [group:ops], condition: "!device.managed"}
"""
    )
    assert evaluate(req("group:ops", device={"managed": True}), p, FRIDAY).allowed
    assert not evaluate(req("group:ops", device={"managed": False}), p, FRIDAY).allowed
    decision = evaluate(req("group:ops"), p, FRIDAY)  # no device: the deny condition errors
    assert not decision.allowed
    assert decision.binding == "unmanaged"
    assert "fail closed" in decision.reason


def test_cel_short_circuits_errors_like_the_spec() -> None:
    ok = policy(guarded("device.serial == 'x' || destination.port == 22"))
    assert evaluate(req("group:ops"), ok, FRIDAY).allowed
    no = policy(guarded("destination.port == 23 && device.serial == 'x'"))
    decision = evaluate(req("group:ops"), no, FRIDAY)
    assert "is false" in decision.reason


def test_web_request_variables() -> None:
    p = policy(guarded("request.host == 'wiki.example.com' && request.path == '/'"))
    web = req(
        "group:ops",
        resource="app:wiki",
        port=443,
        role=WEB_USER,
        request_host="wiki.example.com",
        request_path="/",
    )
    assert evaluate(web, p, FRIDAY).binding == "bindings[1]"


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("request.time.getHours(", "Syntax error"),
        ("requst.time.getHours() < 19", "undeclared reference to 'requst.time'"),
        ("destination.port == 'twenty-two'", "no matching overload"),
        ("destination.port + 1", "a condition must be a bool, this one is int"),
        ("request.host", "a condition must be a bool, this one is string"),
    ],
)
def test_bad_expressions_are_load_errors(expression: str, message: str) -> None:
    text = f"""
bindings:
  - {{members: [group:x], role: tunnelUser, resources: {{instances: ["*"]}}}}
  - name: ops-ssh
    members: [group:ops]
    role: tunnelUser
    resources: {{instances: ["*"]}}
    condition: {{title: t, expression: {json.dumps(expression)}}}
"""
    with pytest.raises(ConfigError) as info:
        policy(text)
    text = str(info.value)
    assert text.startswith("policy.yaml: bindings[1] (ops-ssh).condition: invalid CEL: ")
    assert message in text
    assert "\n" not in text


def test_compile_condition_directly() -> None:
    condition = compile_condition("request.time < timestamp('2030-01-01T00:00:00Z')", title="t")
    assert condition.title == "t"
    assert condition.instants == (1893456000.0,)
    with pytest.raises(CelError):
        compile_condition("1 +")
    with pytest.raises(CelError, match="cannot be used inside an access level"):
        compile_condition("'a' in request.auth.access_levels", allow_levels=False)


def test_every_documented_variable_is_declared() -> None:
    for name in VARIABLES:
        compile_condition(f"{name} == {name}")
    assert set(VARIABLES) >= {
        "request.time",
        "source.ip",
        "destination.ip",
        "destination.port",
        "destination.host",
        "request.host",
        "request.path",
        "device",
        "auth.claims",
        "request.auth.access_levels",
    }
