"""Access levels: each kind, negation, AND/OR, nesting, unknown inputs, cycles refused at load."""

from __future__ import annotations

from typing import Any

import pytest

from tunnel_server.access.policy import AccessRequest, Policy, evaluate, explain
from tunnel_server.config import ConfigError

from .util import FRIDAY, at, policy, req

LEVELS = """
access_levels:
  corp_network: {ip_subnetworks: [10.0.0.0/8, "2001:db8::/32"]}
  managed_device: {device: {managed: true, encrypted: true}}
  desktop_os: {device: {os: [linux, macos]}}
  office_hours:
    time: {days: [mon, tue, wed, thu, fri], start: "08:00", end: "18:00", tz: Europe/Paris}
  trusted: {combine: AND, required_levels: [corp_network, managed_device]}
  either: {combine: OR, required_levels: [corp_network, managed_device]}
  anywhere_trusted: {combine: OR, ip_subnetworks: [192.0.2.0/24], required_levels: [trusted]}
  outside: {ip_subnetworks: [10.0.0.0/8], negate: true}
  unmanaged: {device: {managed: true}, negate: true}
  nested: {required_levels: [anywhere_trusted]}
  mixed:
    combine: OR
    conditions:
      - {ip_subnetworks: [172.16.0.0/12], device: {os: [linux]}}
      - {required_levels: [corp_network], negate: true, device: {managed: true}}
  mfa: {expression: "'mfa' in auth.claims.amr"}
"""


def level_policy(level: str) -> Policy:
    return policy(
        LEVELS
        + f"""
bindings:
  - {{members: [group:ops], role: tunnelUser, resources: {{instances: ["*"]}},
     access_levels: [{level}]}}
"""
    )


MANAGED = {"managed": True, "encrypted": True, "os": "Linux"}


def decide(level: str, now: float = FRIDAY, **kw: Any) -> bool:
    return evaluate(req("group:ops", **kw), level_policy(level), now).allowed


@pytest.mark.parametrize(
    ("level", "kw", "met"),
    [
        ("corp_network", {"source_ip": "10.2.3.4"}, True),
        ("corp_network", {"source_ip": "2001:db8::5"}, True),
        ("corp_network", {"source_ip": "::ffff:10.2.3.4"}, True),
        ("corp_network", {"source_ip": "192.0.2.1"}, False),
        ("corp_network", {}, False),  # unknown source IP
        ("managed_device", {"device": MANAGED}, True),
        ("managed_device", {"device": {"managed": True}}, False),
        ("managed_device", {"device": {"managed": "true", "encrypted": True}}, False),
        ("managed_device", {}, False),
        ("desktop_os", {"device": MANAGED}, True),  # OS names compare case-insensitively
        ("desktop_os", {"device": {"os": "windows"}}, False),
        ("trusted", {"source_ip": "10.0.0.1", "device": MANAGED}, True),
        ("trusted", {"source_ip": "10.0.0.1"}, False),
        ("either", {"source_ip": "10.0.0.1"}, True),
        ("either", {"source_ip": "192.0.2.1", "device": MANAGED}, True),
        ("either", {"source_ip": "192.0.2.1"}, False),
        ("anywhere_trusted", {"source_ip": "192.0.2.9"}, True),
        ("anywhere_trusted", {"source_ip": "10.0.0.1", "device": MANAGED}, True),
        ("anywhere_trusted", {"source_ip": "10.0.0.1"}, False),
        ("nested", {"source_ip": "192.0.2.9"}, True),
        ("nested", {"source_ip": "198.51.100.1"}, False),
        ("outside", {"source_ip": "192.0.2.1"}, True),
        ("outside", {"source_ip": "10.0.0.1"}, False),
        ("outside", {}, False),  # negating an unknown stays unknown: not met
        ("unmanaged", {}, True),  # no device certificate: not proven managed
        ("unmanaged", {"device": MANAGED}, False),
        ("mixed", {"source_ip": "172.16.0.1", "device": {"os": "linux"}}, True),
        # the second condition is not (corp_network and managed): true off the corp network
        ("mixed", {"source_ip": "172.16.0.1", "device": {"os": "macos"}}, True),
        ("mixed", {"source_ip": "10.0.0.1", "device": {"managed": True, "os": "macos"}}, False),
        ("mixed", {"source_ip": "192.0.2.1", "device": {"managed": True}}, True),
        ("mixed", {"source_ip": "10.0.0.1", "device": {"managed": True}}, False),
        ("mfa", {"claims": {"amr": ["pwd", "mfa"]}}, True),
        ("mfa", {"claims": {"amr": ["pwd"]}}, False),
        ("mfa", {}, False),  # CEL error: unknown
    ],
)
def test_levels(level: str, kw: dict[str, Any], met: bool) -> None:
    assert decide(level, **kw) is met


def test_time_window_level() -> None:
    assert decide("office_hours", at("2024-03-29T16:59:59Z"))  # 17:59:59 in Paris, Friday
    assert not decide("office_hours", at("2024-03-29T17:00:00Z"))  # 18:00: end is exclusive
    assert decide("office_hours", at("2024-03-29T07:00:00Z"))  # 08:00: start is inclusive
    assert not decide("office_hours", at("2024-03-30T10:00:00Z"))  # Saturday


def test_unknown_level_input_fails_closed_in_deny_rules() -> None:
    p = policy(
        LEVELS
        + """
bindings:
  - {members: [group:ops], role: tunnelUser, resources: {instances: ["*"]}}
deny:
  - {name: off-network, members: [group:ops], access_levels: [outside]}
"""
    )
    assert evaluate(req("group:ops", source_ip="10.0.0.1"), p, FRIDAY).allowed
    assert not evaluate(req("group:ops", source_ip="192.0.2.1"), p, FRIDAY).allowed
    unknown = evaluate(req("group:ops"), p, FRIDAY)  # no source IP: deny applies
    assert (unknown.allowed, unknown.binding) == (False, "off-network")
    assert "source IP unknown" in unknown.reason
    bad = evaluate(req("group:ops", source_ip="127.1"), p, FRIDAY)  # non-canonical: refused
    assert not bad.allowed


def test_met_levels_are_exposed_to_conditions() -> None:
    p = policy(
        LEVELS
        + """
bindings:
  - members: [group:ops]
    role: tunnelUser
    resources: {instances: ["*"]}
    condition: >-
      'trusted' in request.auth.access_levels
      && !('outside' in request.auth.access_levels)
"""
    )
    assert evaluate(req("group:ops", source_ip="10.0.0.1", device=MANAGED), p, FRIDAY).allowed
    assert not evaluate(req("group:ops", source_ip="10.0.0.1"), p, FRIDAY).allowed
    states = {s.name: s.state for s in explain(req("group:ops"), p, FRIDAY).levels}
    assert states["corp_network"] == "unknown"
    assert states["unmanaged"] == "met"
    assert states["outside"] == "unknown"


def test_all_binding_levels_must_be_met() -> None:
    p = policy(
        LEVELS
        + """
bindings:
  - {members: [group:ops], role: tunnelUser, resources: {instances: ["*"]},
     access_levels: [corp_network, managed_device]}
"""
    )
    assert evaluate(req("group:ops", source_ip="10.0.0.1", device=MANAGED), p, FRIDAY).allowed
    decision = evaluate(req("group:ops", source_ip="10.0.0.1"), p, FRIDAY)
    assert "access level managed_device unmet" in decision.reason


@pytest.mark.parametrize(
    ("levels", "message"),
    [
        ("a: {required_levels: [a]}", "access level cycle: a -> a"),
        (
            "a: {required_levels: [b]}\n  b: {required_levels: [c]}\n  c: {required_levels: [a]}",
            "access level cycle: a -> b -> c -> a",
        ),
        ("a: {required_levels: [nope]}", "access_levels.a.required_levels: unknown access level"),
        (
            "a: {conditions: [{required_levels: [nope]}]}",
            "access_levels.a.conditions[0].required_levels: unknown access level 'nope'",
        ),
        ("a: {}", "an access level needs 'conditions' or one of"),
        ("a: {negate: true}", "an access level needs"),
        (
            "a: {ip_subnetworks: [10.0.0.0/8], conditions: [{ip_subnetworks: [10.0.0.0/8]}]}",
            "give 'conditions' or ip_subnetworks, not both",
        ),
        ("a: {ip_subnetworks: [10.0.0.1/8]}", "access_levels.a.ip_subnetworks[0]"),
        ("a: {device: {}}", "a device policy needs managed, encrypted or os"),
        ("a: {combine: XOR, ip_subnetworks: [10.0.0.0/8]}", "access_levels.a.combine"),
        ("a: {conditions: [{negate: true}]}", "a condition needs one of"),
        (
            "a: {expression: \"'x' in request.auth.access_levels\"}",
            "access_levels.a.expression: invalid CEL: request.auth.access_levels cannot be used",
        ),
        ("a: {expression: 'device.'}", "access_levels.a.expression: invalid CEL:"),
        ("bad-name: {ip_subnetworks: [10.0.0.0/8]}", "access_levels.bad-name"),
    ],
)
def test_level_load_errors(levels: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        policy(f"access_levels:\n  {levels}\n")
    assert message in str(info.value)
    assert str(info.value).startswith("policy.yaml: ")


def test_binding_with_unknown_level_is_a_load_error() -> None:
    with pytest.raises(ConfigError, match=r"bindings\[0\]\.access_levels: unknown access level"):
        policy(
            "bindings: [{members: [group:a], role: tunnelUser, resources: {instances: ['*']},"
            " access_levels: [ghost]}]"
        )


def test_levels_evaluated_lazily_and_once() -> None:
    p = level_policy("nested")
    request = AccessRequest(frozenset({"group:ops"}), "instance:a/b/c", 22, "192.0.2.9")
    explanation = explain(request, p, FRIDAY)
    assert explanation.decision.allowed
    assert {s.name for s in explanation.levels} == set(p.access_levels)
