"""Node-to-node forwarding of resumes: a ``/v4/reconnect`` that reaches a node other than the
tunnel's owner is relayed, message by message, over a WebSocket to the owner.

The forwarding node has already authenticated the caller; the owner authenticates them again
(the Authorization header is passed on) and trusts the client address only from a node that
proves it holds the cluster secret (an HMAC over node, client address, path and time)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ssl
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.connection import Connection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.protocol import State
from websockets.typing import Subprotocol

NODE_HEADER = "X-Tunnel-Forwarded-By"
CLIENT_IP_HEADER = "X-Tunnel-Client-Ip"
TIME_HEADER = "X-Tunnel-Forward-Time"
SIGNATURE_HEADER = "X-Tunnel-Forward-Signature"
FORWARD_HEADERS = (NODE_HEADER, CLIENT_IP_HEADER, TIME_HEADER, SIGNATURE_HEADER)
# A forward older (or newer) than this is refused: a captured one cannot be replayed later.
MAX_SKEW = 30.0


class ForwardRefused(Exception):
    """A forwarded handshake that does not prove it comes from a node of this cluster."""


class OwnerUnreachable(Exception):
    """The owning node did not accept the forwarded resume; ``status`` is its HTTP answer, or
    None when it could not be reached at all."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, slots=True)
class Forwarded:
    node: str
    client_ip: str


def _sign(secret: bytes, node: str, client_ip: str, path: str, when: str) -> str:
    message = "\n".join((node, client_ip, path, when)).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def forward_headers(secret: bytes, node: str, client_ip: str, path: str, now: float) -> Headers:
    when = str(int(now))
    return Headers(
        {
            NODE_HEADER: node,
            CLIENT_IP_HEADER: client_ip,
            TIME_HEADER: when,
            SIGNATURE_HEADER: _sign(secret, node, client_ip, path, when),
        }
    )


def verify_forward(
    headers: Headers, path: str, secret: bytes | None, now: float
) -> Forwarded | None:
    """None for a handshake without forwarding headers; the forwarding node and the client's
    address when they are authentic; ForwardRefused otherwise (also without a cluster secret:
    a single node never accepts forwards)."""
    values = {name: headers.get_all(name) for name in FORWARD_HEADERS}
    if not any(values.values()):
        return None
    if secret is None:
        raise ForwardRefused("forwarded handshake to a relay without a cluster")
    if any(len(v) != 1 for v in values.values()):
        raise ForwardRefused("incomplete forwarding headers")
    node, client_ip, when, signature = (values[name][0] for name in FORWARD_HEADERS)
    try:
        stamp = int(when)
    except ValueError:
        raise ForwardRefused("bad forwarding time") from None
    if abs(now - stamp) > MAX_SKEW:
        raise ForwardRefused("stale forwarded handshake")
    expected = _sign(secret, node, client_ip, path, when)
    if not hmac.compare_digest(expected, signature):
        raise ForwardRefused("bad forwarding signature")
    return Forwarded(node, client_ip)


async def open_forward(
    owner_url: str,
    path: str,
    *,
    authorization: str,
    subprotocols: list[Subprotocol],
    extra: Headers,
    ssl_context: ssl.SSLContext | None,
    server_name: str | None = None,
    open_timeout: float,
    max_size: int,
) -> ClientConnection:
    """Open the WebSocket to the owner; OwnerUnreachable when it does not accept."""
    headers = Headers(extra)
    headers["Authorization"] = authorization
    secure = owner_url.startswith("wss:")
    extra_options: dict[str, Any] = {}
    if secure and server_name:
        extra_options["server_hostname"] = server_name  # connect by address, verify the name
    try:
        return await connect(
            owner_url.rstrip("/") + path,
            additional_headers=headers,
            subprotocols=subprotocols,
            ssl=ssl_context if secure else None,
            open_timeout=open_timeout,
            compression=None,
            ping_interval=None,  # the tunnel's own keepalives pass through
            max_size=max_size,
            user_agent_header=None,
            **extra_options,
        )
    except InvalidStatus as exc:
        raise OwnerUnreachable(
            f"owner answered {exc.response.status_code}", exc.response.status_code
        ) from None
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        raise OwnerUnreachable(f"owner unreachable: {exc}") from None


async def bridge(client: Connection, owner: Connection) -> None:
    """Relay messages both ways until either side closes, then close the other with the same
    code and reason (so the client sees the owner's typed close, and the owner sees the client
    go away). Backpressure: each direction sends one message at a time."""

    async def pump(source: Connection, sink: Connection) -> None:
        # Only the source ending ends a direction: a send that fails because the sink is
        # closing must not stop the reading, or the far end's last messages before its close
        # would be dropped instead of passed on (the bridge ends on the first source to end).
        sink_open = True
        with contextlib.suppress(ConnectionClosed):
            async for message in source:
                if sink_open and sink.state is State.OPEN:
                    try:
                        await sink.send(message)
                    except ConnectionClosed:
                        sink_open = False
                else:
                    sink_open = False

    tasks = [
        asyncio.create_task(pump(client, owner)),
        asyncio.create_task(pump(owner, client)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # A close that the far end started on purpose (the owner's typed close, the client's
        # normal end) is passed on with its code and reason. Anything else (a connection that
        # vanished, or this node closing its side as it shuts down) drops both connections,
        # so the owner parks the tunnel for resume and the client reconnects: never a close
        # that would end the tunnel.
        for gone, other in ((owner, client), (client, owner)):
            frame = gone.protocol.close_rcvd
            if frame is not None and gone.protocol.close_rcvd_then_sent is True:
                with contextlib.suppress(Exception):
                    await other.close(frame.code, frame.reason)
                break
        else:
            for side in (client, owner):
                side.transport.abort()
