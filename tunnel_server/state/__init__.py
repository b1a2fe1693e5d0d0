"""State shared between relay nodes: the interface, the in-memory store (one node) and the
Redis store (a cluster). See docs/scale-out.md."""

from __future__ import annotations

from ..config.models import ServerConfig
from .base import (
    Owner,
    Revocation,
    RevocationKind,
    StateStore,
    StateUnavailable,
    TunnelRecord,
    new_sid,
    node_tag,
    sid_tag,
)
from .memory import MemoryState
from .redis_store import RedisState

__all__ = [
    "MemoryState",
    "Owner",
    "RedisState",
    "Revocation",
    "RevocationKind",
    "StateStore",
    "StateUnavailable",
    "TunnelRecord",
    "build_state",
    "new_sid",
    "node_tag",
    "sid_tag",
]


def build_state(config: ServerConfig, node: str) -> StateStore:
    """The store the config names (not started yet)."""
    if config.state.backend == "memory":
        return MemoryState(node)
    state, cluster = config.state, config.cluster
    assert state.redis_url is not None  # validated with the config
    assert cluster is not None
    return RedisState(
        state.redis_url,
        node=node,
        advertise_url=cluster.advertise_url,
        prefix=state.key_prefix,
        lease_ttl=state.lease_ttl,
        resync_interval=state.resync_interval,
        retention=state.revocation_retention,
        timeout=state.timeout,
    )
