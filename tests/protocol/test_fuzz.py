"""Hypothesis fuzzers: the codec and the state machine only ever fail with TunnelError, and a
client/server pair delivers exactly the bytes sent, whatever the splitting, ack timing and drops.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel_protocol import frames
from tunnel_protocol.dialect import IAP, NATIVE, Dialect
from tunnel_protocol.errors import InvalidData, InvalidTag, TunnelError
from tunnel_protocol.frames import Tag
from tunnel_protocol.tunnel import Side, Tunnel

from .helpers import Endpoint, TunnelPair

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

dialects = st.sampled_from([IAP, NATIVE])
u64 = st.one_of(
    st.integers(min_value=0, max_value=300_000),
    st.integers(min_value=0, max_value=2**64 - 1),
)
tags = st.one_of(st.sampled_from(list(Tag)), st.integers(min_value=0, max_value=0xFFFF))


@st.composite
def near_frames(draw: st.DrawFn) -> bytes:
    """A known or random tag, a plausible or random length, and a random tail."""
    tag = draw(tags)
    body = draw(st.binary(max_size=64))
    form = draw(st.sampled_from(["u32", "u64", "close", "raw"]))
    if form == "u32":
        length = draw(st.sampled_from([len(body), len(body) + 1, max(0, len(body) - 1)]))
        return struct.pack(">HI", tag, length) + body
    if form == "u64":
        return struct.pack(">HQ", tag, draw(u64))
    if form == "close":
        code = draw(st.integers(min_value=0, max_value=0xFFFF))
        return struct.pack(">HHI", tag, code, len(body)) + body
    return struct.pack(">H", tag) + body


well_formed = st.one_of(
    st.builds(frames.encode_data, st.binary(min_size=1, max_size=512)),
    st.builds(frames.encode_ack, u64),
    st.builds(frames.encode_sid, st.binary(min_size=1, max_size=32)),
    st.builds(frames.encode_reconnect_ack, u64),
    st.builds(frames.encode_eof, u64),
    st.builds(
        frames.encode_close, st.integers(min_value=0, max_value=0xFFFF), st.text(max_size=40)
    ),
    st.builds(frames.encode_reauth, st.binary(min_size=1, max_size=64)),
    st.builds(frames.encode_reauth_ok, u64),
    st.builds(frames.encode_reauth_required, u64),
)
messages = st.one_of(st.binary(max_size=80), near_frames(), well_formed)


# -- (1) the codec --------------------------------------------------------------------------------


@FUZZ
@given(message=messages, dialect=dialects)
def test_decode_returns_a_frame_or_raises_tunnel_error(message: bytes, dialect: Dialect) -> None:
    try:
        frame = frames.decode(message, max_data=dialect.max_data, native=dialect.native)
    except (InvalidTag, InvalidData):  # the only TunnelErrors the codec raises
        return
    assert isinstance(
        frame,
        frames.Sid
        | frames.ReconnectAck
        | frames.Data
        | frames.Ack
        | frames.Eof
        | frames.Close
        | frames.Reauth
        | frames.ReauthOk
        | frames.ReauthRequired,
    )
    if not dialect.native:
        assert isinstance(frame, frames.Sid | frames.ReconnectAck | frames.Data | frames.Ack)


# -- (2) the state machine ------------------------------------------------------------------------


@st.composite
def tunnels(draw: st.DrawFn) -> Tunnel:
    """A tunnel in one of its reachable states."""
    dialect = draw(dialects)
    side = draw(st.sampled_from(Side))
    tunnel = Tunnel(side, dialect)
    sent = draw(st.integers(min_value=0, max_value=3 * dialect.max_data))
    tunnel.send_data(b"s" * sent)
    state = draw(st.sampled_from(["connecting", "ready", "reconnecting", "detached"]))
    if side is Side.SERVER:
        tunnel.attach_server(b"sid")
        if state in ("reconnecting", "detached"):
            tunnel.detach()
        if state == "reconnecting":
            tunnel.attach_server(b"sid", resume_from=draw(st.integers(0, sent)))
    else:
        tunnel.attach_client()
        if state != "connecting":
            tunnel.receive_message(frames.encode_sid(b"sid"), 0.0)
        if state in ("reconnecting", "detached"):
            tunnel.detach()
        if state == "reconnecting":
            tunnel.attach_client()
    if dialect.native and draw(st.booleans()):
        tunnel.send_eof()
    tunnel.data_to_send()
    tunnel.events_received()
    return tunnel


@FUZZ
@given(tunnel=tunnels(), inputs=st.lists(messages, max_size=12), clock=st.floats(0, 10))
def test_tunnel_only_raises_tunnel_errors(
    tunnel: Tunnel, inputs: list[bytes], clock: float
) -> None:
    now = 0.0
    for message in inputs:
        now += clock
        try:
            tunnel.receive_message(message, now)
        except TunnelError:
            return  # the driver closes the WebSocket with exc.code
        tunnel.events_received()
        tunnel.handle_timeout(now)
        tunnel.data_to_send()
        assert 0 <= tunnel.peer_acked <= tunnel.sent_total
        assert 0 <= tunnel.send_capacity <= tunnel.buffer_limit
        assert tunnel.buffered == tunnel.sent_total - tunnel.peer_acked


# -- (3) exactly-once, in-order delivery through drops and resumes --------------------------------


@dataclass
class Direction:
    """One direction's application source: the bytes offered, and those not yet accepted."""

    rng: random.Random
    sent: bytearray = field(default_factory=bytearray)
    pending: bytearray = field(default_factory=bytearray)
    closing: bool = False

    def offer(self, size: int) -> None:
        if not self.closing:
            chunk = self.rng.randbytes(size)
            self.sent += chunk
            self.pending += chunk

    def push(self, endpoint: Endpoint) -> None:
        """Hand over as much as the tunnel accepts (what a driver does after every event)."""
        tunnel = endpoint.tunnel
        take = min(len(self.pending), tunnel.send_capacity)
        if take:
            tunnel.send_data(bytes(self.pending[:take]))
            del self.pending[:take]
        if self.closing and not self.pending and not tunnel.eof_sent:
            tunnel.send_eof()


OPS = ["send_c", "send_s", "to_server", "to_client", "tick", "drop", "eof_c", "eof_s"]
ops = st.lists(
    st.tuples(st.sampled_from(OPS), st.integers(min_value=1, max_value=200_000)),
    max_size=40,
)


@FUZZ
@given(
    dialect=dialects,
    limit_frames=st.sampled_from([2, 3, 8, 64]),
    seed=st.integers(min_value=0, max_value=2**32),
    script=ops,
)
def test_pair_delivers_exactly_the_bytes_sent(
    dialect: Dialect, limit_frames: int, seed: int, script: list[tuple[str, int]]
) -> None:
    pair = TunnelPair(dialect, buffer_limit=limit_frames * dialect.max_data)
    upload = Direction(random.Random(seed))
    download = Direction(random.Random(seed + 1))
    pair.handshake()

    def push() -> None:
        upload.push(pair.client)
        download.push(pair.server)
        pair.collect()

    for op, arg in script:
        if op == "send_c":
            upload.offer(arg)
        elif op == "send_s":
            download.offer(arg)
        elif op == "to_server":
            pair.deliver_to_server(arg % 7)
        elif op == "to_client":
            pair.deliver_to_client(arg % 7)
        elif op == "tick":
            pair.advance((arg % 30) / 10)
        elif op == "drop":
            pair.drop()
        elif op == "eof_c" and dialect.native:
            upload.closing = True
        elif op == "eof_s" and dialect.native:
            download.closing = True
        push()
        assert upload.sent.startswith(pair.server.received)
        assert download.sent.startswith(pair.client.received)

    if dialect.native:
        upload.closing = download.closing = True
    for _ in range(1000):
        push()
        pair.settle()
        push()
        if not (upload.pending or download.pending or pair.to_server or pair.to_client):
            break
    else:
        raise AssertionError("transfer did not complete")

    assert pair.server.received == upload.sent
    assert pair.client.received == download.sent
    client, server = pair.client.tunnel, pair.server.tunnel
    assert client.buffered == 0
    assert server.buffered == 0
    assert server.received_total == client.sent_total == len(upload.sent)
    assert client.received_total == server.sent_total == len(download.sent)
    if dialect.native:
        assert pair.client.eof
        assert pair.server.eof
        assert client.finished
        assert server.finished
