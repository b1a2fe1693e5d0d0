"""Loading policy files: the documented example, and precise file / key / reason errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunnel_server.access.policy import evaluate, load_policy
from tunnel_server.config import ConfigError, InventoryConfig

from .util import at, policy, req

EXAMPLE = """\
access_levels:
  corp_network: {ip_subnetworks: [10.0.0.0/8, "2001:db8::/32"]}
  managed_device: {device: {managed: true, encrypted: true}}
  office_hours:
    time: {days: [mon,tue,wed,thu,fri], start: "08:00", end: "18:00", tz: Europe/Paris}
  trusted: {combine: AND, required_levels: [corp_network, managed_device]}
bindings:
  - members: [group:ops]
    role: tunnelUser
    resources: {instances: ["prod/europe-west1-b/*"], labels: {env: prod}}
    ports: [22]
    condition: {title: "business hours", expression: "request.time.getHours('Europe/Paris') < 19"}
    access_levels: [corp_network]
deny:
  - members: [user:mallory@example.com]
    resources: {instances: ["*"]}
"""


def test_example_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(EXAMPLE)
    p = load_policy(path)
    assert [b.name for b in p.bindings] == ["bindings[0]"]
    assert [d.name for d in p.deny] == ["deny[0]"]
    assert set(p.access_levels) == {"corp_network", "managed_device", "office_hours", "trusted"}
    request = req(
        "group:ops",
        resource="instance:prod/europe-west1-b/web-1",
        labels={"env": "prod"},
        source_ip="10.0.0.9",
    )
    assert evaluate(request, p, at("2024-03-29T16:00:00Z")).allowed  # 17:00 in Paris
    late = evaluate(request, p, at("2024-03-29T18:00:00Z"))  # 19:00 in Paris
    assert "condition 'business hours' is false" in late.reason
    mallory = req("group:ops", "user:mallory@example.com", resource=request.resource)
    assert evaluate(mallory, p, at("2024-03-29T16:00:00Z")).binding == "deny[0]"


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read: No such file"):
        load_policy(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("bindings:\n  - members: [group:ops\n    role: x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+, column \d+: invalid YAML"):
        load_policy(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: the top level must be a mapping"):
        load_policy(bad)


BINDING = "{members: [group:ops], role: tunnelUser, resources: {instances: ['*']}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bindngs: []", "policy.yaml: bindngs: unknown key; did you mean 'bindings'?"),
        (
            f"bindings: [{BINDING}, rolle: x}}]",
            "policy.yaml: bindings[0].rolle: unknown key; did you mean 'role'?",
        ),
        (
            "bindings: [{members: [group:ops], resources: {instances: ['*']}}]",
            "policy.yaml: bindings[0].role: is required",
        ),
        (
            "bindings: [{members: [group:ops], role: owner, resources: {instances: ['*']}}]",
            "policy.yaml: bindings[0].role: Input should be 'tunnelUser', 'webUser' or 'admin'",
        ),
        (
            "bindings: [{members: [ops], role: tunnelUser, resources: {instances: ['*']}}]",
            "policy.yaml: bindings[0].members: member 'ops' must look like user:EMAIL",
        ),
        (
            "bindings: [{members: [], role: tunnelUser, resources: {instances: ['*']}}]",
            "policy.yaml: bindings[0].members: List should have at least 1 item",
        ),
        (f"bindings: [{BINDING}, ports: [0]}}]", "policy.yaml: bindings[0].ports[0].first"),
        (f"bindings: [{BINDING}, ports: [70000]}}]", "bindings[0].ports[0].first"),
        (f"bindings: [{BINDING}, ports: ['90-80']}}]", "port range '90-80' is reversed"),
        (f"bindings: [{BINDING}, ports: [true]}}]", "port True must be an integer or a range"),
        (
            "bindings: [{members: [group:ops], role: tunnelUser}]",
            "policy.yaml: bindings[0]: a tunnelUser binding needs 'resources'",
        ),
        (
            "bindings: [{members: [group:ops], role: tunnelUser, resources: {}}]",
            "bindings[0].resources: resources needs instances, destination_groups, apps or labels",
        ),
        (
            "bindings: [{members: [group:ops], role: tunnelUser, resources: {instances: [a/b]}}]",
            "bindings[0].resources.instances: 'a/b' must be * or PROJECT/ZONE/NAME",
        ),
        (
            "bindings: [{members: [group:ops], role: tunnelUser, "
            "resources: {destination_groups: [a/b/c]}}]",
            "'a/b/c' must be * or PROJECT/REGION/NETWORK/NAME",
        ),
        (
            f"bindings: [{BINDING}, condition: {{expression: ''}}}}]",
            "bindings[0].condition.expression: String should have at least 1 character",
        ),
        (
            f"bindings: [{BINDING}, name: x}}, {BINDING}, name: x}}]",
            "policy.yaml: x: duplicate binding name",
        ),
        ("deny: [{members: [group:ops], roles: [root]}]", "policy.yaml: deny[0].roles[0]"),
        (
            "deny: [{members: [group:ops], except_members: [bob]}]",
            "deny[0].except_members: member 'bob' must look like",
        ),
    ],
)
def test_errors_are_precise(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        policy(text)
    assert message in str(info.value)


def test_every_problem_is_reported_at_once() -> None:
    text = f"""
bindings:
  - {BINDING}, condition: "1 +"}}
  - {BINDING}, access_levels: [ghost]}}
deny:
  - {{members: [group:ops], condition: "device.x"}}
"""
    with pytest.raises(ConfigError) as info:
        policy(text)
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("policy.yaml: bindings[0].condition: invalid CEL: ")
    assert lines[1] == "policy.yaml: bindings[1].access_levels: unknown access level 'ghost'"


def test_inventory_checks_exact_keys() -> None:
    inventory = InventoryConfig.model_validate(
        {"instances": [{"project": "p", "zone": "z", "name": "vm1", "address": "10.0.0.5"}]}
    )
    ok = "bindings: [{members: [group:a], role: tunnelUser, resources: {instances: [p/z/vm1]}}]"
    policy(ok, inventory=inventory)
    with pytest.raises(ConfigError) as info:
        policy(
            "bindings: [{name: typo, members: [group:a], role: tunnelUser,"
            " resources: {instances: [p/z/vm1, p/z/vm9, 'p/*/x'], destination_groups: [p/r/n/g]}}]",
            inventory=inventory,
        )
    assert str(info.value).splitlines() == [
        "policy.yaml: bindings[0] (typo).resources.instances[1]: unknown instance 'p/z/vm9'",
        "policy.yaml: bindings[0] (typo).resources.destination_groups[0]: "
        "unknown destination group 'p/r/n/g'",
    ]


def test_members_are_normalized() -> None:
    p = policy(
        "bindings: [{members: [user:Bob@Example.COM, domain:Example.com, group:Ops],"
        " role: tunnelUser, resources: {instances: ['*']}}]"
    )
    assert p.bindings[0].members == {"user:bob@example.com", "domain:example.com", "group:Ops"}


def test_empty_mapping_is_an_empty_policy() -> None:
    p = policy("{}")
    decision = evaluate(req("group:ops"), p, 0.0)
    assert not decision.allowed
