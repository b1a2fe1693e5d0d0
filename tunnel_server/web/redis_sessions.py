"""Browser sessions in Redis, shared by every relay node (docs/http-mode.md, "Several nodes").

Keys (``P`` = the configured prefix, e.g. ``tunnel:``; ``K`` = ``session_key(sid)``)::

    P web:K             JSON session (the cookie's id itself is never stored), PXAT its expiry
    P webp:PRINCIPAL    set of K, for delete_principal; expires with its latest session
    P pending:STATE     JSON pending login, PXAT its expiry; taken with GETDEL (one use)
    P web-ended         channel: JSON list of K for sessions ended by delete/delete_principal

Records are JSON written and read field by field (no pickle), at most ``max_record`` bytes;
anything unreadable is no session. Pending logins are bounded by their TTL (login_timeout).

Errors: a Redis connection error, timeout (``timeout`` bounds every call, retries included) or
read-only replica raises ``SessionStoreUnavailable``; the proxy answers 503 (fail closed)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar, cast

import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..access.identity import Identity
from ..state.redis_store import close_pubsub
from .sessions import (
    EndedCallback,
    GapCallback,
    PendingLogin,
    SessionStoreUnavailable,
    SessionTooLarge,
    WebSession,
    session_key,
)

log = logging.getLogger("tunnel.http.sessions")

MAX_RECORD = 64 * 1024  # bytes of JSON per session or pending login
PRUNE_ABOVE = 64  # a principal's key set is pruned of expired sessions past this size
ANNOUNCE_BATCH = 256  # session keys per notification message
_FORMAT = 1
_KEY = re.compile(r"^[0-9a-f]{64}$")
_DOWN = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica after failover
    TimeoutError,  # our own bound on the call
    OSError,
)


# -- records <-> JSON (explicit, validated) ------------------------------------------------------


def _str(data: dict[str, Any], name: str) -> str:
    value = data[name]
    if not isinstance(value, str):
        raise ValueError(f"{name}: not a string")
    return value


def _opt_str(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    return None if value is None else _str(data, name)


def _num(data: dict[str, Any], name: str) -> float:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: not a number")
    return float(value)


def _opt_num(data: dict[str, Any], name: str) -> float | None:
    return None if data.get(name) is None else _num(data, name)


def _strs(data: dict[str, Any], name: str) -> list[str]:
    value = data[name]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name}: not a list of strings")
    return value


def identity_to_dict(identity: Identity) -> dict[str, Any]:
    return {
        "principal": identity.principal,
        "subject": identity.subject,
        "issuer": identity.issuer,
        "email": identity.email,
        "groups": list(identity.groups),
        "expires_at": identity.expires_at,
        "members": sorted(identity.members),
        "valid_until": identity.valid_until,
        "issued_at": identity.issued_at,
    }


def identity_from_dict(data: dict[str, Any]) -> Identity:
    """Raises ValueError (KeyError included) for anything but what ``identity_to_dict`` wrote."""
    return Identity(
        principal=_str(data, "principal"),
        subject=_str(data, "subject"),
        issuer=_str(data, "issuer"),
        email=_opt_str(data, "email"),
        groups=tuple(_strs(data, "groups")),
        expires_at=_num(data, "expires_at"),
        members=frozenset(_strs(data, "members")),
        valid_until=_num(data, "valid_until"),
        issued_at=_opt_num(data, "issued_at"),
    )


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps({"v": _FORMAT, **data}, separators=(",", ":")).encode()


def _load(raw: bytes | str) -> dict[str, Any]:
    if len(raw) > MAX_RECORD:
        raise ValueError("record too large")
    data = json.loads(raw)
    if not isinstance(data, dict) or data.get("v") != _FORMAT:
        raise ValueError("not a record of this format")
    return data


def session_to_json(session: WebSession) -> bytes:
    """The session without its id (the key is derived from it)."""
    return _dump(
        {
            "identity": identity_to_dict(session.identity),
            "origin": session.origin,
            "created": session.created,
            "auth_time": session.auth_time,
            "expires": session.expires,
            "csrf": session.csrf,
        }
    )


def session_from_json(raw: bytes | str, sid: str) -> WebSession:
    try:
        data = _load(raw)
        identity = data["identity"]
        if not isinstance(identity, dict):
            raise ValueError("identity: not an object")
        return WebSession(
            sid=sid,
            identity=identity_from_dict(identity),
            origin=_str(data, "origin"),
            created=_num(data, "created"),
            auth_time=_num(data, "auth_time"),
            expires=_num(data, "expires"),
            csrf=_str(data, "csrf"),
        )
    except KeyError as exc:
        raise ValueError(f"missing {exc}") from None


def pending_to_json(pending: PendingLogin) -> bytes:
    return _dump(
        {
            "state": pending.state,
            "nonce": pending.nonce,
            "verifier": pending.verifier,
            "return_to": pending.return_to,
            "host": pending.host,
            "browser": pending.browser,
            "expires": pending.expires,
        }
    )


def pending_from_json(raw: bytes | str) -> PendingLogin:
    try:
        data = _load(raw)
        return PendingLogin(
            state=_str(data, "state"),
            nonce=_str(data, "nonce"),
            verifier=_str(data, "verifier"),
            return_to=_str(data, "return_to"),
            host=_str(data, "host"),
            browser=_str(data, "browser"),
            expires=_num(data, "expires"),
        )
    except KeyError as exc:
        raise ValueError(f"missing {exc}") from None


_T = TypeVar("_T")


def _awaited(value: Awaitable[_T] | _T) -> Awaitable[_T]:
    """redis-py types some commands as sync-or-async; on the asyncio client they are async."""
    return cast("Awaitable[_T]", value)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _ms(when: float) -> int:
    return math.ceil(when * 1000)


# -- the store ---------------------------------------------------------------------------------


class RedisSessionStore:
    """``SessionStore`` on a ``redis.asyncio.Redis`` client (bytes or decoded responses alike).
    ``aclose`` closes the client only when this store made it (``from_url``)."""

    def __init__(
        self,
        client: Redis,
        prefix: str = "tunnel:",
        *,
        timeout: float | None = 1.0,
        clock: Callable[[], float] = time.time,
        max_record: int = MAX_RECORD,
        reconnect_delays: tuple[float, float] = (0.1, 5.0),
        poll: float = 1.0,
        owns_client: bool = False,
    ) -> None:
        self._client = client
        self._owns_client = owns_client
        self._prefix = prefix
        self._timeout = timeout
        self._clock = clock
        self._max_record = max_record
        self._delays = reconnect_delays
        self._poll = poll
        self.channel = f"{prefix}web-ended"

    @classmethod
    def from_url(
        cls,
        url: str,
        prefix: str = "tunnel:",
        *,
        timeout: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> RedisSessionStore:
        """A store with its own client: connect and read timeouts of ``timeout``, one immediate
        retry (a pooled connection that died with a Redis restart reconnects at once)."""
        client = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 1),
        )
        return cls(client, prefix, timeout=timeout, clock=clock, owns_client=True)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    def _web(self, key: str) -> str:
        return f"{self._prefix}web:{key}"

    # -- assertion keys ----------------------------------------------------------------------

    async def publish_key(self, jwk: dict[str, Any], expires: float) -> None:
        kid = str(jwk["kid"])
        async with self._guard("publish key"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hset(f"{self._prefix}jwks", kid, json.dumps(jwk, separators=(",", ":")))
                pipe.zadd(f"{self._prefix}jwks:expires", {kid: expires})
                await pipe.execute()

    async def published_keys(self) -> list[dict[str, Any]]:
        keys_key, expires_key = f"{self._prefix}jwks", f"{self._prefix}jwks:expires"
        now = self._clock()
        async with self._guard("published keys"):
            expired = await self._client.zrangebyscore(expires_key, "-inf", now)
            if expired:
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.hdel(keys_key, *expired)
                    pipe.zrem(expires_key, *expired)
                    await pipe.execute()
            raw = await _awaited(self._client.hgetall(keys_key))
        keys = []
        for value in raw.values():
            try:
                jwk = json.loads(value)
            except ValueError:
                continue
            if isinstance(jwk, dict) and jwk.get("kty") == "EC" and isinstance(jwk.get("kid"), str):
                keys.append(jwk)
        return keys

    def _principal(self, principal: str) -> str:
        return f"{self._prefix}webp:{principal}"

    def _pending(self, state: str) -> str:
        return f"{self._prefix}pending:{state}"

    @asynccontextmanager
    async def _guard(self, what: str) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._timeout):
                yield
        except _DOWN as exc:
            raise SessionStoreUnavailable(
                f"session store unavailable ({what}: {type(exc).__name__})"
            ) from exc

    # -- sessions ----------------------------------------------------------------------------

    async def get(self, sid: str) -> WebSession | None:
        async with self._guard("get"):
            raw = await self._client.get(self._web(session_key(sid)))
        if raw is None:
            return None
        try:
            session = session_from_json(raw, sid)
        except ValueError as exc:
            log.warning("unreadable session record ignored: %s", exc)
            return None
        return session if session.expires > self._clock() else None

    async def put(self, session: WebSession) -> None:
        data = session_to_json(session)
        if len(data) > self._max_record:
            raise SessionTooLarge(f"session of {len(data)} bytes (limit {self._max_record})")
        if session.expires <= self._clock():
            return
        key = session_key(session.sid)
        members = self._principal(session.identity.principal)
        at = _ms(session.expires)
        async with self._guard("put"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(self._web(key), data, pxat=at)
                pipe.sadd(members, key)
                pipe.pexpireat(members, at, nx=True)  # a new set: give it an expiry
                pipe.pexpireat(members, at, gt=True)  # then keep its latest session's
                pipe.scard(members)
                results = await pipe.execute()
            if int(results[-1]) > PRUNE_ABOVE:
                await self._prune(members)

    async def _prune(self, members: str) -> None:
        keys = [_text(k) for k in await _awaited(self._client.smembers(members))]
        async with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.exists(self._web(key))
            alive = await pipe.execute()
        gone = [key for key, n in zip(keys, alive, strict=True) if not n]
        if gone:
            await _awaited(self._client.srem(members, *gone))

    async def delete(self, sid: str) -> None:
        key = session_key(sid)
        async with self._guard("delete"):
            raw = await self._client.getdel(self._web(key))
            if raw is None:
                return
            async with self._client.pipeline(transaction=False) as pipe:
                with suppress(ValueError):
                    session = session_from_json(raw, sid)
                    pipe.srem(self._principal(session.identity.principal), key)
                pipe.publish(self.channel, json.dumps([key]))
                await pipe.execute()

    async def delete_principal(self, principal: str) -> int:
        members = self._principal(principal)
        async with self._guard("delete_principal"):
            keys = sorted(_text(k) for k in await _awaited(self._client.smembers(members)))
            if not keys:
                return 0
            async with self._client.pipeline(transaction=True) as pipe:
                for key in keys:
                    pipe.delete(self._web(key))
                pipe.srem(members, *keys)  # only these: a login meanwhile keeps its entry
                for start in range(0, len(keys), ANNOUNCE_BATCH):
                    pipe.publish(self.channel, json.dumps(keys[start : start + ANNOUNCE_BATCH]))
                results = await pipe.execute()
        return sum(int(n) for n in results[: len(keys)])

    # -- pending logins ----------------------------------------------------------------------

    async def put_pending(self, pending: PendingLogin) -> None:
        data = pending_to_json(pending)
        if len(data) > self._max_record:
            raise SessionTooLarge(f"pending login of {len(data)} bytes")
        if pending.expires <= self._clock():
            return
        async with self._guard("put_pending"):
            await self._client.set(
                self._pending(pending.state), data, pxat=_ms(pending.expires), nx=True
            )

    async def pop_pending(self, state: str) -> PendingLogin | None:
        async with self._guard("pop_pending"):
            raw = await self._client.getdel(self._pending(state))  # one use, across nodes
        if raw is None:
            return None
        try:
            pending = pending_from_json(raw)
        except ValueError as exc:
            log.warning("unreadable pending login ignored: %s", exc)
            return None
        if pending.state != state or pending.expires <= self._clock():
            return None
        return pending

    # -- notifications -----------------------------------------------------------------------

    async def listen(self, on_ended: EndedCallback, on_gap: GapCallback | None = None) -> None:
        """Subscribe to the ended-session channel until cancelled; ``on_gap`` once subscribed
        (and again after each reconnection: announcements may have been missed meanwhile).
        Redis errors: reconnect with backoff."""
        delay = self._delays[0]
        interrupted = False
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    # A finite read timeout: an idle channel is not an error.
                    message = await pubsub.get_message(timeout=self._poll)
                    kind = message.get("type") if message is not None else None
                    if kind == "subscribe":  # confirmed: from now on nothing is missed
                        if interrupted:
                            log.info("session notifications resumed")
                            interrupted, delay = False, self._delays[0]
                        self._call(on_gap)
                    elif kind == "message" and message is not None:
                        keys = self._announced(message.get("data"))
                        if keys:
                            self._call(on_ended, keys)
            except _DOWN as exc:
                if not interrupted:
                    log.warning(
                        "session notifications interrupted (%s); reconnecting",
                        type(exc).__name__,
                    )
                interrupted = True
            finally:
                await close_pubsub(pubsub, self._poll)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._delays[1])

    @staticmethod
    def _announced(data: object) -> list[str]:
        if not isinstance(data, bytes | str) or len(data) > ANNOUNCE_BATCH * 80:
            return []
        try:
            keys = json.loads(data)
        except ValueError:
            return []
        if not isinstance(keys, list):
            return []
        return [k for k in keys if isinstance(k, str) and _KEY.match(k)]

    @staticmethod
    def _call(callback: Callable[..., object] | None, *args: Collection[str]) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            log.exception("session notification callback failed")


__all__ = [
    "RedisSessionStore",
    "identity_from_dict",
    "identity_to_dict",
    "pending_from_json",
    "pending_to_json",
    "session_from_json",
    "session_to_json",
]
