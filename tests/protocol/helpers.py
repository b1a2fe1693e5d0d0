"""In-memory client/server Tunnel pair (like h11's ConnectionPair): no sockets, no sleeps.

Each direction is a queue of WebSocket messages "on the wire". Tests choose when messages are
delivered, when time advances (flushing idle acks) and when the WebSocket drops and resumes.
"""

from __future__ import annotations

from collections import deque

from tunnel_protocol.dialect import Dialect
from tunnel_protocol.tunnel import (
    DEFAULT_BUFFER_LIMIT,
    DataReceived,
    EofReceived,
    Event,
    Side,
    Tunnel,
)


class Endpoint:
    """One side's tunnel plus everything its application has seen."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.received = bytearray()
        self.eof = False
        self.events: list[Event] = []

    def absorb_events(self) -> None:
        for event in self.tunnel.events_received():
            self.events.append(event)
            if isinstance(event, DataReceived):
                assert not self.eof, "data after EOF reached the application"
                self.received += event.data
            elif isinstance(event, EofReceived):
                assert not self.eof, "EOF reported twice"
                self.eof = True


class TunnelPair:
    """A Side.CLIENT and a Side.SERVER Tunnel linked by two in-memory message queues."""

    def __init__(
        self,
        dialect: Dialect,
        *,
        sid: bytes = b"sid-0001",
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        now: float = 0.0,
    ) -> None:
        self.dialect = dialect
        self.sid = sid
        self.now = now
        self.client = Endpoint(Tunnel(Side.CLIENT, dialect, buffer_limit=buffer_limit))
        self.server = Endpoint(Tunnel(Side.SERVER, dialect, buffer_limit=buffer_limit))
        self.to_server: deque[bytes] = deque()
        self.to_client: deque[bytes] = deque()
        self.drops = 0

    # -- plumbing ---------------------------------------------------------------------------------

    def collect(self) -> None:
        """Move each tunnel's outgoing messages onto the wire."""
        self.to_server.extend(self.client.tunnel.data_to_send())
        self.to_client.extend(self.server.tunnel.data_to_send())

    def deliver_to_server(self, count: int | None = None) -> int:
        return self._deliver(self.to_server, self.server, count)

    def deliver_to_client(self, count: int | None = None) -> int:
        return self._deliver(self.to_client, self.client, count)

    def _deliver(self, wire: deque[bytes], endpoint: Endpoint, count: int | None) -> int:
        delivered = 0
        while wire and (count is None or delivered < count):
            endpoint.tunnel.receive_message(wire.popleft(), self.now)
            endpoint.absorb_events()
            delivered += 1
            self.collect()
        return delivered

    def pump(self) -> None:
        """Deliver every message, both ways, until the wire is quiet."""
        self.collect()
        while self.to_server or self.to_client:
            self.deliver_to_server()
            self.deliver_to_client()

    # -- lifecycle --------------------------------------------------------------------------------

    def connect(self) -> None:
        """Open the first WebSocket: the server queues the SID (not delivered yet)."""
        self.client.tunnel.attach_client()
        self.server.tunnel.attach_server(self.sid)
        self.collect()

    def handshake(self) -> None:
        """Connect and deliver everything, so the client holds the SID."""
        self.connect()
        self.pump()
        assert self.client.tunnel.sid == self.sid

    def drop(self) -> None:
        """The WebSocket dies: in-flight messages are lost; then the client reconnects."""
        assert self.client.tunnel.sid is not None, "a drop before the SID is a fresh connect"
        self.to_server.clear()
        self.to_client.clear()
        self.client.tunnel.detach()
        self.server.tunnel.detach()
        self.drops += 1
        self.client.tunnel.attach_client()
        self.server.tunnel.attach_server(self.sid, resume_from=self.client.tunnel.received_total)
        self.collect()

    def advance(self, seconds: float) -> None:
        """Let time pass: both tunnels get their timers run (idle ack flush)."""
        self.now += seconds
        for endpoint in (self.client, self.server):
            deadline = endpoint.tunnel.next_deadline()
            if deadline is not None and deadline <= self.now:
                endpoint.tunnel.handle_timeout(self.now)
        self.collect()

    def settle(self) -> None:
        """Deliver everything and flush idle acks until nothing is left in flight."""
        for _ in range(100):
            self.pump()
            self.advance(self.dialect.ack_flush)
            if not (self.to_server or self.to_client):
                return
        raise AssertionError("pair did not settle")
