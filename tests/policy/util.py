"""Helpers for the policy tests: YAML policies, requests and instants in one line each."""

from __future__ import annotations

import datetime as dt
from typing import Any

import yaml

from tunnel_server.access.policy import AccessRequest, Policy, parse_policy
from tunnel_server.config import InventoryConfig

# 2024-03-29 was a Friday; 17:30 UTC is 18:30 in Paris (CET, UTC+1).
FRIDAY = dt.datetime(2024, 3, 29, 17, 30, tzinfo=dt.UTC).timestamp()


def at(text: str) -> float:
    """An ISO 8601 instant (``Z`` allowed) as epoch seconds."""
    return dt.datetime.fromisoformat(text).timestamp()


def policy(text: str, *, inventory: InventoryConfig | None = None) -> Policy:
    return parse_policy(yaml.safe_load(text), "policy.yaml", inventory=inventory)


def req(
    *members: str,
    resource: str = "instance:prod/z1/web-1",
    port: int = 22,
    **kw: Any,
) -> AccessRequest:
    return AccessRequest(frozenset(members), resource, port, **kw)
