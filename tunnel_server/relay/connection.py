"""A relay WebSocket connection: it carries what its handshake admitted (the verified identity
travels on the connection, not in a side table), and it stops reading from a peer whose
automatic replies pile up unread (ping floods)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection

from tunnel_protocol.urls import ConnectRequest, ReconnectRequest

from ..access.device import Device
from ..access.identity import Identity

# Bytes of automatic replies (pongs, close frames) a peer may leave unread before the relay
# stops reading from it. Tunnel data never gets here: the pump waits for the write buffer to
# drain (32 KiB) before sending more, so only a peer that sends pings and does not read its
# pongs can fill it.
REPLY_BACKLOG = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Admitted:
    """What an accepted handshake hands to the tunnel handler."""

    identity: Identity
    request: ConnectRequest | ReconnectRequest
    device: Device | None
    source_ip: str | None
    owner: ClientConnection | None = None  # a resume forwarded to the node holding the tunnel


class RelayConnection(ServerConnection):
    """``admitted`` is set by the handshake before the upgrade.

    websockets answers every ping with a pong as it reads, and writes the pong without waiting
    for the peer to read it: a peer that sends pings and never reads would make the relay buffer
    every pong. Past ``REPLY_BACKLOG`` unsent bytes this connection pauses reading until the
    buffer drains (the peer's TCP window then closes, as it does for tunnel data) and calls
    ``backlog_handler``."""

    admitted: Admitted | None = None
    backlog_handler: ClassVar[Callable[[RelayConnection, int], None] | None] = None
    _backlog_paused = False

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._backlog_paused:
            buffered = self.transport.get_write_buffer_size()
            if buffered > REPLY_BACKLOG:
                self._backlog_paused = True
                self.transport.pause_reading()
                handler = type(self).backlog_handler
                if handler is not None:
                    handler(self, buffered)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._backlog_paused:
            self._backlog_paused = False
            # The message queue may have paused reading too: leave that pause to it.
            if not self.recv_messages.paused:
                self.transport.resume_reading()


def connection_class(
    on_backlog: Callable[[RelayConnection, int], None],
) -> type[RelayConnection]:
    """The connection class for one relay (websockets' ``create_connection``)."""

    class Connection(RelayConnection):
        backlog_handler = on_backlog

    return Connection
