"""Scripted sequences against the tunnel state machine: messages in, events and messages out.

Time is injected (``now`` arguments); nothing sleeps.
"""

from __future__ import annotations

import pytest

from tunnel_protocol import frames
from tunnel_protocol.codes import CloseCode
from tunnel_protocol.dialect import IAP, NATIVE, Dialect
from tunnel_protocol.errors import (
    BadAck,
    InvalidAck,
    InvalidData,
    InvalidTag,
    LocalProtocolError,
    ProtocolError,
    ResumeBufferOverflow,
    RewindFailed,
)
from tunnel_protocol.tunnel import (
    DEFAULT_BUFFER_LIMIT,
    Acked,
    CloseReasonReceived,
    DataReceived,
    EofReceived,
    Event,
    ReauthAccepted,
    ReauthReceived,
    ReauthRequested,
    Resumed,
    Side,
    SidReceived,
    Tunnel,
)

from .helpers import TunnelPair

DIALECTS = [pytest.param(IAP, id="iap"), pytest.param(NATIVE, id="native")]
SID = b"sid-42"
KiB = 1024


def feed(tunnel: Tunnel, *messages: bytes, now: float = 0.0) -> list[Event]:
    for message in messages:
        tunnel.receive_message(message, now)
    return tunnel.events_received()


def new_server(dialect: Dialect, **kwargs: int) -> Tunnel:
    tunnel = Tunnel(Side.SERVER, dialect, **kwargs)
    tunnel.attach_server(SID)
    assert tunnel.data_to_send() == [frames.encode_sid(SID)]
    return tunnel


def new_client(dialect: Dialect, **kwargs: int) -> Tunnel:
    tunnel = Tunnel(Side.CLIENT, dialect, **kwargs)
    tunnel.attach_client()
    assert feed(tunnel, frames.encode_sid(SID)) == [SidReceived(SID)]
    assert tunnel.data_to_send() == []
    return tunnel


def new_tunnel(side: Side, dialect: Dialect, **kwargs: int) -> Tunnel:
    return new_server(dialect, **kwargs) if side is Side.SERVER else new_client(dialect, **kwargs)


def payloads(messages: list[bytes], dialect: Dialect) -> bytes:
    """Concatenate the payloads of DATA messages (asserting they are all DATA)."""
    out = b""
    for message in messages:
        frame = frames.decode(message, max_data=dialect.max_data, native=dialect.native)
        assert isinstance(frame, frames.Data)
        out += frame.payload
    return out


def data_frames(data: bytes, size: int) -> list[bytes]:
    return [frames.encode_data(data[i : i + size]) for i in range(0, len(data), size)]


SIDES = [pytest.param(Side.CLIENT, id="client"), pytest.param(Side.SERVER, id="server")]


# -- handshake ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
def test_server_sends_sid_first(dialect: Dialect) -> None:
    server = Tunnel(Side.SERVER, dialect)
    assert not server.attached
    server.send_data(b"early")  # e.g. the backend spoke first
    server.attach_server(SID)
    assert server.attached
    assert server.sid == SID
    assert server.data_to_send() == [frames.encode_sid(SID), frames.encode_data(b"early")]


def test_server_connect_twice_is_an_error() -> None:
    server = new_server(IAP)
    server.detach()
    with pytest.raises(LocalProtocolError):
        server.attach_server(SID)


def test_client_sends_nothing_before_sid() -> None:
    client = Tunnel(Side.CLIENT, IAP)
    client.attach_client()
    client.send_data(b"hello")
    client.send_data(b" world")
    assert not client.has_pending
    assert client.data_to_send() == []
    assert feed(client, frames.encode_sid(SID)) == [SidReceived(SID)]
    assert client.sid == SID
    assert client.has_pending
    assert client.data_to_send() == [frames.encode_data(b"hello"), frames.encode_data(b" world")]
    assert not client.has_pending


def test_client_eof_before_sid_follows_the_data() -> None:
    client = Tunnel(Side.CLIENT, NATIVE)
    client.attach_client()
    client.send_data(b"abc")
    client.send_eof()
    assert client.data_to_send() == []
    feed(client, frames.encode_sid(SID))
    assert client.data_to_send() == [frames.encode_data(b"abc"), frames.encode_eof(3)]


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize(
    "message",
    [
        pytest.param(frames.encode_data(b"x"), id="data"),
        pytest.param(frames.encode_ack(0), id="ack"),
        pytest.param(frames.encode_reconnect_ack(0), id="reconnect-ack"),
    ],
)
def test_client_rejects_anything_but_sid_first(dialect: Dialect, message: bytes) -> None:
    client = Tunnel(Side.CLIENT, dialect)
    client.attach_client()
    with pytest.raises(ProtocolError) as info:
        client.receive_message(message, 0.0)
    assert info.value.code == CloseCode.PROTOCOL_ERROR
    assert client.received_total == 0
    assert client.events_received() == []


def test_client_native_eof_before_sid_is_an_error() -> None:
    client = Tunnel(Side.CLIENT, NATIVE)
    client.attach_client()
    with pytest.raises(ProtocolError):
        client.receive_message(frames.encode_eof(0), 0.0)


def test_client_rejects_second_sid() -> None:
    client = new_client(IAP)
    with pytest.raises(ProtocolError):
        client.receive_message(frames.encode_sid(b"other"), 0.0)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(frames.encode_sid(SID), id="sid"),
        pytest.param(frames.encode_reconnect_ack(0), id="reconnect-ack"),
    ],
)
def test_server_rejects_server_frames(message: bytes) -> None:
    server = new_server(IAP)
    with pytest.raises(ProtocolError):
        server.receive_message(message, 0.0)


def test_client_reconnect_expects_reconnect_ack() -> None:
    client = new_client(IAP)
    client.detach()
    client.attach_client()
    with pytest.raises(ProtocolError):
        client.receive_message(frames.encode_sid(SID), 0.0)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(frames.encode_data(b"x"), id="data"),
        pytest.param(frames.encode_ack(0), id="ack"),
    ],
)
def test_client_reconnect_rejects_stream_frames_before_reconnect_ack(message: bytes) -> None:
    client = new_client(IAP)
    client.detach()
    client.attach_client()
    with pytest.raises(ProtocolError):
        client.receive_message(message, 0.0)


def test_client_rejects_second_reconnect_ack() -> None:
    client = new_client(IAP)
    client.detach()
    client.attach_client()
    assert feed(client, frames.encode_reconnect_ack(0)) == [Resumed(0)]
    with pytest.raises(ProtocolError):
        client.receive_message(frames.encode_reconnect_ack(0), 0.0)


def test_drop_before_sid_is_a_fresh_connect() -> None:
    client = Tunnel(Side.CLIENT, IAP)
    client.attach_client()
    client.send_data(b"one")
    client.detach()
    client.send_data(b"two")
    client.attach_client()  # no SID yet: this is a connect, not a reconnect
    assert feed(client, frames.encode_sid(b"new")) == [SidReceived(b"new")]
    assert client.data_to_send() == [frames.encode_data(b"one"), frames.encode_data(b"two")]


def test_buffer_limit_must_hold_two_frames() -> None:
    with pytest.raises(ValueError, match="buffer_limit"):
        Tunnel(Side.SERVER, IAP, buffer_limit=2 * IAP.max_data - 1)
    Tunnel(Side.SERVER, IAP, buffer_limit=2 * IAP.max_data)
    with pytest.raises(ValueError, match="buffer_limit"):
        Tunnel(Side.SERVER, NATIVE, buffer_limit=2 * IAP.max_data)


# -- receiving and acking -------------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
def test_data_received_event(side: Side) -> None:
    tunnel = new_tunnel(side, IAP)
    events = feed(tunnel, frames.encode_data(b"hello"), frames.encode_data(b"!"))
    assert events == [DataReceived(b"hello"), DataReceived(b"!")]
    assert tunnel.received_total == 6
    assert tunnel.data_to_send() == []  # below the threshold: no ACK yet


@pytest.mark.parametrize("side", SIDES)
def test_iap_acks_at_32_kib(side: Side) -> None:
    tunnel = new_tunnel(side, IAP)
    feed(tunnel, frames.encode_data(b"a" * 16 * KiB))
    assert tunnel.data_to_send() == []
    feed(tunnel, frames.encode_data(b"b" * (16 * KiB - 1)))
    assert tunnel.data_to_send() == []
    feed(tunnel, frames.encode_data(b"c"))
    assert tunnel.data_to_send() == [frames.encode_ack(32 * KiB)]
    assert tunnel.next_deadline() is None
    # The threshold counts from the last ACK.
    feed(tunnel, *data_frames(b"d" * (32 * KiB - 1), 16 * KiB))
    assert tunnel.data_to_send() == []
    feed(tunnel, frames.encode_data(b"e" * 10))
    assert tunnel.data_to_send() == [frames.encode_ack(64 * KiB + 9)]


@pytest.mark.parametrize("side", SIDES)
def test_native_acks_at_256_kib(side: Side) -> None:
    tunnel = new_tunnel(side, NATIVE)
    chunk = frames.encode_data(b"x" * 64 * KiB)
    for _ in range(3):
        feed(tunnel, chunk)
        assert tunnel.data_to_send() == []
    feed(tunnel, chunk)
    assert tunnel.data_to_send() == [frames.encode_ack(256 * KiB)]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_idle_flush_with_injected_time(dialect: Dialect) -> None:
    tunnel = new_server(dialect)
    assert tunnel.next_deadline() is None
    feed(tunnel, frames.encode_data(b"abc"), now=100.0)
    assert tunnel.next_deadline() == 100.0 + dialect.ack_flush
    # More data pushes the deadline: the flush happens after idleness.
    feed(tunnel, frames.encode_data(b"de"), now=100.5)
    deadline = 100.5 + dialect.ack_flush
    assert tunnel.next_deadline() == deadline
    tunnel.handle_timeout(deadline - 0.01)
    assert tunnel.data_to_send() == []
    tunnel.handle_timeout(deadline)
    assert tunnel.data_to_send() == [frames.encode_ack(5)]
    assert tunnel.next_deadline() is None
    tunnel.handle_timeout(deadline + 100)
    assert tunnel.data_to_send() == []


def test_iap_flush_is_two_seconds_native_one() -> None:
    assert IAP.ack_flush == 2.0
    assert NATIVE.ack_flush == 1.0


def test_handle_timeout_without_deadline_is_a_no_op() -> None:
    tunnel = new_server(IAP)
    tunnel.handle_timeout(1e9)
    assert tunnel.data_to_send() == []


def test_threshold_ack_cancels_the_flush_timer() -> None:
    tunnel = new_server(IAP)
    feed(tunnel, frames.encode_data(b"a" * 100), now=1.0)
    assert tunnel.next_deadline() == 3.0
    feed(tunnel, *data_frames(b"b" * (32 * KiB), 16 * KiB), now=2.0)
    # The 2nd frame crossed the threshold: the ACK covers everything, the timer is off.
    assert tunnel.data_to_send() == [frames.encode_ack(32 * KiB + 100)]
    assert tunnel.next_deadline() is None
    # Data after the threshold ACK starts a new idle timer.
    feed(tunnel, frames.encode_data(b"c"), now=3.0)
    assert tunnel.next_deadline() == 5.0
    tunnel.handle_timeout(5.0)
    assert tunnel.data_to_send() == [frames.encode_ack(32 * KiB + 101)]


def test_detached_tunnel_has_no_deadline() -> None:
    tunnel = new_server(IAP)
    feed(tunnel, frames.encode_data(b"abc"), now=5.0)
    tunnel.detach()
    assert tunnel.next_deadline() is None
    tunnel.handle_timeout(100.0)
    assert tunnel.data_to_send() == []


@pytest.mark.parametrize("side", SIDES)
def test_ack_advances_and_reports(side: Side) -> None:
    tunnel = new_tunnel(side, IAP)
    tunnel.send_data(b"x" * 100)
    tunnel.data_to_send()
    assert feed(tunnel, frames.encode_ack(40)) == [Acked(40)]
    assert tunnel.peer_acked == 40
    assert tunnel.buffered == 60
    # A repeated ACK is harmless and reports nothing.
    assert feed(tunnel, frames.encode_ack(40)) == []
    assert feed(tunnel, frames.encode_ack(100)) == [Acked(100)]
    assert tunnel.buffered == 0


@pytest.mark.parametrize("side", SIDES)
def test_ack_backwards_is_bad_ack(side: Side) -> None:
    tunnel = new_tunnel(side, IAP)
    tunnel.send_data(b"x" * 100)
    feed(tunnel, frames.encode_ack(50))
    with pytest.raises(BadAck) as info:
        tunnel.receive_message(frames.encode_ack(49), 0.0)
    assert info.value.code == 4005
    assert tunnel.peer_acked == 50


@pytest.mark.parametrize("side", SIDES)
def test_ack_beyond_sent_is_invalid_ack(side: Side) -> None:
    tunnel = new_tunnel(side, IAP)
    tunnel.send_data(b"x" * 100)
    with pytest.raises(InvalidAck) as info:
        tunnel.receive_message(frames.encode_ack(101), 0.0)
    assert info.value.code == 4006
    assert tunnel.peer_acked == 0
    assert tunnel.buffered == 100


def test_ack_with_nothing_sent_is_invalid() -> None:
    tunnel = new_server(NATIVE)
    with pytest.raises(InvalidAck):
        tunnel.receive_message(frames.encode_ack(1), 0.0)
    assert feed(tunnel, frames.encode_ack(0)) == []


def test_ack_inside_a_chunk_keeps_the_tail() -> None:
    tunnel = new_server(IAP)
    data = bytes(range(256)) * 200  # 51200 bytes: 16 KiB, 16 KiB, 16 KiB, 2 KiB chunks
    tunnel.send_data(data)
    assert payloads(tunnel.data_to_send(), IAP) == data
    feed(tunnel, frames.encode_ack(20_000))
    tunnel.detach()
    tunnel.attach_server(SID, resume_from=20_000)
    out = tunnel.data_to_send()
    assert out[0] == frames.encode_reconnect_ack(0)
    assert payloads(out[1:], IAP) == data[20_000:]


# -- sending and capacity -------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
def test_send_data_splits_into_max_size_frames(dialect: Dialect) -> None:
    tunnel = new_server(dialect)
    data = bytes(range(256)) * (dialect.max_data * 2 // 256 + 1)  # two full frames + 256 bytes
    tunnel.send_data(data)
    out = tunnel.data_to_send()
    assert [len(m) - 6 for m in out] == [dialect.max_data, dialect.max_data, 256]
    assert payloads(out, dialect) == data
    assert tunnel.sent_total == len(data)


def test_send_empty_data_is_a_no_op() -> None:
    tunnel = new_server(IAP)
    tunnel.send_data(b"")
    assert tunnel.data_to_send() == []
    assert tunnel.sent_total == 0


@pytest.mark.parametrize("dialect", DIALECTS)
def test_send_capacity_shrinks_and_grows(dialect: Dialect) -> None:
    limit = 2 * dialect.max_data
    tunnel = new_server(dialect, buffer_limit=limit)
    assert tunnel.send_capacity == limit
    tunnel.send_data(b"x" * 1000)
    assert tunnel.send_capacity == limit - 1000
    assert tunnel.buffered == 1000
    feed(tunnel, frames.encode_ack(600))
    assert tunnel.send_capacity == limit - 400
    tunnel.send_data(b"y" * (limit - 400))
    assert tunnel.send_capacity == 0
    feed(tunnel, frames.encode_ack(1000))
    assert tunnel.send_capacity == 400
    feed(tunnel, frames.encode_ack(tunnel.sent_total))
    assert tunnel.send_capacity == limit
    assert tunnel.buffered == 0


@pytest.mark.parametrize("dialect", DIALECTS)
def test_send_beyond_capacity_overflows_without_changing_state(dialect: Dialect) -> None:
    limit = 2 * dialect.max_data
    tunnel = new_server(dialect, buffer_limit=limit)
    tunnel.send_data(b"x" * 100)
    before = (tunnel.sent_total, tunnel.buffered, tunnel.send_capacity, tunnel.peer_acked)
    out_before = tunnel.data_to_send()
    with pytest.raises(ResumeBufferOverflow) as info:
        tunnel.send_data(b"y" * (limit - 99))
    assert info.value.code == 4103
    assert (tunnel.sent_total, tunnel.buffered, tunnel.send_capacity, tunnel.peer_acked) == before
    assert tunnel.data_to_send() == []
    assert not tunnel.has_pending
    # The stream is intact: acking and replaying still yields exactly the first 100 bytes.
    tunnel.detach()
    tunnel.attach_server(SID, resume_from=0)
    assert payloads(tunnel.data_to_send()[1:], dialect) == b"x" * 100
    assert payloads(out_before, dialect) == b"x" * 100


def test_default_buffer_limit() -> None:
    tunnel = Tunnel(Side.CLIENT, NATIVE)
    assert tunnel.buffer_limit == DEFAULT_BUFFER_LIMIT == 8 * 1024 * 1024
    assert tunnel.send_capacity == DEFAULT_BUFFER_LIMIT


def test_send_while_detached_is_buffered_for_replay() -> None:
    tunnel = new_server(IAP)
    tunnel.send_data(b"one")
    tunnel.detach()
    assert not tunnel.has_pending  # detach dropped the unsent message
    tunnel.send_data(b"two")
    assert tunnel.data_to_send() == []
    tunnel.attach_server(SID, resume_from=0)
    assert tunnel.data_to_send() == [
        frames.encode_reconnect_ack(0),
        frames.encode_data(b"one"),
        frames.encode_data(b"two"),
    ]


# -- resume ---------------------------------------------------------------------------------------


def test_server_resume_replays_exactly_the_unacked_bytes() -> None:
    server = new_server(IAP)
    feed(server, frames.encode_data(b"from client"))
    server.send_data(b"0123456789")
    server.send_data(b"abcdef")
    server.data_to_send()
    feed(server, frames.encode_ack(4))
    server.detach()
    # The client had received 12 bytes (its ACK for them was lost with the WebSocket).
    server.attach_server(SID, resume_from=12)
    assert server.events_received() == [Acked(12)]
    assert server.data_to_send() == [
        frames.encode_reconnect_ack(11),
        frames.encode_data(b"cdef"),
    ]
    assert server.peer_acked == 12
    assert server.buffered == 4


def test_server_resume_acks_what_it_received() -> None:
    server = new_server(IAP)
    feed(server, frames.encode_data(b"12345"), now=1.0)
    assert server.next_deadline() == 3.0
    server.detach()
    server.attach_server(SID, resume_from=0)
    assert server.data_to_send() == [frames.encode_reconnect_ack(5)]
    # RECONNECT_ACK told the client everything: no flush pending.
    assert server.next_deadline() is None
    server.handle_timeout(10.0)
    assert server.data_to_send() == []


def test_reattach_without_detach_leaves_no_stale_deadline() -> None:
    # A reconnect may be accepted before the old WebSocket's end is noticed.
    server = new_server(IAP)
    feed(server, frames.encode_data(b"12345"), now=1.0)
    server.attach_server(SID, resume_from=0)
    assert server.data_to_send() == [frames.encode_reconnect_ack(5)]
    assert server.next_deadline() is None
    client = new_client(IAP)
    feed(client, frames.encode_data(b"12345"), now=1.0)
    client.attach_client()
    assert client.next_deadline() is None


def test_server_resume_below_buffer_start_fails_to_rewind() -> None:
    server = new_server(IAP)
    server.send_data(b"x" * 100)
    feed(server, frames.encode_ack(60))
    server.detach()
    with pytest.raises(RewindFailed) as info:
        server.attach_server(SID, resume_from=59)
    assert info.value.code == 4074
    assert server.peer_acked == 60


def test_server_resume_beyond_sent_is_invalid_ack() -> None:
    server = new_server(IAP)
    server.send_data(b"x" * 100)
    server.detach()
    with pytest.raises(InvalidAck) as info:
        server.attach_server(SID, resume_from=101)
    assert info.value.code == 4006


def test_client_resume_replays_exactly_the_unacked_bytes() -> None:
    client = new_client(IAP)
    feed(client, frames.encode_data(b"hello"))
    client.send_data(b"abc")
    client.send_data(b"defgh")
    client.data_to_send()
    client.detach()
    client.send_data(b"ij")  # while disconnected
    client.attach_client()
    assert client.data_to_send() == []  # waits for RECONNECT_ACK
    assert client.received_total == 5  # the reconnect URL's ack=5
    events = feed(client, frames.encode_reconnect_ack(4))
    assert events == [Acked(4), Resumed(4)]
    assert client.data_to_send() == [
        frames.encode_data(b"efgh"),
        frames.encode_data(b"ij"),
    ]
    assert client.next_deadline() is None


def test_client_resume_below_buffer_start_fails_to_rewind() -> None:
    client = new_client(IAP)
    client.send_data(b"x" * 10)
    feed(client, frames.encode_ack(8))
    client.detach()
    client.attach_client()
    with pytest.raises(RewindFailed) as info:
        client.receive_message(frames.encode_reconnect_ack(7), 0.0)
    assert info.value.code == 4074


def test_client_resume_beyond_sent_is_invalid_ack() -> None:
    client = new_client(IAP)
    client.send_data(b"x" * 10)
    client.detach()
    client.attach_client()
    with pytest.raises(InvalidAck):
        client.receive_message(frames.encode_reconnect_ack(11), 0.0)


def test_client_ack_threshold_counts_from_the_reconnect_ack() -> None:
    client = new_client(IAP)
    feed(client, *data_frames(b"x" * 30 * KiB, 16 * KiB))
    assert client.data_to_send() == []
    client.detach()
    client.attach_client()  # ack=30 KiB travels in the URL
    feed(client, frames.encode_reconnect_ack(0))
    feed(client, frames.encode_data(b"y" * 4 * KiB))
    assert client.data_to_send() == []  # only 4 KiB unacked since the reconnect


@pytest.mark.parametrize("dialect", DIALECTS)
def test_pair_resume_after_a_drop(dialect: Dialect) -> None:
    pair = TunnelPair(dialect)
    pair.handshake()
    pair.client.tunnel.send_data(b"c" * 5000)
    pair.server.tunnel.send_data(b"s" * 7000)
    pair.collect()
    pair.deliver_to_server(1)
    pair.drop()
    pair.client.tunnel.send_data(b"C")
    pair.settle()
    assert bytes(pair.server.received) == b"c" * 5000 + b"C"
    assert bytes(pair.client.received) == b"s" * 7000
    assert pair.client.tunnel.buffered == 0
    assert pair.server.tunnel.buffered == 0
    assert Resumed(5000) in pair.client.events


# -- native EOF (half-close) ----------------------------------------------------------------------


def test_send_eof_on_iap_raises() -> None:
    tunnel = new_client(IAP)
    with pytest.raises(LocalProtocolError):
        tunnel.send_eof()
    assert not tunnel.eof_sent


def test_send_eof_sends_offset_once() -> None:
    tunnel = new_client(NATIVE)
    tunnel.send_data(b"abc")
    tunnel.send_eof()
    tunnel.send_eof()
    assert tunnel.eof_sent
    assert tunnel.data_to_send() == [frames.encode_data(b"abc"), frames.encode_eof(3)]
    assert tunnel.send_capacity == 0
    with pytest.raises(LocalProtocolError):
        tunnel.send_data(b"more")
    with pytest.raises(LocalProtocolError):
        tunnel.send_data(b"")
    assert tunnel.sent_total == 3


@pytest.mark.parametrize("side", SIDES)
def test_eof_received_is_acked_at_once(side: Side) -> None:
    tunnel = new_tunnel(side, NATIVE)
    events = feed(tunnel, frames.encode_data(b"hi"), frames.encode_eof(2), now=1.0)
    assert events == [DataReceived(b"hi"), EofReceived()]
    assert tunnel.peer_eof
    assert tunnel.data_to_send() == [frames.encode_ack(2)]
    assert tunnel.next_deadline() is None


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("offset", [0, 1, 3, 2**64 - 1])
def test_eof_at_wrong_offset_is_invalid_data(side: Side, offset: int) -> None:
    tunnel = new_tunnel(side, NATIVE)
    feed(tunnel, frames.encode_data(b"hi"))
    with pytest.raises(InvalidData) as info:
        tunnel.receive_message(frames.encode_eof(offset), 0.0)
    assert info.value.code == 4013
    assert not tunnel.peer_eof


@pytest.mark.parametrize("side", SIDES)
def test_data_after_eof_is_invalid_data(side: Side) -> None:
    tunnel = new_tunnel(side, NATIVE)
    feed(tunnel, frames.encode_eof(0))
    with pytest.raises(InvalidData):
        tunnel.receive_message(frames.encode_data(b"late"), 0.0)
    assert tunnel.received_total == 0


def test_eof_frame_on_iap_is_invalid_tag() -> None:
    tunnel = new_server(IAP)
    with pytest.raises(InvalidTag):
        tunnel.receive_message(bytes.fromhex("00 10 00 00 00 00 00 00 00 00"), 0.0)


def test_duplicate_eof_after_resume_is_ignored() -> None:
    client = new_client(NATIVE)
    feed(client, frames.encode_data(b"bye"), frames.encode_eof(3))
    assert client.peer_eof
    client.detach()
    client.attach_client()
    # The server did not see our ACK, so it replays its EOF after the RECONNECT_ACK.
    events = feed(client, frames.encode_reconnect_ack(0), frames.encode_eof(3))
    assert events == [Resumed(0)]
    assert client.data_to_send() == [frames.encode_ack(3)]


def test_server_replays_eof_on_resume() -> None:
    server = new_server(NATIVE)
    server.send_data(b"bye")
    server.send_eof()
    server.data_to_send()
    server.detach()
    server.attach_server(SID, resume_from=3)
    assert server.data_to_send() == [frames.encode_reconnect_ack(0), frames.encode_eof(3)]


def test_half_close_client_to_server_then_server_keeps_sending() -> None:
    pair = TunnelPair(NATIVE)
    pair.handshake()
    client, server = pair.client.tunnel, pair.server.tunnel
    client.send_data(b"request")
    client.send_eof()
    pair.pump()
    assert pair.server.received == b"request"
    assert pair.server.eof
    assert client.peer_acked == 7  # EOF is acked at once
    assert not client.finished
    assert not server.finished
    # The other direction still flows.
    server.send_data(b"response")
    pair.pump()
    assert pair.client.received == b"response"
    assert not server.finished  # no EOF from the server yet
    server.send_eof()
    pair.pump()
    assert pair.client.eof
    assert client.finished
    assert server.finished


def test_half_close_server_to_client() -> None:
    pair = TunnelPair(NATIVE)
    pair.handshake()
    client, server = pair.client.tunnel, pair.server.tunnel
    server.send_data(b"banner")
    server.send_eof()
    pair.pump()
    assert pair.client.eof
    assert not client.finished  # our direction is open
    client.send_data(b"late upload")
    pair.pump()
    assert pair.server.received == b"late upload"
    client.send_eof()
    pair.pump()
    assert client.finished
    assert server.finished


def test_finished_needs_both_eofs_and_all_acked() -> None:
    server = new_server(NATIVE)
    assert not server.finished
    server.send_data(b"abc")
    server.send_eof()
    feed(server, frames.encode_eof(0))
    assert server.peer_eof
    assert server.eof_sent
    assert not server.finished  # 3 bytes unacknowledged
    feed(server, frames.encode_ack(2))
    assert not server.finished
    feed(server, frames.encode_ack(3))
    assert server.finished


def test_finished_with_nothing_sent() -> None:
    client = new_client(NATIVE)
    client.send_eof()
    assert not client.finished
    feed(client, frames.encode_eof(0))
    assert client.finished


# -- native control frames ------------------------------------------------------------------------


def test_close_reason_event() -> None:
    client = new_client(NATIVE)
    events = feed(client, frames.encode_close(4033, "not authorized"))
    assert events == [CloseReasonReceived(4033, "not authorized")]


def test_close_reason_before_sid_is_reported() -> None:
    # A relay refusing a connect may explain why before it closes.
    client = Tunnel(Side.CLIENT, NATIVE)
    client.attach_client()
    assert feed(client, frames.encode_close(4047, "no such vm")) == [
        CloseReasonReceived(4047, "no such vm")
    ]


def test_close_frame_on_iap_is_invalid_tag() -> None:
    client = new_client(IAP)
    with pytest.raises(InvalidTag):
        client.receive_message(frames.encode_close(1000, ""), 0.0)


def test_server_receives_reauth() -> None:
    server = new_server(NATIVE)
    assert feed(server, frames.encode_reauth(b"ey.new.token")) == [ReauthReceived("ey.new.token")]


def test_reauth_token_must_be_ascii() -> None:
    server = new_server(NATIVE)
    with pytest.raises(InvalidData):
        server.receive_message(frames.encode_reauth("t\u00f6ken".encode()), 0.0)


def test_client_rejects_reauth() -> None:
    client = new_client(NATIVE)
    with pytest.raises(ProtocolError):
        client.receive_message(frames.encode_reauth(b"token"), 0.0)


def test_client_receives_reauth_ok_and_required() -> None:
    client = new_client(NATIVE)
    events = feed(client, frames.encode_reauth_required(1000), frames.encode_reauth_ok(5000))
    assert events == [ReauthRequested(1000), ReauthAccepted(5000)]


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(frames.encode_reauth_ok(1), id="reauth-ok"),
        pytest.param(frames.encode_reauth_required(1), id="reauth-required"),
    ],
)
def test_server_rejects_server_control_frames(message: bytes) -> None:
    server = new_server(NATIVE)
    with pytest.raises(ProtocolError):
        server.receive_message(message, 0.0)


def test_reauth_round_trip_between_the_pair() -> None:
    pair = TunnelPair(NATIVE)
    pair.handshake()
    pair.server.tunnel.send_reauth_required(1234)
    pair.pump()
    assert pair.client.events[-1:] == [ReauthRequested(1234)]
    pair.client.tunnel.send_reauth("fresh")
    pair.pump()
    assert pair.server.events[-1:] == [ReauthReceived("fresh")]
    pair.server.tunnel.send_reauth_ok(9999)
    pair.pump()
    assert pair.client.events[-1:] == [ReauthAccepted(9999)]


def test_reauth_sending_direction_is_enforced() -> None:
    client = new_client(NATIVE)
    server = new_server(NATIVE)
    with pytest.raises(LocalProtocolError):
        server.send_reauth("token")
    with pytest.raises(LocalProtocolError):
        client.send_reauth_ok(1)
    with pytest.raises(LocalProtocolError):
        client.send_reauth_required(1)
    assert client.data_to_send() == []
    assert server.data_to_send() == []


def test_reauth_frames_need_the_native_dialect() -> None:
    client = new_client(IAP)
    server = new_server(IAP)
    with pytest.raises(LocalProtocolError):
        client.send_reauth("token")
    with pytest.raises(LocalProtocolError):
        server.send_reauth_ok(1)
    with pytest.raises(LocalProtocolError):
        server.send_reauth_required(1)
    assert client.data_to_send() == []
    assert server.data_to_send() == []


# -- lifecycle ------------------------------------------------------------------------------------


def test_detach_drops_unsent_messages() -> None:
    server = new_server(IAP)
    server.send_data(b"abc")
    assert server.has_pending
    server.detach()
    assert not server.attached
    assert not server.has_pending
    assert server.data_to_send() == []
    assert server.buffered == 3


def test_detached_server_rejects_stream_frames() -> None:
    server = new_server(IAP)
    server.detach()
    with pytest.raises(ProtocolError):
        server.receive_message(frames.encode_data(b"x"), 0.0)


def test_events_are_returned_once() -> None:
    server = new_server(IAP)
    server.receive_message(frames.encode_data(b"x"), 0.0)
    assert server.events_received() == [DataReceived(b"x")]
    assert server.events_received() == []
