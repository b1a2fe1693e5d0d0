"""Slow and unauthenticated connections on HTTP mode's listener (slowloris and its kin).

``ConnectionGuard`` sits between the transport and aiohttp's own protocol (``RequestHandler``),
forwarding every call, and keeps three limits per connection:

* **header timeout**: a request's headers must be complete within ``header_timeout`` of its
  first byte (of the connection's start, for the first request); otherwise 408 and close;
* **request deadline**: its body must be complete within ``request_timeout`` of that first
  byte; otherwise the connection is closed (the response, if any, is cut);
* **unauthenticated connections per source address**: a connection counts until one of its
  requests is authenticated; past ``max_unauthenticated_per_source`` open ones from the same
  address, a new connection is answered 429 and closed before anything is read. Peers in
  ``trusted_proxies`` (balancers carrying many clients) are not counted.

The proxy's handler tells the guard when a request starts and ends and when its caller is
authenticated (``guard_of(request)``). Each refusal is reported to ``refused(reason, source,
status)`` (HTTP mode writes an audit record). Idle keep-alive connections are aiohttp's
``keepalive_timeout``. Timers are loop call-backs, not tasks."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

Refused = Callable[[str, str, int], None]  # reason, source address, HTTP status

IDLE, HEADERS, ACTIVE = 0, 1, 2
_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_BUSY = (
    b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nRetry-After: 5\r\n"
    b"Content-Length: 45\r\nConnection: close\r\n\r\n"
    b"Too many unauthenticated connections: retry.\n"
)


@dataclass(frozen=True)
class GuardSettings:
    header_timeout: float
    request_timeout: float
    max_unauthenticated_per_source: int  # 0: no cap


class SourceLimits:
    """Open unauthenticated connections per source address (one process, one thread)."""

    def __init__(
        self,
        cap: int,
        trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
    ) -> None:
        self.cap = cap
        self._trusted = tuple(trusted)
        self._open: dict[str, int] = {}

    def exempt(self, source: str) -> bool:
        if self.cap <= 0:
            return True
        try:
            address = ipaddress.ip_address(source.split("%", 1)[0])
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    def acquire(self, source: str) -> bool:
        count = self._open.get(source, 0)
        if count >= self.cap:
            return False
        self._open[source] = count + 1
        return True

    def release(self, source: str) -> None:
        count = self._open.get(source, 0) - 1
        if count > 0:
            self._open[source] = count
        else:
            self._open.pop(source, None)

    def open_from(self, source: str) -> int:
        return self._open.get(source, 0)


class ConnectionGuard(asyncio.Protocol):
    """Wraps ``inner`` (aiohttp's protocol for one connection); see the module docstring."""

    def __init__(
        self,
        inner: Any,
        settings: GuardSettings,
        limits: SourceLimits,
        loop: asyncio.AbstractEventLoop,
        refused: Refused,
    ) -> None:
        self._inner = inner
        self._settings = settings
        self._limits = limits
        self._loop = loop
        self._refused = refused
        self._peer = ""
        self._transport: asyncio.Transport | None = None
        self._source: str | None = None  # counted against the cap until authenticated
        self._state = HEADERS
        self._began = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._pending = False  # bytes arrived while a request was handled
        self._closed = False

    # -- the transport's calls, forwarded -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: the protocol is the contract.
        self._transport = stream = cast(asyncio.Transport, transport)
        peer = stream.get_extra_info("peername")
        source = self._peer = str(peer[0]) if isinstance(peer, tuple) else ""
        if source and not self._limits.exempt(source):
            if not self._limits.acquire(source):
                self._refused("too many unauthenticated connections", source, 429)
                stream.write(_BUSY)
                stream.close()
                self._inner = None
                return
            self._source = source
        self._inner.connection_made(transport)
        self._headers_from(self._loop.time())

    def data_received(self, data: bytes) -> None:
        if self._state == IDLE:
            self._headers_from(self._loop.time())
        elif self._state == ACTIVE:
            self._pending = True
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel()
        self.authenticated()
        if self._inner is not None:
            self._inner.connection_lost(exc)

    # -- the handler's calls ---------------------------------------------------------------------

    def request_started(self, request: web.BaseRequest) -> None:
        """Headers complete, the handler runs: the body must be in by the deadline."""
        self._cancel()
        self._state = ACTIVE
        self._pending = False
        if self._closed:
            return
        deadline = self._began + self._settings.request_timeout
        self._timer = self._loop.call_at(deadline, self._deadline, request)

    def request_finished(self) -> None:
        self._cancel()
        if self._pending:  # (part of) the next request may be here already
            self._headers_from(self._loop.time())
        else:
            self._state = IDLE

    def authenticated(self) -> None:
        """A request on this connection was authenticated: it no longer counts."""
        if self._source is not None:
            self._limits.release(self._source)
            self._source = None

    # -- timers -----------------------------------------------------------------------------------

    def _headers_from(self, now: float) -> None:
        self._cancel()
        if self._closed:
            return
        self._state = HEADERS
        self._began = now
        self._timer = self._loop.call_at(now + self._settings.header_timeout, self._too_slow)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        if self._state == HEADERS and self._transport is not None:
            self._refused("request headers not complete in time", self._peer, 408)
            self._transport.write(_TIMEOUT)
            self._transport.close()

    def _deadline(self, request: web.BaseRequest) -> None:
        self._timer = None
        if self._state == ACTIVE and not request.content.is_eof() and self._transport:
            self._refused("request not complete by its deadline", self._peer, 408)
            self._transport.close()


def guard_of(request: web.BaseRequest) -> ConnectionGuard | None:
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, ConnectionGuard) else None


def guarded(
    factory: Callable[[], Any], settings: GuardSettings, limits: SourceLimits, refused: Refused
) -> Callable[[], ConnectionGuard]:
    """A protocol factory for ``loop.create_server``: aiohttp's, each connection guarded."""
    loop = asyncio.get_running_loop()
    return lambda: ConnectionGuard(factory(), settings, limits, loop, refused)
