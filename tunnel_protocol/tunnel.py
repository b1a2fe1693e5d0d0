"""The tunnel state machine: one byte stream each way, acked cumulatively, resumable across
WebSocket connections. Sans-I/O: messages in, events and messages out, time passed in.

Rules (both sides, both dialects):
- A tunnel outlives the WebSocket it runs on. ``attach`` starts a WebSocket, ``detach`` ends one;
  every byte handed to ``send_data`` stays buffered until the peer acknowledges it, so a resumed
  WebSocket replays exactly what the peer lacks.
- The server speaks first: SID after a connect, RECONNECT_ACK(bytes received) after a reconnect.
  The client treats any other first frame as a protocol error.
- ACKs are cumulative, monotonic and never beyond the bytes sent (4005 backwards, 4006 beyond).
- The receiver acks once ``dialect.ack_threshold`` bytes are unacknowledged, and flushes any
  remainder after ``dialect.ack_flush`` seconds without data (the caller asks ``next_deadline``).
- The send buffer is bounded by ``buffer_limit``: callers read no more than ``send_capacity``
  bytes from their source, so a slow peer closes the source's TCP window instead of growing
  memory. Offering more raises ResumeBufferOverflow (4103): never a silent loss.
- Native only: EOF half-closes one direction at a stream offset (replayed on resume, duplicates
  ignored); the tunnel is ``finished`` when both directions ended and all data was acked. CLOSE
  carries a typed reason with a human message; REAUTH* renew the credential in-band.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from . import frames
from .dialect import Dialect
from .errors import (
    BadAck,
    InvalidAck,
    InvalidData,
    LocalProtocolError,
    ProtocolError,
    ResumeBufferOverflow,
    RewindFailed,
)


class Side(Enum):
    CLIENT = "client"
    SERVER = "server"


# Events reported to the driver.


@dataclass(frozen=True, slots=True)
class SidReceived:
    sid: bytes


@dataclass(frozen=True, slots=True)
class Resumed:
    """The server accepted a reconnect; it had received ``peer_received`` bytes."""

    peer_received: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    data: bytes


@dataclass(frozen=True, slots=True)
class EofReceived:
    pass


@dataclass(frozen=True, slots=True)
class Acked:
    """The peer acknowledged bytes: send capacity grew."""

    acked: int


@dataclass(frozen=True, slots=True)
class CloseReasonReceived:
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class ReauthReceived:
    token: str


@dataclass(frozen=True, slots=True)
class ReauthRequested:
    deadline: int


@dataclass(frozen=True, slots=True)
class ReauthAccepted:
    expires: int


Event = (
    SidReceived
    | Resumed
    | DataReceived
    | EofReceived
    | Acked
    | CloseReasonReceived
    | ReauthReceived
    | ReauthRequested
    | ReauthAccepted
)

DEFAULT_BUFFER_LIMIT = 8 * 1024 * 1024


class Tunnel:
    """One tunnel's stream state, for either side and either dialect."""

    def __init__(
        self, side: Side, dialect: Dialect, *, buffer_limit: int = DEFAULT_BUFFER_LIMIT
    ) -> None:
        if buffer_limit < 2 * dialect.max_data:
            raise ValueError(f"buffer_limit must be at least {2 * dialect.max_data} bytes")
        self.side = side
        self.dialect = dialect
        self.buffer_limit = buffer_limit
        self.sid: bytes | None = None
        # Outbound stream: [peer_acked, sent_total) is buffered in _unacked, oldest first.
        self.sent_total = 0
        self.peer_acked = 0
        self._unacked: deque[bytes] = deque()
        self._eof_at: int | None = None
        # Inbound stream.
        self.received_total = 0
        self._acked_to_peer = 0
        self._last_receive: float | None = None
        self.peer_eof = False
        # Current WebSocket.
        self.attached = False
        self._ready = False  # client: SID / RECONNECT_ACK seen on this WebSocket
        self._expect_reconnect_ack = False
        self._out: list[bytes] = []
        self._events: list[Event] = []

    # -- properties -----------------------------------------------------------------------------

    @property
    def send_capacity(self) -> int:
        """Bytes ``send_data`` accepts now without exceeding the resume buffer."""
        if self._eof_at is not None:
            return 0
        return self.buffer_limit - (self.sent_total - self.peer_acked)

    @property
    def buffered(self) -> int:
        return self.sent_total - self.peer_acked

    @property
    def has_pending(self) -> bool:
        """Messages are waiting for ``data_to_send``."""
        return bool(self._out)

    @property
    def eof_sent(self) -> bool:
        return self._eof_at is not None

    @property
    def finished(self) -> bool:
        """Native: both directions ended and every byte we sent was acknowledged."""
        return self.peer_eof and self._eof_at is not None and self.peer_acked == self.sent_total

    # -- WebSocket lifecycle --------------------------------------------------------------------

    def attach_server(self, sid: bytes, *, resume_from: int | None = None) -> None:
        """Server: a WebSocket was accepted. ``resume_from`` is the client's ``ack`` on reconnect.

        Raises RewindFailed (4074) or InvalidAck (4006) when the resume point is not replayable.
        """
        self._require_own_side(Side.SERVER, "attach_server")
        if resume_from is None:
            if self.sid is not None:
                raise LocalProtocolError("tunnel already connected; use resume")
            self.sid = sid
            self._begin_attach()
            self._out.append(frames.encode_sid(sid))
            self._replay()  # data (and EOF) queued before the first attach, e.g. a banner
            return
        self._accept_peer_position(resume_from, resume=True)
        self._begin_attach()
        self._acked_to_peer = self.received_total
        self._out.append(frames.encode_reconnect_ack(self.received_total))
        self._replay()

    def attach_client(self) -> None:
        """Client: a WebSocket opened; connect if no SID yet, else this is a reconnect."""
        self._require_own_side(Side.CLIENT, "attach_client")
        self._begin_attach()
        self._ready = False
        self._expect_reconnect_ack = self.sid is not None
        if self.sid is not None:
            # The reconnect URL carries ack=received_total: that is our ack.
            self._acked_to_peer = self.received_total

    def detach(self) -> None:
        """The WebSocket ended; unsent messages are dropped (the stream state allows replay)."""
        self.attached = False
        self._ready = False
        self._out.clear()
        self._last_receive = None

    def _begin_attach(self) -> None:
        self.attached = True
        self._ready = self.side is Side.SERVER
        self._out.clear()
        # Every attach acknowledges all received bytes (URL ack / RECONNECT_ACK): no flush due.
        self._last_receive = None

    # -- inbound --------------------------------------------------------------------------------

    def receive_message(self, message: bytes, now: float) -> None:
        """Feed one WebSocket message. Raises a ProtocolError subclass (with its close code)."""
        frame = frames.decode(message, max_data=self.dialect.max_data, native=self.dialect.native)
        if isinstance(frame, frames.Data):
            self._require_ready("DATA")
            if self.peer_eof:
                raise InvalidData("DATA after EOF")
            self.received_total += len(frame.payload)
            self._events.append(DataReceived(frame.payload))
            if self.received_total - self._acked_to_peer >= self.dialect.ack_threshold:
                self._send_ack()
            else:
                self._last_receive = now
        elif isinstance(frame, frames.Ack):
            self._require_ready("ACK")
            self._accept_peer_position(frame.received, resume=False)
        elif isinstance(frame, frames.Sid):
            self._receive_sid(frame.sid)
        elif isinstance(frame, frames.ReconnectAck):
            self._receive_reconnect_ack(frame.received)
        else:
            self._receive_native(frame)

    def _receive_native(self, frame: frames.Frame) -> None:
        if isinstance(frame, frames.Eof):
            self._require_ready("EOF")
            if frame.offset != self.received_total:
                raise InvalidData(f"EOF at {frame.offset} but {self.received_total} bytes received")
            if not self.peer_eof:
                self.peer_eof = True
                self._events.append(EofReceived())
            # Acknowledge at once so the sender can finish without waiting for the flush timer.
            self._send_ack()
        elif isinstance(frame, frames.Close):
            self._events.append(CloseReasonReceived(frame.code, frame.message))
        elif isinstance(frame, frames.Reauth):
            self._require_side(Side.SERVER, "REAUTH")
            try:
                token = frame.token.decode("ascii")
            except UnicodeDecodeError as exc:
                raise InvalidData("REAUTH token is not ASCII") from exc
            self._events.append(ReauthReceived(token))
        elif isinstance(frame, frames.ReauthOk):
            self._require_side(Side.CLIENT, "REAUTH_OK")
            self._events.append(ReauthAccepted(frame.expires))
        elif isinstance(frame, frames.ReauthRequired):
            self._require_side(Side.CLIENT, "REAUTH_REQUIRED")
            self._events.append(ReauthRequested(frame.deadline))

    def _receive_sid(self, sid: bytes) -> None:
        self._require_side(Side.CLIENT, "SID")
        if self._ready or self._expect_reconnect_ack:
            raise ProtocolError("unexpected SID")
        self.sid = sid
        self._ready = True
        self._events.append(SidReceived(sid))
        self._flush_pending()

    def _receive_reconnect_ack(self, received: int) -> None:
        self._require_side(Side.CLIENT, "RECONNECT_ACK")
        if self._ready or not self._expect_reconnect_ack:
            raise ProtocolError("unexpected RECONNECT_ACK")
        self._accept_peer_position(received, resume=True)
        self._ready = True
        self._expect_reconnect_ack = False
        self._events.append(Resumed(received))
        self._replay()

    def _require_ready(self, what: str) -> None:
        if not self._ready:
            raise ProtocolError(f"{what} before SID")

    def _require_side(self, side: Side, what: str) -> None:
        """A frame the peer sent that only the other side may send."""
        if self.side is not side:
            raise ProtocolError(f"{what} is only valid towards the {side.value}")

    def _require_own_side(self, side: Side, what: str) -> None:
        """A call that only the ``side`` end of a tunnel may make."""
        if self.side is not side:
            raise LocalProtocolError(f"{what} is for the {side.value} side")

    def _accept_peer_position(self, position: int, *, resume: bool) -> None:
        """Apply a cumulative ack (from ACK, RECONNECT_ACK, or a reconnect URL's ``ack``)."""
        if position > self.sent_total:
            raise InvalidAck(f"ack {position} beyond {self.sent_total} bytes sent")
        if position < self.peer_acked:
            if resume:
                raise RewindFailed(f"resume at {position}, buffer starts at {self.peer_acked}")
            raise BadAck(f"ack {position} went backwards from {self.peer_acked}")
        if position == self.peer_acked:
            return
        drop = position - self.peer_acked
        unacked = self._unacked
        while drop:
            head = unacked[0]
            if len(head) <= drop:
                unacked.popleft()
                drop -= len(head)
            else:
                unacked[0] = head[drop:]
                drop = 0
        self.peer_acked = position
        self._events.append(Acked(position))

    def events_received(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    # -- outbound -------------------------------------------------------------------------------

    def send_data(self, data: bytes) -> None:
        """Queue stream bytes. Raises ResumeBufferOverflow beyond ``send_capacity``."""
        if self._eof_at is not None:
            raise LocalProtocolError("send_data after send_eof")
        if len(data) > self.send_capacity:
            raise ResumeBufferOverflow(
                f"{len(data)} bytes offered, {self.send_capacity} of {self.buffer_limit} free"
            )
        if not data:
            return
        max_data = self.dialect.max_data
        if len(data) <= max_data:
            chunks = [data]
        else:
            chunks = [data[i : i + max_data] for i in range(0, len(data), max_data)]
        for chunk in chunks:
            self._unacked.append(chunk)
            if self.attached and self._ready:
                self._out.append(frames.encode_data(chunk))
        self.sent_total += len(data)

    def send_eof(self) -> None:
        """Native: end our direction after everything sent so far."""
        if not self.dialect.native:
            raise LocalProtocolError("half-close is not part of the IAP subprotocol")
        if self._eof_at is None:
            self._eof_at = self.sent_total
            if self.attached and self._ready:
                self._out.append(frames.encode_eof(self._eof_at))

    def send_reauth(self, token: str) -> None:
        self._require_own_side(Side.CLIENT, "REAUTH")
        self._native_control(frames.encode_reauth(token.encode("ascii")))

    def send_reauth_ok(self, expires: int) -> None:
        self._require_own_side(Side.SERVER, "REAUTH_OK")
        self._native_control(frames.encode_reauth_ok(expires))

    def send_reauth_required(self, deadline: int) -> None:
        self._require_own_side(Side.SERVER, "REAUTH_REQUIRED")
        self._native_control(frames.encode_reauth_required(deadline))

    def _native_control(self, message: bytes) -> None:
        if not self.dialect.native:
            raise LocalProtocolError("in-band control frames need the native subprotocol")
        if self.attached and self._ready:
            self._out.append(message)

    def data_to_send(self) -> list[bytes]:
        """Messages to write to the current WebSocket, in order."""
        out, self._out = self._out, []
        return out

    def _send_ack(self) -> None:
        self._acked_to_peer = self.received_total
        self._last_receive = None
        if self.attached:
            self._out.append(frames.encode_ack(self.received_total))

    def _flush_pending(self) -> None:
        """Client: data queued before the SID arrived goes out now, in order."""
        self._replay()

    def _replay(self) -> None:
        for chunk in self._unacked:
            self._out.append(frames.encode_data(chunk))
        if self._eof_at is not None:
            self._out.append(frames.encode_eof(self._eof_at))

    # -- timers ---------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When ``handle_timeout`` must next be called, or None."""
        if self._last_receive is None or not self.attached:
            return None
        return self._last_receive + self.dialect.ack_flush

    def handle_timeout(self, now: float) -> None:
        deadline = self.next_deadline()
        if deadline is not None and now >= deadline and self.received_total > self._acked_to_peer:
            self._send_ack()
