"""explain: why each binding and deny rule did or did not apply, and agreement with evaluate."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel_server.access.policy import WEB_USER, Explanation, evaluate, explain

from .util import FRIDAY, at, policy, req

POLICY = policy(
    """
access_levels:
  corp_network: {ip_subnetworks: [10.0.0.0/8]}
  office_hours: {time: {days: [mon, tue, wed, thu, fri], start: "08:00", end: "18:00",
                        tz: Europe/Paris}}
bindings:
  - {name: other-team, members: [group:dev], role: tunnelUser, resources: {instances: ["*"]}}
  - {name: web, members: [group:ops], role: webUser, resources: {apps: ["*"]}}
  - {name: staging, members: [group:ops], role: tunnelUser,
     resources: {instances: ["staging/*/*"]}}
  - {name: rdp, members: [group:ops], role: tunnelUser, resources: {instances: ["*"]},
     ports: [3389]}
  - {name: on-corp, members: [group:ops], role: tunnelUser, resources: {instances: ["*"]},
     access_levels: [corp_network]}
  - {name: mfa, members: [group:ops], role: tunnelUser, resources: {instances: ["*"]},
     condition: {title: needs mfa, expression: "'mfa' in auth.claims.amr"}}
  - {name: in-hours, members: [group:ops], role: tunnelUser, resources: {instances: ["*"]},
     access_levels: [office_hours]}
deny:
  - {name: no-mallory, members: [user:mallory@example.com]}
  - {name: no-db, members: [group:ops], except_members: [group:dba], ports: [5432]}
"""
)


def outcomes(explanation: Explanation) -> dict[str, str]:
    return {c.binding: c.outcome for c in explanation.checks}


def test_every_reason_is_named() -> None:
    request = req("group:ops", source_ip="192.0.2.1", claims={"amr": ["pwd"]})
    explanation = explain(request, POLICY, at("2024-03-29T20:00:00Z"))  # Friday 21:00 Paris
    assert not explanation.decision.allowed
    assert outcomes(explanation) == {
        "no-mallory": "member mismatch",
        "no-db": "port mismatch",
        "other-team": "member mismatch",
        "web": "role mismatch",
        "staging": "resource mismatch",
        "rdp": "port mismatch",
        "on-corp": "level unmet",
        "mfa": "condition false",
        "in-hours": "level unmet",
    }
    details = {c.binding: c.detail for c in explanation.checks}
    assert details["web"] == "grants webUser, not tunnelUser"
    assert "instance:prod/z1/web-1 is not in instances ['staging/*/*']" == details["staging"]
    assert details["rdp"] == "port 22 is not in 3389"
    assert details["on-corp"].startswith("access level corp_network unmet: source IP 192.0.2.1")
    assert details["mfa"] == "condition 'needs mfa' is false"
    assert explanation.decided_by is None
    assert explanation.level == "corp_network"  # the closest candidate's unmet level
    assert explanation.next_change == at("2024-04-01T06:00:00Z")
    states = {s.name: s.state for s in explanation.levels}
    assert states == {"corp_network": "unmet", "office_hours": "unmet"}


def test_condition_error_and_grant() -> None:
    explanation = explain(req("group:ops"), POLICY, FRIDAY - 3600)  # Friday 17:30 Paris
    checks = outcomes(explanation)
    assert checks["on-corp"] == "level unmet"  # no source IP: unknown
    assert checks["mfa"] == "condition error"
    assert checks["in-hours"] == "granted"
    assert (explanation.decision.allowed, explanation.decided_by) == (True, "in-hours")
    assert explanation.level is None


def test_deny_explained() -> None:
    request = req("group:ops", "user:mallory@example.com", source_ip="10.0.0.1")
    explanation = explain(request, POLICY, FRIDAY)
    checks = outcomes(explanation)
    assert checks["no-mallory"] == "deny matched"
    assert checks["on-corp"] == "granted, overridden by deny"
    assert explanation.decided_by == "no-mallory"
    excepted = explain(req("group:ops", "group:dba", port=5432), POLICY, FRIDAY)
    assert outcomes(excepted)["no-db"] == "excepted member"


def test_lines_and_json() -> None:
    request = req(
        "group:ops",
        principal="user:al\x1bice@example.com",
        source_ip="10.0.0.1",
        resource="instance:prod/z1/web\n1",
    )
    explanation = explain(request, POLICY, at("2024-03-29T16:30:00Z"))
    text = "\n".join(explanation.lines())
    assert text.startswith("decision: ALLOW (allowed by on-corp)\n")
    assert "user:al\\x1bice@example.com -> instance:prod/z1/web\\x0a1 port 22" in text
    assert "decided by: on-corp" in text
    for name in ("no-mallory", "no-db", "other-team", "web", "staging", "rdp", "mfa"):
        assert f"  {name} " in text
    assert "next change: 2024-03-29T17:00:00Z" not in text  # granted by a static binding
    data = json.loads(json.dumps(explanation.as_dict()))
    assert data["allowed"] is True
    assert data["decided_by"] == "on-corp"
    assert {c["binding"] for c in data["checks"]} >= {"no-mallory", "in-hours"}


MEMBERS = ["group:ops", "group:dev", "group:dba", "user:mallory@example.com"]


@settings(max_examples=150, deadline=None)
@given(
    members=st.frozensets(st.sampled_from(MEMBERS)),
    resource=st.sampled_from(["instance:prod/z/a", "instance:staging/z/b", "app:wiki"]),
    port=st.sampled_from([22, 3389, 5432]),
    web=st.booleans(),
    source_ip=st.sampled_from([None, "10.1.1.1", "192.0.2.1"]),
    amr=st.sampled_from([None, ["mfa"], ["pwd"]]),
    hour=st.integers(0, 23),
)
def test_explain_agrees_with_evaluate(
    members: frozenset[str],
    resource: str,
    port: int,
    web: bool,
    source_ip: str | None,
    amr: list[str] | None,
    hour: int,
) -> None:
    """The indexed evaluation equals a full scan of every rule in policy order."""
    request = req(
        *members,
        resource=resource,
        port=port,
        source_ip=source_ip,
        role=WEB_USER if web else "tunnelUser",
        claims={} if amr is None else {"amr": amr},
    )
    now = at("2024-03-29T00:00:00Z") + hour * 3600
    decision = evaluate(request, POLICY, now)
    explanation = explain(request, POLICY, now)
    assert explanation.decision == decision
    denied_by = [c.binding for c in explanation.checks if c.outcome == "deny matched"]
    granted = [c.binding for c in explanation.checks if c.outcome.startswith("granted")]
    if denied_by:
        assert (decision.allowed, decision.binding) == (False, denied_by[0])
    elif granted:
        assert (decision.allowed, decision.binding) == (True, granted[0])
    else:
        assert (decision.allowed, decision.binding) == (False, None)
