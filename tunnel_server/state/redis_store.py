"""The state store of a relay cluster, in Redis: node leases, the resume registry, global
per-principal caps and revocations (persisted, pushed over pub/sub, resynced).

Keys (``P`` is the configured prefix, ``T`` a node's tag):

- ``P node:T`` hash {node, url}: the node's lease, expiring ``lease_ttl`` after its last
  heartbeat. Everything below that names T counts only while this key exists.
- ``P tunnels:T`` hash sid -> record: the node's tunnels (resume registry; same lease).
- ``P caps:PRINCIPAL`` sorted set of ``T|sid``: the principal's tunnels on every node; a claim
  prunes members whose node lease is gone, so a dead node's slots free themselves.
- ``P revoked:user`` / ``P revoked:session`` sorted sets subject -> time, pruned after
  ``revocation_retention``; ``P revocations`` the pub/sub channel.

Redis must be a single primary (standalone or Sentinel): the claim is a Lua script that reads
keys it computes (not Redis Cluster compatible)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from .base import (
    Owner,
    Revocation,
    RevocationKind,
    StateUnavailable,
    TunnelRecord,
    node_tag,
    sid_tag,
)

log = logging.getLogger("tunnel.state")

# Releases kept while Redis is unreachable (each ~100 bytes).
MAX_PENDING_RELEASES = 100_000
# A revocation message or record larger than this is not ours: ignored.
_MAX_MESSAGE = 4096
_KINDS: tuple[RevocationKind, ...] = ("user", "session")

_CLAIM = """
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local live = 0
for _, m in ipairs(members) do
  local tag = string.match(m, '^([^|]+)|')
  if tag and redis.call('EXISTS', ARGV[3] .. tag) == 1 then
    live = live + 1
  else
    redis.call('ZREM', KEYS[1], m)
  end
end
if live >= tonumber(ARGV[2]) then return live end
local fresh = 0
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('HSET', KEYS[3], 'node', ARGV[8], 'url', ARGV[9])
  fresh = 1
end
redis.call('PEXPIRE', KEYS[3], ARGV[7])
redis.call('ZADD', KEYS[1], ARGV[6], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
return -1 - fresh
"""


def _encode(record: TunnelRecord) -> str:
    return json.dumps(
        {
            "principal": record.principal,
            "subprotocol": record.subprotocol,
            "created": record.created,
        },
        separators=(",", ":"),
    )


def _decode(sid: str, raw: str) -> TunnelRecord | None:
    try:
        data = json.loads(raw)
        return TunnelRecord(
            sid, str(data["principal"]), str(data["subprotocol"]), float(data["created"])
        )
    except (ValueError, KeyError, TypeError):
        return None


def encode_revocation(revocation: Revocation) -> str:
    return json.dumps(
        {
            "kind": revocation.kind,
            "subject": revocation.subject,
            "at": revocation.at,
            "by": revocation.by,
            "node": revocation.node,
        },
        separators=(",", ":"),
    )


def decode_revocation(raw: str | bytes) -> Revocation | None:
    if len(raw) > _MAX_MESSAGE:
        return None
    try:
        data = json.loads(raw)
        kind = data["kind"]
        if kind not in _KINDS:
            return None
        by = data.get("by")
        return Revocation(
            cast(RevocationKind, kind),
            str(data["subject"]),
            float(data["at"]),
            str(by) if by is not None else None,
            str(data.get("node", "")),
        )
    except (ValueError, KeyError, TypeError):
        return None


async def close_pubsub(pubsub: PubSub, bound: float) -> None:
    """Close a subscription within ``bound`` seconds: redis-py's ``PubSub.aclose`` can wait
    forever for its connection's ``wait_closed`` (redis/redis-py#3941), which would hang a
    shutdown; past the bound the connection is dropped without waiting. Redis errors are ignored
    (it is closing anyway)."""
    try:
        async with asyncio.timeout(bound):
            await pubsub.aclose()  # type: ignore[no-untyped-call]
    except TimeoutError:
        if pubsub.connection is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.connection.disconnect(nowait=True)
    except (RedisError, OSError):
        pass


class RedisState:
    """One node's view of the cluster state in Redis. Open tunnels never depend on it: only
    new tunnels (claim), resumes landing on another node (owner) and revocations use it."""

    def __init__(
        self,
        url: str,
        *,
        node: str,
        advertise_url: str,
        prefix: str = "tunnel:",
        lease_ttl: float = 15.0,
        resync_interval: float = 5.0,
        retention: float = 86400.0,
        timeout: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.tag = node_tag(node)
        self.url = advertise_url
        self._prefix = prefix
        self._ttl_ms = max(1000, int(lease_ttl * 1000))
        self._lease_ttl = lease_ttl
        self._resync_interval = resync_interval
        self._retention = retention
        self._clock = clock
        kwargs: dict[str, Any] = {"decode_responses": True, "socket_connect_timeout": timeout}
        self._timeout = timeout
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout, **kwargs)
        # Pub/sub waits for messages indefinitely: no read timeout on its connection.
        self._subscriber = aioredis.Redis.from_url(url, socket_keepalive=True, **kwargs)
        self._claim = self._redis.register_script(_CLAIM)
        self._available = False
        self._registered = False  # this node's tunnels are in Redis (false after a restart)
        self._known: dict[tuple[RevocationKind, str], Revocation] = {}
        self._on_revocation: Callable[[Revocation], None] = lambda revocation: None
        self._local_tunnels: Callable[[], Iterable[TunnelRecord]] = lambda: ()
        self._tasks: list[asyncio.Task[None]] = []
        self._resync_now = asyncio.Event()
        self._releases: list[TunnelRecord] = []
        self._releasing: asyncio.Task[None] | None = None
        # Tunnels this store claimed and has not released: with ``local_tunnels`` (which also
        # lists tunnels opened while Redis was away), what a re-registration writes. A tunnel
        # is claimed before its dial, so the relay's own list does not have it yet.
        self._mine: dict[str, TunnelRecord] = {}

    # -- keys -------------------------------------------------------------------------------------

    def _node_key(self, tag: str) -> str:
        return f"{self._prefix}node:{tag}"

    def _tunnels_key(self, tag: str) -> str:
        return f"{self._prefix}tunnels:{tag}"

    def _caps_key(self, principal: str) -> str:
        return f"{self._prefix}caps:{principal}"

    def _revoked_key(self, kind: RevocationKind) -> str:
        return f"{self._prefix}revoked:{kind}"

    @property
    def _channel(self) -> str:
        return f"{self._prefix}revocations"

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self._available

    async def start(
        self,
        *,
        on_revocation: Callable[[Revocation], None],
        local_tunnels: Callable[[], Iterable[TunnelRecord]],
    ) -> None:
        self._on_revocation = on_revocation
        self._local_tunnels = local_tunnels
        await self.heartbeat()  # a first try; the loop keeps trying when Redis is down
        if self._available:
            await self.resync()
        loop = asyncio.get_running_loop()
        for coro in (self._heartbeats(), self._subscribe(), self._resyncs()):
            self._tasks.append(loop.create_task(coro))

    async def aclose(self) -> None:
        if self._releasing is not None:
            self._tasks.append(self._releasing)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._available:
            # A clean exit frees this node's cap slots and registry entries at once.
            with contextlib.suppress(RedisError, OSError):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for record in self._tunnels_now():
                        pipe.zrem(self._caps_key(record.principal), f"{self.tag}|{record.sid}")
                    pipe.delete(self._node_key(self.tag), self._tunnels_key(self.tag))
                    await pipe.execute()
        await self._redis.aclose()
        await self._subscriber.aclose()

    def _lost(self, exc: BaseException) -> None:
        if self._available:
            log.warning("state store unavailable: %s", exc)
        self._available = False
        self._registered = False  # write everything again once Redis answers

    # -- heartbeat and re-registration --------------------------------------------------------

    async def heartbeat(self) -> None:
        """Renew this node's lease; after Redis lost it (a restart, or a partition longer than
        the lease), register this node's tunnels and re-push every known revocation."""
        tunnels = self._tunnels_now()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.exists(self._node_key(self.tag))
                pipe.hset(self._node_key(self.tag), mapping={"node": self.node, "url": self.url})
                pipe.pexpire(self._node_key(self.tag), self._ttl_ms)
                pipe.pexpire(self._tunnels_key(self.tag), self._ttl_ms)
                for principal in {record.principal for record in tunnels}:
                    pipe.pexpire(self._caps_key(principal), self._ttl_ms)
                existed = (await pipe.execute())[0]
            if not existed or not self._registered:
                await self._register(tunnels)
        except (RedisError, OSError) as exc:
            self._lost(exc)
            return
        if not self._available:
            log.info("state store available")
            self._available = True
            self._resync_now.set()
        if self._releases and self._releasing is None:
            self._releasing = asyncio.get_running_loop().create_task(self._write_releases())

    def _tunnels_now(self) -> list[TunnelRecord]:
        tunnels = {record.sid: record for record in self._local_tunnels()}
        tunnels.update(self._mine)
        for record in self._releases:
            tunnels.pop(record.sid, None)
        return list(tunnels.values())

    async def _register(self, tunnels: list[TunnelRecord]) -> None:
        now = self._clock()
        async with self._redis.pipeline(transaction=False) as pipe:
            # Rewritten, not merged: entries of tunnels that ended while Redis was away go.
            pipe.delete(self._tunnels_key(self.tag))
            for record in tunnels:
                pipe.hset(self._tunnels_key(self.tag), record.sid, _encode(record))
                pipe.zadd(self._caps_key(record.principal), {f"{self.tag}|{record.sid}": now})
                pipe.pexpire(self._caps_key(record.principal), self._ttl_ms)
            pipe.pexpire(self._tunnels_key(self.tag), self._ttl_ms)
            for revocation in self._live_known(now):
                pipe.zadd(
                    self._revoked_key(revocation.kind), {revocation.subject: revocation.at}, gt=True
                )
            await pipe.execute()
        self._registered = True
        if tunnels:
            log.info("registered %d tunnel(s) with the state store", len(tunnels))

    async def _heartbeats(self) -> None:
        while True:
            # Renew three times per lease; retry about once a second while Redis is down.
            interval = self._lease_ttl / 3 if self._available else min(1.0, self._lease_ttl / 3)
            await asyncio.sleep(interval)
            await self.heartbeat()

    # -- tunnels ----------------------------------------------------------------------------------

    async def claim(self, record: TunnelRecord, per_principal: int) -> str | None:
        try:
            result = await self._claim(
                keys=[
                    self._caps_key(record.principal),
                    self._tunnels_key(self.tag),
                    self._node_key(self.tag),
                ],
                args=[
                    f"{self.tag}|{record.sid}",
                    per_principal,
                    f"{self._prefix}node:",
                    record.sid,
                    _encode(record),
                    record.created,
                    self._ttl_ms,
                    self.node,
                    self.url,
                ],
            )
        except (RedisError, OSError) as exc:
            self._lost(exc)
            raise StateUnavailable(str(exc)) from None
        result = int(result)
        if result < 0:
            self._mine[record.sid] = record
        if result == -2:
            # Our lease was gone (Redis restarted): register our other tunnels again now.
            self._registered = False
            asyncio.get_running_loop().create_task(self.heartbeat())
        if result >= 0:
            return f"too many tunnels for this principal across the cluster (limit {per_principal})"
        return None

    async def release(self, record: TunnelRecord) -> None:
        self.release_soon(record)
        while self._releasing is not None:
            await asyncio.shield(self._releasing)
        if self._releases:
            raise StateUnavailable("release not written")

    def release_soon(self, record: TunnelRecord) -> None:
        self._mine.pop(record.sid, None)
        if len(self._releases) >= MAX_PENDING_RELEASES:
            # Redis has been away for long: the oldest entries are left to the registry rewrite
            # at re-registration and, for cap slots, to the count (which then errs high).
            del self._releases[: MAX_PENDING_RELEASES // 10]
        self._releases.append(record)
        if self._releasing is None and self._available:
            self._releasing = asyncio.get_running_loop().create_task(self._write_releases())

    async def _write_releases(self) -> None:
        """Write queued releases, one pipeline per batch, until none is left or Redis fails
        (then they wait for the next successful heartbeat)."""
        try:
            while self._releases:
                batch = self._releases
                self._releases = []
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for record in batch:
                            member = f"{self.tag}|{record.sid}"
                            pipe.zrem(self._caps_key(record.principal), member)
                            pipe.hdel(self._tunnels_key(self.tag), record.sid)
                        await pipe.execute()
                except (RedisError, OSError) as exc:
                    self._releases[:0] = batch
                    self._lost(exc)
                    return
        finally:
            self._releasing = None

    async def owner(self, sid: str) -> Owner | None:
        tag = sid_tag(sid)
        if tag is None:
            return None
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hget(self._tunnels_key(tag), sid)
                pipe.hmget(self._node_key(tag), ["node", "url"])
                raw, (node, url) = await pipe.execute()
        except (RedisError, OSError) as exc:
            self._lost(exc)
            raise StateUnavailable(str(exc)) from None
        if raw is None or node is None or url is None:
            return None
        record = _decode(sid, raw)
        return Owner(node, url, record) if record is not None else None

    # -- revocations ------------------------------------------------------------------------------

    def _remember(self, revocation: Revocation) -> bool:
        """Keep a revocation; False when one as recent was already known."""
        key = (revocation.kind, revocation.subject)
        known = self._known.get(key)
        if known is not None and known.at >= revocation.at:
            return False
        self._known[key] = revocation
        return True

    def _live_known(self, now: float) -> list[Revocation]:
        horizon = now - self._retention
        for key in [k for k, v in self._known.items() if v.at < horizon]:
            del self._known[key]
        return list(self._known.values())

    async def revoke(self, revocation: Revocation) -> None:
        self._remember(revocation)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                key = self._revoked_key(revocation.kind)
                pipe.zadd(key, {revocation.subject: revocation.at}, gt=True)
                pipe.zremrangebyscore(key, "-inf", f"({self._clock() - self._retention}")
                pipe.publish(self._channel, encode_revocation(revocation))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            # Kept in _known: pushed with the re-registration when Redis is back.
            self._lost(exc)
            self._registered = False

    def _deliver(self, revocation: Revocation) -> None:
        if revocation.at < self._clock() - self._retention:
            return
        if self._remember(revocation):
            try:
                self._on_revocation(revocation)
            except Exception:  # one bad callback must not stop delivery
                log.exception("applying a revocation failed")

    async def resync(self) -> None:
        """Apply every stored revocation this node has not seen (missed pushes)."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for kind in _KINDS:
                    pipe.zrange(self._revoked_key(kind), 0, -1, withscores=True)
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            self._lost(exc)
            return
        for kind, entries in zip(_KINDS, results, strict=True):
            for subject, at in entries:
                self._deliver(Revocation(kind, str(subject), float(at)))

    async def _resyncs(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._resync_interval):
                    await self._resync_now.wait()
            self._resync_now.clear()
            if self._available:
                await self.resync()

    async def _subscribe(self) -> None:
        while True:
            pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self._resync_now.set()  # whatever was pushed while we were not listening
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None or message.get("type") != "message":
                        continue
                    revocation = decode_revocation(message["data"])
                    if revocation is not None and revocation.node != self.node:
                        self._deliver(revocation)
            except (RedisError, OSError) as exc:
                self._lost(exc)
            finally:
                await close_pubsub(pubsub, self._timeout)
            await asyncio.sleep(min(1.0, self._lease_ttl / 3))
