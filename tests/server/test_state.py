"""The shared state stores: the same contract for the in-memory store and the Redis store (real
redis-server on loopback), then what only a cluster has: leases of dead nodes, revocations
pushed and resynced, Redis restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tunnel_server.state import (
    MemoryState,
    RedisState,
    Revocation,
    StateStore,
    StateUnavailable,
    TunnelRecord,
    new_sid,
    node_tag,
    sid_tag,
)
from tunnel_server.state.redis_store import close_pubsub

from ..helpers import UNIT
from ..redis_fixture import RedisServer
from ..reliability.common import eventually

SUBPROTOCOL = "v1.native.tunnel.identity-tunnel"


def record(store: StateStore, principal: str = "user:a@example.com") -> TunnelRecord:
    return TunnelRecord(new_sid(store.tag), principal, SUBPROTOCOL, time.time())


def redis_state(server: RedisServer, node: str, lease_ttl: float = 40 * UNIT) -> RedisState:
    return RedisState(
        server.url,
        node=node,
        advertise_url=f"ws://127.0.0.1:1/{node}",
        prefix="t:",
        lease_ttl=lease_ttl,
        resync_interval=20 * UNIT,
    )


async def poll(check: Callable[[], Awaitable[bool]], limit: float = 100 * UNIT) -> None:
    """``eventually`` for a condition that needs a Redis round trip to check. The deadline is
    checked too: a client library that swallowed the timeout's cancellation must not turn a
    failure into a hang."""
    deadline = asyncio.get_running_loop().time() + limit
    async with asyncio.timeout(limit):
        while not await check():  # noqa: ASYNC110
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"not true after {limit} s")
            await asyncio.sleep(UNIT)


@pytest.fixture(params=["memory", "redis"])
async def store(
    request: pytest.FixtureRequest,
    redis: RedisServer,
) -> AsyncIterator[StateStore]:
    state: StateStore = (
        MemoryState("node-a") if request.param == "memory" else redis_state(redis, "node-a")
    )
    await state.start(on_revocation=lambda revocation: None, local_tunnels=lambda: ())
    try:
        yield state
    finally:
        await state.aclose()


def test_tunnel_ids_carry_the_owner_tag() -> None:
    tag = node_tag("relay-0.relay.svc")
    assert tag == node_tag("relay-0.relay.svc") != node_tag("relay-1.relay.svc")
    sid = new_sid(tag)
    assert sid_tag(sid) == tag
    assert sid_tag("short") is None
    assert all(c.isalnum() or c in "-_" for c in sid)  # the IAP sid alphabet


async def test_contract_claim_release_owner(store: StateStore) -> None:
    first, second, third = (record(store) for _ in range(3))
    assert await store.claim(first, 2) is None
    assert await store.claim(second, 2) is None
    refusal = await store.claim(third, 2)
    assert refusal is not None
    assert "limit 2" in refusal
    other = record(store, "user:b@example.com")
    assert await store.claim(other, 2) is None  # caps are per principal
    owner = await store.owner(first.sid)
    assert owner is not None
    assert owner.node == "node-a"
    assert owner.record == first
    await store.release(first)
    assert await store.owner(first.sid) is None
    assert await store.claim(third, 2) is None  # the released slot is free again
    assert await store.owner(new_sid(store.tag)) is None
    assert await store.owner("not-a-cluster-sid") is None


async def test_caps_hold_across_nodes_and_owner_is_found_elsewhere(
    redis: RedisServer,
) -> None:
    a, b = redis_state(redis, "node-a"), redis_state(redis, "node-b")
    for state in (a, b):
        await state.start(on_revocation=lambda revocation: None, local_tunnels=lambda: ())
    try:
        on_a = record(a)
        assert await a.claim(on_a, 2) is None
        assert await b.claim(record(b), 2) is None
        assert await b.claim(record(b), 2) is not None
        assert await a.claim(record(a), 2) is not None
        owner = await b.owner(on_a.sid)
        assert owner is not None
        assert (owner.node, owner.url) == ("node-a", "ws://127.0.0.1:1/node-a")
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_dead_nodes_leases_expire(redis: RedisServer) -> None:
    alive = redis_state(redis, "node-a")
    await alive.start(on_revocation=lambda revocation: None, local_tunnels=lambda: ())
    # A node that claims and then never renews its lease: a crashed process.
    dead = redis_state(redis, "node-dead", lease_ttl=10 * UNIT)
    held = record(dead)
    try:
        assert await dead.claim(held, 1) is None
        assert await alive.claim(record(alive), 1) is not None
        assert await alive.owner(held.sid) is not None
        started = time.monotonic()

        async def claimed() -> bool:
            return await alive.claim(record(alive), 1) is None

        await poll(claimed)
        assert time.monotonic() - started >= 5 * UNIT  # not before the lease ran out
        assert await alive.owner(held.sid) is None
    finally:
        await alive.aclose()
        await dead.aclose()


async def test_revocations_are_pushed_and_missed_ones_resynced(
    redis: RedisServer,
) -> None:
    seen_b: list[Revocation] = []
    a, b = redis_state(redis, "node-a"), redis_state(redis, "node-b")
    await a.start(on_revocation=lambda revocation: None, local_tunnels=lambda: ())
    await b.start(on_revocation=seen_b.append, local_tunnels=lambda: ())
    try:
        pushed = Revocation("user", "user:x@example.com", time.time(), "user:admin", "node-a")
        await a.revoke(pushed)
        await eventually(lambda: len(seen_b) == 1)
        assert seen_b[0].subject == "user:x@example.com"
        # A node that starts later (it missed the push) converges from the stored set.
        seen_c: list[Revocation] = []
        c = redis_state(redis, "node-c")
        await c.start(on_revocation=seen_c.append, local_tunnels=lambda: ())
        await c.aclose()
        assert [r.subject for r in seen_c] == ["user:x@example.com"]
        # The same revocation again is not applied twice.
        await a.revoke(pushed)
        await a.revoke(Revocation("session", new_sid(a.tag), time.time(), None, "node-a"))
        await eventually(lambda: len(seen_b) == 2)
        assert seen_b[1].kind == "session"
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_down_then_restarted_loses_nothing(redis: RedisServer) -> None:
    held: list[TunnelRecord] = []
    seen_b: list[Revocation] = []
    a = redis_state(redis, "node-a", lease_ttl=15 * UNIT)
    b = redis_state(redis, "node-b", lease_ttl=15 * UNIT)
    await a.start(on_revocation=lambda revocation: None, local_tunnels=lambda: held)
    await b.start(on_revocation=seen_b.append, local_tunnels=lambda: ())
    try:
        tunnel, ended = record(a), record(a)
        assert await a.claim(tunnel, 2) is None
        assert await a.claim(ended, 2) is None
        held.append(tunnel)
        await redis.stop()
        with pytest.raises(StateUnavailable):
            await a.claim(record(a), 2)
        assert not a.available
        a.release_soon(ended)  # a tunnel that ends while Redis is away
        with pytest.raises(StateUnavailable):
            await a.release(ended)
        # Revoked while Redis is down: kept, and pushed once it is back.
        revoked_at = time.time()
        await a.revoke(Revocation("user", "user:y@example.com", revoked_at, None, "node-a"))
        await redis.start()  # empty: no persistence
        await eventually(lambda: a.available and b.available)
        await eventually(lambda: [r.subject for r in seen_b] == ["user:y@example.com"])
        # a registered its open tunnel again: the registry finds it, the cap still holds.

        async def registered() -> bool:
            return await b.owner(tunnel.sid) is not None

        await poll(registered)
        assert await b.owner(ended.sid) is None
        # The open tunnel still counts; the one that ended does not.
        assert await b.claim(record(b), 2) is None
        assert await b.claim(record(b), 2) is not None
    finally:
        await a.aclose()
        await b.aclose()


async def test_releases_are_batched(redis: RedisServer) -> None:
    a = redis_state(redis, "node-a")
    await a.start(on_revocation=lambda revocation: None, local_tunnels=lambda: ())
    try:
        tunnels = [record(a) for _ in range(50)]
        for tunnel in tunnels:
            assert await a.claim(tunnel, 100) is None
        for tunnel in tunnels:
            a.release_soon(tunnel)  # no round trip each: queued for one pipeline
        await a.release(record(a))  # waits for the batch
        for tunnel in tunnels:
            assert await a.owner(tunnel.sid) is None
        assert await a.claim(record(a), 1) is None  # every slot is free again
    finally:
        await a.aclose()


async def test_a_clean_exit_frees_its_slots_at_once(redis: RedisServer) -> None:
    held: list[TunnelRecord] = []
    a, b = redis_state(redis, "node-a"), redis_state(redis, "node-b")
    await a.start(on_revocation=lambda revocation: None, local_tunnels=lambda: held)
    await b.start(on_revocation=lambda revocation: None, local_tunnels=lambda: ())
    try:
        tunnel = record(a)
        assert await a.claim(tunnel, 1) is None
        held.append(tunnel)
        assert await b.claim(record(b), 1) is not None
        await a.aclose()
        assert await b.claim(record(b), 1) is None
        assert await b.owner(tunnel.sid) is None
    finally:
        await b.aclose()


class _HangingPubSub:
    """A subscription whose ``aclose`` never returns (redis/redis-py#3941)."""

    def __init__(self) -> None:
        self.connection = self
        self.dropped = False

    async def aclose(self) -> None:
        await asyncio.Event().wait()

    async def disconnect(self, *, nowait: bool = False) -> None:
        self.dropped = nowait


async def test_a_subscription_that_never_closes_is_dropped() -> None:
    pubsub = _HangingPubSub()
    async with asyncio.timeout(40 * UNIT):
        await close_pubsub(pubsub, UNIT)  # type: ignore[arg-type]
    assert pubsub.dropped
