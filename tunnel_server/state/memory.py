"""The state store of a single relay (no Redis): the cluster is this node."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from .base import Owner, Revocation, TunnelRecord, node_tag


class MemoryState:
    """Every tunnel is local, so the registry and the caps are this process's; revocations have
    nowhere else to go."""

    def __init__(self, node: str, url: str = "") -> None:
        self.node = node
        self.tag = node_tag(node)
        self.url = url
        self._tunnels: dict[str, TunnelRecord] = {}
        self._counts: Counter[str] = Counter()

    @property
    def available(self) -> bool:
        return True

    async def start(
        self,
        *,
        on_revocation: Callable[[Revocation], None],
        local_tunnels: Callable[[], Iterable[TunnelRecord]],
    ) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def claim(self, record: TunnelRecord, per_principal: int) -> str | None:
        if self._counts[record.principal] >= per_principal:
            return f"too many tunnels for this principal (limit {per_principal})"
        self._tunnels[record.sid] = record
        self._counts[record.principal] += 1
        return None

    async def release(self, record: TunnelRecord) -> None:
        self.release_soon(record)

    def release_soon(self, record: TunnelRecord) -> None:
        if self._tunnels.pop(record.sid, None) is None:
            return
        self._counts[record.principal] -= 1
        if self._counts[record.principal] <= 0:
            del self._counts[record.principal]

    async def owner(self, sid: str) -> Owner | None:
        record = self._tunnels.get(sid)
        return Owner(self.node, self.url, record) if record is not None else None

    async def revoke(self, revocation: Revocation) -> None:
        return None
