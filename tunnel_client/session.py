"""One tunnel from the client's side: connect over the native subprotocol, pump bytes, and resume
transparently (``/v4/reconnect?sid&ack``) after the WebSocket drops, until the stream ends.

Errors (``tunnel_client.errors``) carry the close code or HTTP status the relay answered with,
and a message whose first line is gcloud's (``Error while connecting [4033: 'not authorized'].``)
followed by what it means: who the token names, the target, the denial category and reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidProxyStatus,
    InvalidStatus,
    ProxyError,
)
from websockets.typing import Subprotocol

from tunnel_protocol import NATIVE, CloseCode, Side, Tunnel
from tunnel_protocol.aio.pump import ControlHandler, ControlJob, End, Pump
from tunnel_protocol.aio.stream import ByteStream
from tunnel_protocol.backoff import backoff
from tunnel_protocol.tunnel import Event, ReauthAccepted, ReauthRequested, SidReceived
from tunnel_protocol.urls import Target, connect_query, reconnect_query

from . import proxies
from .errors import (
    ConnectionFailed,
    CredentialsMissing,
    ProxyRefused,
    TunnelClosed,
    TunnelFailed,
    close_message,
    connection_failed,
    denied,
    token_identity,
    unauthorized,
)
from .http import probe, relay_where

__all__ = [
    "ConnectOptions",
    "TokenProvider",
    "TunnelFailed",
    "TunnelSession",
    "check_connection",
    "close_message",
    "get_token",
    "probe_relay",
]

log = logging.getLogger("tunnel.client")

TokenProvider = Callable[[], Awaitable[str]]

MAX_MESSAGE = NATIVE.max_data + 1024
CANCEL_CLOSE_TIMEOUT = 1.0
DENIAL_CODES = frozenset({CloseCode.NOT_AUTHORIZED, CloseCode.LOOKUP_FAILED})


@dataclass(frozen=True)
class ConnectOptions:
    server: str  # ws:// or wss:// base URL of the relay
    target: Target
    token: TokenProvider
    ssl_context: ssl.SSLContext | None = None
    open_timeout: float = 10.0
    resume_timeout: float = 900.0  # like gcloud: give up resuming after 15 minutes
    keepalive: tuple[float, float] = (20.0, 20.0)
    buffer_limit: int = 8 * 1024 * 1024
    user_agent: str = "tunnel-client"
    backoff_initial: float = 0.05
    backoff_cap: float = 5.0
    extra_headers: dict[str, str] = field(default_factory=dict)
    proxy: proxies.ProxySetting = None  # None: HTTPS_PROXY/NO_PROXY decide; "none": direct

    def proxy_url(self) -> str | None:
        return proxies.proxy_for(self.server, self.proxy)

    @property
    def where(self) -> str:
        """host:port of the relay, for messages."""
        return relay_where(self.server)


def _retryable(code: int) -> bool:
    try:
        return CloseCode(code).retryable
    except ValueError:
        return False


def _base_url(server: str) -> str:
    return server.rstrip("/")


def _status_message(status: int) -> str:
    if status == 403:
        return "Error while connecting [Handshake status 403 Forbidden]"
    if status == 429:
        return "Error while connecting [Handshake status 429 Too Many Requests]: try again later"
    return f"Error while connecting [Handshake status {status}]"


def _relogin(options: ConnectOptions) -> str | None:
    """What to run when logging in again would help (only for a cached login)."""
    hint = getattr(options.token, "relogin_hint", None)
    return hint() if callable(hint) else None


def _source(options: ConnectOptions) -> str | None:
    source = getattr(options.token, "source", None)
    return source if isinstance(source, str) else None


def handshake_failure(exc: InvalidStatus, options: ConnectOptions, who: str | None) -> TunnelFailed:
    """An HTTP answer instead of the upgrade, as a typed error."""
    status = exc.response.status_code
    if status == 401:
        header = exc.response.headers.get("WWW-Authenticate")
        return unauthorized(header, who=who, relogin=_relogin(options), source=_source(options))
    return TunnelFailed(_status_message(status), code=status)


def closed_failure(
    code: int, reason: str, options: ConnectOptions, who: str | None
) -> TunnelFailed:
    if code in DENIAL_CODES:
        return denied(code, reason, who=who, target=options.target)
    return TunnelClosed(close_message(code, reason), code=code, reason=reason)


def proxy_failure(exc: Exception, options: ConnectOptions) -> ConnectionFailed:
    url = options.proxy_url() or ""
    proxy = proxies.redact(url) if url else "the proxy"
    if isinstance(exc, InvalidProxyStatus):
        status = exc.response.status_code
        return ProxyRefused(
            f"Error while connecting [proxy {proxy} answered {status} "
            f"{exc.response.reason_phrase}]: {proxies.refusal(status, url)}.",
            status=status,
        )
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError):
        inner = connection_failed(cause, f"proxy {proxy}")
        return ConnectionFailed(str(inner), kind="proxy")
    return ConnectionFailed(f"Error while connecting [proxy {proxy}]: {exc}.", kind="proxy")


class TunnelSession:
    """Carries one local ByteStream through the relay; ``run`` returns when the stream is done."""

    def __init__(self, options: ConnectOptions) -> None:
        self.options = options
        self.tunnel = Tunnel(Side.CLIENT, NATIVE, buffer_limit=options.buffer_limit)
        self.resumes = 0
        self._ssl: ssl.SSLContext | None = options.ssl_context
        self._pump: Pump | None = None
        self.identity: str | None = None  # email or sub of the last token (for messages)
        self.established = asyncio.Event()  # set when the relay sent the tunnel's SID
        self.reconnecting = False  # between a dropped WebSocket and its resume

    async def _open(self) -> ClientConnection:
        options = self.options
        tunnel = self.tunnel
        if tunnel.sid is None:
            path = connect_query(options.target)
        else:
            path = reconnect_query(tunnel.sid.decode(), tunnel.received_total, options.target)
        token = await get_token(options)
        self.identity = token_identity(token)
        headers = {"Authorization": f"Bearer {token}", **options.extra_headers}
        url = _base_url(options.server) + path
        return await connect(
            url,
            additional_headers=headers,
            subprotocols=[Subprotocol(NATIVE.subprotocol)],
            compression=None,
            ssl=self._ssl if url.startswith("wss:") else None,
            proxy=options.proxy_url(),
            ping_interval=None,  # the pump's keepalive covers dead-peer detection
            max_size=MAX_MESSAGE,
            open_timeout=options.open_timeout,
            user_agent_header=options.user_agent,
            origin=None,
        )

    async def open_once(self) -> ClientConnection:
        """One attempt, no retry: for the connection check."""
        return await self._open_with_retry(asyncio.get_running_loop().time())

    async def _open_with_retry(self, deadline: float) -> ClientConnection:
        loop = asyncio.get_running_loop()
        delays = backoff(self.options.backoff_initial, 1.5, self.options.backoff_cap)
        while True:
            try:
                return await self._open()
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status < 500 and status != 429:
                    raise handshake_failure(exc, self.options, self.identity) from None
                error: Exception = exc
            except (InvalidProxyStatus, ProxyError) as exc:
                if self.tunnel.sid is None:
                    raise proxy_failure(exc, self.options) from None
                error = exc
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                error = exc
            if self.tunnel.sid is None or loop.time() >= deadline:
                if isinstance(error, InvalidStatus):
                    raise handshake_failure(error, self.options, self.identity) from None
                if isinstance(error, OSError | TimeoutError):
                    raise connection_failed(error, self.options.where) from None
                if isinstance(error, InvalidProxyStatus | ProxyError):
                    raise proxy_failure(error, self.options) from None
                raise TunnelFailed(f"Error while connecting [{error}].") from None
            delay = min(next(delays), max(0.0, deadline - loop.time()))
            log.info("relay unreachable (%s); retrying in %.2fs", error, delay)
            await asyncio.sleep(delay)

    async def run(self, stream: ByteStream) -> None:
        """Open (or resume) until the stream completes. Raises TunnelFailed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.resume_timeout
        ws: ClientConnection | None = None
        try:
            while True:
                self.reconnecting = self.tunnel.sid is not None
                ws = await self._open_with_retry(deadline)
                self.reconnecting = False
                self.tunnel.attach_client()
                pump = Pump(
                    self.tunnel,
                    ws,
                    stream,
                    on_control=self._control(),
                    keepalive=self.options.keepalive,
                )
                self._pump = pump
                outcome = await pump.run()
                if outcome.end is End.FINISHED:
                    return
                resumable = outcome.end is End.LOST or (
                    outcome.end is End.PEER_CLOSED
                    and outcome.code is not None
                    and _retryable(outcome.code)
                )
                if not resumable or self.tunnel.sid is None:
                    code = outcome.code or CloseCode.UNKNOWN_ERROR
                    raise closed_failure(code, outcome.reason, self.options, self.identity)
                self.resumes += 1
                deadline = loop.time() + self.options.resume_timeout
                log.info("tunnel interrupted (%s); resuming", outcome.reason or outcome.end.value)
        except asyncio.CancelledError:
            # Cancelled (a library block left, Ctrl-C): drop the WebSocket now and let its
            # transport finish closing, so that no connection outlives the event loop.
            if ws is not None:
                ws.transport.abort()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CANCEL_CLOSE_TIMEOUT):
                        await ws.wait_closed()
            raise
        finally:
            stream.close()

    def _control(self) -> ControlHandler:
        def on_control(event: Event) -> ControlJob | None:
            if isinstance(event, SidReceived):
                self.established.set()
            elif isinstance(event, ReauthRequested):
                # A refresh may call the identity provider: beside the data, not in the reader.
                return self._reauth()
            elif isinstance(event, ReauthAccepted):
                log.debug("re-authenticated; credential valid until %s", event.expires)
            return None

        return on_control

    async def _reauth(self) -> None:
        try:
            token = await self.options.token()
        except Exception as exc:  # the relay closes with 4004 at expiry; we resume then
            log.warning("cannot renew the credential in-band: %s", exc)
            return
        self.tunnel.send_reauth(token)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        if self._pump is not None:
            self._pump.close(code, reason)


async def get_token(options: ConnectOptions) -> str:
    """The bearer token for the next connect; a failing source becomes CredentialsMissing with
    its message (for example: run tunnel-client login). When the relay itself cannot be reached,
    that is reported first: a wrong URL is not a login problem."""
    try:
        return await options.token()
    except asyncio.CancelledError:
        raise
    except TunnelFailed:
        raise
    except Exception as exc:
        message = str(exc).rstrip()
    await probe_relay(options)
    raise CredentialsMissing(message)


async def probe_relay(options: ConnectOptions) -> None:
    """Raise ConnectionFailed unless the relay answers HTTP(S) at its address (through the same
    proxy and TLS settings a tunnel uses). Any HTTP status counts as reachable."""
    await probe(
        options.server,
        ssl_context=options.ssl_context,
        proxy=options.proxy_url(),
        limit=options.open_timeout,
        where=options.where,
    )


async def check_connection(options: ConnectOptions) -> None:
    """Open a tunnel and wait for its SID, then close it: what gcloud's connection test does."""
    session = TunnelSession(options)
    ws = await session.open_once()
    try:
        session.tunnel.attach_client()
        async with asyncio.timeout(options.open_timeout):
            message = await ws.recv()
        if isinstance(message, bytes):
            session.tunnel.receive_message(message, 0.0)
        if session.tunnel.sid is None:
            raise TunnelFailed("Error while connecting [no SID from the relay].")
    except TimeoutError:
        raise TunnelFailed("Error while connecting [timed out waiting for the relay].") from None
    except ConnectionClosed as exc:
        if exc.rcvd is None:
            raise TunnelFailed("Error while connecting [connection lost].") from None
        raise closed_failure(exc.rcvd.code, exc.rcvd.reason, options, session.identity) from None
    finally:
        await ws.close(CloseCode.NORMAL)


async def wait_established(session: TunnelSession, runner: asyncio.Task[None]) -> None:
    """Until the session has its SID; if the runner ends first, its failure is raised."""
    waiter = asyncio.create_task(session.established.wait())
    try:
        await asyncio.wait([waiter, runner], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not session.established.is_set():
        runner.result()  # raises the failure (TunnelFailed and subclasses)
        raise TunnelFailed("Error while connecting [the tunnel ended before it was opened].")
