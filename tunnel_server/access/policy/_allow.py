"""The config file's inline allow-list (``access:``), an input of the policy: members, the
instances and destination groups they may reach, and port ranges."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from ...schema import Port, StrictModel, check_members
from ._logins import LOGIN_TEMPLATE


class PortRange(StrictModel):
    first: Port
    last: Port

    def __contains__(self, port: int) -> bool:
        return self.first <= port <= self.last


def parse_ports(value: Any) -> Any:
    if not isinstance(value, list):
        return value
    out: list[Any] = []
    for item in value:
        if isinstance(item, str) and re.fullmatch(r"[0-9]{1,5}-[0-9]{1,5}", item):
            first, last = (int(p) for p in item.split("-"))
            if first > last:
                raise ValueError(f"port range {item!r} is reversed")
            out.append({"first": first, "last": last})
        elif isinstance(item, int) and not isinstance(item, bool):
            out.append({"first": item, "last": item})
        elif isinstance(item, str) and re.fullmatch(r"[0-9]{1,5}", item):
            out.append({"first": int(item), "last": int(item)})
        else:
            raise ValueError(f"port {item!r} must be an integer or a range like '8000-8080'")
    return out


class AllowRule(StrictModel):
    """Grant ``members`` access to ``ports`` on the listed instances and destination groups.

    ``instances``: ``project/zone/name`` keys, or ``*``. ``destination_groups``:
    ``project/region/network/name`` keys, or ``*``. Unknown keys are errors (typos fail loudly).
    """

    members: list[str] = Field(min_length=1)
    instances: list[str] = Field(default_factory=list)
    destination_groups: list[str] = Field(default_factory=list)
    ports: list[PortRange] = Field(min_length=1)
    # SSH certificates: the login names granted with this rule (templates: docs/ssh-certificates.md)
    logins: list[Annotated[str, Field(pattern=LOGIN_TEMPLATE)]] = Field(default_factory=list)

    _check_ports = field_validator("ports", mode="before")(parse_ports)

    @field_validator("members")
    @classmethod
    def _members(cls, members: list[str]) -> list[str]:
        check_members(
            members,
            hint="user:EMAIL, group:NAME, serviceAccount:ID, domain:NAME or allAuthenticatedUsers",
        )
        return members

    @model_validator(mode="after")
    def _some_resource(self) -> AllowRule:
        if not self.instances and not self.destination_groups:
            raise ValueError("a rule needs 'instances' or 'destination_groups'")
        return self
