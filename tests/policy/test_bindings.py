"""Bindings: members, roles, resource selectors, ports, deny rules, order, old allow-lists."""

from __future__ import annotations

import pytest

from tunnel_server.access.policy import (
    ADMIN,
    NO_GRANT,
    WEB_USER,
    Binding,
    Policy,
    ResourceSelector,
    evaluate,
    parse_policy,
)
from tunnel_server.config import AllowRule, InventoryConfig

from .util import FRIDAY, policy, req

MEMBERS = policy(
    """
bindings:
  - {members: [user:Alice@Example.com], role: tunnelUser, resources: {instances: ["*"]}}
  - {members: [group:ops], role: tunnelUser, resources: {instances: ["*"]}}
  - {members: ["serviceAccount:svc-backup"], role: tunnelUser, resources: {instances: ["*"]}}
  - {members: [domain:example.org], role: tunnelUser, resources: {instances: ["*"]}}
  - {members: [allAuthenticatedUsers], role: tunnelUser, resources: {instances: [pub/z/bastion]}}
"""
)


@pytest.mark.parametrize(
    ("members", "resource", "binding"),
    [
        ({"user:alice@example.com"}, "instance:prod/z1/web-1", "bindings[0]"),
        ({"user:bob@example.com", "group:ops"}, "instance:prod/z1/web-1", "bindings[1]"),
        ({"serviceAccount:svc-backup"}, "instance:prod/z1/web-1", "bindings[2]"),
        ({"user:carol@example.org", "domain:example.org"}, "instance:a/b/c", "bindings[3]"),
        ({"subject:anyone"}, "instance:pub/z/bastion", "bindings[4]"),
        ({"user:bob@example.com"}, "instance:prod/z1/web-1", None),
        ({"group:OPS"}, "instance:prod/z1/web-1", None),  # group names are case-sensitive
        (set(), "instance:prod/z1/web-1", None),
    ],
)
def test_members(members: set[str], resource: str, binding: str | None) -> None:
    decision = evaluate(req(*members, resource=resource), MEMBERS, FRIDAY)
    assert decision.allowed is (binding is not None)
    assert decision.binding == binding
    if binding is None:
        assert decision.reasons[0] == NO_GRANT


def test_role_must_match() -> None:
    p = policy(
        """
bindings:
  - {members: [group:ops], role: webUser, resources: {apps: [wiki]}}
  - {members: [group:admins], role: admin}
"""
    )
    web = req("group:ops", resource="app:wiki", port=443, role=WEB_USER)
    assert evaluate(web, p, FRIDAY).allowed
    assert not evaluate(req("group:ops", resource="app:wiki", port=443), p, FRIDAY).allowed
    admin = req("group:admins", resource="relay:node-1", port=0, role=ADMIN)
    assert evaluate(admin, p, FRIDAY).allowed
    assert not evaluate(req("group:admins", resource="relay:node-1", port=0), p, FRIDAY).allowed
    ops = req("group:ops", resource="relay:node-1", port=0, role=ADMIN)
    assert not evaluate(ops, p, FRIDAY).allowed


SELECTORS = policy(
    """
bindings:
  - name: zone
    members: [group:a]
    role: tunnelUser
    resources: {instances: ["prod/europe-west1-b/*"]}
  - name: prefix
    members: [group:b]
    role: tunnelUser
    resources: {instances: ["*/*/web-*"]}
  - name: labelled
    members: [group:c]
    role: tunnelUser
    resources: {instances: ["prod/*/*"], labels: {env: prod}}
  - name: labels-only
    members: [group:d]
    role: tunnelUser
    resources: {labels: {team: [red, blue], tier: "*"}}
  - name: groups
    members: [group:e]
    role: tunnelUser
    resources: {destination_groups: ["p/r/n/db", "p/*/n/cache-*"]}
  - name: apps
    members: [group:f]
    role: tunnelUser
    resources: {apps: ["wiki-*"]}
"""
)


@pytest.mark.parametrize(
    ("member", "resource", "labels", "allowed"),
    [
        ("group:a", "instance:prod/europe-west1-b/vm", None, True),
        ("group:a", "instance:prod/europe-west1-c/vm", None, False),
        ("group:a", "instance:prod/europe-west1-b/vm/extra", None, False),
        ("group:b", "instance:x/y/web-7", None, True),
        ("group:b", "instance:x/y/db-7", None, False),
        ("group:b", "instance:x/y/z/web-7", None, False),  # * stays within a segment
        ("group:c", "instance:prod/z/vm", {"env": "prod"}, True),
        ("group:c", "instance:prod/z/vm", {"env": "dev"}, False),
        ("group:c", "instance:prod/z/vm", None, False),  # no labels known
        ("group:c", "instance:dev/z/vm", {"env": "prod"}, False),  # labels narrow the list
        ("group:d", "instance:any/z/vm", {"team": "red", "tier": "web"}, True),
        ("group:d", "instance:any/z/vm", {"team": "green", "tier": "web"}, False),
        ("group:d", "instance:any/z/vm", {"team": "blue"}, False),  # tier must be present
        ("group:d", "relay:node", {"team": "red", "tier": "web"}, False),
        ("group:e", "group:p/r/n/db", None, True),
        ("group:e", "group:p/r2/n/cache-1", None, True),
        ("group:e", "group:p/r/n/other", None, False),
        ("group:e", "instance:p/r/n", None, False),  # kinds are separate
        ("group:f", "app:wiki-eu", None, True),
        ("group:f", "app:blog", None, False),
    ],
)
def test_resource_selectors(
    member: str, resource: str, labels: dict[str, str] | None, allowed: bool
) -> None:
    decision = evaluate(req(member, resource=resource, labels=labels), SELECTORS, FRIDAY)
    assert decision.allowed is allowed, decision.reasons


def test_labels_come_from_the_inventory() -> None:
    inventory = InventoryConfig.model_validate(
        {
            "instances": [
                {
                    "project": "prod",
                    "zone": "z",
                    "name": "a",
                    "address": "10.0.0.1",
                    "labels": {"env": "prod"},
                },
                {"project": "prod", "zone": "z", "name": "b", "address": "10.0.0.2"},
            ]
        }
    )
    p = policy(
        "bindings: [{members: [group:c], role: tunnelUser, resources: {labels: {env: prod}}}]",
        inventory=inventory,
    )
    assert evaluate(req("group:c", resource="instance:prod/z/a"), p, FRIDAY).allowed
    assert not evaluate(req("group:c", resource="instance:prod/z/b"), p, FRIDAY).allowed
    # labels carried by the request win over the inventory's
    override = req("group:c", resource="instance:prod/z/a", labels={"env": "dev"})
    assert not evaluate(override, p, FRIDAY).allowed


@pytest.mark.parametrize(
    ("port", "allowed"), [(22, True), (8000, True), (8080, True), (8081, False), (21, False)]
)
def test_ports(port: int, allowed: bool) -> None:
    p = policy(
        """
bindings:
  - {members: [group:ops], role: tunnelUser, resources: {instances: ["*"]}, ports: [22, 8000-8080]}
"""
    )
    assert evaluate(req("group:ops", port=port), p, FRIDAY).allowed is allowed


def test_no_ports_means_every_port() -> None:
    p = policy(
        "bindings: [{members: [group:ops], role: tunnelUser, resources: {instances: ['*']}}]"
    )
    assert evaluate(req("group:ops", port=65535), p, FRIDAY).allowed


DENY = policy(
    """
bindings:
  - {members: [group:ops], role: tunnelUser, resources: {instances: ["*"]}}
  - {members: [group:ops], role: webUser, resources: {apps: ["*"]}}
deny:
  - name: no-mallory
    members: [user:mallory@example.com]
    resources: {instances: ["*"]}
  - name: no-db-port
    members: [allAuthenticatedUsers]
    except_members: [group:dba]
    resources: {instances: ["*"]}
    ports: [5432]
  - name: no-web-contractors
    members: [group:contractors]
    roles: [webUser]
  - name: nothing-for-eve
    members: [user:eve@example.com]
"""
)


@pytest.mark.parametrize(
    ("members", "kw", "decided_by", "allowed"),
    [
        ({"group:ops"}, {}, "bindings[0]", True),
        ({"group:ops", "user:mallory@example.com"}, {}, "no-mallory", False),
        ({"group:ops"}, {"port": 5432}, "no-db-port", False),
        ({"group:ops", "group:dba"}, {"port": 5432}, "bindings[0]", True),
        ({"group:ops", "group:contractors"}, {}, "bindings[0]", True),
        (
            {"group:ops", "group:contractors"},
            {"resource": "app:wiki", "role": WEB_USER},
            "no-web-contractors",
            False,
        ),
        (
            {"group:ops", "user:eve@example.com"},
            {"resource": "app:wiki", "role": WEB_USER},
            "nothing-for-eve",
            False,
        ),
        ({"group:ops", "user:eve@example.com"}, {}, "nothing-for-eve", False),
    ],
)
def test_deny_wins(
    members: set[str], kw: dict[str, object], decided_by: str, allowed: bool
) -> None:
    decision = evaluate(req(*members, **kw), DENY, FRIDAY)  # type: ignore[arg-type]
    assert (decision.allowed, decision.binding) == (allowed, decided_by)
    if not allowed:
        assert decision.reason == f"denied by {decided_by}"
        assert decision.rule is None


def test_first_binding_in_order_decides() -> None:
    p = policy(
        """
bindings:
  - {name: narrow, members: [group:ops], role: tunnelUser, resources: {instances: [p/z/a]}}
  - {name: broad, members: [group:ops], role: tunnelUser, resources: {instances: ["*"]}}
"""
    )
    assert evaluate(req("group:ops", resource="instance:p/z/a"), p, FRIDAY).rule == 0
    decision = evaluate(req("group:ops", resource="instance:p/z/b"), p, FRIDAY)
    assert (decision.binding, decision.rule, decision.reason) == ("broad", 1, "allowed by broad")


def test_allow_rules_keep_working() -> None:
    rules = [
        AllowRule.model_validate(
            {"members": ["user:Alice@example.com"], "instances": ["p/z/vm1"], "ports": [22]}
        ),
        AllowRule.model_validate(
            {"members": ["group:ops"], "destination_groups": ["*"], "ports": ["5000-5999"]}
        ),
    ]
    for p in (Policy(rules), Policy.from_allow_rules(rules)):
        first = evaluate(req("user:alice@example.com", resource="instance:p/z/vm1"), p, 0.0)
        assert (first.allowed, first.rule, first.binding) == (True, 0, "access[0]")
        second = evaluate(req("group:ops", resource="group:p/r/n/db", port=5432), p, 0.0)
        assert (second.allowed, second.rule) == (True, 1)
        assert not evaluate(
            req("group:ops", resource="instance:p/z/vm1", port=5432), p, 0.0
        ).allowed
    combined = parse_policy(
        {
            "bindings": [
                {"members": ["group:x"], "role": "tunnelUser", "resources": {"instances": ["*"]}}
            ]
        },
        allow_rules=rules,
    )
    assert [b.name for b in combined.bindings] == ["access[0]", "access[1]", "bindings[0]"]
    assert evaluate(req("group:x"), combined, 0.0).rule == 2


def test_policy_built_in_code_checks_levels() -> None:
    binding = Binding(
        "b",
        frozenset({"group:ops"}),
        frozenset({"tunnelUser"}),
        ResourceSelector(instances=("*",)),
        access_levels=("missing",),
    )
    with pytest.raises(ValueError, match="unknown access level 'missing'"):
        Policy(bindings=[binding])


def test_evaluate_never_raises() -> None:
    class Weird(dict[str, object]):
        def __iter__(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    p = policy(
        """
bindings:
  - {members: [group:ops], role: tunnelUser, resources: {instances: ["*"]},
     condition: "device.managed == true"}
"""
    )
    decision = evaluate(req("group:ops", device=Weird()), p, FRIDAY)
    assert not decision.allowed
    assert decision.reason
