"""next_change: when the relay must re-decide an open tunnel because of time alone."""

from __future__ import annotations

import json

from tunnel_server.access.policy import evaluate, next_change

from .util import FRIDAY, at, policy, req

LEVELS = """
access_levels:
  office_hours:
    time: {days: [mon, tue, wed, thu, fri], start: "08:00", end: "18:00", tz: Europe/Paris}
  corp_network: {ip_subnetworks: [10.0.0.0/8]}
  corp_in_hours: {required_levels: [office_hours, corp_network]}
"""


def one_binding(extra: str) -> str:
    return (
        LEVELS
        + f"""
bindings:
  - {{name: b, members: [group:ops], role: tunnelUser, resources: {{instances: ["*"]}}, {extra}}}
"""
    )


def test_window_end_is_exact_and_the_decision_flips_there() -> None:
    p = policy(one_binding("access_levels: [office_hours]"))
    request = req("group:ops")
    now = at("2024-03-29T16:30:00Z")  # Friday 17:30 in Paris
    assert evaluate(request, p, now).allowed
    change = next_change(request, p, now)
    assert change == at("2024-03-29T17:00:00Z")
    assert not evaluate(request, p, change).allowed
    assert evaluate(request, p, change - 0.001).allowed
    # closed for the weekend: reopens Monday 08:00 Paris
    assert next_change(request, p, change) == at("2024-04-01T06:00:00Z")


def test_required_levels_are_followed() -> None:
    p = policy(one_binding("access_levels: [corp_in_hours]"))
    request = req("group:ops", source_ip="10.0.0.1")
    assert next_change(request, p, at("2024-03-29T16:30:00Z")) == at("2024-03-29T17:00:00Z")


def test_condition_with_a_timestamp_literal() -> None:
    expression = "request.time < timestamp('2024-03-29T18:00:00Z')"
    p = policy(one_binding(f"condition: {json.dumps(expression)}"))
    assert next_change(req("group:ops"), p, FRIDAY) == at("2024-03-29T18:00:00Z")
    assert next_change(req("group:ops"), p, at("2024-03-29T18:00:00Z")) is None


def test_calendar_getters_change_on_quarter_hours_or_minutes() -> None:
    hours = "request.time.getHours('Asia/Kathmandu') < 19"  # UTC+5:45
    p = policy(one_binding(f"condition: {json.dumps(hours)}"))
    assert next_change(req("group:ops"), p, at("2024-03-29T13:14:30.5Z")) == at(
        "2024-03-29T13:15:00Z"
    )
    assert not evaluate(req("group:ops"), p, at("2024-03-29T13:15:00Z")).allowed
    assert evaluate(req("group:ops"), p, at("2024-03-29T13:14:59Z")).allowed
    minutes = "request.time.getMinutes() < 30 && request.time.getDayOfWeek() == 5"
    p = policy(one_binding(f"condition: {json.dumps(minutes)}"))
    assert next_change(req("group:ops"), p, at("2024-03-29T17:20:30Z")) == at(
        "2024-03-29T17:21:00Z"
    )


def test_opaque_time_use_changes_every_second() -> None:
    expression = "request.time - timestamp('2024-03-29T00:00:00Z') < duration('17h30m10s')"
    p = policy(one_binding(f"condition: {json.dumps(expression)}"))
    assert next_change(req("group:ops"), p, FRIDAY + 0.25) == FRIDAY + 1


def test_levels_used_inside_conditions_count() -> None:
    expression = "'office_hours' in request.auth.access_levels"
    p = policy(one_binding(f"condition: {json.dumps(expression)}"))
    assert next_change(req("group:ops"), p, at("2024-03-29T16:30:00Z")) == at(
        "2024-03-29T17:00:00Z"
    )


def test_none_without_time() -> None:
    p = policy(one_binding("access_levels: [corp_network], ports: [22]"))
    assert next_change(req("group:ops", source_ip="10.0.0.1"), p, FRIDAY) is None


def test_only_bindings_that_could_apply_count() -> None:
    p = policy(one_binding("access_levels: [office_hours], ports: [22]"))
    now = at("2024-03-29T16:30:00Z")
    assert next_change(req("group:other"), p, now) is None  # member mismatch
    assert next_change(req("group:ops", port=23), p, now) is None  # port mismatch
    assert next_change(req("group:ops", resource="app:x"), p, now) is None


def test_static_grant_makes_timed_bindings_irrelevant_but_not_timed_deny() -> None:
    base = (
        LEVELS
        + """
bindings:
  - {name: always, members: [group:ops], role: tunnelUser, resources: {instances: ["*"]}}
  - {name: hours, members: [group:ops], role: tunnelUser, resources: {instances: ["*"]},
     access_levels: [office_hours]}
"""
    )
    now = at("2024-03-29T16:30:00Z")
    assert next_change(req("group:ops"), policy(base), now) is None
    timed_deny = (
        base
        + """
deny:
  - {name: curfew, members: [group:ops], access_levels: [office_hours]}
"""
    )
    p = policy(timed_deny)
    assert not evaluate(req("group:ops"), p, now).allowed
    assert next_change(req("group:ops"), p, now) == at("2024-03-29T17:00:00Z")
    assert evaluate(req("group:ops"), p, at("2024-03-29T17:00:00Z")).allowed


def test_static_deny_never_changes() -> None:
    p = policy(one_binding("access_levels: [office_hours]") + "deny:\n  - {members: [group:ops]}\n")
    assert next_change(req("group:ops"), p, at("2024-03-29T16:30:00Z")) is None
