"""The console's view of the open tunnels and the nodes: this node's own tunnels (always, read
live), and on a cluster (``state.backend: redis``) every other node's, read from Redis.

Reading the cluster: the shared state already keeps each live node's lease (``P node:T``) and
tunnel registry (``P tunnels:T``: principal, subprotocol, start); those give every open tunnel of
the cluster. The details the registry does not hold (target, port, client address, bytes,
state) come from a snapshot each console-enabled node publishes every ``interval`` seconds
(``P console:T``, expiring after three intervals). A tunnel whose node publishes no snapshot is
still listed, without those details (``partial``). When Redis cannot be read, the view falls
back to this node alone and says so (``scope``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tunnel_protocol.dialect import DIALECTS

from ..audit_store import StoreStats
from ..ops.admin import session_view
from ..relay import Relay

log = logging.getLogger("tunnel.console")

MAX_PUBLISHED = 10_000  # tunnels per node snapshot (beyond: counted, not listed)
MAX_SNAPSHOT = 8 * 1024 * 1024  # bytes of one snapshot read back; larger ones are ignored


@dataclass(frozen=True, slots=True)
class TunnelRow:
    sid: str
    principal: str
    node: str
    dialect: str
    duration: float  # seconds since the tunnel opened
    target: str | None = None
    address: str | None = None
    port: int | None = None
    client: str | None = None
    state: str | None = None  # attached / parked
    bytes_from_client: int | None = None
    bytes_to_client: int | None = None
    resumes: int | None = None
    partial: bool = False  # only what the registry holds is known

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class NodeRow:
    node: str
    url: str
    alive: bool
    tunnels: int
    draining: bool | None = None
    state_up: bool | None = None
    audit: dict[str, Any] | None = None  # the audit store's counters
    seen: float | None = None  # when its snapshot was published (wall clock)
    this: bool = False


@dataclass
class ClusterSnapshot:
    scope: str  # "cluster" or "node"
    tunnels: list[TunnelRow]
    nodes: list[NodeRow]
    note: str | None = None
    at: float = field(default_factory=time.time)


def local_rows(relay: Relay) -> list[TunnelRow]:
    node = relay.node
    return [
        TunnelRow(
            sid=v["tunnel_id"],
            principal=v["principal"],
            node=node,
            dialect=v["dialect"],
            duration=v["age"],
            target=v["resource"],
            address=v["address"],
            port=v["port"],
            client=v["source_ip"],
            state=v["state"],
            bytes_from_client=v["bytes_from_client"],
            bytes_to_client=v["bytes_to_client"],
            resumes=v["resumes"],
        )  # fmt: skip
        for v in session_view(relay)
    ]


def local_node(relay: Relay, url: str, store: StoreStats | None) -> NodeRow:
    return NodeRow(
        node=relay.node, url=url, alive=True, tunnels=len(relay.sessions),
        draining=relay.draining, state_up=relay.state.available,
        audit=asdict(store) if store is not None else None, seen=time.time(), this=True,
    )  # fmt: skip


class LocalTunnels:
    """One node (``state.backend: memory``): its own tunnels."""

    def __init__(self, relay: Relay, store: Callable[[], StoreStats | None] = lambda: None) -> None:
        self.relay = relay
        self.store = store

    async def snapshot(self) -> ClusterSnapshot:
        return ClusterSnapshot(
            "node", local_rows(self.relay), [local_node(self.relay, "", self.store())]
        )

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class RedisTunnels:
    """Every node's tunnels, from the shared state in Redis (see the module docstring)."""

    def __init__(
        self,
        relay: Relay,
        redis: aioredis.Redis,
        *,
        prefix: str,
        url: str,
        interval: float,
        store: Callable[[], StoreStats | None] = lambda: None,
    ) -> None:
        self.relay = relay
        self.redis = redis
        self.prefix = prefix
        self.url = url
        self.interval = interval
        self.store = store
        self._task: asyncio.Task[None] | None = None

    def _key(self, kind: str, tag: str) -> str:
        return f"{self.prefix}{kind}:{tag}"

    # -- publishing this node's details -----------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._publish_forever(), name="console-publisher")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(self._key("console", self.relay.state.tag))
        await self.redis.aclose()

    async def publish(self) -> None:
        rows = local_rows(self.relay)
        node = local_node(self.relay, self.url, self.store())
        document = {
            "node": asdict(node) | {"this": False},
            "tunnels": [r.as_json() for r in rows[:MAX_PUBLISHED]],
            "more": max(0, len(rows) - MAX_PUBLISHED),
        }
        text = json.dumps(document, separators=(",", ":"), default=str)
        ttl = max(1, int(self.interval * 3 + 1))
        await self.redis.set(self._key("console", self.relay.state.tag), text, ex=ttl)

    async def _publish_forever(self) -> None:
        while True:
            try:
                await self.publish()
            except (RedisError, OSError) as exc:
                log.debug("console snapshot not published: %s", exc)
            await asyncio.sleep(self.interval)

    # -- reading the cluster ----------------------------------------------------------------

    async def snapshot(self) -> ClusterSnapshot:
        try:
            return await self._read()
        except (RedisError, OSError, ValueError) as exc:
            rows = local_rows(self.relay)
            nodes = [local_node(self.relay, self.url, self.store())]
            return ClusterSnapshot("node", rows, nodes, f"cluster view unavailable: {exc}")

    async def _tags(self) -> list[str]:
        tags = []
        pattern = self._key("node", "*")
        async for key in self.redis.scan_iter(match=pattern, count=200):
            text = key.decode() if isinstance(key, bytes) else str(key)
            tags.append(text[len(self._key("node", "")) :])
            if len(tags) >= 1000:
                break
        return tags

    async def _read(self) -> ClusterSnapshot:
        own = self.relay.state.tag
        tags = [t for t in await self._tags() if t != own]
        pipe = self.redis.pipeline(transaction=False)
        for tag in tags:
            pipe.hgetall(self._key("node", tag))
            pipe.hgetall(self._key("tunnels", tag))
            pipe.get(self._key("console", tag))
        replies = await pipe.execute()
        tunnels = local_rows(self.relay)
        nodes = [local_node(self.relay, self.url, self.store())]
        now = time.time()
        for n, tag in enumerate(tags):
            lease, registry, published = replies[3 * n : 3 * n + 3]
            node_rows, node = _merge(tag, lease or {}, registry or {}, published, now)
            tunnels += node_rows
            nodes.append(node)
        return ClusterSnapshot("cluster", tunnels, nodes)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _merge(
    tag: str,
    lease: Mapping[Any, Any],
    registry: Mapping[Any, Any],
    published: Any,
    now: float,
) -> tuple[list[TunnelRow], NodeRow]:
    """One other node: its registry's tunnels, with the details of its snapshot."""
    lease = {_text(k): _text(v) for k, v in lease.items()}
    name = lease.get("node", tag)
    details: dict[str, dict[str, Any]] = {}
    node_info: dict[str, Any] = {}
    if published is not None and len(published) <= MAX_SNAPSHOT:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            document = json.loads(published)
            node_info = dict(document.get("node") or {})
            details = {str(t["sid"]): t for t in document.get("tunnels", []) if "sid" in t}
    rows = []
    for raw_sid, raw in registry.items():
        sid = _text(raw_sid)
        detail = details.pop(sid, None)
        row = _row(sid, name, detail) if detail is not None else _registry_row(sid, name, raw, now)
        if row is not None:
            rows.append(row)
    rows += [r for r in (_row(sid, name, d) for sid, d in details.items()) if r is not None]
    node = NodeRow(
        node=name, url=lease.get("url", ""), alive=bool(lease), tunnels=len(rows),
        draining=node_info.get("draining"), state_up=node_info.get("state_up"),
        audit=node_info.get("audit"), seen=node_info.get("seen"),
    )  # fmt: skip
    return rows, node


def _row(sid: str, node: str, detail: Mapping[str, Any]) -> TunnelRow | None:
    known = {f for f in TunnelRow.__dataclass_fields__ if f not in ("sid", "node")}
    try:
        values = {k: detail[k] for k in known if k in detail}
        return TunnelRow(sid=sid, node=node, **values)
    except TypeError:
        return None


def _registry_row(sid: str, node: str, raw: Any, now: float) -> TunnelRow | None:
    try:
        data = json.loads(raw)
        dialect = DIALECTS.get(str(data["subprotocol"]))
        return TunnelRow(
            sid=sid, principal=str(data["principal"]), node=node,
            dialect=dialect.name if dialect is not None else str(data["subprotocol"]),
            duration=max(0.0, now - float(data["created"])), partial=True,
        )  # fmt: skip
    except (ValueError, KeyError, TypeError):
        return None
