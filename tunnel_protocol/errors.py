"""Exception tree of the protocol core. A peer that breaks the protocol is a ``TunnelError``,
which carries the close code it maps to on the wire; a caller that uses the protocol objects
wrongly (a programming error in this process) is a ``LocalProtocolError``, never sent.

LocalProtocolError (RuntimeError)  the caller misused a Tunnel: no wire code

TunnelError (code)
├── ProtocolError            the peer broke the protocol (bad frame, bad ack, ...)
│   ├── InvalidTag           4008
│   ├── InvalidData          4013  (truncated frame, bad length, data too large)
│   ├── InvalidAck           4006  (ack beyond what was sent)
│   └── BadAck               4005  (ack went backwards)
├── RewindFailed             4074  a resume asked for bytes no longer buffered
└── ResumeBufferOverflow     4103  more was offered than the bounded resume buffer holds
"""

from __future__ import annotations

from .codes import CloseCode, describe


class LocalProtocolError(RuntimeError):
    """The caller used a protocol object wrongly (sent on the wrong side or after EOF, a
    native-only frame on IAP, attached twice): a bug here, not the peer's fault."""


class TunnelError(Exception):
    """Base class: ``code`` is the WebSocket close code this error is reported with."""

    code: int = CloseCode.UNKNOWN_ERROR

    def __init__(self, message: str = "", *, code: int | None = None) -> None:
        if code is not None:
            self.code = code
        super().__init__(message or describe(self.code))

    @property
    def reason(self) -> str:
        return str(self)


class ProtocolError(TunnelError):
    code = CloseCode.PROTOCOL_ERROR


class InvalidTag(ProtocolError):
    code = CloseCode.INVALID_TAG


class InvalidData(ProtocolError):
    code = CloseCode.INVALID_DATA


class InvalidAck(ProtocolError):
    code = CloseCode.INVALID_ACK


class BadAck(ProtocolError):
    code = CloseCode.BAD_ACK


class RewindFailed(TunnelError):
    code = CloseCode.FAILED_TO_REWIND


class ResumeBufferOverflow(TunnelError):
    code = CloseCode.RESUME_BUFFER_OVERFLOW
