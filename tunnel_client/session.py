"""One tunnel from the client's side: connect over the native subprotocol, pump bytes, and resume
transparently (``/v4/reconnect?sid&ack``) after the WebSocket drops, until the stream ends.

Errors (``TunnelFailed``) carry the close code or HTTP status the relay answered with, and a
message in gcloud's words (``Error while connecting [4033: 'not authorized'].``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from tunnel_protocol import NATIVE, CloseCode, Side, Tunnel, describe
from tunnel_protocol.aio.pump import End, Pump
from tunnel_protocol.aio.stream import ByteStream
from tunnel_protocol.backoff import backoff
from tunnel_protocol.tunnel import Event, ReauthAccepted, ReauthRequested
from tunnel_protocol.urls import Target, connect_query, reconnect_query

log = logging.getLogger("tunnel.client")

TokenProvider = Callable[[], Awaitable[str]]

MAX_MESSAGE = NATIVE.max_data + 1024


class TunnelFailed(Exception):
    """The tunnel could not be opened or ended abnormally. ``code``: close code or HTTP status."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


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


def _retryable(code: int) -> bool:
    try:
        return CloseCode(code).retryable
    except ValueError:
        return False


def _base_url(server: str) -> str:
    return server.rstrip("/")


def _status_message(status: int) -> str:
    if status == 401:
        return "Error while connecting [Handshake status 401 Unauthorized]: log in again"
    if status == 403:
        return "Error while connecting [Handshake status 403 Forbidden]"
    if status == 429:
        return "Error while connecting [Handshake status 429 Too Many Requests]: try again later"
    return f"Error while connecting [Handshake status {status}]"


# A refusal's reason as the relay words it for native clients: "<category>; ref=<reference>".
_REFUSAL = re.compile(r"^(?P<category>[a-z-]+); ref=(?P<ref>[A-Za-z0-9]{8,16})$")
_CATEGORIES = {
    "not authorized": "not authorized",
    "policy": "not allowed by policy",
    "access-level": "an access level the policy requires is not met",
    "unknown-target": "unknown target",
    "port": "this port is not allowed for this target",
    "revoked": "access revoked",
    "expired": "credential expired",
}


def close_message(code: int, reason: str = "") -> str:
    """gcloud's line (``Error while connecting [4033: 'not authorized'].``), then for a typed
    refusal what kind it is and the reference an admin can look up."""
    match = _REFUSAL.match(reason)
    if match is None:
        return f"Error while connecting [{code}: '{reason or describe(code)}']."
    category = _CATEGORIES.get(match["category"], match["category"])
    return (
        f"Error while connecting [{code}: '{describe(code)}'].\n"
        f"Refused: {category} (reference {match['ref']}; an admin can run "
        f"`tunnel-server policy explain --reference {match['ref']}`)."
    )


class TunnelSession:
    """Carries one local ByteStream through the relay; ``run`` returns when the stream is done."""

    def __init__(self, options: ConnectOptions) -> None:
        self.options = options
        self.tunnel = Tunnel(Side.CLIENT, NATIVE, buffer_limit=options.buffer_limit)
        self.resumes = 0
        self._ssl: ssl.SSLContext | None = options.ssl_context
        self._pump: Pump | None = None

    async def _open(self) -> ClientConnection:
        options = self.options
        tunnel = self.tunnel
        if tunnel.sid is None:
            path = connect_query(options.target)
        else:
            path = reconnect_query(tunnel.sid.decode(), tunnel.received_total, options.target)
        token = await get_token(options)
        headers = {"Authorization": f"Bearer {token}", **options.extra_headers}
        url = _base_url(options.server) + path
        return await connect(
            url,
            additional_headers=headers,
            subprotocols=[Subprotocol(NATIVE.subprotocol)],
            compression=None,
            ssl=self._ssl if url.startswith("wss:") else None,
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
                    raise TunnelFailed(_status_message(status), code=status) from None
                error: Exception = exc
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                error = exc
            if self.tunnel.sid is None or loop.time() >= deadline:
                if isinstance(error, InvalidStatus):
                    status = error.response.status_code
                    raise TunnelFailed(_status_message(status), code=status) from None
                raise TunnelFailed(f"Error while connecting [{error}].") from None
            delay = min(next(delays), max(0.0, deadline - loop.time()))
            log.info("relay unreachable (%s); retrying in %.2fs", error, delay)
            await asyncio.sleep(delay)

    async def run(self, stream: ByteStream) -> None:
        """Open (or resume) until the stream completes. Raises TunnelFailed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.resume_timeout
        try:
            while True:
                ws = await self._open_with_retry(deadline)
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
                    raise TunnelFailed(close_message(code, outcome.reason), code=code)
                self.resumes += 1
                deadline = loop.time() + self.options.resume_timeout
                log.info("tunnel interrupted (%s); resuming", outcome.reason or outcome.end.value)
        finally:
            stream.close()

    def _control(self) -> Callable[[Event], Awaitable[None]]:
        async def on_control(event: Event) -> None:
            if isinstance(event, ReauthRequested):
                try:
                    token = await self.options.token()
                except Exception as exc:  # the relay closes with 4004 at expiry; we resume then
                    log.warning("cannot renew the credential in-band: %s", exc)
                    return
                self.tunnel.send_reauth(token)
            elif isinstance(event, ReauthAccepted):
                log.debug("re-authenticated; credential valid until %s", event.expires)

        return on_control

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        if self._pump is not None:
            self._pump.close(code, reason)


async def get_token(options: ConnectOptions) -> str:
    """The bearer token for the next connect; a failing source becomes TunnelFailed with its
    message (for example: run tunnel-client login)."""
    try:
        return await options.token()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise TunnelFailed(str(exc).rstrip()) from None


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
        raise TunnelFailed(
            close_message(exc.rcvd.code, exc.rcvd.reason), code=exc.rcvd.code
        ) from None
    finally:
        await ws.close(CloseCode.NORMAL)
