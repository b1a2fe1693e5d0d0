"""What relay nodes share (resume registry, per-principal caps, revocations): the records and
the ``StateStore`` interface that the in-memory and the Redis stores implement."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

RevocationKind = Literal["user", "session"]

# Random part of a tunnel id: 24 bytes, 32 URL-safe characters (fixed length, so the node tag
# after it parses without a separator that the random part could contain).
_RANDOM_BYTES = 24
_RANDOM_CHARS = 32


class StateUnavailable(Exception):
    """The shared store cannot be reached (or did not answer in time)."""


@dataclass(frozen=True, slots=True)
class TunnelRecord:
    """A tunnel as the cluster knows it: who owns it (the node in its id) and for whom."""

    sid: str
    principal: str
    subprotocol: str
    created: float  # wall clock


@dataclass(frozen=True, slots=True)
class Owner:
    """The node holding a tunnel, and how other nodes reach it."""

    node: str
    url: str
    record: TunnelRecord


@dataclass(frozen=True, slots=True)
class Revocation:
    """A user (every token issued up to ``at``, and their tunnels) or one tunnel, revoked."""

    kind: RevocationKind
    subject: str  # a principal, or a tunnel id
    at: float  # wall clock
    by: str | None = None
    node: str = ""  # where it was decided


def node_tag(node: str) -> str:
    """A short, stable, URL-safe tag for a node id (node ids may hold dots; tunnel ids may not)."""
    digest = hashlib.sha256(node.encode()).digest()
    return base64.b32encode(digest[:5]).decode().lower()  # 8 characters


def new_sid(tag: str) -> str:
    """A tunnel id: 32 random characters, then ``-`` and the owning node's tag."""
    return f"{secrets.token_urlsafe(_RANDOM_BYTES)}-{tag}"


def sid_tag(sid: str) -> str | None:
    """The node tag inside a tunnel id, or None for an id this format did not make."""
    if len(sid) > _RANDOM_CHARS + 1 and sid[_RANDOM_CHARS] == "-":
        return sid[_RANDOM_CHARS + 1 :]
    return None


class StateStore(Protocol):
    """The state one relay node shares with the others.

    ``claim`` and ``owner`` raise StateUnavailable when the store cannot answer; ``release``
    and ``revoke`` never raise (a release is retried by the lease expiring, a revocation is kept
    and pushed again when the store is back)."""

    node: str
    tag: str

    @property
    def available(self) -> bool: ...

    async def start(
        self,
        *,
        on_revocation: Callable[[Revocation], None],
        local_tunnels: Callable[[], Iterable[TunnelRecord]],
    ) -> None:
        """Begin heartbeats and revocation delivery. ``on_revocation`` receives revocations
        decided on other nodes (and ones this node missed); ``local_tunnels`` lists this node's
        tunnels, to register them again after the store lost them (a Redis restart)."""

    async def aclose(self) -> None: ...

    async def claim(self, record: TunnelRecord, per_principal: int) -> str | None:
        """Register a new tunnel of this node unless its principal already holds
        ``per_principal`` tunnels across the cluster; returns the refusal, or None."""

    async def release(self, record: TunnelRecord) -> None:
        """Forget an ended tunnel of this node (done when this returns)."""

    def release_soon(self, record: TunnelRecord) -> None:
        """Forget an ended tunnel of this node without waiting: releases are batched (one
        round trip for all the tunnels that ended meanwhile), and retried after an outage."""

    async def owner(self, sid: str) -> Owner | None:
        """The node that holds ``sid`` (this node included), or None when no live node does."""

    async def revoke(self, revocation: Revocation) -> None:
        """Persist a revocation decided here and push it to every node."""
