"""Browser sessions in Redis shared by several HTTP-mode nodes: the store against a real
redis-server (round trip, expiry, one-use pending logins, per-principal deletion, ended-session
announcements, Redis down), then two proxies sharing one Redis: a login through one node works
on the other, and a sign-out or a revocation on either ends the session and its WebSockets on
both."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tunnel_server.access.identity import Identity
from tunnel_server.config import StateConfig
from tunnel_server.web import (
    MemorySessionStore,
    RedisSessionStore,
    SessionStoreUnavailable,
    WebSession,
    build_session_store,
    session_key,
)
from tunnel_server.web.redis_sessions import identity_from_dict, identity_to_dict
from tunnel_server.web.sessions import PendingLogin, SessionTooLarge
from tunnel_upstream import verify_assertion

from ..helpers import UNIT
from ..oidc_fixture import TestIssuer
from ..redis_fixture import RedisServer
from .harness import APP_AUDIENCE, Stack, TokenEndpoint, proxy_stack, web_policy

ALICE = "user:alice@example.com"
PREFIX = "t:"
WAIT = 20 * UNIT  # everything announced arrives within this (1 s at the default unit)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def identity(email: str = "alice@example.com", **changes: Any) -> Identity:
    now = time.time()
    base = Identity(
        principal=f"user:{email}", subject=email.split("@")[0], issuer="https://idp",
        email=email, groups=("dev", "ops"), expires_at=now + 3600,
        members=frozenset({f"user:{email}", "group:dev", "group:ops"}),
        valid_until=now + 3630.5, issued_at=now - 1.25,
    )  # fmt: skip
    return replace(base, **changes)


def web_session(sid: str, who: Identity | None = None, *, ttl: float = 3600) -> WebSession:
    now = time.time()
    return WebSession(
        sid=sid, identity=who or identity(), origin="http://demo.localhost:8080",
        created=now, auth_time=now - 5, expires=now + ttl,
    )  # fmt: skip


def pending(state: str, *, ttl: float = 600) -> PendingLogin:
    return PendingLogin(
        state=state, nonce="n-" + state, verifier="v" * 64, return_to="/x?y=1",
        host="http://demo.localhost:8080", browser="b-" + state, expires=time.time() + ttl,
    )  # fmt: skip


def make_store(server: RedisServer, clock: Callable[[], float] = time.time) -> RedisSessionStore:
    """One node's store, with its own client (as every node has)."""
    client = Redis.from_url(
        server.url, socket_timeout=WAIT, socket_connect_timeout=WAIT, retry=Retry(NoBackoff(), 1)
    )
    return RedisSessionStore(
        client, PREFIX, timeout=WAIT, clock=clock, reconnect_delays=(UNIT, 4 * UNIT),
        poll=4 * UNIT, owns_client=True,
    )  # fmt: skip


@pytest.fixture
async def stores(redis: RedisServer) -> AsyncIterator[Callable[..., RedisSessionStore]]:
    made: list[RedisSessionStore] = []

    def factory(clock: Callable[[], float] = time.time) -> RedisSessionStore:
        made.append(make_store(redis, clock))
        return made[-1]

    yield factory
    for store in made:
        await store.aclose()


class Raw:
    """A plain client to look at (and tamper with) what the stores wrote."""

    def __init__(self, server: RedisServer) -> None:
        self.client = Redis.from_url(server.url, decode_responses=True)
        self._r: Any = self.client  # redis-py types these commands as sync-or-async

    async def keys(self) -> set[str]:
        return set(await self._r.keys("*"))

    async def members(self, key: str) -> set[str]:
        return set(await self._r.smembers(key))

    async def expires_ms(self, key: str) -> int:
        return int(await self._r.pexpiretime(key))

    async def get(self, key: str) -> str | None:
        value = await self._r.get(key)
        return None if value is None else str(value)

    async def exists(self, key: str) -> bool:
        return bool(await self._r.exists(key))

    async def set(self, key: str, value: str) -> None:
        await self._r.set(key, value)

    async def delete(self, key: str) -> None:
        await self._r.delete(key)


@pytest.fixture
async def raw(redis: RedisServer) -> AsyncIterator[Raw]:
    inspector = Raw(redis)
    yield inspector
    await inspector.client.aclose()


@dataclass
class Listener:
    ended: asyncio.Queue[set[str]] = field(default_factory=asyncio.Queue)
    subscribed: asyncio.Queue[None] = field(default_factory=asyncio.Queue)

    def on_ended(self, keys: Collection[str]) -> None:
        self.ended.put_nowait(set(keys))

    def on_gap(self) -> None:
        self.subscribed.put_nowait(None)

    async def next_ended(self) -> set[str]:
        async with asyncio.timeout(WAIT):
            return await self.ended.get()

    async def next_subscription(self) -> None:
        async with asyncio.timeout(WAIT):
            await self.subscribed.get()


@asynccontextmanager
async def listening(store: RedisSessionStore | MemorySessionStore) -> AsyncIterator[Listener]:
    listener = Listener()
    task = asyncio.create_task(store.listen(listener.on_ended, listener.on_gap))
    try:
        await listener.next_subscription()
        yield listener
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- the store ------------------------------------------------------------------------------------


def test_identity_round_trips_and_refuses_wrong_types() -> None:
    for who in (
        identity(),
        replace(identity(), email=None, issued_at=None, groups=()),
        identity(groups=("é",)),
    ):
        assert identity_from_dict(json.loads(json.dumps(identity_to_dict(who)))) == who
    good = identity_to_dict(identity())
    for name, value in [("members", "group:dev"), ("groups", [1]), ("expires_at", "soon"),
                        ("valid_until", True), ("email", 3), ("principal", None)]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            identity_from_dict({**good, name: value})
    with pytest.raises(KeyError):
        identity_from_dict({k: v for k, v in good.items() if k != "subject"})


async def test_round_trip_keys_and_ttls(stores: Callable[..., RedisSessionStore], raw: Raw) -> None:
    store = stores()
    session = web_session("sid-1")
    await store.put(session)
    assert await store.get("sid-1") == session  # identity included: tuple and frozenset back
    assert await stores().get("sid-1") == session  # another node sees it
    assert await store.get("sid-unknown") is None
    key = session_key("sid-1")
    assert await raw.keys() == {f"{PREFIX}web:{key}", f"{PREFIX}webp:{ALICE}"}
    assert await raw.members(f"{PREFIX}webp:{ALICE}") == {key}
    expires_ms = math.ceil(session.expires * 1000)
    assert await raw.expires_ms(f"{PREFIX}web:{key}") == expires_ms
    assert await raw.expires_ms(f"{PREFIX}webp:{ALICE}") == expires_ms
    # The cookie value is a credential: it is in no key and no value.
    stored = await raw.get(f"{PREFIX}web:{key}")
    assert stored is not None
    assert "sid-1" not in stored
    # The principal's set lives as long as its latest session.
    later = web_session("sid-2", ttl=7200)
    await store.put(later)
    assert await raw.expires_ms(f"{PREFIX}webp:{ALICE}") == math.ceil(later.expires * 1000)
    await store.put(web_session("sid-3", ttl=60))
    assert await raw.expires_ms(f"{PREFIX}webp:{ALICE}") == math.ceil(later.expires * 1000)


async def test_expiry_and_bounds(stores: Callable[..., RedisSessionStore], raw: Raw) -> None:
    clock = Clock()
    store = stores(clock)
    session = web_session("sid-e", ttl=60)
    await store.put(session)
    await store.put_pending(login := pending("st-e", ttl=30))
    assert await raw.expires_ms(f"{PREFIX}pending:st-e") == math.ceil(login.expires * 1000)
    assert await store.get("sid-e") == session
    clock.now = session.expires  # Redis drops it at PXAT; a reader never trusts a late copy
    assert await store.get("sid-e") is None
    assert await store.pop_pending("st-e") is None
    await store.put(web_session("sid-past", ttl=30))  # already over by this clock: not stored
    assert not await raw.exists(f"{PREFIX}web:{session_key('sid-past')}")
    # Oversize records are refused; unreadable ones are no session.
    clock.now = time.time()
    huge = web_session("sid-big", identity(groups=tuple(f"g{i:05}" for i in range(20000))))
    with pytest.raises(SessionTooLarge):
        await store.put(huge)
    await raw.set(f"{PREFIX}web:{session_key('sid-bad')}", '{"v": 1, "identity": []}')
    assert await store.get("sid-bad") is None
    await raw.set(f"{PREFIX}web:{session_key('sid-junk')}", "not json")
    assert await store.get("sid-junk") is None
    await raw.set(f"{PREFIX}web:{session_key('sid-v2')}", '{"v": 2}')
    assert await store.get("sid-v2") is None


async def test_pending_login_is_one_use_across_nodes(
    stores: Callable[..., RedisSessionStore],
) -> None:
    a, b = stores(), stores()
    for round_ in range(20):
        state = f"st-{round_}"
        await a.put_pending(pending(state))
        results = await asyncio.gather(a.pop_pending(state), b.pop_pending(state))
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        assert (winners[0].state, winners[0].nonce) == (state, "n-" + state)
        assert await a.pop_pending(state) is None


async def test_delete_principal_and_announcements(
    stores: Callable[..., RedisSessionStore], raw: Raw
) -> None:
    a, b = stores(), stores()
    bob = identity("bob@example.com")
    for sid in ("a1", "a2", "a3"):
        await a.put(web_session(sid))
    await a.put(web_session("b1", bob))
    async with listening(b) as heard:
        assert await a.delete_principal(ALICE) == 3
        assert await heard.next_ended() == {session_key(s) for s in ("a1", "a2", "a3")}
        for sid in ("a1", "a2", "a3"):
            assert await b.get(sid) is None
        assert await b.get("b1") is not None
        assert not await raw.exists(f"{PREFIX}webp:{ALICE}")
        assert await a.delete_principal(ALICE) == 0
        await b.delete("b1")  # a single sign-out, announced too (from the node that did it)
        assert await heard.next_ended() == {session_key("b1")}
        assert await raw.members(f"{PREFIX}webp:user:bob@example.com") == set()
        await b.delete("b1")  # nothing left: nothing announced
        assert heard.ended.empty()


async def test_redis_down_fails_closed_then_recovers(
    stores: Callable[..., RedisSessionStore], redis: RedisServer
) -> None:
    store = stores()
    await store.put(web_session("sid-d"))
    async with listening(store) as heard:
        await redis.stop()
        with pytest.raises(SessionStoreUnavailable):
            await store.get("sid-d")
        for call in (
            store.put(web_session("sid-x")),
            store.delete("sid-d"),
            store.delete_principal(ALICE),
            store.put_pending(pending("st-d")),
            store.pop_pending("st-d"),
        ):
            with pytest.raises(SessionStoreUnavailable):
                await call
        await redis.start()  # empty, same port: the client and the listener reconnect
        await heard.next_subscription()
        assert await store.get("sid-d") is None
        await store.put(web_session("sid-r"))
        await stores().delete("sid-r")
        assert await heard.next_ended() == {session_key("sid-r")}


async def test_memory_store_speaks_the_same_interface() -> None:
    store = MemorySessionStore()
    async with listening(store) as heard:
        first = web_session("m1")
        await store.put(first)
        await store.put(web_session("m2"))
        assert await store.get("m1") == first
        assert await store.delete_principal(ALICE) == 2
        assert await heard.next_ended() == {session_key("m1"), session_key("m2")}
        await store.put_pending(pending("st-m"))
        assert await store.pop_pending("st-m") is not None
        assert await store.pop_pending("st-m") is None


async def test_build_session_store_from_the_state_config(redis: RedisServer) -> None:
    assert isinstance(build_session_store(StateConfig()), MemorySessionStore)
    config = StateConfig(backend="redis", redis_url=redis.url, key_prefix="x:", timeout=WAIT)
    store = build_session_store(config)  # its own client, closed by aclose
    assert isinstance(store, RedisSessionStore)
    assert store.channel == "x:web-ended"
    session = web_session("sid-f")
    await store.put(session)
    assert await store.get("sid-f") == session
    await store.aclose()


# -- two proxies sharing one Redis ----------------------------------------------------------------


@asynccontextmanager
async def two_nodes(
    issuer: TestIssuer, redis: RedisServer, idp: TokenEndpoint
) -> AsyncIterator[tuple[Stack, Stack]]:
    policy = web_policy({"demo": [ALICE]})
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                proxy_stack(
                    issuer.issuer,
                    policy,
                    apps=("demo",),
                    login=idp.login,
                    extra={"recheck_interval": 600},
                    store=make_store(redis),
                )  # fmt: skip
            )
            for _ in range(2)
        ]
        for node in nodes:
            async with asyncio.timeout(WAIT):
                await node.proxy.listening.wait()
        yield nodes[0], nodes[1]


async def sign_in(
    http: aiohttp.ClientSession, start: Stack, finish: Stack, idp: TokenEndpoint, host: str
) -> str:
    """A browser login that starts on ``start`` and whose callback lands on ``finish``; the
    session cookie's value."""
    async with http.get(
        start.base + "/_tunnel/sign_in?rd=/headers", headers={"Host": host},
        allow_redirects=False,
    ) as resp:  # fmt: skip
        assert resp.status == 302
        location = resp.headers["Location"]
        browser = resp.cookies["__Host-tunnel_login"].value
    async with http.get(
        finish.base + "/_tunnel/callback", params=idp.authorize(location),
        headers={"Host": host, "Cookie": f"__Host-tunnel_login={browser}"},
        allow_redirects=False,
    ) as resp:  # fmt: skip
        assert resp.status == 302, await resp.text()
        assert resp.headers["Location"] == "/headers"
        return resp.cookies["__Host-tunnel_session"].value


async def status_of(
    http: aiohttp.ClientSession, node: Stack, headers: dict[str, str], path: str = "/headers"
) -> tuple[int, str]:
    async with http.get(node.base + path, headers=headers, allow_redirects=False) as resp:
        return resp.status, resp.headers.get("Location", "")


async def closed_within(ws: aiohttp.ClientWebSocketResponse, seconds: float) -> aiohttp.WSMessage:
    async with asyncio.timeout(seconds):
        while True:
            message = await ws.receive()
            if message.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.CLOSING,
            ):
                return message


async def test_login_on_one_node_sign_out_on_another_ends_it_everywhere(
    issuer: TestIssuer, redis: RedisServer
) -> None:
    async with TokenEndpoint(issuer) as idp, two_nodes(issuer, redis, idp) as (a, b):
        # Behind a load balancer every node sees the public Host (here node A's).
        host = a.host()
        async with aiohttp.ClientSession() as http:
            sid = await sign_in(http, a, b, idp, host)  # the callback landed on B
            cookie = {"Host": host, "Cookie": f"__Host-tunnel_session={sid}"}
            for node in (a, b):
                async with http.get(node.base + "/headers", headers=cookie) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["claims"]["email"] == "alice@example.com"
            async with http.get(b.base + "/_tunnel/identity", headers=cookie) as resp:
                csrf = (await resp.json())["csrf_token"]
            origin = {**cookie, "Origin": f"http://{host}"}
            async with http.ws_connect(a.base + "/ws", headers=origin) as ws:
                await ws.send_str("ping")
                assert await ws.receive_str() == "ping"
                async with http.post(
                    b.base + "/_tunnel/sign_out", headers={**cookie, "X-Tunnel-Csrf": csrf}
                ) as resp:
                    assert resp.status == 200
                await closed_within(ws, WAIT)
                assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
            assert any('"reason":"session ended"' in line for line in a.audit)
            xhr = {**cookie, "X-Requested-With": "XMLHttpRequest", "Accept": "text/html"}
            assert await status_of(http, a, xhr) == (401, "")
            status, location = await status_of(http, a, {**cookie, "Accept": "text/html"})
            assert status == 302
            assert location.startswith("/_tunnel/sign_in?rd=")


async def test_revocation_on_one_node_closes_websockets_on_another(
    issuer: TestIssuer, redis: RedisServer
) -> None:
    async with TokenEndpoint(issuer) as idp, two_nodes(issuer, redis, idp) as (a, b):
        host = a.host()
        async with aiohttp.ClientSession() as http:
            sid = await sign_in(http, a, a, idp, host)
            cookie = {"Host": host, "Cookie": f"__Host-tunnel_session={sid}"}
            origin = {**cookie, "Origin": f"http://{host}"}
            async with http.ws_connect(a.base + "/ws", headers=origin) as ws:
                assert b.proxy.revoke_user(ALICE) == 0  # nothing open on B itself
                await closed_within(ws, WAIT)
            await b.proxy.idle()
            assert await a.proxy.store.get(sid) is None
            assert await status_of(http, b, cookie) == (401, "")


async def test_a_missed_announcement_is_caught_by_the_session_recheck(
    issuer: TestIssuer, redis: RedisServer, raw: Raw
) -> None:
    async with TokenEndpoint(issuer) as idp, two_nodes(issuer, redis, idp) as (a, _b):
        host = a.host()
        async with aiohttp.ClientSession() as http:
            sid = await sign_in(http, a, a, idp, host)
            headers = {"Host": host, "Cookie": f"__Host-tunnel_session={sid}"}
            async with http.ws_connect(
                a.base + "/ws", headers={**headers, "Origin": f"http://{host}"}
            ) as ws:
                assert await a.proxy.recheck_sessions() == 0
                await raw.delete(f"{PREFIX}web:{session_key(sid)}")  # gone, never announced
                assert await a.proxy.recheck_sessions() == 1
                await closed_within(ws, WAIT)


async def test_redis_down_is_503_not_a_sign_in_loop(issuer: TestIssuer, redis: RedisServer) -> None:
    async with TokenEndpoint(issuer) as idp, two_nodes(issuer, redis, idp) as (a, _b):
        host = a.host()
        async with aiohttp.ClientSession() as http:
            sid = await sign_in(http, a, a, idp, host)
            cookie = {"Host": host, "Cookie": f"__Host-tunnel_session={sid}"}
            assert await status_of(http, a, cookie) == (200, "")
            await redis.stop()
            for headers in (cookie, {**cookie, "Accept": "text/html"}):
                async with http.get(a.base + "/", headers=headers, allow_redirects=False) as resp:
                    assert resp.status == 503
                    assert resp.headers["Retry-After"] == "5"
                    assert resp.headers["Cache-Control"] == "no-store"
                    body = await resp.text()
            assert "temporarily unavailable" in body  # the HTML page, not a redirect
            # Signing in (again) needs the store as well: 503, not a redirect to the IdP.
            async with http.get(
                a.base + "/_tunnel/sign_in", headers={"Host": host}, allow_redirects=False
            ) as resp:
                assert resp.status == 503
            # Sign-out cannot end the session: 503, and the cookie is kept for a retry.
            async with http.post(
                a.base + "/_tunnel/sign_out", headers={**cookie, "X-Tunnel-Csrf": "x"}
            ) as resp:
                assert resp.status == 503
                assert "Set-Cookie" not in resp.headers
            # Bearer callers never touch the session store.
            token = issuer.mint(aud=APP_AUDIENCE)
            bearer = {"Host": host, "Authorization": f"Bearer {token}"}
            assert await status_of(http, a, bearer) == (200, "")
        denied = [json.loads(line) for line in a.audit if '"status":503' in line]
        assert {r["event"] for r in denied} == {"http", "http_login", "http_logout"}
        assert all(r["reason"].startswith("session store unavailable") for r in denied)
        assert all(sid not in line for line in a.audit)


async def test_every_node_serves_every_nodes_signing_keys(
    issuer: TestIssuer, redis: RedisServer
) -> None:
    """Upstreams fetch the JWKS through the load balancer, from whichever node: an assertion
    signed on node B verifies against node A's JWKS, also after B rotates its key."""
    async with TokenEndpoint(issuer) as idp, two_nodes(issuer, redis, idp) as (a, b):
        signer = b.proxy.signer
        assertion = signer.sign(
            audience="app-b", subject="alice", email="alice@example.com", groups=(),
            principal=ALICE,
        )  # fmt: skip
        jwks = await a.proxy.keys.jwks()
        claims = verify_assertion(assertion, audience="app-b", issuer=signer.issuer, jwks=jwks)
        assert claims["email"] == "alice@example.com"
        assert {k["kid"] for k in jwks["keys"]} >= {
            a.proxy.signer.current.kid,
            signer.current.kid,
        }
        # B rotates: the new key reaches A's JWKS (after A's short cache), the old stays.
        old = signer.current.kid
        signer.rotate()
        b.proxy.keys.ensure_published()
        await b.proxy.idle()
        a.proxy.keys._cached = None  # skip the 5 s cache instead of waiting for it
        kids = {k["kid"] for k in (await a.proxy.keys.jwks())["keys"]}
        assert {old, signer.current.kid} <= kids
