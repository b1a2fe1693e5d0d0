"""State shared between relay nodes: the interface, the in-memory store (one node) and the
Redis store (a cluster). See docs/scale-out.md."""

from __future__ import annotations

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
    "new_sid",
    "node_tag",
    "sid_tag",
]
