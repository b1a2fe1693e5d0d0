"""Frame codec: byte-exact encodings, round trips, and every malformed frame's error and code."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_protocol import frames
from tunnel_protocol.codes import CloseCode
from tunnel_protocol.dialect import IAP, NATIVE, Dialect
from tunnel_protocol.errors import InvalidData, InvalidTag, ProtocolError, TunnelError
from tunnel_protocol.frames import (
    MAX_CLOSE_MESSAGE,
    MAX_SID,
    MAX_TOKEN,
    Ack,
    Close,
    Data,
    Eof,
    Frame,
    Reauth,
    ReauthOk,
    ReauthRequired,
    ReconnectAck,
    Sid,
    Tag,
)

DIALECTS = [pytest.param(IAP, id="iap"), pytest.param(NATIVE, id="native")]
U64_MAX = 2**64 - 1


def decode_iap(message: bytes) -> Frame:
    return frames.decode(message, max_data=IAP.max_data, native=False)


def decode_native(message: bytes) -> Frame:
    return frames.decode(message, max_data=NATIVE.max_data, native=True)


def decode_with(dialect: Dialect, message: bytes) -> Frame:
    return frames.decode(message, max_data=dialect.max_data, native=dialect.native)


# -- byte-exact encodings -----------------------------------------------------------------------


def test_data_hello_matches_the_guide() -> None:
    assert frames.encode_data(b"hello") == bytes.fromhex("00 04 00 00 00 05 68 65 6c 6c 6f")


def test_data_accepts_memoryview() -> None:
    assert frames.encode_data(memoryview(b"xhello")[1:]) == frames.encode_data(b"hello")


def test_ack_49152_matches_the_guide() -> None:
    assert frames.encode_ack(49152) == bytes.fromhex("00 07 00 00 00 00 00 00 c0 00")


def test_sid() -> None:
    assert frames.encode_sid(b"abc") == bytes.fromhex("00 01 00 00 00 03 61 62 63")


def test_reconnect_ack() -> None:
    assert frames.encode_reconnect_ack(0x0102030405060708) == bytes.fromhex(
        "00 02 01 02 03 04 05 06 07 08"
    )


def test_ack_u64_max() -> None:
    assert frames.encode_ack(U64_MAX) == bytes.fromhex("00 07 ff ff ff ff ff ff ff ff")


def test_native_eof() -> None:
    assert frames.encode_eof(5) == bytes.fromhex("00 10 00 00 00 00 00 00 00 05")


def test_native_close() -> None:
    assert frames.encode_close(4033, "no") == bytes.fromhex("00 11 0f c1 00 00 00 02 6e 6f")


def test_native_close_empty_message() -> None:
    assert frames.encode_close(1000, "") == bytes.fromhex("00 11 03 e8 00 00 00 00")


def test_native_reauth() -> None:
    assert frames.encode_reauth(b"tok") == bytes.fromhex("00 12 00 00 00 03 74 6f 6b")


def test_native_reauth_ok() -> None:
    assert frames.encode_reauth_ok(1_700_000_000) == bytes.fromhex("00 13 00 00 00 00 65 53 f1 00")


def test_native_reauth_required() -> None:
    assert frames.encode_reauth_required(0) == bytes.fromhex("00 14 00 00 00 00 00 00 00 00")


def test_tag_values() -> None:
    assert {tag.name: int(tag) for tag in Tag} == {
        "SID": 0x0001,
        "RECONNECT_ACK": 0x0002,
        "DATA": 0x0004,
        "ACK": 0x0007,
        "EOF": 0x0010,
        "CLOSE": 0x0011,
        "REAUTH": 0x0012,
        "REAUTH_OK": 0x0013,
        "REAUTH_REQUIRED": 0x0014,
    }
    assert frames.NATIVE_ONLY_TAGS == set(Tag) - {
        Tag.SID,
        Tag.RECONNECT_ACK,
        Tag.DATA,
        Tag.ACK,
    }


# -- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize(
    ("message", "frame"),
    [
        (bytes.fromhex("00 04 00 00 00 05 68 65 6c 6c 6f"), Data(b"hello")),
        (bytes.fromhex("00 07 00 00 00 00 00 00 c0 00"), Ack(49152)),
        (bytes.fromhex("00 01 00 00 00 03 61 62 63"), Sid(b"abc")),
        (bytes.fromhex("00 02 00 00 00 00 00 00 00 07"), ReconnectAck(7)),
    ],
)
def test_decode_shared_frames(dialect: Dialect, message: bytes, frame: Frame) -> None:
    assert decode_with(dialect, message) == frame


@pytest.mark.parametrize(
    ("message", "frame"),
    [
        (frames.encode_eof(123), Eof(123)),
        (frames.encode_close(4004, "log in again"), Close(4004, "log in again")),
        (frames.encode_close(1000, ""), Close(1000, "")),
        (frames.encode_reauth(b"ey.J"), Reauth(b"ey.J")),
        (frames.encode_reauth_ok(99), ReauthOk(99)),
        (frames.encode_reauth_required(U64_MAX), ReauthRequired(U64_MAX)),
    ],
)
def test_decode_native_frames(message: bytes, frame: Frame) -> None:
    assert decode_native(message) == frame


@pytest.mark.parametrize("dialect", DIALECTS)
def test_data_at_max_size_is_accepted(dialect: Dialect) -> None:
    payload = b"x" * dialect.max_data
    assert decode_with(dialect, frames.encode_data(payload)) == Data(payload)


def test_data_returns_bytes() -> None:
    frame = decode_iap(frames.encode_data(b"abc"))
    assert isinstance(frame, Data)
    assert type(frame.payload) is bytes


def test_sid_at_max_size_is_accepted() -> None:
    assert decode_iap(frames.encode_sid(b"s" * MAX_SID)) == Sid(b"s" * MAX_SID)


def test_reauth_at_max_size_is_accepted() -> None:
    assert decode_native(frames.encode_reauth(b"t" * MAX_TOKEN)) == Reauth(b"t" * MAX_TOKEN)


def test_close_message_is_truncated_to_the_limit() -> None:
    frame = decode_native(frames.encode_close(4000, "a" * (MAX_CLOSE_MESSAGE + 500)))
    assert frame == Close(4000, "a" * MAX_CLOSE_MESSAGE)


def test_close_truncation_never_splits_a_utf8_sequence() -> None:
    # 3-byte characters: 1024 is not a multiple of 3, so a naive cut leaves a broken sequence.
    message = "\u20ac" * 1000
    encoded = frames.encode_close(4000, message)
    frame = decode_native(encoded)
    assert frame == Close(4000, "\u20ac" * (MAX_CLOSE_MESSAGE // 3))
    assert len(encoded) == 8 + 3 * (MAX_CLOSE_MESSAGE // 3)


def test_close_message_with_lone_surrogate_still_encodes() -> None:
    # Reasons come from str(exception); they may hold surrogate-escaped bytes.
    frame = decode_native(frames.encode_close(4000, "bad \udcff name"))
    assert isinstance(frame, Close)
    assert frame.code == 4000
    assert frame.message.startswith("bad ")
    assert frame.message.endswith(" name")


# -- round trips ----------------------------------------------------------------------------------

u64 = st.integers(min_value=0, max_value=U64_MAX)


@given(payload=st.binary(min_size=1, max_size=IAP.max_data))
def test_data_round_trip(payload: bytes) -> None:
    assert decode_iap(frames.encode_data(payload)) == Data(payload)
    assert decode_native(frames.encode_data(payload)) == Data(payload)


@given(received=u64)
def test_ack_round_trip(received: int) -> None:
    assert decode_iap(frames.encode_ack(received)) == Ack(received)


@given(received=u64)
def test_reconnect_ack_round_trip(received: int) -> None:
    assert decode_iap(frames.encode_reconnect_ack(received)) == ReconnectAck(received)


@given(sid=st.binary(min_size=1, max_size=MAX_SID))
def test_sid_round_trip(sid: bytes) -> None:
    assert decode_iap(frames.encode_sid(sid)) == Sid(sid)


@given(offset=u64)
def test_eof_round_trip(offset: int) -> None:
    assert decode_native(frames.encode_eof(offset)) == Eof(offset)


@given(code=st.integers(min_value=0, max_value=0xFFFF), message=st.text(max_size=300))
def test_close_round_trip(code: int, message: str) -> None:
    assert decode_native(frames.encode_close(code, message)) == Close(code, message)


@given(token=st.binary(min_size=1, max_size=2048))
def test_reauth_round_trip(token: bytes) -> None:
    assert decode_native(frames.encode_reauth(token)) == Reauth(token)


@given(expires=u64)
def test_reauth_ok_round_trip(expires: int) -> None:
    assert decode_native(frames.encode_reauth_ok(expires)) == ReauthOk(expires)


@given(deadline=u64)
def test_reauth_required_round_trip(deadline: int) -> None:
    assert decode_native(frames.encode_reauth_required(deadline)) == ReauthRequired(deadline)


# -- malformed frames -----------------------------------------------------------------------------


def _hdr32(tag: int, length: int) -> bytes:
    return struct.pack(">HI", tag, length)


INVALID_DATA_BOTH = [
    pytest.param(b"", id="empty-message"),
    pytest.param(b"\x00", id="one-byte"),
    pytest.param(b"\x00\x04", id="data-tag-only"),
    pytest.param(b"\x00\x04\x00\x00\x00", id="data-truncated-length"),
    pytest.param(_hdr32(Tag.DATA, 5) + b"hell", id="data-short-payload"),
    pytest.param(_hdr32(Tag.DATA, 5) + b"hello!", id="data-long-payload"),
    pytest.param(_hdr32(Tag.DATA, 0), id="data-empty"),
    pytest.param(_hdr32(Tag.DATA, 0xFFFFFFFF) + b"x", id="data-huge-length"),
    pytest.param(b"\x00\x07" + b"\x00" * 7, id="ack-short"),
    pytest.param(b"\x00\x07" + b"\x00" * 9, id="ack-long"),
    pytest.param(b"\x00\x07", id="ack-tag-only"),
    pytest.param(b"\x00\x02" + b"\x00" * 7, id="reconnect-ack-short"),
    pytest.param(b"\x00\x02" + b"\x00" * 9, id="reconnect-ack-long"),
    pytest.param(b"\x00\x01\x00\x00", id="sid-truncated"),
    pytest.param(_hdr32(Tag.SID, 0), id="sid-empty"),
    pytest.param(_hdr32(Tag.SID, 4) + b"abc", id="sid-short"),
    pytest.param(_hdr32(Tag.SID, 2) + b"abc", id="sid-long"),
    pytest.param(_hdr32(Tag.SID, MAX_SID + 1) + b"s" * (MAX_SID + 1), id="sid-oversize"),
]


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("message", INVALID_DATA_BOTH)
def test_malformed_shared_frames_are_invalid_data(dialect: Dialect, message: bytes) -> None:
    with pytest.raises(InvalidData) as info:
        decode_with(dialect, message)
    assert info.value.code == 4013


def test_oversize_data_on_iap() -> None:
    with pytest.raises(InvalidData) as info:
        decode_iap(frames.encode_data(b"x" * (16 * 1024 + 1)))
    assert info.value.code == 4013


def test_oversize_data_on_native() -> None:
    with pytest.raises(InvalidData) as info:
        decode_native(frames.encode_data(b"x" * (64 * 1024 + 1)))
    assert info.value.code == 4013


def test_native_sized_data_is_oversize_on_iap() -> None:
    message = frames.encode_data(b"x" * NATIVE.max_data)
    assert decode_native(message) == Data(b"x" * NATIVE.max_data)
    with pytest.raises(InvalidData):
        decode_iap(message)


NATIVE_FRAMES = [
    pytest.param(frames.encode_eof(0), id="eof"),
    pytest.param(frames.encode_close(1000, "bye"), id="close"),
    pytest.param(frames.encode_reauth(b"token"), id="reauth"),
    pytest.param(frames.encode_reauth_ok(1), id="reauth-ok"),
    pytest.param(frames.encode_reauth_required(1), id="reauth-required"),
]


@pytest.mark.parametrize("message", NATIVE_FRAMES)
def test_native_tags_are_invalid_on_iap(message: bytes) -> None:
    with pytest.raises(InvalidTag) as info:
        decode_iap(message)
    assert info.value.code == 4008


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("tag", [0x0000, 0x0003, 0x0005, 0x0006, 0x0008, 0x000F, 0x0015, 0xFFFF])
def test_unknown_tags_are_invalid(dialect: Dialect, tag: int) -> None:
    message = struct.pack(">HQ", tag, 0)
    with pytest.raises(InvalidTag) as info:
        decode_with(dialect, message)
    assert info.value.code == 4008


def test_unknown_tag_alone_is_invalid_tag() -> None:
    with pytest.raises(InvalidTag):
        decode_native(b"\x00\x03")


NATIVE_MALFORMED = [
    pytest.param(b"\x00\x10" + b"\x00" * 7, id="eof-short"),
    pytest.param(b"\x00\x10" + b"\x00" * 9, id="eof-long"),
    pytest.param(b"\x00\x13" + b"\x00" * 7, id="reauth-ok-short"),
    pytest.param(b"\x00\x14" + b"\x00" * 9, id="reauth-required-long"),
    pytest.param(_hdr32(Tag.REAUTH, 0), id="reauth-empty"),
    pytest.param(_hdr32(Tag.REAUTH, 3) + b"ab", id="reauth-short"),
    pytest.param(_hdr32(Tag.REAUTH, MAX_TOKEN + 1) + b"t" * (MAX_TOKEN + 1), id="reauth-oversize"),
    pytest.param(b"\x00\x11\x03\xe8\x00\x00", id="close-truncated"),
    pytest.param(struct.pack(">HHI", Tag.CLOSE, 1000, 3) + b"ab", id="close-short"),
    pytest.param(struct.pack(">HHI", Tag.CLOSE, 1000, 1) + b"ab", id="close-long"),
    pytest.param(
        struct.pack(">HHI", Tag.CLOSE, 1000, MAX_CLOSE_MESSAGE + 1) + b"m" * 1025,
        id="close-oversize",
    ),
    pytest.param(struct.pack(">HHI", Tag.CLOSE, 1000, 2) + b"\xff\xfe", id="close-not-utf8"),
    pytest.param(struct.pack(">HHI", Tag.CLOSE, 1000, 2) + b"\xe2\x82", id="close-cut-utf8"),
    pytest.param(struct.pack(">HHI", Tag.CLOSE, 1000, 3) + b"\xed\xa0\x80", id="close-surrogate"),
]


@pytest.mark.parametrize("message", NATIVE_MALFORMED)
def test_malformed_native_frames_are_invalid_data(message: bytes) -> None:
    with pytest.raises(InvalidData) as info:
        decode_native(message)
    assert info.value.code == 4013


def test_non_utf8_close_chains_the_decode_error() -> None:
    with pytest.raises(InvalidData) as info:
        decode_native(struct.pack(">HHI", Tag.CLOSE, 4000, 1) + b"\x80")
    assert isinstance(info.value.__cause__, UnicodeDecodeError)


def test_error_tree() -> None:
    assert issubclass(InvalidData, ProtocolError)
    assert issubclass(InvalidTag, ProtocolError)
    assert issubclass(ProtocolError, TunnelError)
    error = InvalidData()
    assert error.code == 4013
    assert error.reason == "invalid data"
    assert InvalidTag("x", code=4000).code == 4000
    assert InvalidTag().code == 4008


def test_close_code_values() -> None:
    assert {code.name: int(code) for code in CloseCode if 4000 <= code < 4100} == {
        "UNKNOWN_ERROR": 4000,
        "SID_UNKNOWN": 4001,
        "SID_IN_USE": 4002,
        "FAILED_TO_CONNECT_TO_BACKEND": 4003,
        "REAUTHENTICATION_REQUIRED": 4004,
        "BAD_ACK": 4005,
        "INVALID_ACK": 4006,
        "INVALID_WEBSOCKET_OPCODE": 4007,
        "INVALID_TAG": 4008,
        "DESTINATION_WRITE_FAILED": 4009,
        "DESTINATION_READ_FAILED": 4010,
        "INVALID_DATA": 4013,
        "NOT_AUTHORIZED": 4033,
        "LOOKUP_FAILED": 4047,
        "LOOKUP_FAILED_RECONNECT": 4051,
        "FAILED_TO_REWIND": 4074,
    }
    assert int(CloseCode.RESUME_BUFFER_OVERFLOW) == 4103
