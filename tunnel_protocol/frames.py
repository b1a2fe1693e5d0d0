"""Frame codec shared by both subprotocols: one frame per binary WebSocket message, big-endian.

Layout (IAP relay v4, extended by the native subprotocol with tags 0x0010-0x0014):

    0x0001 SID                u16 tag, u32 len, sid bytes
    0x0002 RECONNECT_ACK      u16 tag, u64 bytes received from the peer
    0x0004 DATA               u16 tag, u32 len, payload (1..max_data bytes)
    0x0007 ACK                u16 tag, u64 cumulative bytes received
    0x0010 EOF        native  u16 tag, u64 stream offset at which the sender's direction ends
    0x0011 CLOSE      native  u16 tag, u16 close code, u32 len, UTF-8 message
    0x0012 REAUTH     native  u16 tag, u32 len, fresh bearer token (client -> server)
    0x0013 REAUTH_OK  native  u16 tag, u64 unix time the new credential expires (0: none)
    0x0014 REAUTH_REQ native  u16 tag, u64 unix time by which the client must re-authenticate
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from .errors import InvalidData, InvalidTag

MAX_SID = 256
MAX_TOKEN = 16 * 1024
MAX_CLOSE_MESSAGE = 1024


class Tag(IntEnum):
    SID = 0x0001
    RECONNECT_ACK = 0x0002
    DATA = 0x0004
    ACK = 0x0007
    EOF = 0x0010
    CLOSE = 0x0011
    REAUTH = 0x0012
    REAUTH_OK = 0x0013
    REAUTH_REQUIRED = 0x0014


NATIVE_ONLY_TAGS = frozenset({Tag.EOF, Tag.CLOSE, Tag.REAUTH, Tag.REAUTH_OK, Tag.REAUTH_REQUIRED})

_U16 = struct.Struct(">H")
_TAG_U32 = struct.Struct(">HI")
_TAG_U64 = struct.Struct(">HQ")
_TAG_U16_U32 = struct.Struct(">HHI")


@dataclass(frozen=True, slots=True)
class Sid:
    sid: bytes


@dataclass(frozen=True, slots=True)
class ReconnectAck:
    received: int


@dataclass(frozen=True, slots=True)
class Data:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    received: int


@dataclass(frozen=True, slots=True)
class Eof:
    offset: int


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Reauth:
    token: bytes


@dataclass(frozen=True, slots=True)
class ReauthOk:
    expires: int


@dataclass(frozen=True, slots=True)
class ReauthRequired:
    deadline: int


Frame = Sid | ReconnectAck | Data | Ack | Eof | Close | Reauth | ReauthOk | ReauthRequired


def encode_sid(sid: bytes) -> bytes:
    return _TAG_U32.pack(Tag.SID, len(sid)) + sid


def encode_reconnect_ack(received: int) -> bytes:
    return _TAG_U64.pack(Tag.RECONNECT_ACK, received)


def encode_data(payload: bytes | memoryview) -> bytes:
    return _TAG_U32.pack(Tag.DATA, len(payload)) + payload


def encode_ack(received: int) -> bytes:
    return _TAG_U64.pack(Tag.ACK, received)


def encode_eof(offset: int) -> bytes:
    return _TAG_U64.pack(Tag.EOF, offset)


def encode_close(code: int, message: str) -> bytes:
    # "replace": reasons come from str(exception) and may hold lone surrogates.
    raw = message.encode("utf-8", "replace")[:MAX_CLOSE_MESSAGE]
    # Never cut a UTF-8 sequence in half: the peer decodes strictly.
    raw = raw.decode("utf-8", "ignore").encode("utf-8")
    return _TAG_U16_U32.pack(Tag.CLOSE, code, len(raw)) + raw


def encode_reauth(token: bytes) -> bytes:
    return _TAG_U32.pack(Tag.REAUTH, len(token)) + token


def encode_reauth_ok(expires: int) -> bytes:
    return _TAG_U64.pack(Tag.REAUTH_OK, expires)


def encode_reauth_required(deadline: int) -> bytes:
    return _TAG_U64.pack(Tag.REAUTH_REQUIRED, deadline)


def _length_prefixed(message: bytes, header: struct.Struct, limit: int, what: str) -> bytes:
    if len(message) < header.size:
        raise InvalidData(f"truncated {what} frame")
    length = header.unpack_from(message)[-1]
    if length > limit:
        raise InvalidData(f"{what} length {length} exceeds {limit}")
    if len(message) != header.size + length:
        raise InvalidData(f"{what} length {length} does not match frame size {len(message)}")
    return message[header.size :]


def _u64(message: bytes, what: str) -> int:
    if len(message) != _TAG_U64.size:
        raise InvalidData(f"{what} frame must be {_TAG_U64.size} bytes, got {len(message)}")
    value: int = _TAG_U64.unpack(message)[1]
    return value


def decode(message: bytes, *, max_data: int, native: bool) -> Frame:
    """Decode one WebSocket message into a frame.

    Raises InvalidTag for a tag the subprotocol does not define (native tags are invalid on the
    IAP subprotocol) and InvalidData for any malformed frame.
    """
    if len(message) < 2:
        raise InvalidData("frame shorter than its tag")
    tag = _U16.unpack_from(message)[0]
    if tag == Tag.DATA:
        payload = _length_prefixed(message, _TAG_U32, max_data, "DATA")
        if not payload:
            raise InvalidData("empty DATA frame")
        return Data(payload)
    if tag == Tag.ACK:
        return Ack(_u64(message, "ACK"))
    if tag == Tag.SID:
        sid = _length_prefixed(message, _TAG_U32, MAX_SID, "SID")
        if not sid:
            raise InvalidData("empty SID")
        return Sid(sid)
    if tag == Tag.RECONNECT_ACK:
        return ReconnectAck(_u64(message, "RECONNECT_ACK"))
    if not native or tag not in NATIVE_ONLY_TAGS:
        raise InvalidTag(f"invalid tag 0x{tag:04x}")
    if tag == Tag.EOF:
        return Eof(_u64(message, "EOF"))
    if tag == Tag.REAUTH:
        token = _length_prefixed(message, _TAG_U32, MAX_TOKEN, "REAUTH")
        if not token:
            raise InvalidData("empty REAUTH token")
        return Reauth(token)
    if tag == Tag.REAUTH_OK:
        return ReauthOk(_u64(message, "REAUTH_OK"))
    if tag == Tag.REAUTH_REQUIRED:
        return ReauthRequired(_u64(message, "REAUTH_REQUIRED"))
    # Tag.CLOSE
    raw = _length_prefixed(message, _TAG_U16_U32, MAX_CLOSE_MESSAGE, "CLOSE")
    code = _U16.unpack_from(message, 2)[0]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidData("CLOSE message is not UTF-8") from exc
    return Close(code, text)
