"""The allow-list decision and the inventory lookup, as pure functions."""

from __future__ import annotations

import pytest

from tunnel_protocol.urls import HostTarget, InstanceTarget
from tunnel_server.access.inventory import Inventory, LookupFailed
from tunnel_server.access.policy import AccessRequest, Policy, evaluate
from tunnel_server.config import AllowRule, InventoryConfig

INVENTORY = InventoryConfig.model_validate(
    {
        "instances": [
            {"project": "p", "zone": "z", "name": "vm1", "address": "10.0.0.5"},
            {
                "project": "p",
                "zone": "z",
                "name": "vm2",
                "interfaces": {"nic0": "10.0.0.6", "nic1": "10.1.0.6"},
            },
        ],
        "destination_groups": [
            {
                "project": "p",
                "region": "r",
                "network": "n",
                "name": "db",
                "cidrs": ["10.2.0.0/16", "fd00:1::/64"],
                "fqdns": ["DB.internal."],
            },
        ],
    }
)


def rule(**kw: object) -> AllowRule:
    return AllowRule.model_validate(kw)


POLICY = Policy(
    (
        rule(
            members=["user:alice@example.com", "group:ops"],
            instances=["p/z/vm1"],
            ports=[22, "8000-8080"],
        ),
        rule(members=["domain:example.com"], destination_groups=["p/r/n/db"], ports=[5432]),
        rule(members=["allAuthenticatedUsers"], instances=["p/z/vm2"], ports=[3389]),
    )
)


def request(members: set[str], resource: str, port: int) -> AccessRequest:
    return AccessRequest(frozenset(members), resource, port)


@pytest.mark.parametrize(
    ("members", "resource", "port", "allowed", "rule_index"),
    [
        ({"user:alice@example.com"}, "instance:p/z/vm1", 22, True, 0),
        ({"user:bob@example.com", "group:ops"}, "instance:p/z/vm1", 8080, True, 0),
        ({"user:bob@example.com", "group:ops"}, "instance:p/z/vm1", 8081, False, None),
        ({"user:bob@example.com"}, "instance:p/z/vm1", 22, False, None),
        ({"user:alice@example.com"}, "instance:p/z/vm2", 22, False, None),
        ({"subject:x"}, "instance:p/z/vm2", 3389, True, 2),
        ({"domain:example.com"}, "group:p/r/n/db", 5432, True, 1),
        ({"domain:example.org"}, "group:p/r/n/db", 5432, False, None),
        (set(), "instance:p/z/vm1", 22, False, None),
    ],
)
def test_allow_list(
    members: set[str], resource: str, port: int, allowed: bool, rule_index: int | None
) -> None:
    decision = evaluate(request(members, resource, port), POLICY, 0.0)
    assert decision.allowed is allowed
    assert decision.rule == rule_index
    assert decision.reason


def test_wildcard_rule() -> None:
    policy = Policy((rule(members=["group:admins"], instances=["*"], ports=["1-65535"]),))
    assert evaluate(request({"group:admins"}, "instance:q/y/any", 1), policy, 0.0).allowed
    assert not evaluate(request({"group:admins"}, "group:p/r/n/db", 1), policy, 0.0).allowed


def test_inventory_instances() -> None:
    inventory = Inventory(INVENTORY)
    dest = inventory.resolve(InstanceTarget("p", "z", "vm2", "nic1", 22))
    assert (dest.resource, dest.host, dest.port) == ("instance:p/z/vm2", "10.1.0.6", 22)
    with pytest.raises(LookupFailed):
        inventory.resolve(InstanceTarget("p", "z", "vm3", "nic0", 22))
    with pytest.raises(LookupFailed):
        inventory.resolve(InstanceTarget("p", "z", "vm1", "nic1", 22))
    with pytest.raises(LookupFailed):
        inventory.resolve(InstanceTarget("other", "z", "vm1", "nic0", 22))


@pytest.mark.parametrize(
    ("host", "group", "found"),
    [
        ("10.2.3.4", "db", True),
        ("10.2.3.4", None, True),  # the group is found from the host, as IAP does
        ("10.3.0.1", "db", False),
        ("fd00:1::5", "db", True),
        ("db.internal", "db", True),  # FQDNs compare case- and trailing-dot-insensitively
        ("db.internal.evil", "db", False),
        ("10.2.3.4", "other", False),
    ],
)
def test_inventory_destination_groups(host: str, group: str | None, found: bool) -> None:
    inventory = Inventory(INVENTORY)
    target = HostTarget("p", "r", "n", host, group, 5432)
    if found:
        assert inventory.resolve(target).resource == "group:p/r/n/db"
        assert inventory.resource_for(target) == "group:p/r/n/db"
    else:
        with pytest.raises(LookupFailed):
            inventory.resolve(target)
